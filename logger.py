"""Console + per-rank file logging, per-epoch metrics (JSON lines) and optional wandb."""
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


class MetricsWriter:
    """Appends one JSON object per epoch to ``metrics.jsonl``; mirrors it to wandb if enabled.

    wandb problems (not installed, no network, bad key) are logged and never stop the run.
    """

    def __init__(self, config, output_dir: str, logger: logging.Logger, enabled: bool) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.logger = logger
        self.wandb: Optional[Any] = None
        if enabled and config.WANDB.ENABLED:
            self.wandb = self._start_wandb(config, output_dir)

    def _start_wandb(self, config, output_dir: str) -> Optional[Any]:
        try:
            import wandb
            mode = config.WANDB.MODE
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            run = wandb.init(project=config.WANDB.PROJECT, entity=config.WANDB.ENTITY or None,
                             name=f"{config.MODEL.NAME}/{config.TAG}", dir=output_dir, mode=mode,
                             config=json.loads(json.dumps(config, default=str)), resume="allow")
            self.logger.info(f"wandb: logging {mode} to {output_dir}")
            return run
        except Exception as e:  # a logging backend must never stop training
            self.logger.warning(f"wandb disabled: {type(e).__name__}: {e}")
            return None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(record, step=record.get("epoch"))
            except Exception as e:
                self.logger.warning(f"wandb log failed: {e}")

    def close(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
