"""Block kinds of DAT / DAT++, one class per ``stage_spec`` letter, all in plain PyTorch.

The contract of a kind (``@register_dat_block("<letter>")``, looked up in ``DAT_BLOCKS``):

- ``for_stage(cls, s: StageArgs)``, a classmethod: the kind built from its stage's settings
  (``StageArgs``), passing by keyword the ones it uses. It becomes ``attns.<d>`` of the stage.
- ``forward``: an NCHW map ``(B, C, H, W)`` -> ``(out, pos, ref)``: the output map and, for
  the deformable kind only, the sampled positions and reference points
  ``(B, groups, Hk, Wk, 2)`` in (y, x) order (``None`` otherwise), which the visualisation
  reads.
- ``pre_norm`` (class attribute, default True): the block is
  ``x += DropPath(kind(LN(x)))``, ``x += DropPath(MLP(LN(x)))``; False makes it a
  ConvNeXt-style block ``x += DropPath(MLP(LN(kind(x))))`` (``models.dat.DATStage``).

- ``NeighborhoodAttention`` ('N'): every query attends to the k x k window around it, shifted
  inward at borders; computed tile by tile (a tile of queries against its halo of keys), so
  there is no per-query loop and no H*W x H*W matrix; or (``backend``) by FlexAttention with
  the window as a block mask and ``rpb`` as a ``score_mod``.
- ``DeformableAttention`` ('D'): keys and values bilinearly sampled at learned offsets from a
  coarse grid of reference points (DAT++ semantics, or v1 with ``version=1``).
- ``LocalAttention`` ('L') and ``ShiftedWindowAttention`` ('S'): Swin windows (DAT v1).
- ``SpatialReductionAttention`` ('P', PVT-style) and ``DepthwiseConvMixer`` ('X', the mixer of
  a ConvNeXt-style block): kinds of the reference code that no released checkpoint uses.

Parameter and buffer names follow the released checkpoints.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from torch.utils.flop_counter import register_flop_formula

from .attention import check_backend, create_block_mask, flex_attention, float32_region, use_flex

Tensor = torch.Tensor
AttnOutput = tuple[Tensor, Optional[Tensor], Optional[Tensor]]

__all__ = ["DAT_BLOCKS", "register_dat_block", "StageArgs", "LayerNormProxy", "PointwiseConv",
           "NeighborhoodAttention", "DeformableAttention", "LocalAttention", "ShiftedWindowAttention",
           "SpatialReductionAttention", "DepthwiseConvMixer", "neighborhood_attention"]

# stage_spec letter -> block kind (filled by @register_dat_block below)
DAT_BLOCKS: dict[str, type[nn.Module]] = {}


def register_dat_block(letter: str):
    """Class decorator: the kind ``letter`` names in ``stage_spec``."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if len(letter) != 1 or letter in DAT_BLOCKS:
            raise ValueError(f"DAT block kind {letter!r}: one letter, registered once")
        DAT_BLOCKS[letter] = cls
        return cls
    return wrap


@dataclass(frozen=True)
class StageArgs:
    """One stage's settings, the DAT constructor's per-stage arguments (singular names): what
    a kind's ``for_stage`` may read."""

    q_size: tuple[int, int]  # the stage's map (H, W) at the construction size
    dim: int
    heads: int
    window_size: int
    groups: int
    use_pe: bool
    stride: int
    offset_range_factor: float
    no_off: bool
    ksize: int
    nat_ksize: int
    sr_ratio: int
    deform_version: int
    attn_drop: float
    proj_drop: float
    na_backend: str


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of an NCHW map (the checkpoints store it as ``.norm``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (the checkpoints' layout) computed as a matmul over channels.

    PyTorch's CPU convolution takes a slow im2col path for 1x1 kernels on the channels-last
    maps that ``LayerNormProxy`` returns; as a matmul it is the same arithmetic, 2-3x faster.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                       dropout: float) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for (..., N, d) tensors.

    SDPA on CUDA; explicit matmuls elsewhere: SDPA's CPU flash kernel is invisible to
    ``torch.utils.flop_counter`` (the MAC counts would miss these products) and is no faster
    at DAT's shapes.
    """
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    # in place on the fresh product (the same values; no second (.., N, Ns) allocation)
    logits = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    if bias is not None:
        logits = logits.add_(bias)
    return torch.matmul(F.dropout(logits.softmax(dim=-1), dropout), v)


# --------------------------------------------------------------------------------------------
# Neighborhood attention
# --------------------------------------------------------------------------------------------

class _AxisTiling(NamedTuple):
    """Tiles of one axis: queries [start, start + size), keys [halo_start, halo_start + halo)."""

    size: int
    halo: int
    starts: tuple[int, ...]
    halo_starts: tuple[int, ...]


@functools.lru_cache(maxsize=None)
def _axis_tiling(n: int, k: int, tile: int) -> _AxisTiling:
    """Queries cut into tiles of ``tile`` positions (the last one padded), each reading a halo
    of ``tile + k - 1`` keys, clamped inside the axis like the windows, that holds every window
    of its queries. An axis no longer than the halo is one tile whose halo is the whole axis."""
    if n <= tile + k - 1:
        return _AxisTiling(n, n, (0,), (0,))
    halo = tile + k - 1
    starts = tuple(range(0, n, tile))
    return _AxisTiling(tile, halo, starts, tuple(min(max(s - k // 2, 0), n - halo) for s in starts))


def _axis_bias_index(n: int, k: int, axis: _AxisTiling, device: torch.device
                     ) -> tuple[Tensor, Tensor]:
    """Per (tile, query in tile, key in halo): index into the 2k-1 bias axis and whether the
    key lies in the query's window, both (tiles, size, halo)."""
    # the starts of ``_axis_tiling`` computed on the device (no host-to-device copy per layer)
    starts = torch.arange(len(axis.starts), device=device) * axis.size
    keys = (starts - k // 2).clamp(0, n - axis.halo)[:, None] + torch.arange(axis.halo, device=device)
    queries = starts[:, None] + torch.arange(axis.size, device=device)
    window = (queries - k // 2).clamp(0, n - k)[:, :, None]                   # window start
    allowed = (keys[:, None, :] >= window) & (keys[:, None, :] < window + k)
    rel = (keys[:, None, :] - queries[:, :, None] + k - 1).clamp(0, 2 * k - 2)
    return rel, allowed


def _tile_queries(t: Tensor, rows: _AxisTiling, cols: _AxisTiling) -> Tensor:
    """(B, h, H, W, c) -> (B, h, tiles, queries per tile, c), zero-padded to whole tiles."""
    B, h, H, W, c = t.shape
    nr, nc = len(rows.starts), len(cols.starts)
    t = F.pad(t, (0, 0, 0, nc * cols.size - W, 0, nr * rows.size - H))
    t = t.reshape(B, h, nr, rows.size, nc, cols.size, c).transpose(3, 4)
    return t.reshape(B, h, nr * nc, rows.size * cols.size, c)


def _untile_into(out: Tensor, t: Tensor, rows: _AxisTiling, cols: _AxisTiling) -> None:
    """Inverse of ``_tile_queries``, written into ``out`` (B, h, H, W, c)."""
    B, h, H, W, c = out.shape
    nr, nc = len(rows.starts), len(cols.starts)
    t = t.reshape(B, h, nr, nc, rows.size, cols.size, c).transpose(3, 4)
    out.copy_(t.reshape(B, h, nr * rows.size, nc * cols.size, c)[:, :, :H, :W])


def _halos(t: Tensor, rows: _AxisTiling, cols: _AxisTiling) -> Tensor:
    """(B, h, H, W, c) -> the keys of each tile's halo, (B, h, tiles, keys per halo, c).
    Slices stacked twice (rows, then columns): cheaper than an index gather, forward and back."""
    B, h, H, W, c = t.shape
    by_rows = torch.stack([t[:, :, r:r + rows.halo] for r in rows.halo_starts], 2)
    blocks = torch.stack([by_rows[:, :, :, :, s:s + cols.halo] for s in cols.halo_starts], 3)
    return blocks.reshape(B, h, -1, rows.halo * cols.halo, c)


def _add_halos_into(out: Tensor, g: Tensor, rows: _AxisTiling, cols: _AxisTiling) -> None:
    """Adjoint of ``_halos``: accumulates the halo gradients g into ``out`` (B, h, H, W, c)."""
    B, h, H, W, c = out.shape
    g = g.reshape(B, h, len(rows.halo_starts), len(cols.halo_starts), rows.halo, cols.halo, c)
    by_rows = g.new_zeros(B, h, len(rows.halo_starts), rows.halo, W, c)
    for j, s in enumerate(cols.halo_starts):
        by_rows[:, :, :, :, s:s + cols.halo] += g[:, :, :, j]
    for i, r in enumerate(rows.halo_starts):
        out[:, :, r:r + rows.halo] += by_rows[:, :, i]


def _batch_chunks(batch: int, bytes_per_sample: int, device: torch.device) -> list[slice]:
    """Slices of the batch processed together: on CPU, about 4 MiB of scores at a time so that
    they stay in cache between the matmuls and the softmax; on GPU, everything."""
    if device.type != "cpu" or batch <= 1:
        return [slice(0, batch)]
    step = max(1, (4 << 20) // max(bytes_per_sample, 1))
    return [slice(i, i + step) for i in range(0, batch, step)]


@torch.library.custom_op("dat::neighborhood_attention", mutates_args=())
def _neighborhood_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, kernel_size: int,
                     tile: int) -> tuple[Tensor, Tensor]:
    """Tiled neighborhood attention, returning (out (B, h, H, W, d), tile probabilities).

    q, k, v (B, h, H, W, d); bias (h, tiles, queries per tile, keys per halo), -inf outside each
    query's window. Halos are built (and their gradients reduced) inside the op, a chunk of the
    batch at a time, so autograd never sees the gather; a FLOP formula below counts the
    window products natten reports, not the tiles' padded work.
    """
    B, _, H, W, _ = q.shape
    rows, cols = _axis_tiling(H, kernel_size, tile), _axis_tiling(W, kernel_size, tile)
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in at least float32
    out = torch.empty_like(q)
    probs = q.new_empty(q.shape[:2] + bias.shape[1:])
    for sl in _batch_chunks(B, probs[0].numel() * 4, q.device):
        logits = torch.matmul(_tile_queries(q[sl], rows, cols),
                              _halos(k[sl], rows, cols).transpose(-2, -1)).to(acc).add_(bias)
        if acc == q.dtype:
            torch.softmax(logits, dim=-1, out=probs[sl])
        else:
            probs[sl] = logits.softmax(dim=-1)
        _untile_into(out[sl], torch.matmul(probs[sl], _halos(v[sl], rows, cols)), rows, cols)
    return out, probs


@_neighborhood_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, kernel_size: int,
      tile: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:2] + bias.shape[1:])


@register_flop_formula(torch.ops.dat.neighborhood_attention)
def _neighborhood_flops(q_shape, k_shape, v_shape, bias_shape, kernel_size: int, tile: int,
                        *args, out_shape=None, **kwargs) -> int:
    return 2 * 2 * math.prod(q_shape) * kernel_size ** 2  # q k^T and attn v, 2 FLOPs per MAC


def _neighborhood_setup(ctx, inputs, output) -> None:
    q, k, v, bias, kernel_size, tile = inputs
    ctx.bias_shape = bias.shape
    ctx.tiling = _axis_tiling(q.shape[2], kernel_size, tile), _axis_tiling(q.shape[3], kernel_size, tile)
    ctx.set_materialize_grads(False)  # nobody differentiates the returned probabilities
    ctx.save_for_backward(q, k, v, output[0], output[1])


def _neighborhood_backward(ctx, grad_out: Optional[Tensor], grad_probs: Optional[Tensor]):
    """The usual softmax-attention gradients, tile by tile (grad_probs is never used)."""
    q, k, v, out, probs = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    rows, cols = ctx.tiling
    acc = torch.promote_types(q.dtype, torch.float32)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grad_bias = torch.zeros(ctx.bias_shape, dtype=acc, device=q.device)
    for sl in _batch_chunks(q.shape[0], probs[0].numel() * 4, q.device):
        q_t, d_out, p = _tile_queries(q[sl], rows, cols), _tile_queries(grad_out[sl], rows, cols), probs[sl]
        # d logits = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O) is cheaper
        row = _tile_queries((grad_out[sl].to(acc) * out[sl].to(acc)).sum(-1, keepdim=True), rows, cols)
        grad_s = torch.matmul(d_out, _halos(v[sl], rows, cols).transpose(-2, -1)).to(acc)
        grad_s = grad_s.sub_(row).mul_(p)
        grad_bias += grad_s.sum_to_size(ctx.bias_shape)
        grad_s = grad_s.to(q.dtype)
        _untile_into(grad_q[sl], torch.matmul(grad_s, _halos(k[sl], rows, cols)), rows, cols)
        _add_halos_into(grad_k[sl], torch.matmul(grad_s.transpose(-2, -1), q_t), rows, cols)
        _add_halos_into(grad_v[sl], torch.matmul(p.transpose(-2, -1), d_out), rows, cols)
    return grad_q, grad_k, grad_v, grad_bias.to(q.dtype), None, None


_neighborhood_op.register_autograd(_neighborhood_backward, setup_context=_neighborhood_setup)


# FlexAttention: the window as a block mask (blocks of 128 queries x 128 keys that no window
# reaches are skipped) and as mask_mod, rpb as score_mod. NA_BACKENDS: the values of
# NeighborhoodAttention's ``backend`` (MODEL.DAT.NA_BACKEND); 'auto' takes flex on CUDA.
NA_BACKENDS = ("auto", "tiled", "flex")
_FLEX_MASKS_KEPT = 8
_flex_masks: dict[tuple, object] = {}


def _na_mask_mod(H: int, W: int, ks: int):
    """mask_mod: key (row, col) inside the k x k window of the query (shifted inward at borders)."""
    def window(b, h, q_idx, kv_idx):
        qy, qx, ky, kx = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
        y0, x0 = (qy - ks // 2).clamp(0, H - ks), (qx - ks // 2).clamp(0, W - ks)
        return (ky >= y0) & (ky < y0 + ks) & (kx >= x0) & (kx < x0 + ks)
    return window


def _na_score_mod(rpb: Tensor, W: int, ks: int):
    """score_mod: + rpb[h, key_row - row + k - 1, key_col - col + k - 1] (indices clamped: the
    kernels evaluate it on masked-out pairs of partial blocks too)."""
    def bias(score, b, h, q_idx, kv_idx):
        dy = (kv_idx // W - q_idx // W + ks - 1).clamp(0, 2 * ks - 2)
        dx = (kv_idx % W - q_idx % W + ks - 1).clamp(0, 2 * ks - 2)
        return score + rpb[h, dy, dx]
    return bias


def _na_block_mask(H: int, W: int, ks: int, device: torch.device):
    """The block mask of an H x W map, computed once per (size, kernel, device) and kept (a
    few sizes at most; never while compiling or exporting, where it is traced)."""
    key = (H, W, ks, str(device))
    mask = _flex_masks.get(key)
    if mask is None:
        mask = create_block_mask(_na_mask_mod(H, W, ks), None, None, H * W, H * W, device=device)
        if not torch.compiler.is_compiling():
            if len(_flex_masks) >= _FLEX_MASKS_KEPT:
                _flex_masks.pop(next(iter(_flex_masks)))
            _flex_masks[key] = mask
    return mask


def _neighborhood_flex(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int) -> Tensor:
    """``neighborhood_attention`` through FlexAttention; (B, h, H, W, d) in and out."""
    B, nh, H, W, d = q.shape
    flat = [t.reshape(B, nh, H * W, d) for t in (q, k, v)]
    out = flex_attention(*flat, score_mod=_na_score_mod(rpb, W, kernel_size),
                         block_mask=_na_block_mask(H, W, kernel_size, q.device), scale=1.0)
    return out.reshape(B, nh, H, W, d)


def _counting_flops() -> bool:
    """Whether torch.utils.flop_counter is counting (its dispatch mode is active)."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
        return any(type(m).__name__ == "_FlopCounterMode" for m in _get_current_dispatch_mode_stack())
    except (ImportError, AttributeError):
        return False


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int,
                           attn_drop: float = 0.0, tile: int = 7, backend: str = "tiled") -> Tensor:
    """2-D neighborhood attention with relative position bias.

    q, k, v: (B, heads, H, W, d) with H, W >= kernel_size, q already scaled; rpb: (heads,
    2k-1, 2k-1). Query (i, j) attends to the k x k keys starting at row clamp(i - k//2, 0,
    H - k) (columns likewise) with bias rpb[h, key_row - i + k - 1, key_col - j + k - 1].
    Returns (B, heads, H, W, d). ``attn_drop`` > 0 uses a plain autograd path (with dropout).
    ``backend``: 'tiled' (the custom op below) or 'flex' (FlexAttention; not with dropout,
    which it lacks). Under torch.utils.flop_counter the tiled op runs in either case: its
    registered formula counts the window products the published MACs include, where
    FlexAttention's own formula would count all H*W x H*W products.
    """
    B, nh, H, W, d = q.shape
    if H < kernel_size or W < kernel_size:
        raise ValueError(f"map {H}x{W} is smaller than the kernel {kernel_size}; pad it first")
    if backend == "flex" and attn_drop == 0.0 and not _counting_flops():
        return _neighborhood_flex(q, k, v, rpb, kernel_size)
    rows, cols = _axis_tiling(H, kernel_size, tile), _axis_tiling(W, kernel_size, tile)
    rel_r, ok_r = _axis_bias_index(H, kernel_size, rows, q.device)
    rel_c, ok_c = _axis_bias_index(W, kernel_size, cols, q.device)
    # bias and mask per (tile row, tile col, query row, query col, key row, key col)
    bias = rpb[:, rel_r[:, None, :, None, :, None], rel_c[None, :, None, :, None, :]]
    allowed = ok_r[:, None, :, None, :, None] & ok_c[None, :, None, :, None, :]
    bias = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)
    bias = bias.reshape(nh, len(rows.starts) * len(cols.starts), rows.size * cols.size, -1)
    if attn_drop == 0.0:
        return _neighborhood_op(q, k, v, bias, kernel_size, tile)[0]
    logits = _tile_queries(q, rows, cols) @ _halos(k, rows, cols).transpose(-2, -1) + bias
    tiles = F.dropout(logits.softmax(-1), attn_drop) @ _halos(v, rows, cols)
    out = q.new_empty(q.shape)
    _untile_into(out, tiles, rows, cols)  # autograd records the copy into the fresh tensor
    return out


@register_dat_block("N")
class NeighborhoodAttention(nn.Module):
    """'N': neighborhood attention (DAT++ stages 1-3), parameters ``rpb``, ``qkv``, ``proj``.

    Maps smaller than the kernel are zero-padded bottom/right *before* ``qkv`` (the padded
    tokens carry the qkv bias and are attended to) and cropped afterwards. ``backend``
    (``NA_BACKENDS``): 'tiled' (the custom op), 'flex' (FlexAttention: inference only on the
    CPU, where it has no backward) or 'auto' (flex on CUDA, where it is available; tiled
    elsewhere: on the CPU flex measured 6.5x slower).
    """

    def __init__(self, dim: int, heads: int, kernel_size: int = 7, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.backend = check_backend("na_backend", backend, NA_BACKENDS)
        self.heads, self.kernel_size = heads, kernel_size
        self.scale = (dim // heads) ** -0.5
        self.rpb = nn.Parameter(torch.zeros(heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.rpb, std=0.02)

    @classmethod
    def for_stage(cls, s: StageArgs) -> NeighborhoodAttention:
        return cls(s.dim, s.heads, kernel_size=s.nat_ksize, attn_drop=s.attn_drop,
                   proj_drop=s.proj_drop, backend=s.na_backend)

    def forward(self, x: Tensor) -> AttnOutput:
        B, C, H, W = x.shape
        k = self.kernel_size
        x = x.permute(0, 2, 3, 1)
        Hp, Wp = max(H, k), max(W, k)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        q, key, v = rearrange(self.qkv(x), "b y x (three h c) -> three b h y x c", three=3,
                              h=self.heads).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        backend = "flex" if drop == 0.0 and use_flex("na_backend", self.backend, q, key, v, self.rpb) else "tiled"
        out = neighborhood_attention(q * self.scale, key, v, self.rpb, k, attn_drop=drop, backend=backend)
        out = rearrange(out[:, :, :H, :W], "b h y x c -> b y x (h c)")
        return self.proj_drop(self.proj(out)).permute(0, 3, 1, 2), None, None


# --------------------------------------------------------------------------------------------
# Deformable attention
# --------------------------------------------------------------------------------------------

def _centres(n: int, version: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Reference-point coordinates in [-1, 1] along an axis of n key positions.

    v2 (DAT++): ((a + 0.5) / (n - 1)) * 2 - 1 (as the released code; 0 for n == 1, where the
    formula would divide by zero). v1: ((a + 0.5) / n) * 2 - 1.
    """
    a = torch.arange(n, device=device, dtype=dtype) + 0.5
    if version == 1:
        return a / n * 2 - 1
    return a / (n - 1) * 2 - 1 if n > 1 else torch.zeros(1, device=device, dtype=dtype)


def _query_grid(n: int, version: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Query coordinates in [-1, 1] for the relative-position bias: v2 a / (n - 1) * 2 - 1
    (0 for n == 1); v1 uses the reference-point formula."""
    if version == 1:
        return _centres(n, 1, device, dtype)
    a = torch.arange(n, device=device, dtype=dtype)
    return a / (n - 1) * 2 - 1 if n > 1 else torch.zeros(1, device=device, dtype=dtype)


def _grid(ys: Tensor, xs: Tensor) -> Tensor:
    """(len(ys), len(xs), 2) grid of (y, x) pairs."""
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


@register_dat_block("D")
class DeformableAttention(nn.Module):
    """'D': deformable attention. Queries come from every position; keys and values from the
    input bilinearly sampled at reference points (a grid ``stride`` times coarser) moved by
    offsets predicted from the queries, per offset group. The relative-position bias is the
    ``rpe_table`` sampled at the query-to-key displacement.

    ``version=2`` is DAT++ (offset scale 1/(Hk-1), clamp to [-1, 1] when the range factor is
    negative); ``version=1`` is the CVPR 2022 model (scale 1/Hk, tanh instead of the clamp,
    other reference formulas; see ``_centres``).
    """

    def __init__(self, q_size: tuple[int, int], dim: int, heads: int, groups: int, stride: int,
                 offset_range_factor: float, ksize: int, use_pe: bool = True,
                 no_off: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 version: int = 2) -> None:
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"deformable attention version must be 1 or 2, got {version}")
        if dim % heads or heads % groups:
            raise ValueError(f"dim {dim}, heads {heads}, groups {groups}: each group must hold "
                             "whole heads")
        self.heads, self.groups, self.version = heads, groups, version
        self.offset_range_factor, self.no_off = offset_range_factor, no_off
        self.attn_drop = attn_drop
        gc = dim // groups
        pad = 0 if (version == 2 and ksize == stride) else ksize // 2
        self.conv_offset = nn.Sequential(
            nn.Conv2d(gc, gc, ksize, stride, pad, groups=gc),
            LayerNormProxy(gc),
            nn.GELU(),
            PointwiseConv(gc, 2, bias=False),
        )
        if no_off:  # kept for the reference layout, frozen: no gradient reaches it (DDP needs one)
            self.conv_offset.requires_grad_(False)
        self.proj_q = PointwiseConv(dim, dim)
        self.proj_k = PointwiseConv(dim, dim)
        self.proj_v = PointwiseConv(dim, dim)
        self.proj_out = PointwiseConv(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if use_pe:
            h, w = q_size
            self.rpe_table = nn.Parameter(torch.zeros(heads, 2 * h - 1, 2 * w - 1))
            trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.rpe_table = None

    @classmethod
    def for_stage(cls, s: StageArgs) -> DeformableAttention:
        return cls(s.q_size, s.dim, s.heads, groups=s.groups, stride=s.stride,
                   offset_range_factor=s.offset_range_factor, ksize=s.ksize, use_pe=s.use_pe,
                   no_off=s.no_off, attn_drop=s.attn_drop, proj_drop=s.proj_drop,
                   version=s.deform_version)

    def sample_positions(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Positions to sample keys at, from the projected queries q (B, C, H, W).

        Returns (pos, ref), each (B * groups, Hk, Wk, 2) in (y, x) order, in [-1, 1] units.
        """
        B, C, H, W = q.shape
        # The offset network in its weights' dtype, float32 under autocast, and so the offsets,
        # reference points and positions: bf16 would quantise a position to ~0.1 pixel.
        with float32_region(q):
            offset = self.conv_offset(q.reshape(B * self.groups, C // self.groups, H, W)
                                      .to(self.conv_offset[0].weight.dtype))
        hk, wk = offset.shape[-2:]
        r = self.offset_range_factor
        if self.version == 2 and r >= 0:
            scale = [1.0 / max(hk - 1, 1), 1.0 / max(wk - 1, 1)]
        elif self.version == 1 and r > 0:
            scale = [1.0 / hk, 1.0 / wk]
        else:
            scale = None
        if scale is not None:
            t = offset.tanh()  # per-axis scalars, no (1, 2, 1, 1) tensor copied to the device
            offset = torch.stack((t[:, 0] * scale[0], t[:, 1] * scale[1]), 1) * r
        offset = offset.permute(0, 2, 3, 1)
        if self.no_off:
            offset = torch.zeros_like(offset)
        ref = _grid(_centres(hk, self.version, q.device, offset.dtype),
                    _centres(wk, self.version, q.device, offset.dtype)).expand(B * self.groups, -1, -1, -1)
        pos = offset + ref
        if r < 0:
            pos = pos.tanh() if self.version == 1 else pos.clamp(-1.0, 1.0)
        return pos, ref

    def position_bias(self, pos: Tensor, H: int, W: int) -> Tensor:
        """rpe_table sampled at (query - key) / 2: (B * groups, Hk, Wk, 2) -> (B, heads, HW, Ns)."""
        bg, hk, wk, _ = pos.shape
        B = bg // self.groups
        q_grid = _grid(_query_grid(H, self.version, pos.device, pos.dtype),
                       _query_grid(W, self.version, pos.device, pos.dtype)).reshape(1, H * W, 1, 2)
        # (query - key) * 0.5 in grid_sample's (x, y) order, (B*g, HW, Ns, 2). Flipping and
        # halving the small factors first is exact (a permutation, a power of two), so this is
        # bit for bit flip((q - p) * 0.5) without three passes over the large displacement.
        displacement = q_grid.flip(-1) * 0.5 - pos.reshape(bg, 1, hk * wk, 2).flip(-1) * 0.5
        table = self.rpe_table.unsqueeze(0).expand(B, -1, -1, -1)
        table = table.reshape(bg, self.heads // self.groups, *self.rpe_table.shape[1:])
        bias = F.grid_sample(table.to(pos.dtype), displacement, mode="bilinear",
                             align_corners=True)                          # (B*g, heads/g, HW, Ns)
        return bias.reshape(B, self.heads, H * W, hk * wk)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Tensor, Tensor]:
        """q (B, heads, HW, hc), k and v (B, heads, Ns, hc) from the keys sampled at ``pos``,
        the position bias (B, heads, HW, Ns) or None, and (pos, ref) as ``sample_positions``."""
        B, C, H, W = x.shape
        g, nh = self.groups, self.heads
        q = self.proj_q(x)
        pos, ref = self.sample_positions(q)
        hk, wk = pos.shape[1:3]
        sampled = F.grid_sample(x.reshape(B * g, C // g, H, W).to(pos.dtype), pos.flip(-1),
                                mode="bilinear", align_corners=True).reshape(B, C, hk, wk)
        k, v, q = (rearrange(t, "b (h c) y x -> b h (y x) c", h=nh)
                   for t in (self.proj_k(sampled), self.proj_v(sampled), q))
        bias = self.position_bias(pos, H, W).to(q.dtype) if self.rpe_table is not None else None
        return q, k, v, bias, pos, ref

    def forward(self, x: Tensor) -> AttnOutput:
        B, C, H, W = x.shape
        q, k, v, bias, pos, ref = self._qkv(x)
        out = _softmax_attention(q, k, v, bias, self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj_out(rearrange(out, "b h (y x) c -> b (h c) y x", y=H)))
        hk, wk = pos.shape[1:3]
        return out, pos.reshape(B, self.groups, hk, wk, 2), ref.reshape(B, self.groups, hk, wk, 2)

    def attention_probs(self, x: Tensor) -> Tensor:
        """The attention weights forward applies, (B, heads, H*W, Hk*Wk), keys in row-major
        order of the key grid; for visualisation (forward itself may go through SDPA)."""
        q, k, _, bias, _, _ = self._qkv(x)
        logits = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return (logits if bias is None else logits + bias).softmax(dim=-1)


# --------------------------------------------------------------------------------------------
# Swin windows (DAT v1)
# --------------------------------------------------------------------------------------------

def _shift_mask(h: int, w: int, ws: int, s: int) -> Tensor:
    """Swin's shifted-window mask for an h x w map (multiples of ws) rolled by -s: -100 between
    tokens from different regions of the rolled map, else 0; (windows, ws^2, ws^2)."""
    region = torch.zeros(h, w)
    if s:
        label = 0
        for rows in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for cols in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                region[rows, cols] = label
                label += 1
    windows = region.reshape(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    diff = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(diff.shape).masked_fill(diff, -100.0)


@register_dat_block("L")
class LocalAttention(nn.Module):
    """'L': attention inside non-overlapping w x w windows with Swin's relative position bias.

    The window is fixed at construction: it shrinks to the map when the map (of ``q_size``) is
    smaller (the bias table keeps its (2w-1)^2 size, so released weights still fit). A map that
    is not a multiple of the window, at construction or at run time, is zero-padded on the
    bottom/right, attended and cropped back, as mmdet's Swin backbone does (the padded tokens
    carry the qkv bias and are attended to).
    """

    shift = False

    def __init__(self, q_size: tuple[int, int], dim: int, heads: int, window_size: int = 7,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        h, w = q_size
        ws = min(window_size, h, w)
        self.heads, self.window, self.attn_drop = heads, ws, attn_drop
        self.shift_size = math.ceil(ws / 2) if self.shift and ws < min(h, w) else 0
        span = 2 * window_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(span * span, heads))
        coords = _grid(torch.arange(ws), torch.arange(ws)).reshape(-1, 2)        # (ws^2, 2)
        rel = coords[:, None, :] - coords[None, :, :] + window_size - 1
        self.register_buffer("relative_position_index", rel[..., 0] * span + rel[..., 1])
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    @classmethod
    def for_stage(cls, s: StageArgs) -> LocalAttention:
        return cls(s.q_size, s.dim, s.heads, window_size=s.window_size, attn_drop=s.attn_drop,
                   proj_drop=s.proj_drop)

    def _bias(self, h: int, w: int) -> Tensor:
        """(heads, ws^2, ws^2), or (windows, heads, ws^2, ws^2) with a mask, for an h x w
        (padded) map."""
        n = self.window ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.heads).permute(2, 0, 1)

    def forward(self, x: Tensor) -> AttnOutput:
        B, C, H, W = x.shape
        ws, s, nh = self.window, self.shift_size, self.heads
        pad_b, pad_r = -H % ws, -W % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(2, 3))
        windows = rearrange(x, "b c (ny wy) (nx wx) -> b (ny nx) (wy wx) c", wy=ws, wx=ws)
        # windows x heads as SDPA's head axis: 4-D, the shape CUDA's fused kernels take
        q, k, v = rearrange(self.proj_qkv(windows), "b n t (three h c) -> three b (n h) t c", three=3,
                            h=nh).unbind(0)
        bias = self._bias(Hp, Wp).to(q.dtype)
        bias = bias.expand(windows.shape[1], *bias.shape[-3:]).reshape(-1, *bias.shape[-2:])
        out = _softmax_attention(q, k, v, bias, self.attn_drop if self.training else 0.0)
        out = self.proj_out(rearrange(out, "b (n h) t c -> b n t (h c)", h=nh))
        out = rearrange(out, "b (ny nx) (wy wx) c -> b c (ny wy) (nx wx)", ny=Hp // ws, wy=ws)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(2, 3))
        if pad_b or pad_r:
            out = out[:, :, :H, :W]
        return self.proj_drop(out), None, None


@register_dat_block("S")
class ShiftedWindowAttention(LocalAttention):
    """'S': as 'L' on the map rolled by -ceil(w/2) (rolled back after), with Swin's mask
    (-100 between tokens from different regions of the rolled map).

    The ``attn_mask`` buffer is the mask of the construction size (padded to whole windows), as
    in the released checkpoints; other sizes compute theirs once per (size, device) and keep
    it (at most ``MASKS_KEPT``; never while compiling or exporting, where it is traced).
    """

    shift = True
    MASKS_KEPT = 8

    def __init__(self, q_size: tuple[int, int], dim: int, heads: int, window_size: int = 7,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__(q_size, dim, heads, window_size, attn_drop, proj_drop)
        ws = self.window
        self.mask_size = tuple(-(-n // ws) * ws for n in q_size)       # padded construction size
        self.register_buffer("attn_mask", _shift_mask(*self.mask_size, ws, self.shift_size))
        self._masks: dict[tuple, Tensor] = {}

    def _mask(self, h: int, w: int) -> Optional[Tensor]:
        """The mask of an h x w (padded) map; None where nothing is masked."""
        if (h, w) == self.mask_size:
            return self.attn_mask
        if not self.shift_size:
            return None
        key = (h, w, self.attn_mask.device)
        mask = self._masks.get(key)
        if mask is None:
            mask = _shift_mask(h, w, self.window, self.shift_size).to(self.attn_mask.device)
            if not torch.compiler.is_compiling():
                if len(self._masks) >= self.MASKS_KEPT:
                    self._masks.pop(next(iter(self._masks)))
                self._masks[key] = mask
        return mask

    def _bias(self, h: int, w: int) -> Tensor:
        mask = self._mask(h, w)
        bias = super()._bias(h, w)
        return bias if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Kinds of the reference code that no released checkpoint uses
# --------------------------------------------------------------------------------------------

@register_dat_block("P")
class SpatialReductionAttention(nn.Module):
    """'P': PVT-style global attention whose keys and values come from the map downsampled by
    ``sr_ratio`` (a strided ``sr_ratio`` x ``sr_ratio`` convolution and a LayerNorm,
    ``proj_ds``); no position bias. Parameter names as in the reference code (``q``, ``kv``,
    ``proj``; the first half of ``kv``'s channels are the keys)."""

    def __init__(self, q_size: tuple[int, int], dim: int, heads: int, sr_ratio: int = 1,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if sr_ratio > min(q_size):
            raise ValueError(f"sr_ratio {sr_ratio} is larger than the {q_size[0]}x{q_size[1]} map")
        self.heads, self.sr_ratio, self.attn_drop = heads, sr_ratio, attn_drop
        self.q = PointwiseConv(dim, dim)
        self.kv = PointwiseConv(dim, 2 * dim)
        self.proj = PointwiseConv(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.proj_ds = nn.Sequential(nn.Conv2d(dim, dim, sr_ratio, sr_ratio), LayerNormProxy(dim))

    @classmethod
    def for_stage(cls, s: StageArgs) -> SpatialReductionAttention:
        return cls(s.q_size, s.dim, s.heads, sr_ratio=s.sr_ratio, attn_drop=s.attn_drop,
                   proj_drop=s.proj_drop)

    def forward(self, x: Tensor) -> AttnOutput:
        B, C, H, W = x.shape
        nh = self.heads
        q = rearrange(self.q(x), "b (h c) y x -> b h (y x) c", h=nh)
        kv = self.kv(self.proj_ds(x) if self.sr_ratio > 1 else x)
        k, v = rearrange(kv, "b (two h c) y x -> two b h (y x) c", two=2, h=nh).unbind(0)
        out = _softmax_attention(q, k, v, None, self.attn_drop if self.training else 0.0)
        out = rearrange(out, "b h (y x) c -> b (h c) y x", y=H)
        return self.proj_drop(self.proj(out)), None, None


@register_dat_block("X")
class DepthwiseConvMixer(nn.Conv2d):
    """'X': the token mixer of a ConvNeXt-style block, a k x k depthwise convolution (k the
    stage's window size). Not pre-norm: the block is ``x + MLP(LN(dwconv(x)))`` with the norm
    in ``ln_cnvnxt`` (``DATStage``). A Conv2d itself, so that its weights are
    ``attns.<d>.weight`` as in the reference code."""

    pre_norm = False

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    @classmethod
    def for_stage(cls, s: StageArgs) -> DepthwiseConvMixer:
        return cls(s.dim, kernel_size=s.window_size)

    def forward(self, x: Tensor) -> AttnOutput:
        return super().forward(x), None, None

