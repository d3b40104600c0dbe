"""Checkpoints: atomic writes, auto-resume, and loading foreign weight files safely.

Everything is read with ``torch.load(weights_only=True)``: our checkpoints hold tensors and
plain values only (the config as YAML text), so no pickled code is ever executed.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any, Optional

import torch
import torch.nn as nn

WEIGHT_KEYS = ("model", "state_dict", "model_ema")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why in one line."""


def save_atomic(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        message = " ".join(str(e).split())[:300]
        if "weights_only" in message or "Unpickl" in type(e).__name__ or "GLOBAL" in message:
            raise CheckpointError(
                f"{path} needs arbitrary unpickling, refused for safety (weights_only=True); "
                f"if you trust it, re-save its tensors with torch.save(state_dict)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {message}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def extract_state_dict(obj: dict, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Weights under 'model', 'state_dict' or 'model_ema', or at the top level; strips
    a DDP 'module.' prefix."""
    for key in WEIGHT_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path} holds no weights (looked under {', '.join(WEIGHT_KEYS)} and the top level)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def describe_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    return missing, unexpected, shapes


def _summary(label: str, items: list) -> str:
    if not items:
        return ""
    more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
    return f"{len(items)} {label}: {', '.join(items[:3])}{more}"


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str, strict: bool = True,
                 logger=None) -> None:
    """Load with a readable report; strict raises CheckpointError on any mismatch."""
    missing, unexpected, shapes = describe_mismatch(model, state)
    report = "; ".join(s for s in (_summary("missing", missing), _summary("unexpected", unexpected),
                                   _summary("shape mismatches", shapes)) if s)
    if report and strict:
        raise CheckpointError(f"{path} does not match {type(model).__name__}: {report}")
    if report and logger is not None:
        logger.warning(f"loading {path}: {report}")
    own = model.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(compatible, strict=False)


def load_pretrained(model: nn.Module, path: str, logger=None, **adapt_options: Any) -> None:
    """Fine-tuning start: adapt resolution-dependent weights (the model's
    ``adapt_pretrained``), drop a classifier of another size, report what stays fresh."""
    state = extract_state_dict(read_checkpoint(path), path)
    if hasattr(model, "adapt_pretrained"):
        state = model.adapt_pretrained(state, **adapt_options)
    head = getattr(model, "classifier_name", None)
    own = model.state_dict()
    if head:
        dropped = [k for k in state if k.startswith(head + ".") and k in own and state[k].shape != own[k].shape]
        for key in dropped:
            del state[key]
        if dropped and logger is not None:
            logger.info(f"pretrained: dropped classifier {head} of another size ({', '.join(dropped)})")
    load_weights(model, state, path, strict=False, logger=logger)


_EPOCH_RE = re.compile(r"ckpt_epoch_(\d+)\.pth$")


def epoch_checkpoints(output_dir: str) -> list[str]:
    """``ckpt_epoch_N.pth`` files, oldest first."""
    paths = [p for p in glob.glob(os.path.join(output_dir, "ckpt_epoch_*.pth")) if _EPOCH_RE.search(p)]
    return sorted(paths, key=lambda p: int(_EPOCH_RE.search(p).group(1)))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    paths = epoch_checkpoints(output_dir)
    return paths[-1] if paths else None


def prune_checkpoints(output_dir: str, keep: int) -> None:
    if keep <= 0:
        return
    for path in epoch_checkpoints(output_dir)[:-keep]:
        os.remove(path)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    py = random.getstate()
    npy = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": [py[0], list(py[1]), py[2]],
             "numpy": [npy[0], torch.from_numpy(npy[1].astype("int64")), npy[2], npy[3], npy[4]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], npy[1].numpy().astype("uint32"), npy[2], npy[3], npy[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
