"""Train or evaluate a registered backbone from a YAML config.

One process:  python main.py --cfg configs/quickstart.yaml
One node:     torchrun --nproc_per_node 8 main.py --cfg CFG      (train.sh)
Slurm:        srun python main.py --cfg CFG                       (train_slurm.sh)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

import models
from checkpoint import (CheckpointError, extract_state_dict, latest_checkpoint, load_pretrained,
                        load_weights, prune_checkpoints, read_checkpoint, rng_state, save_atomic,
                        set_rng_state)
from config import ConfigError, config_from_args, dump_config, framework_model_keys
from data import DataError, build_loaders
from engine import (NonFiniteLossError, TrainState, evaluate, measure_throughput, set_progress,
                    steps_per_epoch, train_one_epoch)
from logger import MetricsWriter, create_logger
from lr_scheduler import build_scheduler, scaled_lrs
from optimizer import build_optimizer
from utils import DistEnv, count_macs, count_params, epoch_seed, init_distributed, seed_everything


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


def resume(path: str, state: TrainState, logger) -> tuple[int, float]:
    """Restore everything a run needs; returns (next epoch, best accuracy so far)."""
    ckpt = read_checkpoint(path)
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no optimizer/epoch); "
                              f"use --pretrained to start from its weights")
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
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    logger.info(f"resumed from {path} (epoch {ckpt['epoch']}, best Acc@1 {ckpt['max_accuracy']:.3f})")
    return int(ckpt["epoch"]) + 1, float(ckpt["max_accuracy"])


def save_checkpoint(path: str, config, state: TrainState, epoch: int, max_accuracy: float) -> None:
    save_atomic({
        "model": state.core.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "ema": state.ema.module.state_dict() if state.ema is not None else None,
        "epoch": epoch,
        "max_accuracy": max_accuracy,
        "rng": rng_state(),
        "model_name": config.MODEL.NAME,
        "config": config.dump(),
    }, path)


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


def run(config, env: DistEnv) -> int:
    out_dir = run_dir(config)
    logger = create_logger(out_dir, env.rank)
    if env.is_main:
        dump_config(config, os.path.join(out_dir, "config.yaml"))
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
        load_for_eval(config, model, logger)
        model.eval()  # before the hook: in training mode it may redraw random features
        set_progress(model, config.TRAIN.EPOCHS, 2**62)  # a finished run's schedule point
        stats = evaluate(model, loaders.val, env, autocast, config.TRAIN.CHANNELS_LAST)
        logger.info(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} "
                    f"loss {stats['loss']:.4f} on {stats['images']} images")
        return 0

    if config.MODEL.PRETRAINED:
        load_pretrained(model, config.MODEL.PRETRAINED, logger, **adapt_options(config))
    accum = config.TRAIN.ACCUMULATION_STEPS
    lr, warmup_lr, min_lr = scaled_lrs(config, config.DATA.BATCH_SIZE * env.world_size * accum)
    optimizer = build_optimizer(config, model, lr)
    n_steps = steps_per_epoch(len(loaders.train), accum)
    scheduler = build_scheduler(config, optimizer, n_steps, warmup_lr, min_lr)
    # Parameters are averaged; buffers are state (e.g. a Performer's random features, which
    # an average would turn into garbage) and are copied from the live model.
    ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY, exclude_buffers=True) \
        if config.TRAIN.EMA.ENABLED else None
    train_model = model
    if env.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if config.TRAIN.COMPILE:
        train_model = torch.compile(train_model)
    state = TrainState(model=train_model, core=model, criterion=build_criterion(config, loaders.mixup),
                       optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast=autocast,
                       ema=ema, mixup=loaders.mixup, accumulation_steps=accum,
                       clip_grad=config.TRAIN.CLIP_GRAD, channels_last=config.TRAIN.CHANNELS_LAST)
    total_batch = config.DATA.BATCH_SIZE * env.world_size * accum
    scaling = (f"base {config.TRAIN.BASE_LR:.1e} x total batch {total_batch} / {config.TRAIN.LR_BASE_BATCH}"
               if config.TRAIN.LR_BASE_BATCH else f"total batch {total_batch}, not scaled")
    logger.info(f"lr {lr:.3e} ({scaling}), {n_steps} steps/epoch, {config.TRAIN.EPOCHS} epochs")

    start_epoch, max_accuracy = config.TRAIN.START_EPOCH, 0.0
    resume_path = config.MODEL.RESUME or (latest_checkpoint(out_dir) if config.TRAIN.AUTO_RESUME else None)
    if resume_path:
        start_epoch, max_accuracy = resume(resume_path, state, logger)

    metrics = MetricsWriter(config, out_dir, logger, enabled=env.is_main)
    last_saved = resume_path
    try:
        for epoch in range(start_epoch, config.TRAIN.EPOCHS):
            seed = epoch_seed(config.SEED, env.rank, epoch)
            seed_everything(seed)
            loaders.generator.manual_seed(seed)
            loaders.train.sampler.set_epoch(epoch)
            try:
                train_stats = train_one_epoch(state, loaders.train, epoch, env, logger, config.PRINT_FREQ)
            except NonFiniteLossError as e:
                where = last_saved or "none yet"
                logger.error(f"{e}; stopping. Last good checkpoint: {where}")
                return 1
            model.eval()
            set_progress(model, epoch + 1, (epoch + 1) * n_steps)
            val = evaluate(model, loaders.val, env, autocast, config.TRAIN.CHANNELS_LAST)
            record = {"epoch": epoch, **train_stats, "val_loss": val["loss"], "val_acc1": val["acc1"],
                      "val_acc5": val["acc5"]}
            if ema is not None:
                ema_val = evaluate(ema.module, loaders.val, env, autocast, config.TRAIN.CHANNELS_LAST)
                record.update(ema_acc1=ema_val["acc1"], ema_acc5=ema_val["acc5"])
            improved = val["acc1"] > max_accuracy
            max_accuracy = max(max_accuracy, val["acc1"])
            record["max_acc1"] = max_accuracy
            ema_text = f", EMA Acc@1 {record['ema_acc1']:.3f}" if ema is not None else ""
            logger.info(f"Epoch {epoch}: val Acc@1 {val['acc1']:.3f} Acc@5 {val['acc5']:.3f} "
                        f"on {val['images']} images{ema_text}; best {max_accuracy:.3f}")
            if env.is_main:
                last = epoch == config.TRAIN.EPOCHS - 1
                if (epoch + 1) % config.SAVE_FREQ == 0 or last:
                    last_saved = os.path.join(out_dir, f"ckpt_epoch_{epoch}.pth")
                    save_checkpoint(last_saved, config, state, epoch, max_accuracy)
                    prune_checkpoints(out_dir, config.KEEP_CKPTS)
                if improved:
                    save_checkpoint(os.path.join(out_dir, "ckpt_best.pth"), config, state, epoch, max_accuracy)
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
        return 2
    env = init_distributed(config.DEVICE)
    try:
        return run(config, env)
    except (DataError, CheckpointError, models.ModelArgumentError, models.UnknownModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
