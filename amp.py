"""Mixed precision: the autocast context and the gradient step that goes with it.

``LossScaler`` owns one optimizer step's gradient handling, with or without fp16 loss
scaling (disabled, torch's GradScaler passes everything through), so the training loop
has no precision branches: ``backward`` (scaled), ``unscale_and_clip`` (returns the true
gradient norm), ``step`` (or skip, with the scale still updated). The shape of Swin's
NativeScalerWithGradNormCount, split where the loop must agree with the other ranks
whether the step was finite.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterable

import torch


def autocast_dtype(config, device: torch.device):
    """The autocast dtype, or None for full precision. AMP acts on CUDA only."""
    if not (config.AMP and device.type == "cuda"):
        return None
    dtype = config.AMP_DTYPE
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return getattr(torch, dtype)


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
                         max_norm: float) -> float:
        """Unscale the gradients and clip them to ``max_norm`` (0: no clipping); the true
        (unscaled, pre-clipping) total norm, inf or NaN when a gradient is not finite."""
        self.scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")).item()

    def step(self, optimizer: torch.optim.Optimizer, skip: bool = False) -> None:
        """Apply the step (unless ``skip``), then update the scale: a skipped non-finite step
        still lowers it, as GradScaler does on its own."""
        if not skip:
            self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state and self.enabled:
            self.scaler.load_state_dict(state)
