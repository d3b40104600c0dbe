"""README's "Adding a model" and "A new attention kind", done as a user does them: new files
only (a model file, an attention file, configs) in a copy of the repository, no existing
file edited; then main.py trains each and rejects their misspelt or bad options."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cmd

TOY_ATTENTION = '''\
from .attention import Attention, register_attention


@register_attention("temperature")
class TemperatureAttention(Attention):
    """Softmax attention whose logits are divided by ``temperature``."""

    def __init__(self, dim, num_heads=8, *, temperature: float = 1.0, **base):
        super().__init__(dim, num_heads=num_heads, **base)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.scale = self.scale / temperature
'''

TOY_FAMILY = '''\
import torch.nn as nn

from .registry import register_model


class ToyNet(nn.Module):
    classifier_name = "head"

    def __init__(self, img_size: int = 8, in_chans: int = 3, num_classes: int = 10,
                 width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.features = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.GELU(),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(width * 16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


@register_model
def toynet_small(**kwargs) -> ToyNet:
    return ToyNet(**{"width": 32, **kwargs})
'''

TOY_CONFIG = '''\
DATA: {DATASET: digits, IMG_SIZE: 8, BATCH_SIZE: 32, NUM_WORKERS: 0, MEAN: [0.5, 0.5, 0.5], STD: [0.5, 0.5, 0.5]}
MODEL:
  NAME: toynet_small
  NUM_CLASSES: 10
  TOYNET:
    WIDTH: 48
TRAIN: {EPOCHS: 1, WARMUP_EPOCHS: 0, BASE_LR: 3.0e-3, LR_BASE_BATCH: 0}
AUG: {AUTO_AUGMENT: none, COLOR_JITTER: 0.0, REPROB: 0.0, HFLIP: 0.0, CROP_PAD: 0, MIXUP: 0.0, CUTMIX: 0.0}
TEST: {CROP: false}
PRINT_FREQ: 100
'''

TOY_ATTENTION_CONFIG = '''\
BASE: [quickstart.yaml]
MODEL:
  VIT:
    ATTN: temperature
    ATTN_ARGS:
      TEMPERATURE: 2.0
TRAIN: {EPOCHS: 3, WARMUP_EPOCHS: 1}
PRINT_FREQ: 100
'''


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> Path:
    """A copy of the repository's tracked files plus the four new files."""
    copy = tmp_path_factory.mktemp("extended") / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    new = {"models/toy_attention.py": TOY_ATTENTION, "models/toynet.py": TOY_FAMILY,
           "configs/toy.yaml": TOY_CONFIG, "configs/toy_attention.yaml": TOY_ATTENTION_CONFIG}
    for name, text in new.items():
        assert not (copy / name).exists()
        (copy / name).write_text(text)
    return copy


def in_copy(copy: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, *args], env={"PYTHONPATH": ""}, cwd=copy)


def test_a_new_model_family_trains_with_its_own_config_section(extended, tmp_path):
    result = in_copy(extended, "main.py", "--cfg", "configs/toy.yaml", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "toynet_small" / "default"
    record = json.loads((run / "metrics.jsonl").read_text())
    assert record["epoch"] == 0 and record["val_acc1"] > 20  # chance is 10%
    assert "WIDTH: 48" in (run / "config.yaml").read_text()
    assert "params 0.01M" in result.stdout  # 3*48*9 + 48 + 48*16*10 + 10 = 9,034 weights
    bad = in_copy(extended, "main.py", "--cfg", "configs/toy.yaml", "--output", str(tmp_path),
                  "--opts", "MODEL.TOYNET.WIDHT", "8")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "config error: --opts: MODEL.TOYNET.WIDHT: model 'toynet_small' takes no argument "
        "'widht' (did you mean width?)")
    bad = in_copy(extended, "main.py", "--cfg", "configs/toy.yaml", "--output", str(tmp_path),
                  "--opts", "MODEL.TOYNET.WIDTH", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "config error: --opts: MODEL.TOYNET.WIDTH: model 'toynet_small': width must be >= 1, got 0")


def test_a_new_attention_kind_is_selected_and_configured_through_attn_args(extended, tmp_path):
    probe = in_copy(extended, "-c", "import models; m = models.create_model('vit_tiny_patch2_32', "
                    "attn='temperature', attn_args={'temperature': 2.0}); a = m.blocks[0].attn; "
                    "print(type(a).__name__, a.scale)")
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split() == ["TemperatureAttention", str(64 ** -0.5 / 2)]
    result = in_copy(extended, "main.py", "--cfg", "configs/toy_attention.yaml", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "vit_tiny_patch2_32" / "quickstart" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["max_acc1"] > 20
    for opts, message in (
            (["MODEL.VIT.ATTN_ARGS.TEMPERATUR", "1.0"], "config error: --opts: MODEL.VIT.ATTN_ARGS.TEMPERATUR: "
             "attention 'temperature' takes no argument 'temperatur' (did you mean temperature?)"),
            (["MODEL.VIT.ATTN_ARGS.TEMPERATURE", "hot"], "config error: --opts: MODEL.VIT.ATTN_ARGS.TEMPERATURE: "
             "temperature: expected float, got str ('hot')"),
            (["MODEL.VIT.ATTN_ARGS.TEMPERATURE", "0"], "config error: --opts: MODEL.VIT.ATTN_ARGS.TEMPERATURE: "
             "model 'vit_tiny_patch2_32': temperature must be > 0, got 0")):
        bad = in_copy(extended, "main.py", "--cfg", "configs/toy_attention.yaml", "--output", str(tmp_path),
                      "--opts", *opts)
        assert bad.returncode == 2 and bad.stderr.strip() == message
