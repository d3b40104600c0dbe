"""Console + per-rank file logging, per-epoch metrics (JSON lines), optional wandb and
TensorBoard."""
from __future__ import annotations

import json
import logging
import os
import sys
import uuid
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

    A run resumed at global step ``resume_step`` (a mid-epoch checkpoint: the steps after it,
    and maybe the epoch's line, were logged before a kill -9) logs nothing twice: an epoch's
    line replaces the lines of that epoch and later ones; TensorBoard drops the step values
    from ``resume_step`` on (``purge_step``) and gets no second record of an epoch already in
    metrics.jsonl; wandb continues the folder's run (its id in ``wandb_run_id``) and skips the
    steps and epochs it already holds.

    Backend problems (wandb not installed, no network, a bad key; an unwritable event file)
    are logged and never stop the run.
    """

    def __init__(self, config, output_dir: str, logger: logging.Logger, enabled: bool, resume_step: int = 0) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.logger = logger
        self.wandb: Optional[Any] = None
        self.tensorboard: Optional[Any] = None
        self.logged_epochs = {r.get("epoch") for r in self._records()[0]} if enabled else set()
        self.wandb_after = {"global_step": -1, "epoch": -1}  # what a resumed wandb run holds
        if enabled and config.WANDB.ENABLED:
            self.wandb = self._start_wandb(config, output_dir)
        try:
            if self.wandb is not None and getattr(self.wandb, "resumed", False):
                for axis in self.wandb_after:  # the last values it was given (its summary)
                    value = self.wandb.summary.get(axis)
                    if isinstance(value, (int, float)):
                        self.wandb_after[axis] = int(value)
        except Exception as e:  # a logging backend must never stop training
            self.logger.warning(f"wandb: cannot read the resumed run's last step: {type(e).__name__}: {e}")
        if enabled and config.TENSORBOARD.ENABLED:
            self.tensorboard = self._start_tensorboard(output_dir, resume_step)

    def _records(self) -> tuple[list[dict], bool]:
        """(metrics.jsonl's records, whether every line was whole); a line cut short by a
        kill is left out."""
        if not os.path.isfile(self.path):
            return [], True
        with open(self.path) as f:
            text = f.read()
        records, whole = [], text.endswith("\n") or not text
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                whole = False
        return [r for r in records if isinstance(r, dict)], whole

    def _start_tensorboard(self, output_dir: str, resume_step: int) -> Optional[Any]:
        try:
            from torch.utils.tensorboard import SummaryWriter
            folder = os.path.join(output_dir, "tensorboard")
            writer = SummaryWriter(log_dir=folder, purge_step=resume_step or None)
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
            id_file = os.path.join(output_dir, "wandb_run_id")  # the folder's one wandb run, resumed
            if os.path.isfile(id_file):
                with open(id_file) as f:
                    run_id = f.read().strip()
            else:
                run_id = uuid.uuid4().hex[:12]
                with open(id_file, "w") as f:
                    f.write(run_id + "\n")
            run = wandb.init(project=config.WANDB.PROJECT, entity=config.WANDB.ENTITY or None,
                             name=f"{config.MODEL.NAME}/{config.TAG}", dir=output_dir, mode=mode, id=run_id,
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
        if self.tensorboard is not None and not (axis == "epoch" and x in self.logged_epochs):
            try:
                for tag, value in tags.items():
                    self.tensorboard.add_scalar(tag, value, x)
            except Exception as e:
                self.logger.warning(f"TensorBoard write failed: {e}")
        if self.wandb is not None and x > self.wandb_after[axis]:
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
        epoch = int(record.get("epoch", 0))
        records, whole = self._records()
        kept = [r for r in records if not isinstance(r.get("epoch"), int) or r["epoch"] < epoch]
        if len(kept) < len(records) or not whole:
            tmp = f"{self.path}.tmp"  # a resumed epoch: its line (and later ones) replaced, atomically
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in [*kept, record])
            os.replace(tmp, self.path)
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
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
