"""Train or evaluate a registered backbone from a YAML config.

One process:  python main.py --cfg configs/quickstart.yaml
One node:     torchrun --nproc_per_node 8 main.py --cfg CFG      (train.sh)
Slurm:        srun python main.py --cfg CFG                       (train_slurm.sh)

Exit codes: 0 done; 2 a user mistake (config, data, checkpoint, output folder; one line on
stderr); 3 training diverged (TRAIN.MAX_BAD_STEPS non-finite steps in a row); 75 stopped by
SIGTERM/SIGUSR1 after saving a resumable checkpoint (run the same command again to go on;
train_slurm.sh requeues the job); anything else: a crash (traceback).

This file is the wiring: flags -> config -> process group -> model, data, optimizer ->
the epoch loop. torch and the framework's modules are imported inside the functions, once
the flags and the config are known to be good, so that --help and config mistakes answer
at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from config import dump_config, resume_file, source_of
from errors import (EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PREEMPTED, TrainingDiverged, UserError, exit_code, report,
                    user_errors)
from flags import build_parser, config_from_args
from model_config import build_model


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return build_parser(__doc__).parse_args(argv)


def build_train_state(config, model, loaders, env, autocast, amp_dtype, logger):
    """Optimizer, per-step schedule, loss, EMA, loss scaler and the DDP / compiled wrapper
    around ``model``; returns the state a training step needs and the steps per epoch."""
    import torch
    from timm.utils import ModelEmaV3

    import losses
    from amp import LossScaler
    from distillation import build_distillation
    from engine import steps_per_epoch
    from lr_scheduler import build_scheduler, scaled_lrs
    from optimizer import build_optimizer
    from train_state import TrainState
    from utils import data_parallel

    accum = config.TRAIN.ACCUMULATION_STEPS
    total_batch = config.DATA.BATCH_SIZE * env.world_size * accum
    lr, warmup_lr, min_lr = scaled_lrs(config, total_batch)
    optimizer = build_optimizer(config, model, lr)
    n_steps = steps_per_epoch(len(loaders.train), accum)
    scheduler = build_scheduler(config, optimizer, n_steps, warmup_lr, min_lr)
    # EMA averages parameters; buffers are state (a Performer's random features, which an
    # average would turn into garbage) and are copied from the live model.
    ema_cfg = config.TRAIN.EMA
    ema = ModelEmaV3(model, decay=ema_cfg.DECAY, exclude_buffers=True, use_warmup=ema_cfg.WARMUP,
                     warmup_power=ema_cfg.WARMUP_POWER, warmup_gamma=ema_cfg.WARMUP_GAMMA) \
        if ema_cfg.ENABLED else None
    criterion = losses.build_criterion(config, loaders.mixup)
    distillation = build_distillation(config, model, criterion, env.device, logger)  # before DDP wraps it
    wrapped = model
    if env.distributed:
        wrapped = data_parallel(model, env)
    if config.TRAIN.COMPILE:
        logger.info("TRAIN.COMPILE: torch.compile compiles the model in the first step, which takes "
                    "longer (evaluation runs eagerly)")
        wrapped = torch.compile(wrapped)
    state = TrainState(model=model, wrapped=wrapped, criterion=criterion, distillation=distillation,
                       clip_mode=config.TRAIN.CLIP_MODE, mixup_off_epoch=config.AUG.MIXUP_OFF_EPOCH,
                       optimizer=optimizer,
                       scheduler=scheduler, autocast=autocast,
                       scaler=LossScaler(amp_dtype == torch.float16, env.device.type), ema=ema,
                       mixup=loaders.mixup, accumulation_steps=accum, clip_grad=config.TRAIN.CLIP_GRAD,
                       channels_last=config.TRAIN.CHANNELS_LAST, max_bad_steps=config.TRAIN.MAX_BAD_STEPS,
                       compiling=config.TRAIN.COMPILE)
    scaling = (f"base {config.TRAIN.BASE_LR:.1e} x total batch {total_batch} / {config.TRAIN.LR_BASE_BATCH}"
               if config.TRAIN.LR_BASE_BATCH else f"total batch {total_batch}, not scaled")
    drawn = loaders.images_per_epoch()
    left = drawn - n_steps * accum * config.DATA.BATCH_SIZE
    dropped = f"; {left} of the {drawn} images each process draws per epoch " \
              f"do not fill a step and wait for a later epoch" if left else ""
    logger.info(f"lr {lr:.3e} ({scaling}), {n_steps} steps/epoch, {config.TRAIN.EPOCHS} epochs{dropped}")
    return state, n_steps


def validate_epoch(state, loaders, env, epoch: int, n_steps: int, train_stats: dict, progress,
                   best: float, logger) -> dict:
    """Validation of the model (and its EMA) after ``epoch``; logs one line and returns the
    epoch's metrics record, whose ``max_acc1`` includes this epoch."""
    from engine import evaluate, set_progress

    state.model.eval()
    set_progress(state.model, epoch + 1, (epoch + 1) * n_steps)
    val = evaluate(state.model, loaders.val, env, state.autocast, state.channels_last)
    record = {"epoch": epoch, **train_stats, "val_loss": val["loss"], "val_acc1": val["acc1"],
              "val_acc5": val["acc5"], "max_acc1": max(best, val["acc1"])}
    ema_text = ""
    if state.ema is not None:
        set_progress(state.ema.module, epoch + 1, (epoch + 1) * n_steps)  # its own schedule point
        ema_val = evaluate(state.ema.module, loaders.val, env, state.autocast, state.channels_last)
        record.update(ema_acc1=ema_val["acc1"], ema_acc5=ema_val["acc5"])
        ema_text = f", EMA Acc@1 {ema_val['acc1']:.3f}"
    for line in loaders.skipped_images(env):  # DATA.SKIP_BAD_IMAGES
        logger.warning(f"Epoch {epoch}: {line}")
    skipped = f"; {progress.skipped} non-finite steps skipped" if progress.skipped else ""
    logger.info(f"Epoch {epoch}: val Acc@1 {val['acc1']:.3f} Acc@5 {val['acc5']:.3f} "
                f"on {val['images']} images{ema_text}; best {record['max_acc1']:.3f}{skipped}")
    return record


def fit(config, model, env, autocast, amp_dtype, logger, out_dir: str) -> int:
    """The epoch loop: resume (or start from pretrained weights), train, validate, save;
    stop cleanly on a signal. Weights are found before the data is read."""
    import torch.distributed as dist

    from checkpoint import CheckpointSaver, ResumePoint, find_resume, restore_rng
    from data import build_loaders
    from engine import train_one_epoch
    from logger import MetricsWriter
    from lr_scheduler import step_epoch
    from models.weights import load_pretrained
    from utils import StopSignal

    path, ckpt = find_resume(out_dir, env, logger, resume_file(config), auto=config.MODEL.RESUME == "auto")
    if config.MODEL.PRETRAINED and path:
        logger.info(f"MODEL.PRETRAINED {config.MODEL.PRETRAINED} is not loaded: the run resumes "
                    f"from its checkpoint, which holds the weights")
    elif config.MODEL.PRETRAINED:
        load_pretrained(model, config.MODEL.PRETRAINED, config.MODEL.HEAD_MAP, logger)
    loaders = build_loaders(config, env.rank, env.world_size, device=env.device)
    state, n_steps = build_train_state(config, model, loaders, env, autocast, amp_dtype, logger)
    per_step = config.DATA.BATCH_SIZE * env.world_size * config.TRAIN.ACCUMULATION_STEPS
    saver = CheckpointSaver(out_dir, state, env, logger, model_name=config.MODEL.NAME,
                            config_text=config.dump(), epochs=config.TRAIN.EPOCHS, steps_per_epoch=n_steps,
                            samples_per_step=per_step, save_freq=config.SAVE_FREQ,
                            keep=config.KEEP_CKPTS, every_steps=config.TRAIN.SAVE_EVERY_STEPS)
    point = saver.restore(path, ckpt, config) if path else ResumePoint(0)
    if env.is_main:  # after the data checks and the resume: bad input must not overwrite a run's config
        dump_config(config, os.path.join(out_dir, "config.yaml"), saver.history)
    if point.epoch >= config.TRAIN.EPOCHS:
        logger.info(f"nothing to train: the run is at epoch {point.epoch} of TRAIN.EPOCHS {config.TRAIN.EPOCHS}")
    resume_step = point.epoch * n_steps + (point.progress.steps_done if point.progress else 0)
    metrics = MetricsWriter(config, out_dir, logger, enabled=env.is_main, resume_step=resume_step)
    state.log_step = metrics.write_step  # per-step loss, lr, grad norm (TensorBoard, wandb)
    try:
        with StopSignal() as stop:
            for epoch in range(point.epoch, config.TRAIN.EPOCHS):
                resumed = point.progress if epoch == point.epoch else None
                skip = resumed.steps_done * config.TRAIN.ACCUMULATION_STEPS if resumed else 0
                batches = loaders.epoch(epoch, config.SEED, env.rank, skip)
                if resumed:  # each rank's RNG where the mid-epoch checkpoint left it
                    restore_rng(point.rng, env, config.SEED, epoch * n_steps + resumed.steps_done, logger)
                try:
                    train_stats, progress = train_one_epoch(state, batches, epoch, env, logger,
                                                            config.PRINT_FREQ, n_steps, resumed, saver, stop)
                    if progress.stopped:
                        path = saver.stopped(epoch, progress)
                        why = stop.received or "a stop signal on another rank"
                        logger.warning(f"{why}: stopped at epoch {epoch} step {progress.steps_done}/"
                                       f"{n_steps} and saved {path}; exit code {EXIT_PREEMPTED}: run the "
                                       f"same command again to continue")
                        return EXIT_PREEMPTED
                    try:
                        record = validate_epoch(state, loaders, env, epoch, n_steps, train_stats, progress,
                                                saver.best, logger)
                    except UserError:  # unreadable validation data: keep the epoch's training
                        path = saver.stopped(epoch, progress)
                        logger.error(f"validation of epoch {epoch} failed; its training is saved in {path}: "
                                     f"fix the data and run the same command again to validate it and go on")
                        raise
                    step_epoch(state.scheduler, epoch, record["val_acc1"])  # plateau; saved with the epoch
                    saver.after_epoch(epoch, record["val_acc1"])
                except TrainingDiverged as e:
                    logger.error(f"{e}; stopping. Last good checkpoint: {saver.last_saved or 'none yet'}")
                    return EXIT_DIVERGED
                metrics.write(record)
                if env.distributed:
                    dist.barrier()
    finally:
        metrics.close()
    logger.info(f"done: best Acc@1 {saver.best:.3f}")
    return 0


def run(config, env, out_dir: Optional[str] = None) -> int:
    """One MODE of ``config`` in the run folder (``out_dir``: another folder, for
    tools/eval_sweep.py's settings); the exit code."""
    import torch

    import run_folder
    from amp import autocast_dtype, autocast_factory
    from amp import describe as describe_amp
    from compiling import check_flex, require_compiler
    from evaluation import evaluate_weights
    from logger import create_logger
    from utils import count_macs, count_params, seed_everything, throughput

    seed_everything(config.SEED + env.rank)
    if config.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)
    amp_dtype = autocast_dtype(config, env.device)  # what this machine lacks is a config error,
    if config.TRAIN.COMPILE and config.MODE != "eval":  # found before any file is written
        require_compiler(config, env.device)
    flex_note = check_flex(env.device)  # FlexAttention is compiled too: 'auto' falls back, 'flex' is refused
    model = build_model(config)  # what the constructor refuses is a config error: before any file is written
    out_dir = out_dir or run_folder.run_dir(config)
    training = config.MODE == "train"
    lock, notes = run_folder.claim(config, out_dir, env) if training else (None, [])
    try:
        logger = create_logger(out_dir, env.rank)
        for line in notes:
            logger.warning(line)
        logger.info(f"{config.MODEL.NAME} on {env.device} x {env.world_size} process(es); output {out_dir}")
        if flex_note:
            logger.warning(flex_note)
        macs = count_macs(model, config.DATA.IMG_SIZE, config.MODEL.IN_CHANS)
        logger.info(f"params {count_params(model) / 1e6:.2f}M, GMACs {macs / 1e9:.3f} "
                    f"at {config.DATA.IMG_SIZE}x{config.DATA.IMG_SIZE}")
        model.to(env.device)
        if config.TRAIN.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)
        logger.info(describe_amp(config, env.device, amp_dtype))
        autocast = autocast_factory(amp_dtype, env.device)
        if config.MODE == "throughput":
            return throughput(config, model, env, autocast, logger)
        if config.MODE == "eval":
            return evaluate_weights(config, model, env, autocast, logger, out_dir)
        return fit(config, model, env, autocast, amp_dtype, logger, out_dir)
    finally:
        if lock is not None:
            lock.release()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except UserError as e:
        return exit_code(report(e))
    import torch.distributed as dist

    from utils import abort_distributed, init_distributed, is_peer_failure

    env, finished = None, False
    try:
        env = init_distributed(config.DEVICE, config.DIST_TIMEOUT, source_of(config, "DEVICE"))
        code = run(config, env)
        finished = True
    except user_errors() as e:  # UserError, and weights that cannot be found, read or fitted
        code = report(e, shared=not dist.is_initialized())
    except TrainingDiverged as e:  # run() reports the usual cases with the last good checkpoint
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_DIVERGED
    except KeyboardInterrupt:
        print("interrupted by a second Ctrl-C: stopped at once, nothing saved since the newest "
              "checkpoint; run the same command again to resume from it", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BaseException as e:
        if env is None or not env.distributed:
            raise
        if not is_peer_failure(e):  # the traceback follows on stderr; say which rank failed
            print(f"rank {env.rank} failed ({type(e).__name__}); aborting the process group", file=sys.stderr)
            raise
        print(f"rank {env.rank} failed: a collective broke ({type(e).__name__}), after another rank "
              f"failed first: its error says why", file=sys.stderr)
        code = 1
    finally:
        if dist.is_initialized():
            if finished:
                dist.destroy_process_group()
            else:  # peers may be waiting for this rank in a collective: make them fail fast
                abort_distributed()
    return exit_code(code)


if __name__ == "__main__":
    sys.exit(main())
