"""The training loop's parts and recipes: optimizer groups and layer decay, lr schedules, gradient
accumulation, DeiT's augmentations and losses, EMA, mixup switch-off, clipping, and what a run logs."""
from __future__ import annotations

import contextlib
import json
import logging
import random
import warnings

import main as main_module
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

import models
from amp import LossScaler
from config import ConfigError
from data.transforms import build_transform
from engine import train_one_epoch
from lr_scheduler import build_scheduler, PlateauScheduler, resume_schedule, scaled_lrs, step_epoch
from models.weights import load_pretrained
from optimizer import build_optimizer
from train_state import TrainState

from tests.conftest import ENV, ONE_EPOCH, QUICK, RUN, quick

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each



def test_what_used_to_happen_silently_is_logged(out_dir, capsys):
    """Pretrained weights loaded (and position embeddings resampled), pretrained weights
    passed over on resume, --amp on the CPU, and images a large batch leaves out."""
    base = ["--cfg", QUICK, "--output", str(out_dir), "--opts", *ONE_EPOCH]
    assert main_module.main(["--tag", "src", *base]) == 0
    ckpt = out_dir / RUN / "src" / "ckpt_epoch_0.pth"
    capsys.readouterr()
    assert main_module.main(["--tag", "ft", "--pretrained", str(ckpt), *base, "DATA.IMG_SIZE", "16"]) == 0
    out = capsys.readouterr().out
    assert "pretrained: resampled pos_embed (1, 17, 64) -> (1, 65, 64)" in out
    assert f"pretrained: loaded 56 of the model's 56 tensors from {ckpt}" in out
    assert main_module.main(["--tag", "ft", "--pretrained", str(ckpt), "--amp", "--batch-size", "1000", *base,
                             "DATA.IMG_SIZE", "16", "TRAIN.EPOCHS", "2"]) == 0
    out = capsys.readouterr().out
    assert f"MODEL.PRETRAINED {ckpt} is not loaded: the run resumes from its checkpoint" in out
    assert "AMP: float32 on cpu: AMP_DTYPE auto uses autocast on CUDA only" in out
    assert "1 steps/epoch, 2 epochs; 437 of the 1437 images each process draws per epoch do not fill a step" in out


def test_channels_last_repeated_augmentation_and_step_schedule_do_what_they_say(out_dir, monkeypatch, capsys):
    """Three switches in one short run, each checked for its effect: TRAIN.CHANNELS_LAST
    trains a channels-last model on channels-last batches; DATA.REPEATED_AUG draws every
    image three times in a row (timm's sampler: 1,280 of 1,437 x 3 draws, 40 steps of 32);
    the step schedule multiplies the lr by DECAY_RATE every DECAY_EPOCHS."""
    import data
    import main as main_module
    seen, loaders = {}, []

    def build_model(config):
        model = model_config.build_model(config)
        model.patch_embed.proj.register_forward_pre_hook(  # training batches only
            lambda m, inputs: seen.update(x=inputs[0]) if m.training else None)
        seen["model"] = model
        return model

    import model_config
    real_loaders = data.build_loaders
    monkeypatch.setattr(main_module, "build_model", build_model)
    monkeypatch.setattr(data, "build_loaders", lambda *a, **k: loaders.append(real_loaders(*a, **k)) or loaders[-1])
    torch.set_num_threads(1)
    code = main_module.main(["--cfg", QUICK, "--output", str(out_dir), "--tag", "opts", "--opts",
                             "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.CHANNELS_LAST", "True",
                             "DATA.REPEATED_AUG", "True", "TRAIN.LR_SCHEDULER.NAME", "step",
                             "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "1", "TRAIN.LR_SCHEDULER.DECAY_RATE", "0.1",
                             "PRINT_FREQ", "100"])
    assert code == 0
    assert seen["x"].is_contiguous(memory_format=torch.channels_last) and not seen["x"].is_contiguous()
    assert seen["model"].patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    sampler = loaders[0].train.sampler
    sampler.set_epoch(0)
    order = list(sampler)
    assert len(order) == 1280 and "40 steps/epoch" in capsys.readouterr().out
    assert all(order[i] == order[i + 1] == order[i + 2] for i in range(0, 1278, 3))
    assert len(set(order)) > 400
    records = [json.loads(l) for l in (out_dir / RUN / "opts" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([2e-4, 2e-5])  # BASE_LR 2e-3, x0.1 per epoch
    assert 0 < records[-1]["train_loss"] < 3 and 0 <= records[-1]["val_acc1"] <= 100


RAW = ["DATA.MEAN", "[0, 0, 0]", "DATA.STD", "[1, 1, 1]"]  # normalised batches are pixels / 255


def pixels(tensor: torch.Tensor) -> np.ndarray:
    """HWC pixels of a transform's CHW uint8 image."""
    return tensor.numpy().transpose(1, 2, 0).astype(np.int64)


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
    assert type(rrc.transforms[0]).__name__ == "RowsRandomResizedCrop"  # timm's, decoding as far as the crop


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


def test_lr_is_scaled_by_total_batch_and_follows_warmup_then_cosine():
    cfg = quick("TRAIN.LR_BASE_BATCH", "512", "TRAIN.BASE_LR", "5e-4", "TRAIN.EPOCHS", "10",
                "TRAIN.WARMUP_EPOCHS", "2", "TRAIN.MIN_LR", "5e-6", "TRAIN.WARMUP_LR", "5e-7")
    lr, warmup_lr, min_lr = scaled_lrs(cfg, total_batch=1024)
    assert (lr, warmup_lr, min_lr) == pytest.approx((1e-3, 1e-6, 1e-5))
    model = models.create_model("vit_tiny_patch2_32", depth=1)
    opt = build_optimizer(cfg, model, lr)
    sched = build_scheduler(cfg, opt, steps_per_epoch=10, warmup_lr=warmup_lr, min_lr=min_lr)
    lrs = []
    for step in range(100):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[10] < lrs[19] and lrs[20] == pytest.approx(1e-3, rel=1e-3)  # linear warmup, then peak
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:])) and lrs[-1] < 2e-5  # cosine down to min


def test_weight_decay_groups_and_optimizers():
    model = models.create_model("vit_tiny_patch2_32", depth=1)
    for name in ("adamw", "sgd", "lamb"):
        opt = build_optimizer(quick("TRAIN.OPTIMIZER.NAME", name), model, 1e-3)
        decays = {g["weight_decay"] for g in opt.param_groups}
        assert decays == {0.0, 0.05}
        no_decay = [p for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
        assert any(p is model.pos_embed for p in no_decay) and any(p is model.cls_token for p in no_decay)


def test_layer_decay_scales_early_layers_down():
    model = models.create_model("vit_tiny_patch2_32", depth=4)
    opt = build_optimizer(quick("TRAIN.LAYER_DECAY", "0.5"), model, 1e-3)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales[0] == pytest.approx(0.5 ** 5) and scales[-1] == 1.0


def _one_update(batch: int, accum: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = models.create_model("vit_tiny_patch2_32", depth=2, img_size=8, drop_path_rate=0.0)
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 10)
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = type("NoSchedule", (), {"step_update": lambda self, step: None})()
    state = TrainState(model=model, wrapped=model, criterion=torch.nn.CrossEntropyLoss(), optimizer=opt,
                       scheduler=sched, scaler=LossScaler(False), autocast=contextlib.nullcontext,
                       accumulation_steps=accum)
    import logging
    train_one_epoch(state, loader, epoch=0, env=ENV, logger=logging.getLogger("quiet"), print_freq=100)
    return model.state_dict()


def test_gradient_accumulation_equals_one_big_batch():
    big, accumulated = _one_update(16, 1), _one_update(8, 2)
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-6)


def test_pretrained_resamples_positions_and_drops_a_head_of_another_size(tmp_path):
    source = models.create_model("vit_tiny_patch2_32", depth=2, img_size=8, num_classes=5)
    path = tmp_path / "src.pth"
    torch.save({"model": source.state_dict()}, path)
    target = models.create_model("vit_tiny_patch2_32", depth=2, img_size=16, num_classes=10)
    head_before = target.head.weight.clone()
    load_pretrained(target, str(path))
    assert target.pos_embed.shape == (1, 1 + 64, 192)
    torch.testing.assert_close(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert torch.equal(target.head.weight, head_before)  # fresh head kept


def _lrs(cfg, steps_per_epoch: int = 10) -> list[float]:
    model = models.create_model("vit_tiny_patch2_32", depth=1)
    opt = build_optimizer(cfg, model, cfg.TRAIN.BASE_LR)
    sched = build_scheduler(cfg, opt, steps_per_epoch, cfg.TRAIN.WARMUP_LR, cfg.TRAIN.MIN_LR)
    lrs = []
    for step in range(cfg.TRAIN.EPOCHS * steps_per_epoch + 1):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_linear_schedule_warms_up_then_falls_in_a_straight_line_to_min():
    lrs = _lrs(quick("TRAIN.LR_SCHEDULER.NAME", "linear", "TRAIN.EPOCHS", "10", "TRAIN.WARMUP_EPOCHS", "2",
                     "TRAIN.BASE_LR", "1e-3", "TRAIN.MIN_LR", "1e-5", "TRAIN.WARMUP_LR", "1e-6"))
    for step in range(21):  # warmup: a straight line from WARMUP_LR to BASE_LR over 20 steps
        assert lrs[step] == pytest.approx(1e-6 + (1e-3 - 1e-6) * step / 20)
    for step in range(20, 100):  # then a straight line down to MIN_LR at the last step
        assert lrs[step] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 - (step - 20) / 80))
    assert lrs[100] == pytest.approx(1e-5)


def test_step_schedule_multiplies_by_the_rate_every_decay_epochs():
    lrs = _lrs(quick("TRAIN.LR_SCHEDULER.NAME", "step", "TRAIN.EPOCHS", "9", "TRAIN.WARMUP_EPOCHS", "0",
                     "TRAIN.BASE_LR", "1e-2", "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "3",
                     "TRAIN.LR_SCHEDULER.DECAY_RATE", "0.5"))
    assert lrs[:30] == pytest.approx([1e-2] * 30)
    assert lrs[30:60] == pytest.approx([5e-3] * 30) and lrs[60:90] == pytest.approx([2.5e-3] * 30)


def test_optimizer_settings_reach_the_optimizer():
    model = models.create_model("vit_tiny_patch2_32", depth=1)
    adamw = build_optimizer(quick("TRAIN.OPTIMIZER.BETAS", "[0.8, 0.95]", "TRAIN.OPTIMIZER.EPS", "1e-6"), model, 1e-3)
    assert type(adamw) is torch.optim.AdamW
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 and g["lr"] == 1e-3 for g in adamw.param_groups)
    sgd = build_optimizer(quick("TRAIN.OPTIMIZER.NAME", "sgd", "TRAIN.OPTIMIZER.MOMENTUM", "0.8"), model, 0.1)
    assert type(sgd) is torch.optim.SGD
    assert all(g["momentum"] == 0.8 and g["nesterov"] and g["lr"] == 0.1 for g in sgd.param_groups)
    lamb = build_optimizer(quick("TRAIN.OPTIMIZER.NAME", "lamb", "TRAIN.OPTIMIZER.BETAS", "[0.85, 0.9]",
                                 "TRAIN.OPTIMIZER.EPS", "1e-7"), model, 2e-3)
    assert type(lamb).__name__ == "Lamb"
    assert all(g["betas"] == (0.85, 0.9) and g["eps"] == 1e-7 for g in lamb.param_groups)


def test_every_layer_decay_scale_of_a_vit():
    """LAYER_DECAY d on a 4-block ViT: the stem (tokens, position and patch embeddings) at
    d^5, block i at d^(4 - i), the final norm with the last block, the head at 1."""
    model = models.create_model("vit_tiny_patch2_32", depth=4)
    opt = build_optimizer(quick("TRAIN.LAYER_DECAY", "0.5"), model, 1e-3)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}

    def expected(name: str) -> float:
        if name.startswith(("cls_token", "pos_embed", "patch_embed.")):
            return 0.5 ** 5
        if name.startswith("blocks."):
            return 0.5 ** (4 - int(name.split(".")[1]))
        return {"norm": 0.5, "head": 1.0}[name.split(".")[0]]

    named = dict(model.named_parameters())
    assert len(scale) == len(named)
    for name, param in named.items():
        assert scale[id(param)] == pytest.approx(expected(name)), name
