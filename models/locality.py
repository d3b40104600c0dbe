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
Once the window covers every token the mask is dropped and attention is plain SDPA. The
window follows the token grid (``set_grid``): at another input size it is the same radius
on the new grid.

``backend`` (LAI only): how the active window is attended. ``"sdpa"``: SDPA with the additive
(N, N) window; ``"flex"``: FlexAttention with the window as a block mask (blocks of 128
tokens that the window never reaches are skipped) and as its ``mask_mod``; ``"auto"``
(default): flex on CUDA, SDPA elsewhere (on the CPU flex measured 2-5x slower and has no
backward). Both give the same values and gradients. The block mask is built, like the
window, by the hooks, and by a move to or from CUDA (``_apply``), only where flex is used.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx
import torch.nn.functional as F

from .attention import (Attention, BlockMask, auto_flex, check_backend, create_block_mask, flex_attention,
                        given_masks, register_attention, use_flex)

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
    """The LAI schedule of one attention layer: schedule, current radius, token layout.

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

    def set_progress(self, epoch: int, step: int) -> bool:
        """Move to the schedule point of (epoch, step); True if the radius changed."""
        radius = radius_at(self.schedule, epoch if self.by == "epoch" else step)
        changed, self.radius = radius != self.radius, radius
        return changed

    def mask(self) -> Optional[torch.Tensor]:
        """Boolean (N, N) mask for the current grid and radius, or None (no mask)."""
        return locality_mask(self.grid_size, self.num_prefix_tokens, self.radius, self.window)


class LocalityWindow:
    """Mixin for attention kinds with a LAI window (lai, dislai, performer_lai): builds the
    layer's ``LocalitySchedule`` from the options ``schedule``, ``window``, ``by`` and
    follows training progress and the token grid.

    The window is the buffer ``window_mask``: (N, N) additive 0 / -inf, all zeros once it
    covers every token (then ``window_active`` is False and no mask is passed at all). Its
    shape depends on the grid only, never on the radius, so the buffers stay the same
    through training. Kinds that never form an (N, N) matrix override ``build_window``.
    """

    def init_window(self, schedule: Optional[Sequence[Sequence]], window: str, by: str) -> None:
        self.lai = LocalitySchedule(self.grid_size, self.num_prefix_tokens, schedule, window, by)
        self.build_window()

    def build_window(self) -> None:
        """(Re)build the window for the current grid and radius, on the layer's device."""
        mask = self.lai.mask()
        N = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        bias = torch.zeros(N, N, device=self.qkv.weight.device)
        if mask is not None:
            bias.masked_fill_(~mask.to(bias.device), float("-inf"))
        self.window_active = mask is not None
        self.register_buffer("window_mask", bias, persistent=False)

    def window_bias(self, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The current window as an additive (N, N) mask, or None once it covers every token."""
        if not self.window_active:
            return None
        return self.window_mask.to(device=device, dtype=dtype)

    def set_progress(self, epoch: int, step: int) -> None:
        if hasattr(super(), "set_progress"):
            super().set_progress(epoch, step)
        if self.lai.set_progress(epoch, step):
            self.build_window()

    def set_grid(self, grid_size: tuple[int, int]) -> None:
        super().set_grid(grid_size)
        self.lai.grid_size = self.grid_size
        self.build_window()


FLEX_BLOCK = 128  # FlexAttention's block of tokens (query and key)
FLEX_BUFFERS = ("flex_kv_num_blocks", "flex_kv_indices", "flex_full_kv_num_blocks", "flex_full_kv_indices")


def lai_mask_mod(num_prefix_tokens: int, width: int, radius, window: str = "2d"):
    """FlexAttention's ``mask_mod`` of the LAI window (``locality_mask`` as a function of the
    query and key indices); ``radius`` an int or a 0-d tensor (the layer's ``flex_radius``:
    a new radius is then new data, not a recompile)."""
    P, W, r = num_prefix_tokens, width, radius
    if window == "1d":
        def band(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() <= r
        return band

    def chebyshev(b, h, q_idx, kv_idx):
        qy, qx = (q_idx - P) // W, (q_idx - P) % W
        ky, kx = (kv_idx - P) // W, (kv_idx - P) % W
        near = torch.maximum((qy - ky).abs(), (qx - kx).abs()) <= r
        return (q_idx < P) | (kv_idx < P) | near
    return chebyshev


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: torch.Tensor,
                     blocks: tuple[torch.Tensor, ...], mask_args: tuple, backend: str, scale: float,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Attention inside the LAI window: SDPA with the additive ``window`` (N, N), or
    FlexAttention with the block mask ``blocks`` (the ``FLEX_BUFFERS``) and
    ``lai_mask_mod(*mask_args)`` where ``backend`` chooses it (``use_flex``; attention
    dropout, which FlexAttention lacks, always runs SDPA). A leaf for torch.fx: it branches
    on the device."""
    if dropout_p == 0.0 and use_flex("backend", backend, q, k, v):
        N = q.shape[-2]
        block_mask = BlockMask.from_kv_blocks(*blocks, BLOCK_SIZE=FLEX_BLOCK, mask_mod=lai_mask_mod(*mask_args),
                                              seq_lengths=(N, N))
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window, dropout_p=dropout_p, scale=scale)


torch.fx.wrap("window_attention")


@register_attention("lai")
class LAIAttention(LocalityWindow, Attention):
    """Softmax attention restricted to the current LAI window (see the module docstring).
    ``backend``: 'auto' | 'sdpa' | 'flex' (``MODEL.VIT.ATTN_ARGS.BACKEND``)."""

    def __init__(self, dim: int, num_heads: int = 8, *,
                 schedule: Optional[Sequence[Sequence]] = None, window: str = "2d",
                 by: str = "epoch", backend: str = "auto", **base) -> None:
        super().__init__(dim, num_heads=num_heads, **base)
        self.backend = check_backend("backend", backend, ("auto", "sdpa", "flex"))
        self.flex_window = False
        self.init_window(schedule, window, by)

    def flex_wanted(self) -> bool:
        """Whether this layer attends through FlexAttention on its device: 'flex' always,
        'auto' where ``auto_flex`` says (CUDA, where it can run)."""
        return self.backend == "flex" or self.backend == "auto" and auto_flex(self.qkv.weight.device.type)

    def build_window(self) -> None:
        """The additive window, and where FlexAttention is used its block mask: the buffers
        ``FLEX_BUFFERS`` (built on the CPU, moved to the layer's device; zeros of the same
        shapes while no window is active) and the radius ``flex_radius``."""
        super().build_window()
        self.flex_window = self.flex_wanted()
        if not self.flex_window:
            return
        N = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        P, W, radius, window = self.num_prefix_tokens, self.grid_size[1], self.lai.radius, self.lai.window
        if self.window_active:
            mask = create_block_mask(lai_mask_mod(P, W, radius, window), None, None, N, N,
                                     device="cpu", BLOCK_SIZE=FLEX_BLOCK)
            parts = (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices)
        else:
            n = -(-N // FLEX_BLOCK)
            parts = tuple(torch.zeros((1, 1, n) + (n,) * (i % 2), dtype=torch.int32) for i in range(4))
        for name, part in zip(FLEX_BUFFERS, parts):
            self.register_buffer(name, part.to(self.qkv.weight.device), persistent=False)
        self.register_buffer("flex_radius", torch.full((), radius or 0, device=self.qkv.weight.device),
                             persistent=False)

    def flex_mask_args(self) -> tuple:
        return self.num_prefix_tokens, self.grid_size[1], self.flex_radius, self.lai.window

    def _apply(self, fn, *args, **kwargs):
        """After a move (``.to``, ``.cuda``): 'auto' builds the block mask when the layer
        arrives on CUDA and stops using it elsewhere (the device-move hook of the window)."""
        module = super()._apply(fn, *args, **kwargs)
        if self.flex_wanted() != self.flex_window:
            self.build_window()
        return module

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim)."""
        attn_mask, is_causal = given_masks(attn_mask, is_causal)
        window = self.window_bias(q.device, q.dtype)
        if window is not None:
            if is_causal:
                raise ValueError("LAI attention does not combine with is_causal")
            if not torch.jit.is_scripting():
                if attn_mask is None and self.flex_window:
                    blocks = tuple(getattr(self, name) for name in FLEX_BUFFERS)
                    return window_attention(q, k, v, window, blocks, self.flex_mask_args(), self.backend,
                                            self.scale, self.attn_drop.p if self.training else 0.0)
            attn_mask = window if attn_mask is None else combine_masks(attn_mask, window)
        return self.sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def combine_masks(attn_mask: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """A caller's boolean or additive mask combined with the additive window."""
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(window).masked_fill(~attn_mask, float("-inf"))
    return attn_mask + window
