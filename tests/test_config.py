"""Configs: inheritance, overrides, and one-line errors for every kind of bad input."""
from __future__ import annotations

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
    assert cfg.MODEL.TYPE == "vit"


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
