"""Locality-aware initialisation (LAI, from TransGAN): attention limited to a growing window.

Tokens are laid out as ``[prefix tokens (CLS...), patches in raster order]``.

Options (``MODEL.VIT.ATTN_ARGS``): ``schedule``, ``window`` and ``by``.

* ``window="2d"`` (default, corrected): a patch sees the patches within Chebyshev distance ``r``
  on the patch grid; prefix tokens see, and are seen by, every token.
* ``window="1d"`` (faithful to seed 000): token ``i`` sees token ``j`` iff ``|i - j| <= w`` on the
  flattened sequence, CLS included as index 0, so neighbours above/below are far apart and the
  CLS token only sees the top rows of the image.

The window grows on a schedule ``[[start, r], ...]`` (``r = None``: full attention) indexed by
epoch or by optimizer step (``by``), advanced through the model-wide ``set_progress(epoch, step)`` hook.
Once the window covers every token the mask is dropped and attention is plain SDPA.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .attention import Attention, register_attention

Schedule = tuple[tuple[int, Optional[int]], ...]

# Defaults: the example for the 2-D window; TransGAN's epochs for the seed's 1-D band.
DEFAULT_SCHEDULES: dict[str, Schedule] = {
    "2d": ((0, 1), (10, 2), (20, 4), (40, None)),
    "1d": ((0, 8), (22, 12), (32, 18), (42, 20), (60, None)),
}


def parse_schedule(schedule: Optional[Sequence[Sequence]], window: str) -> Schedule:
    """``[[start, r], ...]`` with starts increasing from 0 and r >= 0 or None; None gives the
    default schedule of the window shape."""
    if window not in DEFAULT_SCHEDULES:
        raise ValueError(f"window must be one of {sorted(DEFAULT_SCHEDULES)}, got {window!r}")
    if schedule is None:
        return DEFAULT_SCHEDULES[window]
    points = []
    for point in schedule:
        if len(point) != 2:
            raise ValueError(f"schedule: each point is [start, radius], got {point!r}")
        start, radius = point
        if not _is_int(start) or start < 0:
            raise ValueError(f"schedule: start must be an integer >= 0, got {start!r}")
        if radius is not None and (not _is_int(radius) or radius < 0):
            raise ValueError(f"schedule: radius must be an integer >= 0 or null, got {radius!r}")
        points.append((int(start), None if radius is None else int(radius)))
    starts = [s for s, _ in points]
    if not points or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"schedule: starts must increase from 0, got {starts}")
    return tuple(points)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or (
        isinstance(value, float) and value.is_integer())


def radius_at(schedule: Schedule, progress: int) -> Optional[int]:
    """The radius of the last schedule point whose start is <= progress."""
    radius = schedule[0][1]
    for start, r in schedule:
        if start <= progress:
            radius = r
    return radius


def locality_mask(grid_size: tuple[int, int], num_prefix_tokens: int, radius: Optional[int],
                  window: str = "2d") -> Optional[torch.Tensor]:
    """Boolean (N, N) mask, True = may attend; None when the window covers every token."""
    H, W = grid_size
    P = num_prefix_tokens
    N = P + H * W
    if radius is None:
        return None
    if window == "1d":
        if radius >= N - 1:
            return None
        i = torch.arange(N)
        return (i[:, None] - i[None, :]).abs() <= radius
    if radius >= max(H, W) - 1:
        return None
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    y, x = y.flatten(), x.flatten()
    cheb = torch.maximum((y[:, None] - y[None, :]).abs(), (x[:, None] - x[None, :]).abs())
    mask = torch.ones(N, N, dtype=torch.bool)
    mask[P:, P:] = cheb <= radius
    return mask


class LocalitySchedule:
    """The LAI state of one attention layer: schedule, current radius and a mask cache.

    Not a module: it holds no weights, and the radius is re-derived from (epoch, step) by
    ``set_progress`` on every step, so a resumed run gets it back without a checkpoint entry.
    """

    def __init__(self, grid_size: tuple[int, int], num_prefix_tokens: int,
                 schedule: Optional[Sequence[Sequence]], window: str, by: str) -> None:
        if by not in ("epoch", "step"):
            raise ValueError(f"by must be 'epoch' or 'step', got {by!r}")
        self.schedule = parse_schedule(schedule, window)
        self.grid_size, self.num_prefix_tokens = tuple(grid_size), num_prefix_tokens
        self.window, self.by = window, by
        self.radius = radius_at(self.schedule, 0)
        self._masks: dict[tuple, Optional[torch.Tensor]] = {}

    def set_progress(self, epoch: int, step: int) -> None:
        self.radius = radius_at(self.schedule, epoch if self.by == "epoch" else step)

    def mask(self, device: torch.device) -> Optional[torch.Tensor]:
        """Boolean (N, N) mask for the current radius on ``device``, or None (no mask)."""
        key = (self.radius, device)
        if key not in self._masks:
            mask = locality_mask(self.grid_size, self.num_prefix_tokens, self.radius, self.window)
            self._masks[key] = None if mask is None else mask.to(device)
        return self._masks[key]

    def additive_mask(self, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The same mask as 0 / -inf (N, N) in ``dtype``, cached: SDPA adds it to the logits."""
        key = (self.radius, device, dtype)
        if key not in self._masks:
            mask = self.mask(device)
            self._masks[key] = None if mask is None else torch.zeros(
                mask.shape, device=device, dtype=dtype).masked_fill_(~mask, float("-inf"))
        return self._masks[key]


class LocalityWindow:
    """Mixin for attention kinds with a LAI window (lai, dislai, performer_lai): builds the
    layer's ``LocalitySchedule`` from the options ``schedule``, ``window``, ``by`` and
    follows training progress."""

    lai: LocalitySchedule
    grid_size: tuple[int, int]
    num_prefix_tokens: int

    def init_window(self, schedule: Optional[Sequence[Sequence]], window: str, by: str) -> None:
        self.lai = LocalitySchedule(self.grid_size, self.num_prefix_tokens, schedule, window, by)

    def window_bias(self, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The current window as an additive (N, N) mask, or None once it covers every token."""
        return self.lai.additive_mask(device, dtype)

    def set_progress(self, epoch: int, step: int) -> None:
        if hasattr(super(), "set_progress"):
            super().set_progress(epoch, step)
        self.lai.set_progress(epoch, step)


@register_attention("lai")
class LAIAttention(LocalityWindow, Attention):
    """Softmax attention restricted to the current LAI window (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int = 8, *,
                 schedule: Optional[Sequence[Sequence]] = None, window: str = "2d",
                 by: str = "epoch", **base) -> None:
        super().__init__(dim, num_heads=num_heads, **base)
        self.init_window(schedule, window, by)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim)."""
        window = self.window_bias(q.device, q.dtype)
        if window is not None:
            if is_causal:
                raise ValueError("LAI attention does not combine with is_causal")
            attn_mask = window if attn_mask is None else combine_masks(attn_mask, window)
        return super().attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def combine_masks(attn_mask: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """A caller's boolean or additive mask combined with the additive window."""
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(window).masked_fill(~attn_mask, float("-inf"))
    return attn_mask + window
