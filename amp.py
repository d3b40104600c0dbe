"""Mixed precision: which autocast dtype a run gets on its device, the autocast context,
and the gradient step that goes with it.

The dtype rule (README's flag table): ``AMP_DTYPE off`` is float32 everywhere. ``AMP_DTYPE`` naming
a dtype gives that dtype on any device, the CPU included (CPU autocast; float16 with a
GradScaler on the CPU too), so the CPU suite runs the code a GPU runs; a device or torch
that lacks it is a config error. ``AMP_DTYPE auto`` is bfloat16 on a GPU that has it, else
float16, and float32 on the CPU: CPU autocast is slow for many ops without bf16 matrix
units and would change the numerics of every CPU run. ``--amp bfloat16`` asks for it.

``LossScaler`` owns one optimizer step's gradient handling, with or without fp16 loss
scaling (disabled, torch's GradScaler passes everything through), so the training loop
has no precision branches: ``backward`` (scaled), ``unscale_and_clip`` (returns the true
gradient norm), ``step`` (or skip, with the scale still updated). The shape of Swin's
NativeScalerWithGradNormCount, split where the loop must agree with the other ranks
whether the step was finite.
"""
from __future__ import annotations

import contextlib
import warnings
from functools import partial
from typing import Callable, Iterable, Optional

import torch
from timm.utils import dispatch_clip_grad

from config import ConfigError, source_of


def _autocast_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether autocast to ``dtype`` acts on ``device`` in this torch: a product computed
    under it comes out in ``dtype`` (torch disables an unsupported dtype with a warning)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type=device.type, dtype=dtype):
                x = torch.ones(2, 2, device=device)
                return (x @ x).dtype == dtype
    except (RuntimeError, ValueError, AssertionError):
        return False


def _grad_scaler_works(device: torch.device) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.amp.GradScaler(device.type).is_enabled()
    except (RuntimeError, ValueError, AssertionError, TypeError):
        return False


def _cuda_has_bf16(device: torch.device) -> bool:
    """Native bfloat16 (Ampere and newer), not the emulation torch offers on older GPUs."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation argument
        return torch.cuda.is_bf16_supported()


def _gpu_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def autocast_dtype(config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of this run on ``device`` (module docstring), or None for float32.
    A dtype the device or this torch cannot run is a ConfigError naming AMP_DTYPE."""
    name = config.AMP_DTYPE
    if name == "off":
        return None
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if _cuda_has_bf16(device) else torch.float16
    dtype = getattr(torch, name)

    def refuse(why: str, instead: str) -> None:
        raise ConfigError(f"{source_of(config, 'AMP_DTYPE')}: AMP_DTYPE: {name} {why}; {instead}")

    if device.type == "cuda" and dtype == torch.bfloat16 and not _cuda_has_bf16(device):
        refuse(f"is not supported by {_gpu_name(device)}",
               "use AMP_DTYPE float16 (loss-scaled) or auto (bfloat16 where supported, else float16)")
    if not _autocast_works(device, dtype):
        refuse(f"autocast does not run on {device.type} in torch {torch.__version__}",
               "use the other AMP_DTYPE, or --no-amp (float32)")
    if dtype == torch.float16 and not _grad_scaler_works(device):
        refuse(f"needs loss scaling, and torch {torch.__version__} has no GradScaler for {device.type}",
               "use AMP_DTYPE bfloat16, or --no-amp (float32)")
    return dtype


def describe(config, device: torch.device, dtype: Optional[torch.dtype]) -> str:
    """The log line saying what precision the run computes in, and why."""
    if dtype is not None:
        scaled = ", loss-scaled (GradScaler, saved in checkpoints)" if dtype == torch.float16 else ""
        how = f"AMP_DTYPE {config.AMP_DTYPE}"
        if config.AMP_DTYPE == "auto" and dtype == torch.float16:
            how += f": {_gpu_name(device)} has no bfloat16"
        return f"AMP: {str(dtype)[6:]} autocast on {device.type}{scaled} ({how}); weights, EMA and " \
               f"optimizer state stay float32"
    if config.AMP_DTYPE == "off":
        return "AMP: off (AMP_DTYPE off, --no-amp): float32"
    return (f"AMP: float32 on {device.type}: AMP_DTYPE auto uses autocast on CUDA only; "
            f"--amp bfloat16 (or float16) turns autocast on here")


def autocast_factory(dtype, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A callable giving the autocast context for ``dtype`` (a null context for None)."""
    if dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


class LossScaler:
    """Backward, unscale, clip, step and scale update for one optimizer; fp16 loss
    scaling when ``enabled`` (torch's GradScaler), a plain pass-through otherwise."""

    def __init__(self, enabled: bool, device_type: str = "cuda", init_scale: float = 2.0 ** 16) -> None:
        self.scaler = torch.amp.GradScaler(device_type, init_scale=init_scale, enabled=enabled)

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 when scaling is off)."""
        return self.scaler.get_scale() if self.enabled else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_and_clip(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
                         max_norm: float, mode: str = "norm") -> torch.Tensor:
        """Unscale the gradients and clip them at ``max_norm`` (0: no clipping) the way
        ``mode`` says (timm's dispatch_clip_grad: 'norm', 'value' or 'agc', TRAIN.CLIP_MODE);
        returns the true (unscaled, pre-clipping) total norm, inf or NaN when a gradient is
        not finite, whatever the mode: a 0-d tensor on the gradients' device, left there (the
        training loop reads it with the step's other values, in one host sync)."""
        self.scaler.unscale_(optimizer)
        if mode == "norm" or not max_norm:
            return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
        params = list(params)
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))  # measures, clips nothing
        dispatch_clip_grad(params, max_norm, mode=mode)
        return norm

    def step(self, optimizer: torch.optim.Optimizer, skip: bool = False) -> None:
        """Apply the step (unless ``skip``), then update the scale: a skipped non-finite step
        still lowers it, as GradScaler does on its own. ``skip`` must be True when a gradient
        is not finite (the loop's agreed flag): GradScaler's own check would read its
        found-inf flag on the host, a second sync per step, so the optimizer steps directly."""
        if not skip:
            optimizer.step()
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state and self.enabled:
            self.scaler.load_state_dict(state)
