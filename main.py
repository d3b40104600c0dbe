"""Train or evaluate a registered backbone from a YAML config.

One process:  python main.py --cfg configs/quickstart.yaml
One node:     torchrun --nproc_per_node 8 main.py --cfg CFG      (train.sh)
Slurm:        srun python main.py --cfg CFG                       (train_slurm.sh)

Exit codes: 0 done; 2 a user mistake (config, data, checkpoint, output folder; one line on
stderr); 3 training diverged (TRAIN.MAX_BAD_STEPS non-finite steps in a row); 75 stopped by
SIGTERM/SIGUSR1 after saving a resumable checkpoint (run the same command again to go on;
train_slurm.sh requeues the job); anything else: a crash (traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
import yaml
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

import models
from checkpoint import (CheckpointError, check_training_checkpoint, checkpoint_name, extract_state_dict,
                        load_pretrained, load_weights, newest_valid_checkpoint, prune_checkpoints,
                        read_checkpoint, remove_stale_temporaries, rng_state, save_atomic, set_rng_state)
from config import ConfigError, config_from_args, dump_config, framework_model_keys
from data import DataError, build_loaders
from engine import (EpochProgress, TrainingDiverged, TrainState, evaluate, measure_throughput,
                    set_progress, steps_per_epoch, train_one_epoch)
from logger import MetricsWriter, create_logger
from lr_scheduler import build_scheduler, scaled_lrs
from optimizer import build_optimizer
from utils import (DistEnv, abort_distributed, count_macs, count_params, epoch_seed, init_distributed,
                   seed_everything, skip_batches)

EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_PREEMPTED = 2, 3, 75  # 75: EX_TEMPFAIL, "try again"


class RunFolderError(RuntimeError):
    """The output folder holds another model's run; the message says how to proceed."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--cfg", required=True, metavar="FILE", help="YAML config")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="override config keys, e.g. --opts TRAIN.EPOCHS 30 DATA.BATCH_SIZE 64")
    p.add_argument("--batch-size", type=int, help="per-process batch size (DATA.BATCH_SIZE)")
    p.add_argument("--data-path", help="dataset root (DATA.DATA_PATH)")
    p.add_argument("--output", help="root of run folders (OUTPUT)")
    p.add_argument("--tag", help="run name (TAG)")
    p.add_argument("--resume", help="training checkpoint to resume from (disables auto-resume)")
    p.add_argument("--pretrained", help="weights to fine-tune from (or to evaluate with --eval)")
    p.add_argument("--eval", action="store_true", help="evaluate and exit")
    p.add_argument("--throughput", action="store_true", help="measure images/s and exit")
    p.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision on CUDA (--no-amp disables)")
    p.add_argument("--overwrite", action="store_true",
                   help="train even if the output folder holds another model's run: that run's "
                        "files are moved aside into a replaced-<time>/ subfolder (OVERWRITE)")
    return p.parse_args(argv)


def autocast_factory(config, device: torch.device):
    """(autocast context factory, GradScaler or None). AMP only acts on CUDA."""
    if not (config.AMP and device.type == "cuda"):
        return contextlib.nullcontext, None
    dtype = config.AMP_DTYPE
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    dtype = getattr(torch, dtype)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return partial(torch.autocast, device_type="cuda", dtype=dtype), scaler


def build_criterion(config, mixup):
    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup already smooths the targets
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


def run_dir(config) -> str:
    return os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)


def adapt_options(config) -> dict:
    """Framework keys of the model's config section (e.g. MODEL.DAT.HEAD_MAP), as keyword
    arguments for the model's ``adapt_pretrained``; empty values are left out."""
    section = config.MODEL.get(config.MODEL.TYPE.upper(), None) or {}
    return {k.lower(): v for k, v in section.items()
            if k in framework_model_keys(config.MODEL.TYPE) and v}


def load_for_eval(config, model, logger) -> str:
    path = config.MODEL.RESUME or config.MODEL.PRETRAINED
    if not path:
        raise CheckpointError("--eval needs weights: pass --resume CKPT or --pretrained CKPT")
    state = extract_state_dict(read_checkpoint(path), path)
    if hasattr(model, "adapt_pretrained") and config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        state = model.adapt_pretrained(state, **adapt_options(config))
    load_weights(model, state, path, strict=True)
    logger.info(f"loaded weights from {path}")
    return path


@dataclass
class ResumePoint:
    """Where training picks up: the epoch to run next, and for a mid-epoch checkpoint how
    far that epoch got and the RNG state to restore once the epoch's seeds are set."""
    epoch: int
    max_accuracy: float = 0.0
    progress: Optional[EpochProgress] = None
    rng: Optional[dict] = None


def resume(path: str, config, state: TrainState, logger, ckpt: Optional[dict] = None) -> ResumePoint:
    """Restore everything a run needs from a training checkpoint (epoch end or mid-epoch)."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    check_training_checkpoint(ckpt, path)
    name = ckpt.get("model_name")
    if name and name != config.MODEL.NAME:
        raise CheckpointError(f"{path} is a checkpoint of {name}, not of {config.MODEL.NAME}")
    load_weights(state.core, extract_state_dict(ckpt, path), path, strict=True)
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["lr_scheduler"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.ema is not None:
        if ckpt.get("ema"):
            state.ema.module.load_state_dict(ckpt["ema"])
        else:
            logger.warning(f"{path} has no EMA weights; EMA restarts from the model")
            state.ema.module.load_state_dict(state.core.state_dict())
    state.bad_in_a_row = int(ckpt.get("bad_in_a_row", 0))
    epoch, best = int(ckpt["epoch"]), float(ckpt["max_accuracy"])
    if ckpt.get("progress") is not None:  # mid-epoch: the same epoch goes on
        progress = EpochProgress(**ckpt["progress"])
        progress.stopped = False
        logger.info(f"resumed from {path} (epoch {epoch} after step {progress.steps_done}, "
                    f"best Acc@1 {best:.3f})")
        return ResumePoint(epoch, best, progress, ckpt.get("rng"))
    logger.info(f"resumed from {path} (epoch {epoch}, best Acc@1 {best:.3f})")
    return ResumePoint(epoch + 1, best)


def save_checkpoint(path: str, config, state: TrainState, epoch: int, max_accuracy: float,
                    progress: Optional[EpochProgress] = None) -> None:
    """Everything resume() needs; ``progress`` marks a mid-epoch checkpoint."""
    save_atomic({
        "model": state.core.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "ema": state.ema.module.state_dict() if state.ema is not None else None,
        "epoch": epoch,
        "max_accuracy": max_accuracy,
        "progress": progress.as_dict() if progress is not None else None,
        "bad_in_a_row": state.bad_in_a_row,
        "rng": rng_state(),
        "model_name": config.MODEL.NAME,
        "config": config.dump(),
    }, path)


def weights_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


def build_ema(config, model: torch.nn.Module):
    """The one place the weight average is made (engine.py calls its ``update(model, step=)``
    after every optimizer step that was not skipped; checkpoints hold ``.module``)."""
    if not config.TRAIN.EMA.ENABLED:
        return None
    # Parameters are averaged; buffers are state (e.g. a Performer's random features, which
    # an average would turn into garbage) and are copied from the live model.
    return ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY, exclude_buffers=True)


class StopSignal:
    """SIGTERM (preemption, scancel) or SIGUSR1 (slurm's warning before the time limit,
    ``srun --signal``) asks training to stop at the next step boundary. The handler only
    sets a flag; the training loop reads it, and all ranks agree on it every step."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.received is not None


_ARCH_KEYS = ("NAME", "TYPE", "NUM_CLASSES", "IN_CHANS")


def run_folder_conflict(config, out_dir: str) -> Optional[str]:
    """How the run recorded in ``out_dir/config.yaml`` builds a different model, or None."""
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
    except yaml.YAMLError:
        return f"{path} is not valid YAML"
    ours = yaml.safe_load(config.dump())
    if not isinstance(saved, dict) or not isinstance(saved.get("MODEL"), dict):
        return f"{path} has no MODEL section"
    family = config.MODEL.TYPE.upper()
    framework = framework_model_keys(family)
    pairs = [(f"MODEL.{k}", saved["MODEL"].get(k), ours["MODEL"][k]) for k in _ARCH_KEYS]
    pairs.append((f"MODEL.{family}", {k: v for k, v in (saved["MODEL"].get(family) or {}).items() if k not in framework},
                  {k: v for k, v in (ours["MODEL"].get(family) or {}).items() if k not in framework}))
    pairs.append(("DATA.IMG_SIZE", (saved.get("DATA") or {}).get("IMG_SIZE"), ours["DATA"]["IMG_SIZE"]))
    diffs = [f"{key} {old!r} here, {new!r} now" for key, old, new in pairs if old != new]
    return "; ".join(diffs[:3]) or None


def prepare_run_folder(config, out_dir: str, env: DistEnv) -> Optional[str]:
    """Refuse an output folder holding another model's run before anything is written there;
    with --overwrite, move the old run's files aside instead (returns where to)."""
    conflict = run_folder_conflict(config, out_dir)
    if conflict and not config.OVERWRITE:
        raise RunFolderError(f"{out_dir} holds another model's run ({conflict}); choose another "
                             f"--tag or --output, or pass --overwrite to move that run aside")
    moved = None
    if config.OVERWRITE and env.is_main and os.path.isdir(out_dir):
        old = [n for n in os.listdir(out_dir) if n in ("config.yaml", "metrics.jsonl")
               or n.startswith(("ckpt_", "log_rank"))]
        if old:
            moved = os.path.join(out_dir, time.strftime("replaced-%Y%m%d-%H%M%S"))
            os.makedirs(moved)
            for name in old:
                shutil.move(os.path.join(out_dir, name), moved)
    if env.distributed:
        dist.barrier()  # nobody looks for checkpoints before they are moved
    return moved


def agreed_resume_path(out_dir: str, env: DistEnv, logger) -> Optional[str]:
    """Rank 0 picks the newest valid checkpoint and tells the others, so that every rank
    resumes from the same file (and epoch) even if the files change meanwhile."""
    path = newest_valid_checkpoint(out_dir, logger)[0] if env.is_main else None
    if env.distributed:
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    return path


def throughput(config, model, env: DistEnv, autocast, logger) -> None:
    batch = torch.randn(config.DATA.BATCH_SIZE, config.MODEL.IN_CHANS, config.DATA.IMG_SIZE,
                        config.DATA.IMG_SIZE, device=env.device)
    if config.TRAIN.CHANNELS_LAST:
        batch = batch.contiguous(memory_format=torch.channels_last)
    iters = 30 if env.device.type == "cuda" else 5
    fwd = measure_throughput(model, batch, autocast, train_step=False, iters=iters)
    train = measure_throughput(model, batch, autocast, train_step=True, iters=iters)
    logger.info(f"throughput {config.MODEL.NAME} batch {batch.size(0)}: "
                f"eval {fwd:.1f} img/s, train step {train:.1f} img/s")


def evaluate_checkpoint(config, model, loaders, env: DistEnv, autocast, logger, out_dir: str) -> int:
    """--eval: the accuracy of the given weights on the validation set, one line."""
    if env.is_main and not os.path.exists(os.path.join(out_dir, "config.yaml")):
        dump_config(config, os.path.join(out_dir, "config.yaml"))  # never another run's
    load_for_eval(config, model, logger)
    model.eval()  # before the hook: in training mode it may redraw random features
    set_progress(model, config.TRAIN.EPOCHS, 2**62)  # a finished run's schedule point
    stats = evaluate(model, loaders.val, env, autocast, config.TRAIN.CHANNELS_LAST)
    for line in loaders.skipped_images():  # DATA.SKIP_BAD_IMAGES
        logger.warning(line)
    logger.info(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} "
                f"loss {stats['loss']:.4f} on {stats['images']} images")
    return 0


def build_train_state(config, model, loaders, env: DistEnv, autocast, scaler, logger
                      ) -> tuple[TrainState, int]:
    """Optimizer, per-step schedule, EMA and the DDP / compiled wrapper around ``model``;
    returns the state a training step needs and the optimizer steps per epoch."""
    if config.MODEL.PRETRAINED:
        load_pretrained(model, config.MODEL.PRETRAINED, logger, **adapt_options(config))
    accum = config.TRAIN.ACCUMULATION_STEPS
    total_batch = config.DATA.BATCH_SIZE * env.world_size * accum
    lr, warmup_lr, min_lr = scaled_lrs(config, total_batch)
    optimizer = build_optimizer(config, model, lr)
    n_steps = steps_per_epoch(len(loaders.train), accum)
    scheduler = build_scheduler(config, optimizer, n_steps, warmup_lr, min_lr)
    train_model = model
    if env.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if config.TRAIN.COMPILE:
        train_model = torch.compile(train_model)
    state = TrainState(model=train_model, core=model, criterion=build_criterion(config, loaders.mixup),
                       optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast=autocast,
                       ema=build_ema(config, model), mixup=loaders.mixup, accumulation_steps=accum,
                       clip_grad=config.TRAIN.CLIP_GRAD, channels_last=config.TRAIN.CHANNELS_LAST,
                       max_bad_steps=config.TRAIN.MAX_BAD_STEPS)
    scaling = (f"base {config.TRAIN.BASE_LR:.1e} x total batch {total_batch} / {config.TRAIN.LR_BASE_BATCH}"
               if config.TRAIN.LR_BASE_BATCH else f"total batch {total_batch}, not scaled")
    logger.info(f"lr {lr:.3e} ({scaling}), {n_steps} steps/epoch, {config.TRAIN.EPOCHS} epochs")
    return state, n_steps


def epoch_batches(config, loaders, env: DistEnv, epoch: int, point: ResumePoint):
    """Seeds everything for ``epoch`` and returns (batches, progress so far): the whole loader,
    or for the epoch a mid-epoch checkpoint stopped in, the batches it had not reached yet."""
    seed = epoch_seed(config.SEED, env.rank, epoch)
    seed_everything(seed)
    loaders.generator.manual_seed(seed)
    loaders.train.sampler.set_epoch(epoch)
    if epoch != point.epoch or point.progress is None:
        return loaders.train, None
    batches = skip_batches(loaders.train, point.progress.steps_done * config.TRAIN.ACCUMULATION_STEPS)
    if point.rng:
        set_rng_state(point.rng)
    return batches, point.progress


def validate_epoch(state: TrainState, loaders, env: DistEnv, epoch: int, n_steps: int,
                   train_stats: dict, progress: EpochProgress, best: float, logger) -> dict:
    """Validation of the model (and its EMA) after ``epoch``; logs one line and returns the
    epoch's metrics record, whose ``max_acc1`` includes this epoch."""
    model = state.core
    model.eval()
    set_progress(model, epoch + 1, (epoch + 1) * n_steps)
    val = evaluate(model, loaders.val, env, state.autocast, state.channels_last)
    record = {"epoch": epoch, **train_stats, "val_loss": val["loss"], "val_acc1": val["acc1"],
              "val_acc5": val["acc5"], "max_acc1": max(best, val["acc1"])}
    ema_text = ""
    if state.ema is not None:
        ema_val = evaluate(state.ema.module, loaders.val, env, state.autocast, state.channels_last)
        record.update(ema_acc1=ema_val["acc1"], ema_acc5=ema_val["acc5"])
        ema_text = f", EMA Acc@1 {ema_val['acc1']:.3f}"
    for line in loaders.skipped_images():  # DATA.SKIP_BAD_IMAGES
        logger.warning(f"Epoch {epoch}: {line}")
    skipped = f"; {progress.skipped} non-finite steps skipped" if progress.skipped else ""
    logger.info(f"Epoch {epoch}: val Acc@1 {val['acc1']:.3f} Acc@5 {val['acc5']:.3f} "
                f"on {val['images']} images{ema_text}; best {record['max_acc1']:.3f}{skipped}")
    return record


def run(config, env: DistEnv) -> int:
    out_dir = run_dir(config)
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    moved = prepare_run_folder(config, out_dir, env) if training else None
    logger = create_logger(out_dir, env.rank)
    if moved:
        logger.warning(f"--overwrite: the previous run in {out_dir} was moved to {moved}")
    logger.info(f"{config.MODEL.NAME} on {env.device} x {env.world_size} process(es); "
                f"output {out_dir}")
    seed_everything(config.SEED + env.rank)
    if config.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)

    model = models.build_model(config)
    macs = count_macs(model, config.DATA.IMG_SIZE, config.MODEL.IN_CHANS)
    logger.info(f"params {count_params(model) / 1e6:.2f}M, GMACs {macs / 1e9:.3f} "
                f"at {config.DATA.IMG_SIZE}x{config.DATA.IMG_SIZE}")
    model.to(env.device)
    if config.TRAIN.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    autocast, scaler = autocast_factory(config, env.device)

    if config.THROUGHPUT_MODE:
        throughput(config, model, env, autocast, logger)
        return 0
    loaders = build_loaders(config, env.rank, env.world_size, train=not config.EVAL_MODE)
    if config.EVAL_MODE:
        return evaluate_checkpoint(config, model, loaders, env, autocast, logger, out_dir)

    state, n_steps = build_train_state(config, model, loaders, env, autocast, scaler, logger)
    if env.is_main:
        remove_stale_temporaries(out_dir)
    resume_path = config.MODEL.RESUME or None
    if not resume_path and config.TRAIN.AUTO_RESUME:
        resume_path = agreed_resume_path(out_dir, env, logger)
    point = resume(resume_path, config, state, logger) if resume_path \
        else ResumePoint(config.TRAIN.START_EPOCH)
    if env.is_main:  # after the data checks and the resume: bad input must not overwrite a run's config
        dump_config(config, os.path.join(out_dir, "config.yaml"))

    max_accuracy, last_saved = point.max_accuracy, resume_path

    def save(name: str, epoch: int, progress: Optional[EpochProgress] = None) -> str:
        """Every rank checks the weights (never save a NaN model); rank 0 writes."""
        if not weights_finite(model) or (state.ema is not None and not weights_finite(state.ema.module)):
            raise TrainingDiverged(f"the weights are not finite at epoch {epoch}; {name} not saved")
        path = os.path.join(out_dir, name)
        if env.is_main:
            save_checkpoint(path, config, state, epoch, max_accuracy, progress)
            prune_checkpoints(out_dir, config.KEEP_CKPTS)
        return path

    def after_step(epoch: int, progress: EpochProgress) -> None:
        nonlocal last_saved
        every = config.TRAIN.SAVE_EVERY_STEPS
        if every and progress.steps_done % every == 0 and progress.steps_done < n_steps:
            last_saved = save(checkpoint_name(epoch, progress.steps_done), epoch, progress)

    state.after_step = after_step
    metrics = MetricsWriter(config, out_dir, logger, enabled=env.is_main)
    try:
        with StopSignal() as stop:
            state.stop_requested = stop.requested
            for epoch in range(point.epoch, config.TRAIN.EPOCHS):
                batches, progress = epoch_batches(config, loaders, env, epoch, point)
                try:
                    train_stats, progress = train_one_epoch(state, batches, epoch, env, logger,
                                                            config.PRINT_FREQ, n_steps, progress)
                except TrainingDiverged as e:
                    logger.error(f"{e}; stopping. Last good checkpoint: {last_saved or 'none yet'}")
                    return EXIT_DIVERGED
                if progress.stopped:
                    path = save(checkpoint_name(epoch, progress.steps_done), epoch, progress)
                    if env.distributed:
                        dist.barrier()  # the checkpoint is complete before any rank exits
                    why = stop.received or "a stop signal on another rank"
                    logger.warning(f"{why}: stopped at epoch {epoch} step {progress.steps_done}/"
                                   f"{n_steps} and saved {path}; exit code {EXIT_PREEMPTED}: run the "
                                   f"same command again to continue")
                    return EXIT_PREEMPTED
                record = validate_epoch(state, loaders, env, epoch, n_steps, train_stats, progress,
                                        max_accuracy, logger)
                improved, max_accuracy = record["val_acc1"] > max_accuracy, record["max_acc1"]
                try:
                    if (epoch + 1) % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
                        last_saved = save(checkpoint_name(epoch), epoch)
                    if improved:
                        save("ckpt_best.pth", epoch)
                except TrainingDiverged as e:
                    logger.error(f"{e}; stopping. Last good checkpoint: {last_saved or 'none yet'}")
                    return EXIT_DIVERGED
                if env.is_main:
                    metrics.write(record)
                if env.distributed:
                    dist.barrier()
    finally:
        metrics.close()
    logger.info(f"done: best Acc@1 {max_accuracy:.3f}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    env = init_distributed(config.DEVICE, config.DIST_TIMEOUT)
    finished = False
    try:
        code = run(config, env)
        finished = True
        return code
    except (DataError, CheckpointError, RunFolderError, models.ModelArgumentError,
            models.UnknownModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as e:  # run() reports the usual cases with the last good checkpoint
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except BaseException as e:
        if env.distributed:  # the traceback follows on stderr; say which rank failed
            print(f"rank {env.rank} failed ({type(e).__name__}); aborting the process group",
                  file=sys.stderr)
        raise
    finally:
        if dist.is_initialized():
            if finished:
                dist.destroy_process_group()
            else:  # peers may be waiting for this rank in a collective: make them fail fast
                abort_distributed()


if __name__ == "__main__":
    sys.exit(main())
