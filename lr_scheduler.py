"""Learning-rate schedules (timm), with linear warmup: per step (cosine, linear, step,
multistep), or per epoch from the validation top-1 (plateau)."""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from timm.scheduler import (CosineLRScheduler, MultiStepLRScheduler, PlateauLRScheduler, PolyLRScheduler,
                            StepLRScheduler)
from timm.scheduler.scheduler import Scheduler


class PlateauScheduler(PlateauLRScheduler):
    """timm's plateau schedule (torch's ReduceLROnPlateau on val top-1, mode max, after a
    per-epoch linear warmup), with its whole state in checkpoints: timm keeps only the
    best value (the reason timm deprecates the class), so a resumed run would forget how
    many epochs it had waited and how far it had decayed. The decay is saved as a factor
    of the base lr, so a resumed run with another TRAIN.BASE_LR keeps its decays. timm's
    deprecation warning is silenced here for that reason."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated", category=FutureWarning)
            super().__init__(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        factors = [group["lr"] / (base * group.get("lr_scale", 1.0)) if base else 0.0
                   for group, base in zip(self.optimizer.param_groups, self.base_values)]
        return {"plateau": self.lr_scheduler.state_dict(), "lr_factors": factors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "plateau" not in (state_dict or {}):  # a run that used another schedule starts the plateau afresh
            return
        self.lr_scheduler.load_state_dict(state_dict["plateau"])
        for group, base, factor in zip(self.optimizer.param_groups, self.base_values, state_dict["lr_factors"]):
            group["lr"] = base * group.get("lr_scale", 1.0) * factor


def step_epoch(scheduler: Scheduler, epoch: int, val_acc1: float) -> None:
    """After epoch ``epoch``'s validation: per-epoch schedules (plateau) take their step;
    per-step ones moved with every optimizer step already."""
    if scheduler.t_in_epochs:
        scheduler.step(epoch + 1, val_acc1)


def resume_schedule(scheduler: Scheduler, saved: Optional[dict], step: int) -> None:
    """On resume: a per-step schedule is recomputed at global ``step`` from this command's
    values; the plateau's state (best top-1, epochs waited) comes from the checkpoint."""
    if isinstance(scheduler, PlateauScheduler):
        scheduler.load_state_dict(saved or {})
    else:
        scheduler.step_update(step)


def scaled_lrs(config, total_batch: int) -> tuple[float, float, float]:
    """(base, warmup, min) learning rates scaled by total batch / TRAIN.LR_BASE_BATCH."""
    train = config.TRAIN
    scale = total_batch / train.LR_BASE_BATCH if train.LR_BASE_BATCH else 1.0
    return train.BASE_LR * scale, train.WARMUP_LR * scale, train.MIN_LR * scale


def _per_step(train, steps_per_epoch: int, warmup_lr: float) -> tuple[int, int, dict[str, Any]]:
    """(total steps, warmup steps, the arguments every per-step schedule takes)."""
    warmup = train.WARMUP_EPOCHS * steps_per_epoch
    return train.EPOCHS * steps_per_epoch, warmup, dict(warmup_t=warmup, warmup_lr_init=warmup_lr, t_in_epochs=False)


def _cosine(train, optimizer, steps_per_epoch: int, warmup_lr: float, min_lr: float) -> Scheduler:
    total, warmup, common = _per_step(train, steps_per_epoch, warmup_lr)
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=min_lr,
                             cycle_limit=1, warmup_prefix=True, **common)


def _linear(train, optimizer, steps_per_epoch: int, warmup_lr: float, min_lr: float) -> Scheduler:
    total, warmup, common = _per_step(train, steps_per_epoch, warmup_lr)
    return PolyLRScheduler(optimizer, t_initial=max(1, total - warmup), power=1.0,
                           lr_min=min_lr, cycle_limit=1, warmup_prefix=True, **common)


def _step(train, optimizer, steps_per_epoch: int, warmup_lr: float, min_lr: float) -> Scheduler:
    _, _, common = _per_step(train, steps_per_epoch, warmup_lr)
    return StepLRScheduler(optimizer, decay_t=train.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch,
                           decay_rate=train.LR_SCHEDULER.DECAY_RATE, **common)


def _multistep(train, optimizer, steps_per_epoch: int, warmup_lr: float, min_lr: float) -> Scheduler:
    # timm applies milestone m at update m - 1; + 1 makes the decay start with the first
    # step of each milestone epoch (warmup counted, as torch's MultiStepLR)
    _, _, common = _per_step(train, steps_per_epoch, warmup_lr)
    return MultiStepLRScheduler(optimizer, decay_t=[m * steps_per_epoch + 1 for m in train.LR_SCHEDULER.MILESTONES],
                                decay_rate=train.LR_SCHEDULER.DECAY_RATE, warmup_prefix=False, **common)


def _plateau(train, optimizer, steps_per_epoch: int, warmup_lr: float, min_lr: float) -> Scheduler:
    return PlateauScheduler(optimizer, decay_rate=train.LR_SCHEDULER.DECAY_RATE,
                            patience_t=train.LR_SCHEDULER.PATIENCE_EPOCHS, warmup_t=train.WARMUP_EPOCHS,
                            warmup_lr_init=warmup_lr, lr_min=min_lr, mode="max")


# TRAIN.LR_SCHEDULER.NAME -> its builder; the names are the key's choices (config.CHOICES).
SCHEDULES = {"cosine": _cosine, "linear": _linear, "step": _step, "multistep": _multistep, "plateau": _plateau}


def build_scheduler(config, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    warmup_lr: float, min_lr: float) -> Scheduler:
    """TRAIN.LR_SCHEDULER.NAME's schedule (SCHEDULES), stepped with
    ``scheduler.step_update(global_step)`` after every optimizer step and ``step_epoch``
    after every validation (plateau)."""
    train = config.TRAIN
    return SCHEDULES[train.LR_SCHEDULER.NAME](train, optimizer, steps_per_epoch, warmup_lr, min_lr)
