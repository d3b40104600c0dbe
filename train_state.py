"""What training carries from step to step (``TrainState``) and through an epoch
(``EpochProgress``): the loop (engine.py) updates them, the checkpoint format
(checkpoint.py) saves and restores them, without either importing the other."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from amp import LossScaler


@dataclass
class TrainState:
    """What one training step needs besides the batch."""
    model: nn.Module  # the bare model: hooks, EMA source, checkpoints
    wrapped: nn.Module  # what the step calls: the model, or its DDP / compiled wrapper
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: LossScaler
    autocast: Callable[[], contextlib.AbstractContextManager]
    ema: Optional[Any] = None  # anything with .update(model, step=) and .module (timm's ModelEmaV3: main.build_train_state)
    mixup: Optional[Callable] = None
    accumulation_steps: int = 1
    clip_grad: float = 0.0
    channels_last: bool = False
    max_bad_steps: int = 20  # consecutive non-finite steps before errors.TrainingDiverged
    bad_in_a_row: int = 0  # consecutive non-finite steps so far (carried across epochs)
    compiling: bool = False  # torch.compile: the next step compiles (its time is logged)
    clip_mode: str = "norm"  # how clip_grad clips: norm | value | agc (TRAIN.CLIP_MODE)
    # DeiT's loss with a teacher (distillation.DistillationLoss), called as (images, outputs, targets)
    # in place of ``criterion``, which it wraps; None: ``criterion`` alone
    distillation: Optional[Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor]] = None
    mixup_off_epoch: int = 0  # from this epoch on ``mixup`` mixes nothing (AUG.MIXUP_OFF_EPOCH); 0: never
    log_step: Optional[Callable[[int, dict], None]] = None  # told (global step, loss/lr/grad_norm) after each good step


@dataclass
class EpochProgress:
    """How far an epoch got. Saved in mid-epoch checkpoints, so that a resumed epoch trains
    on exactly the remaining batches and reports the same averages as an uninterrupted one."""
    steps_done: int = 0  # optimizer steps finished in this epoch (good or skipped)
    samples_done: int = 0  # images those steps consumed, all ranks: the position at another batch size
    loss_sum: float = 0.0
    loss_count: int = 0
    norm_sum: float = 0.0
    norm_count: int = 0
    skipped: int = 0  # non-finite steps skipped in this epoch
    stopped: bool = False  # the epoch ended early on a preemption signal

    def as_dict(self) -> dict:
        return dict(self.__dict__)
