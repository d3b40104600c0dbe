"""README's "Adding a model" and "A new attention kind", done as a user does them: new files
only (a model file, an attention file, configs) in a copy of the repository, no existing
file edited; then main.py trains each and rejects their misspelt or bad options. The
attention file is README's code block itself, so the documented contract is the tested one."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, doc_block, run_two_at_a_time

ATTENTION_FILE = "models/temperature.py"
TOY_ATTENTION = doc_block("README.md", f"# {ATTENTION_FILE}")

TOY_FAMILY = '''\
import torch.nn as nn

from .registry import register_model


class ToyNet(nn.Module):
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


@register_model(pretrained_cfg=dict(classifier="head"))
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
TEST: {CROP_PCT: 1.0, RESIZE: square}
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
    new = {ATTENTION_FILE: TOY_ATTENTION, "models/toynet.py": TOY_FAMILY,
           "configs/toy.yaml": TOY_CONFIG, "configs/toy_attention.yaml": TOY_ATTENTION_CONFIG}
    for name, text in new.items():
        assert not (copy / name).exists()
        (copy / name).write_text(text)
    return copy


def in_copy(copy: Path, *commands: list[str]) -> list[subprocess.CompletedProcess]:
    """python with each argument list, in the copy, two at a time (the commands are independent)."""
    return run_two_at_a_time([[sys.executable, *args] for args in commands], env={"PYTHONPATH": ""}, cwd=copy)


@pytest.mark.slow
def test_a_new_model_family_trains_with_its_own_config_section(extended, tmp_path):
    toy = ["main.py", "--cfg", "configs/toy.yaml", "--output", str(tmp_path)]
    result, *bad = in_copy(extended, toy, [*toy, "--opts", "MODEL.TOYNET.WIDHT", "8"],
                           [*toy, "--opts", "MODEL.TOYNET.WIDTH", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "toynet_small" / "default"
    record = json.loads((run / "metrics.jsonl").read_text())
    assert record["epoch"] == 0 and record["val_acc1"] > 20  # chance is 10%
    assert "WIDTH: 48" in (run / "config.yaml").read_text()
    assert "params 0.01M" in result.stdout  # 3*48*9 + 48 + 48*16*10 + 10 = 9,034 weights
    assert [(b.returncode, b.stderr.strip()) for b in bad] == [
        (2, "config error: --opts: MODEL.TOYNET.WIDHT: model 'toynet_small' takes no argument "
            "'widht' (did you mean width?)"),
        (2, "config error: --opts: MODEL.TOYNET.WIDTH: model 'toynet_small': width must be >= 1, got 0")]


PROBE = """\
import torch, models
a = models.create_model('vit_tiny_patch2_32', attn='temperature', attn_args={'temperature': 2.0}).blocks[0].attn
plain = models.create_model('vit_tiny_patch2_32').blocks[0].attn
plain.load_state_dict(a.state_dict())
plain.scale = plain.scale / 2
x = torch.randn(2, 5, 192)
print(type(a).__name__, a.temperature, torch.allclose(a(x), plain(x), atol=1e-6))
try:
    a(x, attn_mask=torch.zeros(5, 5))
except ValueError as e:
    print(e)
"""


@pytest.mark.slow
def test_a_new_attention_kind_is_selected_and_configured_through_attn_args(extended, tmp_path):
    """README's kind as printed: its attend(q, k, v) divides the logits by the temperature
    (the plain layer at half the scale gives the same), refuses a mask, and trains."""
    train = ["main.py", "--cfg", "configs/toy_attention.yaml", "--output", str(tmp_path)]
    mistakes = (
        (["MODEL.VIT.ATTN_ARGS.TEMPERATUR", "1.0"], "config error: --opts: MODEL.VIT.ATTN_ARGS.TEMPERATUR: "
         "attention 'temperature' takes no argument 'temperatur' (did you mean temperature?)"),
        (["MODEL.VIT.ATTN_ARGS.TEMPERATURE", "hot"], "config error: --opts: MODEL.VIT.ATTN_ARGS.TEMPERATURE: "
         "temperature: expected float, got str ('hot')"),
        (["MODEL.VIT.ATTN_ARGS.TEMPERATURE", "0"], "config error: --opts: MODEL.VIT.ATTN_ARGS.TEMPERATURE: "
         "model 'vit_tiny_patch2_32': temperature must be > 0, got 0"))
    result, probe, *bad = in_copy(extended, train, ["-c", PROBE], *([*train, "--opts", *opts] for opts, _ in mistakes))
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.splitlines() == [
        "TemperatureAttention 2.0 True",
        "this attention kind takes no attn_mask or is_causal: its attend(q, k, v) declares neither"]
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "vit_tiny_patch2_32" / "quickstart" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["max_acc1"] > 20
    assert [(b.returncode, b.stderr.strip()) for b in bad] == [(2, message) for _, message in mistakes]


def test_masks_reach_only_an_attend_that_declares_them():
    """The other half of README's contract: an attend declaring attn_mask and is_causal gets
    them; declaring one alone fails at construction, naming the class."""
    import torch

    from models.attention import Attention

    class Masked(Attention):
        def attend(self, q, k, v, attn_mask=None, is_causal=False):
            return self.sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    class Half(Attention):
        def attend(self, q, k, v, attn_mask=None):
            return self.sdpa(q, k, v, attn_mask=attn_mask)

    torch.manual_seed(0)
    layer, x = Masked(16, 2).eval(), torch.randn(1, 5, 16)
    causal = layer(x, is_causal=True)
    torch.testing.assert_close(causal, layer(x, attn_mask=torch.ones(5, 5, dtype=torch.bool).tril()))
    assert not torch.allclose(causal, layer(x))
    with pytest.raises(TypeError, match="Half.attend declares attn_mask alone"):
        Half(16, 2)
