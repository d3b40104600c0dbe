"""Per-step learning-rate schedules (timm), with linear warmup."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler


def scaled_lrs(config, total_batch: int) -> tuple[float, float, float]:
    """(base, warmup, min) learning rates scaled by total batch / TRAIN.LR_BASE_BATCH."""
    train = config.TRAIN
    scale = total_batch / train.LR_BASE_BATCH if train.LR_BASE_BATCH else 1.0
    return train.BASE_LR * scale, train.WARMUP_LR * scale, train.MIN_LR * scale


def build_scheduler(config, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    warmup_lr: float, min_lr: float) -> Scheduler:
    """Stepped with ``scheduler.step_update(global_step)`` after every optimizer step."""
    train = config.TRAIN
    total = train.EPOCHS * steps_per_epoch
    warmup = train.WARMUP_EPOCHS * steps_per_epoch
    common = dict(warmup_t=warmup, warmup_lr_init=warmup_lr, t_in_epochs=False)
    name = train.LR_SCHEDULER.NAME
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=min_lr,
                                 cycle_limit=1, warmup_prefix=True, **common)
    if name == "linear":
        return PolyLRScheduler(optimizer, t_initial=max(1, total - warmup), power=1.0,
                               lr_min=min_lr, cycle_limit=1, warmup_prefix=True, **common)
    if name == "step":
        return StepLRScheduler(optimizer, decay_t=train.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch,
                               decay_rate=train.LR_SCHEDULER.DECAY_RATE, **common)
    raise AssertionError(f"TRAIN.LR_SCHEDULER.NAME {name!r}: config.CHOICES and build_scheduler disagree")
