"""Console + per-rank file logging, per-epoch metrics (JSON lines), optional wandb and
TensorBoard."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Optional

from termcolor import colored

from errors import UserError


class _ColorFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return colored(text, "red")
        return text


def create_logger(output_dir: str, rank: int, name: str = "train") -> logging.Logger:
    """Rank 0 logs to the console (colored) and every rank to ``log_rank{rank}.txt``."""
    logger = logging.getLogger(f"{name}.rank{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    stamp = "%(asctime)s %(levelname)s"
    plain = logging.Formatter(f"[{stamp}] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(_ColorFormatter(
            colored("[%(asctime)s]", "green") + " %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(console)
    path = os.path.join(output_dir, f"log_rank{rank}.txt")
    try:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(path, mode="a")
    except OSError as e:
        raise UserError(f"cannot write the log file {path}: {e.strerror or e} (--output must be a "
                        f"writable folder)") from None
    file_handler.setFormatter(plain)
    logger.addHandler(file_handler)
    return logger


def scalar_tags(prefix: str, record: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``record`` as ``prefix/key`` tags (what TensorBoard and wandb both get)."""
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsWriter:
    """Appends one JSON object per epoch to ``metrics.jsonl``; mirrors every optimizer
    step's loss, lr and grad norm (``step/loss``, ``step/lr``, ``step/grad_norm`` against
    the global step) and every epoch's record (``epoch/<key>`` against the epoch) to
    TensorBoard and wandb when enabled, under the same tags in both. Only rank 0 writes
    (``enabled``); the step values are rank 0's.

    Backend problems (wandb not installed, no network, a bad key; an unwritable event file)
    are logged and never stop the run.
    """

    def __init__(self, config, output_dir: str, logger: logging.Logger, enabled: bool) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.logger = logger
        self.wandb: Optional[Any] = None
        self.tensorboard: Optional[Any] = None
        if enabled and config.WANDB.ENABLED:
            self.wandb = self._start_wandb(config, output_dir)
        if enabled and config.TENSORBOARD.ENABLED:
            self.tensorboard = self._start_tensorboard(output_dir)

    def _start_tensorboard(self, output_dir: str) -> Optional[Any]:
        try:
            from torch.utils.tensorboard import SummaryWriter
            folder = os.path.join(output_dir, "tensorboard")
            writer = SummaryWriter(log_dir=folder)
            self.logger.info(f"TensorBoard: event files in {folder} (tensorboard --logdir {folder})")
            return writer
        except Exception as e:  # a logging backend must never stop training
            self.logger.warning(f"TensorBoard disabled: {type(e).__name__}: {e}")
            return None

    def _start_wandb(self, config, output_dir: str) -> Optional[Any]:
        try:
            import wandb
            mode = config.WANDB.MODE
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            run = wandb.init(project=config.WANDB.PROJECT, entity=config.WANDB.ENTITY or None,
                             name=f"{config.MODEL.NAME}/{config.TAG}", dir=output_dir, mode=mode,
                             config=json.loads(json.dumps(config, default=str)), resume="allow")
            # two x axes, as in TensorBoard: step/* against the global step, epoch/* against the epoch
            run.define_metric("global_step")
            run.define_metric("step/*", step_metric="global_step")
            run.define_metric("epoch")
            run.define_metric("epoch/*", step_metric="epoch")
            self.logger.info(f"wandb: logging {mode} to {output_dir}")
            return run
        except Exception as e:  # a logging backend must never stop training
            self.logger.warning(f"wandb disabled: {type(e).__name__}: {e}")
            return None

    def _mirror(self, tags: dict[str, float], axis: str, x: int) -> None:
        """``tags`` at ``x`` to TensorBoard and wandb (``axis`` names x for wandb)."""
        if self.tensorboard is not None:
            try:
                for tag, value in tags.items():
                    self.tensorboard.add_scalar(tag, value, x)
            except Exception as e:
                self.logger.warning(f"TensorBoard write failed: {e}")
        if self.wandb is not None:
            try:
                self.wandb.log({**tags, axis: x})
            except Exception as e:
                self.logger.warning(f"wandb log failed: {e}")

    def write_step(self, step: int, values: dict[str, float]) -> None:
        """One optimizer step (global ``step``): loss, lr, grad norm."""
        if self.enabled and (self.tensorboard is not None or self.wandb is not None):
            self._mirror(scalar_tags("step", values), "global_step", step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        epoch = int(record.get("epoch", 0))
        self._mirror(scalar_tags("epoch", {k: v for k, v in record.items() if k != "epoch"}), "epoch", epoch)
        if self.tensorboard is not None:
            try:
                self.tensorboard.flush()  # an epoch's numbers on disk now, not in 2 minutes
            except Exception as e:
                self.logger.warning(f"TensorBoard write failed: {e}")

    def close(self) -> None:
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()
            except Exception:
                pass
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
