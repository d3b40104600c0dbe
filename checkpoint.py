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


def read_checkpoint(path: str) -> dict:
    """A checkpoint as a dict, read without executing pickled code: ``torch.load`` with
    ``weights_only=True``, or a ``.safetensors`` file (a flat dict of weights)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {' '.join(str(e).split())[:300]}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = " ".join(str(e).split())
        if "Weights only load failed" in text or "Unpickl" in type(e).__name__:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f" (it holds {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} needs arbitrary unpickling{what}, refused for safety (weights_only=True); "
                f"if you trust its source, convert it once: "
                f"python tools/convert_checkpoint.py --trust {path} OUT.pth") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {text[:300]}") from None
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
    ``adapt_pretrained``), drop a classifier of another size, report what stays fresh.
    Keys the model lacks or shapes it cannot take mean another model: CheckpointError."""
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
    _, unexpected, shapes = describe_mismatch(model, state)
    if unexpected or shapes:  # another model's weights; layers the model adds may stay fresh
        report = "; ".join(s for s in (_summary("unexpected", unexpected),
                                       _summary("shape mismatches", shapes)) if s)
        raise CheckpointError(f"{path} does not fit {type(model).__name__} for fine-tuning: {report}")
    load_weights(model, state, path, strict=False, logger=logger)


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


def epoch_checkpoints(output_dir: str) -> list[str]:
    """``ckpt_epoch_N.pth`` files, oldest first."""
    return [p for p in resumable_checkpoints(output_dir) if _position(p)[1] == float("inf")]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    paths = resumable_checkpoints(output_dir)
    return paths[-1] if paths else None


def check_training_checkpoint(ckpt: dict, path: str) -> None:
    """Raise CheckpointError unless ``ckpt`` can restart training: the parts resume needs,
    and finite weights (a NaN model is never saved, so one found here is damaged)."""
    missing = [k for k in ("model", "optimizer", "lr_scheduler", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {', '.join(missing)}); "
                              f"use --pretrained to start from its weights")
    bad = [k for k, v in extract_state_dict(ckpt, path).items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({bad[0]}, {len(bad)} tensors)")


def newest_valid_checkpoint(output_dir: str, logger=None) -> tuple[Optional[str], Optional[dict]]:
    """(path, contents) of the newest checkpoint that reads and checks out; each damaged
    newer one (truncated by a crash, corrupt) is reported in one line and passed over."""
    for path in reversed(resumable_checkpoints(output_dir)):
        try:
            ckpt = read_checkpoint(path)
            check_training_checkpoint(ckpt, path)
            return path, ckpt
        except CheckpointError as e:
            if logger is not None:
                logger.warning(f"auto-resume: skipping damaged checkpoint: {e}")
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
