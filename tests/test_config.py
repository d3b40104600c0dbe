"""Configs: inheritance, overrides, and one-line errors for every kind of bad input."""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import yaml

import models
from config import ConfigError, load_config
from lr_scheduler import scaled_lrs
from model_config import build_model
from utils import count_params

from tests.conftest import (QUICK, ROOT, RUN, assert_untouched, one_error_line, one_line_error, previous_run,
                            run_cmd, run_main)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each


# -------------------------------------------------------------- 4, 9. one line, not silent
@pytest.mark.parametrize("opts, message", [
    (["MODEL.VIT.NUM_HEADS", "5"],
     "config error: --opts: MODEL.VIT.NUM_HEADS: model 'vit_tiny_patch2_32': num_heads 5 does not divide the width 64"),
    (["DATA.IMG_SIZE", "9"],
     "config error: --opts: DATA.IMG_SIZE: model 'vit_tiny_patch2_32': img_size 9 is not a multiple of patch_size 2"),
    (["MODEL.VIT.DEPTH", "0"], "config error: --opts: MODEL.VIT.DEPTH: model 'vit_tiny_patch2_32': depth must be >= 1, got 0"),
    (["MODEL.NAME", "None"], "config error: --opts: wrong type for MODEL.NAME: expected a string, got None"),
    (["TAG", "None"], "config error: --opts: wrong type for TAG: expected a string, got None"),
    (["OUTPUT", "None"], "config error: --opts: wrong type for OUTPUT: expected a string, got None"),
    (["DATA.IMG_SIZE", "None"], "config error: --opts: wrong type for DATA.IMG_SIZE: expected an integer, got None"),
    (["DATA.STD", "[0, 0, 0]"], "config error: --opts: DATA.STD: every value must be > 0 (inputs are divided by it), got [0.0, 0.0, 0.0]"),
    (["TRAIN.EPOCHS", "'1'"], "config error: --opts: wrong type for TRAIN.EPOCHS: expected an integer, got '1'"),
    (["TAG", "../../x"], "config error: --opts: TAG: '../../x' is not a run name: use a non-empty name without path separators"),
    (["TAG", "''"], "config error: --opts: TAG: '' is not a run name: use a non-empty name without path separators"),
    (["DEVICE", "cuda"], "error: --device cuda: this machine has no CUDA device (torch.cuda.is_available() is False); use --device cpu or auto"),
    (["MODEL.NAME", "VIT_TINY_PATCH4_32"], "config error: --opts: MODEL.NAME: unknown model 'VIT_TINY_PATCH4_32'; did you mean vit_tiny_patch4_32?"),
    # rows that start with a flag are the command's flags, not --opts
    (["--data-path", "/tmp"], "config error: --data-path: DATA.DATA_PATH: DATA.DATASET digits reads no folder (scikit-learn's 8x8 digits ship with it): leave DATA.DATA_PATH empty (train.sh, evaluate.sh and train_slurm.sh pass $DATA_PATH as --data-path)"),
    (["--test-crop-pct", "1.5"], "config error: --test-crop-pct: TEST.CROP_PCT: must be in (0, 1], got 1.5"),
    (["--batch-size", "7"], "config error: --batch-size: DATA.BATCH_SIZE: 7 is odd: mixup/cutmix (AUG.MIXUP 0.2) pair each image with another of its batch (timm's Mixup), so the per-process batch must be even; or turn them off"),
])
def test_values_the_model_or_the_framework_refuse_are_one_line(opts, message, capsys, out_dir):
    if "cuda" in opts and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = opts if opts[0].startswith("--") else ["--opts", *opts]
    assert one_line_error(capsys, "--cfg", QUICK, "--output", str(out_dir), *args) == message
    assert not out_dir.exists() or not any(out_dir.iterdir())  # before anything is written


@pytest.mark.parametrize("args, source", [(["--device", "cuda:1"], "--device"), (["--opts", "DEVICE", "cuda:1"], "--opts")])
def test_one_gpu_for_several_processes_is_one_line_before_anything_is_written(args, source, capsys, out_dir,
                                                                                monkeypatch):
    """Rank 0 of 2 as torchrun starts it (no peer is needed: the check comes before the group)."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    assert one_line_error(capsys, "--cfg", QUICK, "--output", str(out_dir), *args) == (
        f"config error: {source}: DEVICE: cuda:1 with 2 processes puts every rank on one GPU (NCCL refuses a "
        f"duplicate GPU); use cuda or auto, which give each process the GPU of its LOCAL_RANK, and "
        f"CUDA_VISIBLE_DEVICES to choose the GPUs")
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_bad_files_flags_and_combinations_are_one_line(tmp_path, capsys, out_dir):
    def config(text: str | bytes) -> str:
        path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    base = f"BASE: [{ROOT / QUICK}]\n"
    assert one_line_error(capsys, "--cfg", config(base + "MODEL:\n  NAME:\n")) == \
        f"config error: {os.path.relpath(tmp_path)}/c0.yaml: wrong type for MODEL.NAME: expected a string, got None"
    assert "wrong type for TRAIN.EPOCHS: expected an integer, got '1'" in \
        one_line_error(capsys, "--cfg", config(base + 'TRAIN: {EPOCHS: "1"}\n'))
    assert "not UTF-8 text" in one_line_error(capsys, "--cfg", config(base.encode() + b"TAG: caf\xe9\n"))
    assert "the config file is empty" in one_line_error(capsys, "--cfg", config(""))
    assert load_config(config(f"BASE: {ROOT / QUICK}\n")).MODEL.NAME == RUN  # a BASE string is one file
    assert load_config(QUICK, ["TRAIN.WEIGHT_DECAY", "0"]).TRAIN.WEIGHT_DECAY == 0.0  # an int widens
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = one_line_error(capsys, "--cfg", QUICK, "--output", str(a_file))
    assert err.startswith(f"error: cannot write the run folder {a_file}/") and "Not a directory" in err
    err = one_line_error(capsys, "--cfg", QUICK, "--output", "/proc/no_such_output")
    assert err.startswith("error: cannot write the run folder /proc/no_such_output/")
    (out_dir / RUN / "logdir" / "log_rank0.txt").mkdir(parents=True)  # the log file cannot be opened
    assert "cannot write the log file" in one_line_error(capsys, "--cfg", QUICK, "--output", str(out_dir),
                                                         "--tag", "logdir")
    ckpt = tmp_path / "w.pth"
    torch.save({"model": {}}, ckpt)
    assert "--eval and --throughput together" in one_line_error(capsys, "--cfg", QUICK, "--eval", "--throughput",
                                                                "--resume", str(ckpt))
    assert "pass the one to evaluate" in one_line_error(capsys, "--cfg", QUICK, "--eval", "--resume", str(ckpt),
                                                        "--pretrained", str(ckpt))


# --------------------------------------------------------------------- 10. start-up time
def test_help_and_config_mistakes_answer_before_torch_loads():
    for args in (["--help"], ["--cfg", QUICK, "--opts", "TRAIN.EPOCHZ", "1"]):
        start = time.perf_counter()
        result = run_main(*args)
        took = time.perf_counter() - start
        assert result.returncode in (0, 2) and took < 2.0, (args, took)
    probe = run_cmd([sys.executable, "-c", "import sys, config, flags, model_config; print('torch' in sys.modules)"])
    assert probe.returncode == 0 and probe.stdout.strip() == "False", probe.stdout + probe.stderr


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("case", ["unknown key", "wrong type", "BASE cycle", "duplicate key", "duplicate key in a BASE"])
def test_bad_config_through_main(tmp_path, out_dir, case):
    """A typo, a value of the wrong type, a BASE cycle or a key given twice (YAML would drop
    the first silently), in the file or its BASE: one line naming the key (or the cycle), the
    file (and the lines), before the run folder is touched."""
    before = previous_run(out_dir, ["--cfg", QUICK, "--output", str(out_dir)])
    base = {"BASE": [str(ROOT / QUICK)]}
    if case == "unknown key":
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, "TRAIN": {"EPOCHZ": 3}}))
        needles = ["unknown config key TRAIN.EPOCHZ", "bad.yaml"]
    elif case == "wrong type":
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, "DATA": {"SKIP_BAD_IMAGES": "often"}}))
        needles = ["wrong type for DATA.SKIP_BAD_IMAGES", "bad.yaml"]
    elif case.startswith("duplicate key"):
        if "BASE" in case:  # a key twice in a nested mapping of a BASE
            (tmp_path / "base.yaml").write_text(f"BASE: [{ROOT / QUICK}]\nAUG:\n  MIXUP: 0.0\n  MIXUP: 0.1\n")
            (tmp_path / "bad.yaml").write_text("BASE: [base.yaml]\n")
            needles = [f"{tmp_path / 'base.yaml'}: AUG.MIXUP is given twice, at lines 3 and 4 (BASE of "
                       f"{os.path.relpath(tmp_path / 'bad.yaml')})"]
        else:  # the whole first TRAIN block would be dropped
            (tmp_path / "bad.yaml").write_text(f"BASE: [{ROOT / QUICK}]\nTRAIN: {{EPOCHS: 1}}\nTAG: x\n"
                                               f"TRAIN:\n  WARMUP_EPOCHS: 0\n")
            needles = [f"{tmp_path / 'bad.yaml'}: TRAIN is given twice, at lines 2 and 4"]
    else:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"BASE": ["other.yaml"]}))
        (tmp_path / "other.yaml").write_text(yaml.safe_dump({"BASE": ["bad.yaml"]}))
        needles = ["BASE cycle", "bad.yaml -> ", "other.yaml -> ", "bad.yaml"]
    line = one_error_line(run_main("--cfg", str(tmp_path / "bad.yaml"), "--output", str(out_dir)))
    assert line.startswith("config error: ")
    for needle in needles:
        assert needle in line, line
    assert_untouched(before)


SEED004 = "configs/vit/vit_seed004_patch2_32_cifar10.yaml"


SEED003 = "configs/vit/vit_base_patch16_224_seed003.yaml"


def test_seed004_model_has_the_summarys_parameters_layer_by_layer(tmp_path):
    """The seed's torchinfo summary: 2,725,632 parameters without a classifier (its head is
    an Identity); per block 384 + 148,224 (attention) + 384 + 148,032 (MLP); 49,536 for CLS and
    257 position embeddings, 2,496 for the 2x2 patch embedding, 384 for the final norm."""
    cfg = load_config(SEED004, ["DATA.DATA_PATH", str(tmp_path)])
    model = build_model(cfg)
    assert count_params(model) == 2_725_632 + 192 * 10 + 10  # + the 10-class head
    model.reset_classifier(0)
    assert count_params(model) == 2_725_632
    assert len(model.blocks) == 9 and model.patch_embed.grid_size == (16, 16)
    block = model.blocks[0]
    assert count_params(block.attn) == 148_224 and count_params(block.mlp) == 148_032
    assert count_params(block.norm1) == count_params(block.norm2) == 384
    assert model.pos_embed.numel() + model.cls_token.numel() == 49_536
    assert count_params(model.patch_embed) == 2_496 and count_params(model.norm) == 384
    assert block.attn.num_heads == 12 and model(torch.randn(1, 3, 32, 32)).shape == (1, 192)


def test_seed004_recipe_keys(tmp_path):
    cfg = load_config(SEED004, ["DATA.DATA_PATH", str(tmp_path)])
    assert (cfg.DATA.DATASET, cfg.DATA.IMG_SIZE, cfg.DATA.BATCH_SIZE) == ("cifar10", 32, 128)
    assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS, cfg.TRAIN.WEIGHT_DECAY) == (100, 10, 0.1)
    assert scaled_lrs(cfg, total_batch=256) == pytest.approx((1e-3, 1e-6, 1e-6))  # 1e-3 per 256 images
    assert (cfg.TRAIN.OPTIMIZER.NAME, cfg.TRAIN.LR_SCHEDULER.NAME) == ("adamw", "cosine")
    assert (cfg.MODEL.LABEL_SMOOTHING, cfg.MODEL.DROP_PATH_RATE) == (0.1, 0.1)
    assert (cfg.AUG.AUTO_AUGMENT, cfg.AUG.HFLIP, cfg.AUG.CROP_PAD, cfg.AUG.REPROB) == ("trivialaugment", 0.5, 4, 0.1)
    assert cfg.AUG.MIXUP == cfg.AUG.CUTMIX == 0.0


def test_seed003_recipe_keys(tmp_path):
    cfg = load_config(SEED003, ["DATA.DATA_PATH", str(tmp_path)])
    assert cfg.MODEL.NAME == "vit_base_patch16_224" and cfg.DATA.IMG_SIZE == 224
    with torch.device("meta"):
        assert count_params(models.create_model(cfg.MODEL.NAME)) == 86_567_656  # ViT-B/16
    assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS) == (300, 30)
    assert cfg.DATA.BATCH_SIZE == 384  # per GPU; lr 0.01 at the seed's 4 GPUs
    assert scaled_lrs(cfg, total_batch=4 * 384)[0] == pytest.approx(0.01)
    assert scaled_lrs(cfg, total_batch=8 * 384)[0] == pytest.approx(0.02)  # scaled linearly beyond
    assert cfg.TRAIN.WEIGHT_DECAY == 0.1 and cfg.TRAIN.OPTIMIZER.NAME == "adamw"
    assert (cfg.TRAIN.CLIP_GRAD, cfg.TRAIN.CLIP_MODE) == (1.0, "norm")
    assert cfg.AUG.AUTO_AUGMENT.startswith("rand-m9")
    assert (cfg.AUG.MIXUP, cfg.AUG.CUTMIX, cfg.MODEL.LABEL_SMOOTHING) == (0.2, 1.0, 0.1)


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_base_inheritance_is_relative_to_the_file_and_opts_win(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", {"DATA": {"DATASET": "digits", "BATCH_SIZE": 6},
                                   "MODEL": {"NAME": "vit_tiny_patch2_32", "NUM_CLASSES": 10}})
    child = write(tmp_path / "sub" / "child.yaml", {"BASE": ["../base.yaml"], "DATA": {"BATCH_SIZE": 8}})
    cfg = load_config(child, ["TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "MODEL.VIT.DEPTH", "2"])
    assert cfg.DATA.DATASET == "digits" and cfg.DATA.BATCH_SIZE == 8
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
    """As a user loads it: with a data folder where its dataset asks for one (digits reads none)."""
    from pathlib import Path

    def error(path: Path, opts: list[str]) -> str:
        try:
            load_config(str(path), opts)
        except ConfigError as e:
            return str(e)
        return ""

    failures = []
    for path in sorted(Path(ROOT, "configs").rglob("*.yaml")):
        failure = error(path, [])
        if "DATA.DATA_PATH: required" in failure:
            failure = error(path, ["DATA.DATA_PATH", str(ROOT)])
        failures += [failure] if failure else []
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
