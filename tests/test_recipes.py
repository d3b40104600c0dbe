"""DeiT III's recipe keys, each doing what it says: 3-Augment, simple random crop, BCE loss,
EMA warmup, mixup off after an epoch, multistep and plateau schedules, clipping by value
or AGC with the true norm logged; and all of them together through main.py, resumed."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageOps
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy
from timm.utils.agc import adaptive_clip_grad
from torch.utils.data import DataLoader, TensorDataset

from amp import LossScaler
from config import ConfigError, load_config
from data.transforms import build_transform
from engine import train_one_epoch
from lr_scheduler import PlateauScheduler, build_scheduler, resume_schedule, step_epoch
from tests.conftest import run_main
from train_state import TrainState
from utils import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
QUICK = "configs/quickstart.yaml"
RAW = ["DATA.MEAN", "[0, 0, 0]", "DATA.STD", "[1, 1, 1]"]  # tensors are pixels / 255


def quick(*opts: str):
    return load_config(QUICK, list(opts))


def pixels(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.numpy().transpose(1, 2, 0) * 255).round().astype(np.int64)


# ------------------------------------------------------------------------------ 3-Augment
def test_three_augment_applies_exactly_one_of_grayscale_solarize_blur_to_each_image():
    """AUG.AUTO_AUGMENT 3a is timm's DeiT III 3-Augment: each image gets one of grayscale,
    solarize (threshold 128) or a Gaussian blur (radius 0.1-2); color jitter stays on."""
    cfg = quick("DATA.IMG_SIZE", "32", "AUG.AUTO_AUGMENT", "3a", "AUG.COLOR_JITTER", "0.0", *RAW)
    transform = build_transform(cfg, train=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    original = np.asarray(image).astype(np.int64)
    solarized = np.asarray(ImageOps.solarize(image, 128)).astype(np.int64)
    tv = lambda a: np.abs(np.diff(a, axis=0)).sum() + np.abs(np.diff(a, axis=1)).sum()  # noqa: E731
    random.seed(0)
    kinds = []
    for _ in range(60):
        out = pixels(transform(image))
        gray = (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        solar = np.array_equal(out, solarized)
        # a blur never adds detail and keeps the colours (at radius 0.1 it is nearly the identity)
        blurred = not gray and not solar and tv(out) <= tv(original) and abs(out.mean() - original.mean()) < 2
        assert gray + solar + blurred == 1, "each image gets exactly one of the three"
        kinds.append("gray" if gray else "solarize" if solar else "blur")
    assert all(kinds.count(k) >= 10 for k in ("gray", "solarize", "blur")), kinds
    assert sum(tv(pixels(transform(image))) < 0.8 * tv(original) for _ in range(30)) >= 5  # real blurs happen
    jittered = build_transform(quick("DATA.IMG_SIZE", "32", "AUG.AUTO_AUGMENT", "3a", "AUG.COLOR_JITTER", "0.3",
                                     "AUG.HFLIP", "0.5"), train=True)
    steps = [type(t).__name__ for t in jittered.transforms]
    assert steps[1:4] == ["RandomHorizontalFlip", "AutoAugment", "ColorJitter"], steps


def test_simple_random_crop_resizes_then_crops_with_reflect_padding():
    """AUG.TRAIN_CROP src (DeiT III): shorter side to IMG_SIZE, reflect padding, a random
    crop: a flat image stays flat (the default <= 32 px crop pads with black)."""
    flat = Image.new("RGB", (48, 40), (200, 200, 200))
    src = build_transform(quick("DATA.IMG_SIZE", "32", "AUG.TRAIN_CROP", "src", "AUG.CROP_PAD", "4", *RAW),
                          train=True)
    resize, crop = src.transforms[0].transforms
    assert isinstance(resize, T.Resize) and resize.size == 32
    assert isinstance(crop, T.RandomCrop) and crop.padding == 4 and crop.padding_mode == "reflect"
    zero = build_transform(quick("DATA.IMG_SIZE", "32", "AUG.CROP_PAD", "4", *RAW), train=True)
    torch.manual_seed(0)
    outs = [pixels(src(flat)) for _ in range(20)]
    assert all(o.shape == (32, 32, 3) and (o == 200).all() for o in outs)
    assert any((pixels(zero(flat)) == 0).any() for _ in range(20))
    rrc = build_transform(quick("DATA.IMG_SIZE", "32", "AUG.TRAIN_CROP", "rrc"), train=True)
    assert type(rrc.transforms[0]).__name__ == "RandomResizedCropAndInterpolation"


def test_trivialaugment_is_torchvisions_and_policies_are_checked():
    transform = build_transform(quick("DATA.IMG_SIZE", "32", "AUG.AUTO_AUGMENT", "trivialaugment",
                                      "AUG.COLOR_JITTER", "0.4"), train=True)
    names = [type(t).__name__ for t in transform.transforms]
    assert "TrivialAugmentWide" in names and "ColorJitter" not in names
    with pytest.raises(ConfigError, match="AUG.AUTO_AUGMENT: 'randaug' is no policy"):
        quick("AUG.AUTO_AUGMENT", "randaug")


# ----------------------------------------------------------------------------------- BCE
def test_bce_loss_on_mixup_targets_and_deit3_binarization():
    from losses import build_criterion
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    labels = torch.tensor([1, 2, 3, 4])
    mixup = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10)
    _, soft = mixup(torch.randn(4, 3, 8, 8), labels)
    criterion = build_criterion(quick("TRAIN.LOSS.NAME", "bce"), mixup)
    assert isinstance(criterion, BinaryCrossEntropy)
    torch.testing.assert_close(criterion(logits, soft), F.binary_cross_entropy_with_logits(logits, soft))
    deit3 = build_criterion(quick("TRAIN.LOSS.NAME", "bce", "TRAIN.LOSS.BCE_TARGET_THRESH", "0.0",
                                  "MODEL.LABEL_SMOOTHING", "0.0"), mixup)
    torch.testing.assert_close(deit3(logits, soft), F.binary_cross_entropy_with_logits(logits, (soft > 0).float()))
    hard = build_criterion(quick("TRAIN.LOSS.NAME", "bce", "AUG.MIXUP", "0.0"), None)  # index targets, smoothed
    target = torch.full((4, 10), 0.01).scatter_(1, labels[:, None], 0.91)
    torch.testing.assert_close(hard(logits, labels), F.binary_cross_entropy_with_logits(logits, target))
    with pytest.raises(ConfigError, match="below every smoothed target"):
        quick("TRAIN.LOSS.NAME", "bce", "TRAIN.LOSS.BCE_TARGET_THRESH", "0.0")  # smoothing 0.1: all targets > 0


# ---------------------------------------------------------------------------- EMA warmup
def test_ema_warmup_follows_the_weights_early_then_reaches_its_decay():
    """TRAIN.EMA.WARMUP reaches timm's ModelEmaV3 through main.build_train_state."""
    import main
    from amp import autocast_factory
    from data import build_loaders

    def ema_after_a_jump(warmup: str) -> tuple[float, float]:
        cfg = quick("TRAIN.EMA.ENABLED", "True", "TRAIN.EMA.WARMUP", warmup, "TRAIN.EMA.DECAY", "0.9998")
        model = main.build_model(cfg)
        state, _ = main.build_train_state(cfg, model, build_loaders(cfg, 0, 1), ENV, autocast_factory(None, ENV.device),
                                          None, logging.getLogger("test"))
        with torch.no_grad():
            model.pos_embed.add_(1.0)
        before = state.ema.module.pos_embed.clone()
        state.ema.update(model, step=10)
        moved = (state.ema.module.pos_embed - before).mean().item()
        return moved, state.ema.get_decay(10 ** 9)

    moved, final = ema_after_a_jump("True")
    assert moved == pytest.approx(10 ** -0.75, rel=1e-4)  # decay 1 - (1 + 9) ** -0.75 at step 10
    assert final == 0.9998
    moved, _ = ema_after_a_jump("False")
    assert moved == pytest.approx(2e-4, rel=1e-3)


# ------------------------------------------------------------------------------ mixup off
class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 2 * 2, 4)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.fc(x.flatten(1))


class _NoSchedule:
    def step_update(self, step: int) -> None:
        pass


def test_mixup_turns_off_from_its_epoch():
    torch.manual_seed(0)
    images = torch.randn(8, 3, 2, 2)
    loader = DataLoader(TensorDataset(images, torch.arange(8) % 4), batch_size=8)
    model = _Recorder()
    mixup = Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=4)
    state = TrainState(model=model, wrapped=model, criterion=lambda out, y: -(y * out.log_softmax(1)).sum(1).mean(),
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=_NoSchedule(),
                       scaler=LossScaler(False, "cpu"), autocast=contextlib.nullcontext,
                       mixup=mixup, mixup_off_epoch=2)
    for epoch in range(4):
        train_one_epoch(state, loader, epoch, ENV, logging.getLogger("test"), print_freq=100)
    mixed = [not torch.equal(x, images) for x in model.inputs]
    assert mixed == [True, True, False, False]
    for bad, message in ((["AUG.MIXUP", "0.0", "AUG.MIXUP_OFF_EPOCH", "3"], "mixup and cutmix are off already"),
                         (["AUG.MIXUP_OFF_EPOCH", "99"], "after the last epoch")):
        with pytest.raises(ConfigError, match=message):
            quick(*bad)


# ----------------------------------------------------------------------------- schedules
def _schedule(*opts: str, steps: int = 10):
    cfg = quick("TRAIN.BASE_LR", "1.0", "TRAIN.WARMUP_LR", "0.0", "TRAIN.MIN_LR", "0.0", "TRAIN.EPOCHS", "8", *opts)
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    return build_scheduler(cfg, optimizer, steps, warmup_lr=0.0, min_lr=0.0), optimizer


def test_multistep_decays_at_the_first_step_of_each_milestone_epoch():
    sched, optimizer = _schedule("TRAIN.WARMUP_EPOCHS", "1", "TRAIN.LR_SCHEDULER.NAME", "multistep",
                                 "TRAIN.LR_SCHEDULER.MILESTONES", "[3, 5]", "TRAIN.LR_SCHEDULER.DECAY_RATE", "0.1")
    lrs = {}
    for step in range(80):
        sched.step_update(step)
        lrs[step] = optimizer.param_groups[0]["lr"]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5)  # linear warmup over epoch 0
    assert lrs[10] == lrs[29] == 1.0 and lrs[30] == pytest.approx(0.1) and lrs[49] == pytest.approx(0.1)
    assert lrs[50] == pytest.approx(0.01) and lrs[79] == pytest.approx(0.01)
    for bad in ("[5, 3]", "[0, 3]", "[3, 8]", "[]"):
        with pytest.raises(ConfigError, match="MILESTONES: multistep needs increasing epochs"):
            quick("TRAIN.LR_SCHEDULER.NAME", "multistep", "TRAIN.LR_SCHEDULER.MILESTONES", bad, "TRAIN.EPOCHS", "8")
    with pytest.raises(ConfigError, match="only the multistep schedule reads it"):
        quick("TRAIN.LR_SCHEDULER.MILESTONES", "[3]")


def test_plateau_decays_when_val_top1_stalls_and_resumes_its_patience():
    opts = ("TRAIN.WARMUP_EPOCHS", "2", "TRAIN.LR_SCHEDULER.NAME", "plateau",
            "TRAIN.LR_SCHEDULER.PATIENCE_EPOCHS", "1", "TRAIN.LR_SCHEDULER.DECAY_RATE", "0.5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm's deprecation warning is not the user's business
        sched, optimizer = _schedule(*opts)
    assert isinstance(sched, PlateauScheduler)
    lr = lambda: optimizer.param_groups[0]["lr"]  # noqa: E731
    assert lr() == 0.0
    sched.step_update(5)  # per-step updates leave a per-epoch schedule alone
    assert lr() == 0.0
    seen = []
    for epoch, acc in enumerate([10.0, 20.0, 50.0, 60.0, 60.0, 60.0, 60.0, 60.0]):
        step_epoch(sched, epoch, acc)
        seen.append(lr())
    # warmup 0.5, 1.0; then best 50, 60; two epochs without gain (patience 1) -> 0.5; two more -> 0.25
    assert seen == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25]
    saved = sched.state_dict()
    again, optimizer2 = _schedule(*opts)  # a resumed run: the optimizer's lr is the command's warmup start
    resume_schedule(again, saved, step=80)
    assert optimizer2.param_groups[0]["lr"] == 0.25
    assert again.lr_scheduler.num_bad_epochs == sched.lr_scheduler.num_bad_epochs
    assert again.lr_scheduler.best == 60.0
    with pytest.raises(ConfigError, match="plateau lowers the lr"):
        quick("TRAIN.LR_SCHEDULER.NAME", "plateau", "TRAIN.LR_SCHEDULER.DECAY_RATE", "2.0")


# ------------------------------------------------------------------------------ clipping
def _grads(model: nn.Module, scaler: LossScaler, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    scaler.backward((model(x) ** 2).sum() * 10)


@pytest.mark.parametrize("mode", ["norm", "value", "agc"])
@pytest.mark.parametrize("scaled", [False, True])
def test_clipping_modes_clip_as_timm_and_log_the_true_norm(mode, scaled):
    """timm's dispatch_clip_grad does the clipping; unscale_and_clip returns the norm before
    clipping, unscaled, whatever the mode (fp16 loss scaling on the CPU included)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    reference = LossScaler(False, "cpu")
    _grads(model, reference, x)
    true_grads = [p.grad.clone() for p in model.parameters()]
    true_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in true_grads])).item()
    limit = {"norm": 1.0, "value": 0.05, "agc": 0.01}[mode]
    expected = [g.clone() for g in true_grads]
    if mode == "norm":
        expected = [g * min(1.0, limit / (true_norm + 1e-6)) for g in expected]
    elif mode == "value":
        expected = [g.clamp(-limit, limit) for g in expected]
    else:
        shadow = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for s, g in zip(shadow, expected):
            s.grad = g.clone()
        adaptive_clip_grad(shadow, limit)
        expected = [s.grad for s in shadow]
    scaler = LossScaler(scaled, "cpu", init_scale=1024.0)
    _grads(model, scaler, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    norm = scaler.unscale_and_clip(optimizer, list(model.parameters()), limit, mode)
    assert norm == pytest.approx(true_norm, rel=1e-5)
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if mode == "value":
        assert max(p.grad.abs().max().item() for p in model.parameters()) <= limit + 1e-7


def test_clip_mode_without_a_limit_is_an_error():
    with pytest.raises(ConfigError, match="TRAIN.CLIP_MODE: agc clipping needs TRAIN.CLIP_GRAD > 0"):
        quick("TRAIN.CLIP_MODE", "agc", "TRAIN.CLIP_GRAD", "0.0")


# ------------------------------------------------------------------------ through main.py
DEIT3 = ["AUG.AUTO_AUGMENT", "3a", "AUG.COLOR_JITTER", "0.3", "AUG.TRAIN_CROP", "src", "AUG.CROP_PAD", "1",
         "TRAIN.LOSS.NAME", "bce", "MODEL.LABEL_SMOOTHING", "0.0", "TRAIN.LOSS.BCE_TARGET_THRESH", "0.0",
         "TRAIN.EMA.ENABLED", "True", "TRAIN.EMA.WARMUP", "True", "AUG.MIXUP_OFF_EPOCH", "2",
         "TRAIN.LR_SCHEDULER.NAME", "plateau", "TRAIN.LR_SCHEDULER.PATIENCE_EPOCHS", "0",
         "TRAIN.CLIP_MODE", "agc", "TRAIN.CLIP_GRAD", "0.05", "TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1",
         "SAVE_FREQ", "1", "PRINT_FREQ", "100", "DETERMINISTIC", "True"]


def test_deit3_recipe_keys_train_together_and_resume_exactly(tmp_path):
    """All the keys above in one digits run; deleting its last checkpoint and running the
    same command again resumes it to the same weights, EMA and plateau state."""
    out = tmp_path / "out"
    args = ["--cfg", QUICK, "--output", str(out), "--tag", "deit3", "--opts", *DEIT3]
    first = run_main(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    run = out / "vit_tiny_patch2_32" / "deit3"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["train_loss"]) for r in records)
    reference = torch.load(run / "ckpt_epoch_2.pth", weights_only=True)
    assert set(reference["lr_scheduler"]["plateau"]) >= {"best", "num_bad_epochs"}
    (run / "ckpt_epoch_2.pth").unlink()
    second = run_main(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "ckpt_epoch_1.pth" in second.stdout
    resumed = torch.load(run / "ckpt_epoch_2.pth", weights_only=True)
    for part in ("model", "ema"):
        for key, value in reference[part].items():
            assert torch.equal(value, resumed[part][key]), f"{part}.{key}"
    assert resumed["lr_scheduler"] == reference["lr_scheduler"]
