"""Configs: inheritance, overrides, and one-line errors for every kind of bad input."""
from __future__ import annotations

import os

import pytest
import yaml

from config import ConfigError, load_config
from tests.conftest import run_main


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_base_inheritance_is_relative_to_the_file_and_opts_win(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", {"DATA": {"DATASET": "digits", "BATCH_SIZE": 7},
                                   "MODEL": {"NAME": "vit_tiny_patch2_32", "NUM_CLASSES": 10}})
    child = write(tmp_path / "sub" / "child.yaml", {"BASE": ["../base.yaml"], "DATA": {"BATCH_SIZE": 9}})
    cfg = load_config(child, ["TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "MODEL.VIT.DEPTH", "2"])
    assert cfg.DATA.DATASET == "digits" and cfg.DATA.BATCH_SIZE == 9
    assert cfg.TRAIN.EPOCHS == 3 and cfg.MODEL.VIT.DEPTH == 2
    assert "VIT" in cfg.MODEL  # the family section of MODEL.NAME


@pytest.mark.parametrize("data, opts, needle", [
    ({"TRAIN": {"EPOCHZ": 3}}, [], "unknown config key TRAIN.EPOCHZ"),
    ({"TRAIN": {"EPOCHS": "many"}}, [], "wrong type for TRAIN.EPOCHS"),
    ({"TRAIN": {"OPTIMIZER": {"NAME": "adamm"}}}, [], "TRAIN.OPTIMIZER.NAME: 'adamm' is not one of"),
    ({"MODEL": {"NAME": "vit_tiny_patch3_32"}}, [], "MODEL.NAME: unknown model 'vit_tiny_patch3_32'"),
    ({"MODEL": {"VIT": {"EMBED_DIMM": 3}}}, [], "takes no argument 'embed_dimm' (did you mean embed_dim?)"),
    ({"MODEL": {"VIT": {"DEPTH": "deep"}}}, [], "MODEL.VIT.DEPTH: depth: expected int"),
    ({"DATA": {"BATCH_SIZE": 0}}, [], "DATA.BATCH_SIZE: must be > 0"),
    ({}, ["DATA.NOPE", "1"], "--opts: unknown config key DATA.NOPE"),
    ({}, ["TRAIN.EPOCHS"], "odd count"),
])
def test_bad_values_name_the_key_and_the_file(tmp_path, data, opts, needle):
    base = {"DATA": {"DATASET": "digits"}, "MODEL": {"NAME": "vit_tiny_patch2_32", "NUM_CLASSES": 10}}
    for key, value in data.items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.update({key: value})
    path = write(tmp_path / "bad.yaml", base)
    with pytest.raises(ConfigError) as info:
        load_config(path, opts)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    if not opts:
        assert "bad.yaml" in message


def test_missing_files_and_data_paths(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    path = write(tmp_path / "in.yaml", {"DATA": {"DATASET": "imagenet", "DATA_PATH": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError, match="DATA.DATA_PATH: dataset folder not found"):
        load_config(path)
    path = write(tmp_path / "nopath.yaml", {"DATA": {"DATASET": "imagenet"}})
    with pytest.raises(ConfigError, match="DATA.DATA_PATH: required"):
        load_config(path)


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", {"BASE": ["b.yaml"]})
    write(tmp_path / "b.yaml", {"BASE": ["a.yaml"]})
    with pytest.raises(ConfigError, match="BASE cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_family_section_of_another_model_is_rejected(tmp_path):
    path = write(tmp_path / "x.yaml", {"DATA": {"DATASET": "digits"},
                                       "MODEL": {"NAME": "vit_tiny_patch2_32", "DAT": {"DEPTHS": [1]}}})
    with pytest.raises(ConfigError, match="MODEL.DAT.DEPTHS: section MODEL.DAT does not apply"):
        load_config(path)


def test_main_exits_2_with_one_line_and_no_traceback(tmp_path):
    path = write(tmp_path / "typo.yaml", {"TRAIN": {"EPOCHZ": 1}})
    result = run_main("--cfg", path, "--output", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TRAIN.EPOCHZ" in lines[0] and "typo.yaml" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "vit_small_patch16_224").exists()  # failed before any work


def test_unknown_flag_is_an_error():
    result = run_main("--cfg", "configs/quickstart.yaml", "--epochs", "3")
    assert result.returncode == 2
    assert "unrecognized arguments: --epochs" in result.stderr


def test_every_shipped_config_loads():
    from pathlib import Path

    from tests.conftest import ROOT
    failures = []
    for path in sorted(Path(ROOT, "configs").rglob("*.yaml")):
        try:
            load_config(str(path), ["DATA.DATA_PATH", str(ROOT)])
        except ConfigError as e:
            failures.append(str(e))
    assert not failures, failures


def test_the_flag_table_makes_the_parser_and_names_the_source():
    """Every row of flags.FLAGS is a flag whose help names its key and whose choices are the
    key's; the value lands in the key with the flag as its source; two flags for one key
    are refused."""
    import argparse

    from config import CHOICES, source_of
    from flags import FLAGS, build_parser, config_from_args
    actions = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings}
    assert set(actions) == {"-h", "--cfg", "--opts"} | {flag.name for flag in FLAGS}
    for flag in FLAGS:
        action = actions[flag.name]
        assert flag.key in action.help and flag.help in action.help
        if flag.type is not None:
            assert action.choices == CHOICES.get(flag.key)
    assert actions["--amp"].choices == CHOICES["AMP_DTYPE"] and "off | auto" in actions["--amp"].help
    assert "(MODE eval)" in actions["--eval"].help and "(AMP_DTYPE off)" in actions["--no-amp"].help

    def parse(*argv):
        return config_from_args(build_parser().parse_args(["--cfg", "configs/quickstart.yaml", *argv]))

    cfg = parse("--eval", "--no-amp", "--test-crop-pct", "0.5")
    assert (cfg.MODE, cfg.AMP_DTYPE, cfg.TEST.CROP_PCT, cfg.MODEL.RESUME) == ("eval", "off", 0.5, "auto")
    assert [source_of(cfg, k) for k in ("MODE", "AMP_DTYPE", "TEST.CROP_PCT")] == \
        ["--eval", "--no-amp", "--test-crop-pct"]
    assert parse("--throughput").MODE == "throughput" and parse().MODE == "train"
    with pytest.raises(ConfigError, match=r"^--eval and --throughput together: both set MODE; pass one$"):
        parse("--eval", "--throughput")
    with pytest.raises(SystemExit):  # argparse's choices, from the key's
        build_parser().parse_args(["--cfg", "x", "--amp", "fp8"])
    assert isinstance(build_parser().parse_args(["--cfg", "x"]), argparse.Namespace)


@pytest.mark.parametrize("old, value, new", [
    ("AMP", False, "AMP_DTYPE (AMP false is AMP_DTYPE off)"),
    ("TRAIN.AUTO_RESUME", False, "MODEL.RESUME (MODEL.RESUME auto, the default, resumes"),
    ("TEST.CROP", False, "TEST.CROP_PCT (TEST.CROP false is TEST.CROP_PCT 1.0 with TEST.RESIZE square)"),
    ("EVAL_MODE", True, "MODE (EVAL_MODE true is MODE eval)"),
    ("THROUGHPUT_MODE", True, "MODE (THROUGHPUT_MODE true is MODE throughput)"),
    ("MODEL.VIT.LAI_SCHEDULE", [[0, 1]], "MODEL.VIT.ATTN_ARGS.SCHEDULE"),
])
def test_an_old_key_is_one_line_naming_the_new_one(tmp_path, old, value, new):
    *parents, last = old.split(".")
    data: dict = {last: value}
    for part in reversed(parents):
        data = {part: data}
    path = write(tmp_path / "old.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{os.path.relpath(path)}: {old} moved to {new}")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=f"^--opts: {old} moved to "):
        load_config(None, [old, str(value)])


@pytest.mark.parametrize("old", ["MODEL.TYPE", "TRAIN.START_EPOCH"])
def test_a_removed_key_says_why(tmp_path, old):
    section, key = old.split(".")
    with pytest.raises(ConfigError, match=rf"old.yaml: {old} was removed: "):
        load_config(write(tmp_path / "old.yaml", {section: {key: 0}}))


def test_choices_come_from_the_consumers_table(monkeypatch):
    """TRAIN.LR_SCHEDULER.NAME's choices are lr_scheduler.SCHEDULES, DATA.INTERPOLATION's
    data.transforms.INTERPOLATIONS: a name the table gains is valid, one it lacks is not."""
    import lr_scheduler
    from config import choices
    from data import transforms
    assert choices("TRAIN.LR_SCHEDULER.NAME") == tuple(lr_scheduler.SCHEDULES)
    assert choices("DATA.INTERPOLATION") == tuple(transforms.INTERPOLATIONS)
    with pytest.raises(ConfigError, match="TRAIN.LR_SCHEDULER.NAME: 'onecycle' is not one of cosine, linear"):
        load_config("configs/quickstart.yaml", ["TRAIN.LR_SCHEDULER.NAME", "onecycle"])
    monkeypatch.setitem(lr_scheduler.SCHEDULES, "onecycle", lr_scheduler.SCHEDULES["cosine"])
    assert load_config("configs/quickstart.yaml", ["TRAIN.LR_SCHEDULER.NAME", "onecycle"]).TRAIN.LR_SCHEDULER.NAME \
        == "onecycle"


def test_a_saved_config_is_read_in_todays_keys():
    """An old run's config (AMP false, TEST.CROP false, EVAL_MODE, MODEL.TYPE, LAI_SCHEDULE)
    reads as today's keys, so resuming it reports only what really changed."""
    from config import changed_keys, saved_config
    cfg = load_config("configs/vit_variants/digits_lai.yaml",
                      ["AMP_DTYPE", "off", "TEST.CROP_PCT", "1.0", "TEST.RESIZE", "square"])
    text = cfg.dump()
    assert changed_keys(text, cfg) == []
    old = yaml.safe_load(text)
    old.update(AMP=False, AMP_DTYPE="auto", EVAL_MODE=False, THROUGHPUT_MODE=False)
    del old["MODE"]
    old["MODEL"]["TYPE"] = "vit"
    old["MODEL"]["VIT"]["LAI_SCHEDULE"] = old["MODEL"]["VIT"]["ATTN_ARGS"].pop("SCHEDULE")
    old["TRAIN"].update(START_EPOCH=0, AUTO_RESUME=True)
    old["TEST"].update(CROP=False, CROP_PCT=0.875, RESIZE="shorter")
    saved = saved_config(yaml.safe_dump(old))
    assert (saved.AMP_DTYPE, saved.MODE, saved.MODEL.RESUME, saved.TEST.CROP_PCT, saved.TEST.RESIZE) == \
        ("off", "train", "auto", 1.0, "square")
    assert "TYPE" not in saved.MODEL and "START_EPOCH" not in saved.TRAIN
    assert saved.MODEL.VIT.ATTN_ARGS.SCHEDULE == cfg.MODEL.VIT.ATTN_ARGS.SCHEDULE
    assert changed_keys(yaml.safe_dump(old), cfg) == []
    old["TRAIN"]["EPOCHS"] += 1
    assert changed_keys(yaml.safe_dump(old), cfg) == [("TRAIN.EPOCHS", cfg.TRAIN.EPOCHS + 1, cfg.TRAIN.EPOCHS)]
    assert saved_config("not: [a config") is None and saved_config("TAG: x") is None
