"""The training and evaluation loops, as plain functions (DeiT's engine.py habit)."""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import resource
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import AverageMeter

from errors import TrainingDiverged, UserError
from train_state import EpochProgress, TrainState
from utils import DistEnv, StopSignal, all_reduce_sum


def _read_step(losses: list[torch.Tensor], grad_norm: torch.Tensor, stop: bool,
               env: DistEnv) -> tuple[bool, bool, list[float], float]:
    """The step's one host sync: whether it is bad (a loss or the gradient not finite) and
    whether to stop, each agreed by all ranks (any rank's flag is every rank's: one tiny
    all_reduce on the rank's device; nothing when alone), read together with the step's
    micro-batch losses and its gradient norm. Returns (bad, stop, losses, grad_norm)."""
    loss = torch.stack([value.float() for value in losses])
    bad = ~(torch.isfinite(loss).all() & torch.isfinite(grad_norm))
    flags = torch.stack([bad, torch.full_like(bad, stop)]).float()  # no host data: no copy to the device
    if env.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    values = torch.cat([flags, grad_norm.float().reshape(1), loss]).tolist()
    return values[0] > 0, values[1] > 0, values[3:], values[2]


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def set_progress(model: nn.Module, epoch: int, step: int) -> None:
    """The one hook through which schedules inside a model (e.g. a growing locality
    window) follow training; models without schedules simply don't define it."""
    if hasattr(model, "set_progress"):
        model.set_progress(epoch, step)


def steps_per_epoch(loader_len: int, accumulation_steps: int) -> int:
    return max(1, loader_len // accumulation_steps)


def _to_device(images: torch.Tensor, targets: torch.Tensor, env: DistEnv, channels_last: bool):
    images = images.to(env.device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(env.device, non_blocking=True)


def _apply_step(state: TrainState, progress: EpochProgress, skip: bool, step: int, grad_norm: float) -> None:
    """The optimizer step (scheduler, EMA) of global step ``step``, or its skip (counted);
    the gradients are cleared either way."""
    state.scaler.step(state.optimizer, skip=skip)
    if skip:
        state.bad_in_a_row += 1
        progress.skipped += 1
    else:
        state.bad_in_a_row = 0
        state.scheduler.step_update(step + 1)
        if state.ema is not None:
            state.ema.update(state.model, step=step)
        progress.norm_sum += grad_norm
        progress.norm_count += 1
    state.optimizer.zero_grad(set_to_none=True)


def train_one_epoch(state: TrainState, loader, epoch: int, env: DistEnv, logger: logging.Logger,
                    print_freq: int, num_steps: Optional[int] = None,
                    progress: Optional[EpochProgress] = None, saver=None,
                    stop: Optional[StopSignal] = None) -> tuple[dict[str, float], EpochProgress]:
    """Train one epoch, or its rest: with ``progress`` from a mid-epoch checkpoint, ``loader``
    yields only the batches not yet done (data.samplers.epoch_batches) and ``num_steps`` is the
    whole epoch's count. ``saver`` (checkpoint.CheckpointSaver) is told after every step;
    ``stop`` (a StopSignal) ends the epoch early at a step boundary agreed by all ranks.

    A step whose loss or gradient is not finite (on any rank) is skipped: no optimizer,
    scheduler or EMA update; an fp16 loss scale is still lowered. Returns the epoch's
    averages and its progress (``stopped`` when a stop signal ended it early).
    """
    model, accum = state.wrapped, state.accumulation_steps
    model.train()
    if state.mixup is not None and state.mixup_off_epoch:  # set every epoch: a resumed run agrees
        state.mixup.mixup_enabled = epoch < state.mixup_off_epoch
    num_steps = num_steps or steps_per_epoch(len(loader), accum)
    progress = progress or EpochProgress()
    time_meter = AverageMeter()
    params = [p for p in state.model.parameters() if p.requires_grad]
    state.optimizer.zero_grad(set_to_none=True)
    start = end = time.time()
    losses, sizes = [], []  # the micro-batches' losses (on the device, read once per step) and sizes
    for idx, (images, targets) in enumerate(loader, start=progress.steps_done * accum):
        if idx >= num_steps * accum:
            break  # an incomplete accumulation group at the end of the epoch is dropped
        images, targets = _to_device(images, targets, env, state.channels_last)
        if state.mixup is not None:
            images, targets = state.mixup(images, targets)
        step = epoch * num_steps + idx // accum
        if idx % accum == 0:
            set_progress(state.model, epoch, step)
            losses, sizes = [], []
        update = (idx + 1) % accum == 0
        no_sync = model.no_sync if env.distributed and not update and hasattr(model, "no_sync") \
            else contextlib.nullcontext
        with no_sync():
            with state.autocast():
                outputs = model(images)
                loss = state.criterion(outputs, targets) if state.distillation is None \
                    else state.distillation(images, outputs, targets)
            # backward even when the loss is NaN: under DDP every rank must join the all-reduce
            state.scaler.backward(loss / accum)
        losses.append(loss.detach())
        sizes.append(targets.size(0))
        if not update:
            continue
        grad_norm = state.scaler.unscale_and_clip(state.optimizer, params, state.clip_grad, state.clip_mode)
        bad, stopping, loss_values, grad_norm = _read_step(losses, grad_norm,
                                                           stop is not None and stop.requested(), env)
        for value, size in zip(loss_values, sizes):
            if math.isfinite(value):
                progress.loss_sum += value * size
                progress.loss_count += size
        loss_value = loss_values[-1]  # the last micro-batch's, as logged
        step_lr = state.optimizer.param_groups[0]["lr"]  # the lr this step uses, before the schedule moves
        _apply_step(state, progress, skip=bad, step=step, grad_norm=grad_norm)
        if state.log_step is not None and not bad:
            state.log_step(step, {"loss": loss_value, "lr": step_lr, "grad_norm": grad_norm})
        progress.steps_done = done = idx // accum + 1
        progress.samples_done = done * accum * targets.size(0) * env.world_size
        where = f"Train [{epoch}][{done}/{num_steps}]"
        if bad:
            logger.warning(f"{where} step {step} skipped: loss {loss_value:.4g}, grad norm {grad_norm:.4g} "
                           f"({state.bad_in_a_row} in a row, at most {state.max_bad_steps})")
        if state.bad_in_a_row >= state.max_bad_steps:
            raise TrainingDiverged(f"{state.bad_in_a_row} consecutive non-finite steps (TRAIN.MAX_BAD_STEPS), "
                                   f"the last at epoch {epoch} step {step} (loss {loss_value:.4g}, "
                                   f"grad norm {grad_norm:.4g})")
        time_meter.update(time.time() - end)
        end = time.time()
        if state.compiling:
            logger.info(f"torch.compile: the first step, compiling included, took {time_meter.val:.1f} s")
            state.compiling = False
        if done % print_freq == 0 or done == num_steps:
            eta = datetime.timedelta(seconds=int(time_meter.avg * (num_steps - done)))
            logger.info(f"{where} eta {eta} lr {state.optimizer.param_groups[0]['lr']:.3e} "
                        f"time {time_meter.val:.3f} ({time_meter.avg:.3f}) "
                        f"loss {loss_value:.4f} ({progress.loss_sum / max(1, progress.loss_count):.4f}) "
                        f"grad_norm {grad_norm:.3f} ({progress.norm_sum / max(1, progress.norm_count):.3f}) "
                        f"mem {memory_mb(env.device):.0f}MB")
        if stopping:
            progress.stopped = True
            break
        if saver is not None:
            saver.after_step(epoch, progress)
    stats = {"train_loss": progress.loss_sum / max(1, progress.loss_count),
             "grad_norm": progress.norm_sum / max(1, progress.norm_count),
             "lr": state.optimizer.param_groups[0]["lr"], "epoch_time": time.time() - start,
             "skipped_steps": progress.skipped}
    return stats, progress


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, autocast, channels_last: bool = False,
             collector: Optional[Any] = None, classes: Optional[list[int]] = None) -> dict[str, float]:
    """Top-1/top-5 and mean loss over every readable validation image exactly once (all
    ranks). An unreadable file (a UserError) on any rank stops every rank's evaluation.
    ``collector`` (e.g. evaluation.Predictions) is given each batch's ``add(logits, targets)``,
    in loader order, for reports per class and per image. ``classes``: the model chooses among
    these only (ImageNet-A/-R's 200: the other logits are -inf). Targets of shape (B, L) are
    multi-label (ImageNet-ReaL: each image's classes, padded with -1): a prediction is right
    if it is any of them, and the loss is against their uniform mixture."""
    model.eval()
    sums = None  # loss, top-1 and top-5 hits summed on the device in float64: read once, at the end
    count = 0
    error = None
    keep = None
    try:
        for batch in loader:
            if batch is None:
                continue  # every image of this batch was unreadable and dropped (DATA.SKIP_BAD_IMAGES)
            images, targets = _to_device(*batch, env, channels_last)
            with autocast():
                output = model(images)
            output = output.float()
            if classes is not None:
                if keep is None:
                    keep = torch.zeros(output.size(1), dtype=torch.bool, device=output.device)
                    keep[torch.tensor(classes, device=output.device)] = True
                output = output.masked_fill(~keep, float("-inf"))
            if collector is not None:
                collector.add(output, targets)
            top5 = output.topk(min(5, output.size(1)), dim=1).indices
            if targets.dim() == 2:  # multi-label
                valid = targets >= 0
                mixture = torch.zeros_like(output).scatter_(1, targets.clamp(min=0), valid.float())
                mixture = mixture / mixture.sum(dim=1, keepdim=True)
                loss = -(mixture * output.log_softmax(dim=1).nan_to_num(neginf=0.0)).sum()
                hits = (top5[:, :, None] == targets[:, None, :]).any(dim=2)
            else:
                loss = F.cross_entropy(output, targets, reduction="sum")
                hits = top5.eq(targets[:, None])
            batch_sums = torch.stack([loss.double(), hits[:, :1].sum().double(), hits.any(dim=1).sum().double()])
            sums = batch_sums if sums is None else sums + batch_sums
            count += targets.size(0)
    except UserError as e:
        error = e
    loss_sum, correct1, correct5 = sums.tolist() if sums is not None else (0.0, 0.0, 0.0)
    correct1, correct5, loss_sum, total, failed = all_reduce_sum(
        [correct1, correct5, loss_sum, count, float(error is not None)], env)
    if error is not None:
        raise error
    if failed:
        raise UserError("validation stopped: another process could not read its data (its log names the file)")
    if not total:
        raise UserError("no readable validation image: every file was skipped as unreadable")
    total = int(total)
    return {"acc1": 100.0 * correct1 / total, "acc5": 100.0 * correct5 / total,
            "loss": loss_sum / total, "images": total}
