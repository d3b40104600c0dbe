"""Optimizer groups, LR schedule, gradient accumulation and fine-tuning surgery."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import models
from amp import LossScaler
from config import load_config
from engine import train_one_epoch
from lr_scheduler import build_scheduler, scaled_lrs
from models.weights import load_pretrained
from optimizer import build_optimizer
from train_state import TrainState
from utils import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def quick(*opts):
    return load_config("configs/quickstart.yaml", list(opts))


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
