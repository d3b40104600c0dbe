"""Training checkpoints: the format (written, checked and read here only), the saver that
names, keeps and prunes them, and auto-resume. Weights, ours or foreign, are read and loaded
by models/weights.py.

Everything is read with ``torch.load(weights_only=True)``: our checkpoints hold tensors and
plain values only (the config as YAML text), so no pickled code is ever executed.
"""
from __future__ import annotations

import glob
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from errors import TrainingDiverged, UserError, one_line
from lr_scheduler import resume_schedule
from models.weights import WeightsError, load_weights, read_weights, state_dict_of
from train_state import EpochProgress, TrainState
from utils import DistEnv, seed_everything


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says why in one line."""


def save_atomic(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a
    crash or a full disk leaves either the old file or the new one, never half of one.

    Raises CheckpointError (one line) when the write fails; the temporary file is removed.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        os_error = _os_error(e)
        if os_error is None:
            raise
        raise CheckpointError(f"saving {path} failed: {os_error.strerror or os_error} "
                              f"(errno {os_error.errno}); the previous checkpoints are untouched") from None
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind ``e``: torch.save reports a failed write (full disk, file size
    limit) as a RuntimeError raised while handling it."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


_CKPT_RE = re.compile(r"ckpt_epoch_(\d+)(?:_step_(\d+))?\.pth$")


def checkpoint_name(epoch: int, step: Optional[int] = None) -> str:
    """``ckpt_epoch_N.pth`` after epoch N; ``ckpt_epoch_N_step_S.pth`` after S optimizer
    steps of epoch N (TRAIN.SAVE_EVERY_STEPS, preemption)."""
    return f"ckpt_epoch_{epoch}.pth" if step is None else f"ckpt_epoch_{epoch}_step_{step}.pth"


def _position(path: str) -> tuple[int, float]:
    epoch, step = _CKPT_RE.search(path).groups()
    return int(epoch), float(step) if step is not None else float("inf")  # epoch end last


def resumable_checkpoints(output_dir: str) -> list[str]:
    """Epoch and mid-epoch checkpoints, oldest first."""
    paths = [p for p in glob.glob(os.path.join(output_dir, "ckpt_epoch_*.pth")) if _CKPT_RE.search(p)]
    return sorted(paths, key=_position)


def newest_valid_checkpoint(output_dir: str, logger=None) -> tuple[Optional[str], Optional[dict]]:
    """(path, contents) of the newest checkpoint that reads and checks out; each damaged
    newer one (truncated by a crash, corrupt) is reported in one line and passed over."""
    for path in reversed(resumable_checkpoints(output_dir)):
        try:
            ckpt = read_weights(path)
            check_training_checkpoint(ckpt, path)
            return path, ckpt
        except (CheckpointError, WeightsError) as e:
            if logger is not None:
                logger.warning(f"auto-resume: skipping damaged checkpoint: {one_line(e)}")
    return None, None


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Keep the newest ``keep`` epoch checkpoints (0: all). Mid-epoch checkpoints are only
    stepping stones: those older than the newest epoch checkpoint go, and of the rest the
    newest ``keep`` stay (0: all)."""
    paths = resumable_checkpoints(output_dir)
    ends = [p for p in paths if _position(p)[1] == float("inf")]
    steps = [p for p in paths if _position(p)[1] != float("inf")]
    doomed = ends[:-keep] if keep > 0 else []
    if ends:
        newest_end = _position(ends[-1])
        doomed += [p for p in steps if _position(p) < newest_end]
        steps = [p for p in steps if _position(p) > newest_end]
    if keep > 0:
        doomed += steps[:-keep]
    for path in doomed:
        os.remove(path)


def remove_stale_temporaries(output_dir: str) -> None:
    """Half-written ``*.tmp.PID`` files left by a process killed while saving."""
    for path in glob.glob(os.path.join(output_dir, "*.pth.tmp.*")):
        os.remove(path)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random state: torch's CPU generator, Python's, NumPy's, and on a GPU
    its own device's generator (not every visible device's)."""
    py = random.getstate()
    npy = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": [py[0], list(py[1]), py[2]],
             "numpy": [npy[0], torch.from_numpy(npy[1].astype("int64")), npy[2], npy[3], npy[4]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], npy[1].numpy().astype("uint32"), npy[2], npy[3], npy[4]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's ``rng_state``, in rank order, for the one checkpoint file rank 0 writes
    (every rank must call it: a collective on the rank's device)."""
    own = rng_state(env.device)
    if not env.distributed:
        return [own]
    states: list = [None] * env.world_size
    dist.all_gather_object(states, own)
    return states


def restore_rng(saved: Any, env: DistEnv, seed: int, step: int, logger) -> None:
    """Resuming mid-epoch, after Loaders.epoch seeded the epoch: each rank takes its own
    saved state, so the rest of the epoch draws the mixup, drop path and augmentation an
    uninterrupted run would. Saved by another process count, no state is this rank's: it
    reseeds from (seed, rank, step) rather than replay the draws that began the epoch, and
    one line says so. ``saved`` is a list of per-rank states."""
    if isinstance(saved, dict):  # older checkpoints: rank 0's state, its CUDA part for every device
        saved = [{k: v for k, v in saved.items() if k != "cuda"}]
    states = list(saved or [])
    if len(states) == env.world_size:
        set_rng_state(states[env.rank], env.device)
        return
    seed_everything(int(np.random.SeedSequence([seed, env.rank, step]).generate_state(1)[0]))
    logger.info(f"resume: the checkpoint holds the random state of {len(states)} process(es), this run "
                f"has {env.world_size}: each process reseeds from (SEED, its rank, step {step}), so the "
                f"rest of the epoch draws other random numbers than an uninterrupted run would")


# ------------------------------------------------------------ the training-state format
# Every key of a training checkpoint; written by ``training_checkpoint``, checked by
# ``check_training_checkpoint`` (the REQUIRED ones) and read by ``restore``.
TRAINING_KEYS = ("model", "optimizer", "lr_scheduler", "scaler", "ema", "epoch", "max_accuracy",
                 "progress", "bad_in_a_row", "rng", "model_name", "config")
REQUIRED = ("model", "optimizer", "lr_scheduler", "epoch")


def check_training_checkpoint(ckpt: dict, path: str) -> None:
    """Raise CheckpointError unless ``ckpt`` can restart training: the parts resume needs,
    and finite weights (a NaN model is never saved, so one found here is damaged)."""
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {', '.join(missing)}); "
                              f"use --pretrained to start from its weights")
    bad = [k for k, v in state_dict_of(ckpt, path).items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({bad[0]}, {len(bad)} tensors)")


def training_checkpoint(state: TrainState, epoch: int, max_accuracy: float,
                        progress: Optional[EpochProgress], model_name: str, config_text: str,
                        rng: list[dict]) -> dict:
    """Everything ``restore`` needs; ``progress`` marks a mid-epoch checkpoint, ``rng`` holds
    every rank's random state (gather_rng_states)."""
    ckpt = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler.enabled else None,
        "ema": state.ema.module.state_dict() if state.ema is not None else None,
        "epoch": epoch,
        "max_accuracy": max_accuracy,
        "progress": progress.as_dict() if progress is not None else None,
        "bad_in_a_row": state.bad_in_a_row,
        "rng": rng,
        "model_name": model_name,
        "config": config_text,
    }
    assert tuple(ckpt) == TRAINING_KEYS
    return ckpt


@dataclass
class ResumePoint:
    """Where training picks up: the epoch to run next, and for a mid-epoch checkpoint how
    far that epoch got and the RNG state to restore once the epoch's seeds are set."""
    epoch: int
    max_accuracy: float = 0.0
    progress: Optional[EpochProgress] = None
    rng: Optional[list] = None  # every rank's random state (restore_rng picks this rank's)
    path: Optional[str] = None


# Keys whose change a resumed run cannot honour, and why.
UNRESUMABLE = {"TRAIN.OPTIMIZER.NAME": "the optimizer's state (its moments) cannot carry over "
                                       "to another optimizer"}


def find_resume(out_dir: str, env: DistEnv, logger, path: str = "", auto: bool = True
                ) -> tuple[Optional[str], Optional[dict]]:
    """The checkpoint to resume from: ``path``, or with ``auto`` the newest valid one in the
    run folder (rank 0 picks it and tells the others, so every rank loads the same file);
    with its contents where already read. Stale temporaries of a crashed save go first."""
    if env.is_main:
        remove_stale_temporaries(out_dir)
    ckpt = None
    if not path and auto:
        if env.is_main:
            path, ckpt = newest_valid_checkpoint(out_dir, logger)
        if env.distributed:
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0]
    if path and ckpt is None:
        ckpt = read_weights(path)
    return path or None, ckpt


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict, path: str) -> None:
    """The saved optimizer state (moments, step counts) under this command's settings:
    lr, weight decay, betas, momentum and lr scales stay those just built."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except ValueError as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this command's optimizer "
                              f"({one_line(e, 160)}): TRAIN.LAYER_DECAY or the model changed; resume "
                              f"with the checkpoint's settings, or start a new run (--tag) from its "
                              f"weights with --pretrained") from None
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def restore(ckpt: dict, path: str, state: TrainState, model_name: str, logger) -> ResumePoint:
    """Load a training checkpoint (epoch end or mid-epoch) into ``state``: weights, optimizer
    state, loss scale, EMA. The learning-rate schedule is not loaded: it is rebuilt from
    the command (CheckpointSaver.restore moves it to the resumed step)."""
    check_training_checkpoint(ckpt, path)
    name = ckpt.get("model_name")
    if name and name != model_name:
        raise CheckpointError(f"{path} is a checkpoint of {name}, not of {model_name}")
    load_weights(state.model, state_dict_of(ckpt, path), path)
    _load_optimizer(state.optimizer, ckpt["optimizer"], path)
    state.scaler.load_state_dict(ckpt.get("scaler"))
    if state.ema is not None:
        if ckpt.get("ema"):
            state.ema.module.load_state_dict(ckpt["ema"])
        else:
            logger.warning(f"{path} has no EMA weights; EMA restarts from the model")
            state.ema.module.load_state_dict(state.model.state_dict())
    state.bad_in_a_row = int(ckpt.get("bad_in_a_row", 0))
    epoch, best = int(ckpt["epoch"]), float(ckpt["max_accuracy"])
    if ckpt.get("progress") is not None:  # mid-epoch: the same epoch goes on
        progress = EpochProgress(**ckpt["progress"])
        progress.stopped = False
        return ResumePoint(epoch, best, progress, ckpt.get("rng"), path)
    return ResumePoint(epoch + 1, best, path=path)


def weights_finite(module: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


class CheckpointSaver:
    """Owns the run folder's checkpoints (timm's CheckpointSaver is the model): restores
    the one to resume from (``find_resume`` picks it), writes epoch, best, mid-epoch
    (``every_steps``) and stop saves under their names, keeps the newest ``keep``, and
    tracks the best accuracy.

    Every rank checks the weights before a save (a NaN model is never saved: the run
    stops with TrainingDiverged instead); rank 0 writes."""

    def __init__(self, out_dir: str, state: TrainState, env: DistEnv, logger, *, model_name: str,
                 config_text: str, epochs: int, steps_per_epoch: int, samples_per_step: int,
                 save_freq: int = 1, keep: int = 3, every_steps: int = 0) -> None:
        self.out_dir, self.state, self.env, self.logger = out_dir, state, env, logger
        self.model_name, self.config_text = model_name, config_text
        self.epochs, self.steps_per_epoch, self.samples_per_step = epochs, steps_per_epoch, samples_per_step
        self.save_freq, self.keep, self.every_steps = save_freq, keep, every_steps
        self.best = 0.0
        self.last_saved: Optional[str] = None
        self.history: Optional[str] = None  # how this command differs from the resumed checkpoint

    def restore(self, path: str, ckpt: dict, config) -> ResumePoint:
        """Continue the run in ``path`` under this command (``config``): every key that differs
        from the checkpoint's config is logged, one line each; the schedule follows the new
        values from the resumed step; a mid-epoch position is mapped by images seen, so a new
        batch size or process count goes on where the old one stopped. A change that cannot
        be honoured (UNRESUMABLE) is a CheckpointError saying so."""
        from config import changed_keys
        changes = changed_keys(ckpt.get("config") or "", config)
        for key, old, new in changes:
            if key in UNRESUMABLE:
                raise CheckpointError(f"cannot resume {path} with {key} {new!r} (it was {old!r}): "
                                      f"{UNRESUMABLE[key]}; start a new run (--tag) from its weights "
                                      f"with --pretrained")
            self.logger.info(f"resume: {key} {old!r} in the checkpoint, {new!r} now")
        point = restore(ckpt, path, self.state, self.model_name, self.logger)
        self.best, self.last_saved = point.max_accuracy, path
        self.history = "; ".join(f"{k} {o!r} -> {n!r}" for k, o, n in changes) or None
        if self.history:
            self.history = f"{os.path.basename(path)} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {self.history}"
        where = f"epoch {point.epoch - 1}"  # the epoch the checkpoint finished
        if point.progress is not None:
            where = self._map_position(point.epoch, point.progress)
        step = point.epoch * self.steps_per_epoch + (point.progress.steps_done if point.progress else 0)
        resume_schedule(self.state.scheduler, ckpt.get("lr_scheduler"), step)
        self.logger.info(f"resumed from {path} ({where}, best Acc@1 {point.max_accuracy:.3f}); "
                         f"lr {self.state.optimizer.param_groups[0]['lr']:.3e} at step {step}")
        return point

    def _map_position(self, epoch: int, progress: EpochProgress) -> str:
        """Mid-epoch: the steps of this command's batch that the images seen make up."""
        per_step = self.samples_per_step
        seen = progress.samples_done or progress.steps_done * per_step  # older checkpoints
        if seen != progress.steps_done * per_step:
            steps = min(seen // per_step, self.steps_per_epoch)
            self.logger.info(f"resume: {seen} images of epoch {epoch} were seen at another batch size "
                             f"or process count; at {per_step} images per step that is step {steps} "
                             f"of {self.steps_per_epoch}")
            progress.steps_done, progress.samples_done = steps, steps * per_step
        return f"epoch {epoch} after step {progress.steps_done}"

    def save(self, name: str, epoch: int, progress: Optional[EpochProgress] = None) -> str:
        state = self.state
        if not weights_finite(state.model) or (state.ema is not None and not weights_finite(state.ema.module)):
            raise TrainingDiverged(f"the weights are not finite at epoch {epoch}; {name} not saved")
        path = os.path.join(self.out_dir, name)
        rng = gather_rng_states(self.env)
        if self.env.is_main:
            save_atomic(training_checkpoint(state, epoch, self.best, progress, self.model_name,
                                            self.config_text, rng), path)
            prune_checkpoints(self.out_dir, self.keep)
        return path

    def after_step(self, epoch: int, progress: EpochProgress) -> None:
        """Mid-epoch checkpoint every ``every_steps`` optimizer steps (not at the epoch's end)."""
        done = progress.steps_done
        if self.every_steps and done % self.every_steps == 0 and done < self.steps_per_epoch:
            self.last_saved = self.save(checkpoint_name(epoch, done), epoch, progress)

    def after_epoch(self, epoch: int, acc1: float) -> None:
        """The epoch's checkpoint (every ``save_freq`` epochs and the last), and
        ``ckpt_best.pth`` when ``acc1`` beats the best so far."""
        improved = acc1 > self.best
        self.best = max(self.best, acc1)
        if (epoch + 1) % self.save_freq == 0 or epoch == self.epochs - 1:
            self.last_saved = self.save(checkpoint_name(epoch), epoch)
        if improved:
            self.save("ckpt_best.pth", epoch)

    def stopped(self, epoch: int, progress: EpochProgress) -> str:
        """A stop signal ended the epoch: save where it got to; every rank waits until the
        file is complete."""
        path = self.last_saved = self.save(checkpoint_name(epoch, progress.steps_done), epoch, progress)
        if self.env.distributed:
            dist.barrier()
        return path
