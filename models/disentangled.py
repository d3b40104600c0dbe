"""Disentangled attention (DeBERTa) for a ViT: content-to-content + content-to-position +
position-to-content, each divided by sqrt(3 d_head):

    A_ij = (Qc_i . Kc_j + Qc_i . Kr[rel(i, j)] + Kc_j . Qr[rel(j, i)]) / sqrt(3 d)

``Kr = LN(P) Wk`` and ``Qr = LN(P) Wq`` come from one relative-position table ``P`` shared by
all layers (``RelativePositionTable``, owned by the model as ``rel_pos``). With
``share=True`` (DeBERTa's share_att_key) Wk/Wq are the layer's own key/query weights
(without bias, so a zero table gives exactly content attention); otherwise each layer has
``pos_k_proj``/``pos_q_proj``.

Relations ``rel(i, j)`` (options ``positions``, ``span``, ``log_buckets``, ``share``):

* ``positions="2d"`` (corrected default): the patch offset (dy, dx) = pos_i - pos_j, each axis
  clipped to ``span`` (optionally compressed with log buckets beyond span/2), and three
  learned relations for prefix tokens: prefix->patch, patch->prefix, prefix->prefix.
* ``positions="1d"`` (faithful to seed 000): i - j on the flattened sequence, CLS at index 0.
  The seed also had no absolute position embedding: set ``pos_embed="none"`` on the model.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .attention import Attention, given_masks, register_attention
from .locality import LocalityWindow, combine_masks


def log_bucket(delta: torch.Tensor, span: int, max_distance: int) -> torch.Tensor:
    """Map offsets to [-span, span]: exact up to span // 2, log-spaced up to ``max_distance``."""
    exact = span // 2
    if max_distance <= span or exact < 1:
        return delta.clamp(-span, span)
    mag = delta.abs().clamp(min=1).double()
    logd = exact + torch.ceil(torch.log(mag / exact) / math.log(max_distance / exact) * (span - exact))
    far = torch.sign(delta) * logd.clamp(max=span).long()
    return torch.where(delta.abs() <= exact, delta, far)


def check_relative(positions: str, span: Optional[int]) -> None:
    if positions not in ("2d", "1d"):
        raise ValueError(f"positions must be '2d' or '1d', got {positions!r}")
    if span is not None and (isinstance(span, bool) or not isinstance(span, int) or span < 1):
        raise ValueError(f"span must be an integer >= 1 or null, got {span!r}")


def relative_index(grid_size: tuple[int, int], num_prefix_tokens: int, positions: str = "2d",
                   span: Optional[int] = None, log_buckets: bool = False,
                   max_distance: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """(N, N) long tensor of relation ids ``rel(i, j)`` and the number of relations.

    2-D ids: ``(dy + s) * (2s + 1) + (dx + s)`` for patches, then prefix->patch,
    patch->prefix and prefix->prefix. 1-D ids: ``i - j + s``.
    ``max_distance``: the largest offset the relations are laid out for (the default span
    and the far end of the log buckets); default this grid's extent (2-D: max(H, W) - 1,
    1-D: N - 1). A layer built for one grid passes its own, so at another grid the number
    of relations stays and longer offsets clip to the span.
    """
    check_relative(positions, span)
    H, W = grid_size
    P = num_prefix_tokens
    N = P + H * W
    if positions == "1d":
        far = N - 1 if max_distance is None else max_distance
        s = far if span is None else span
        i = torch.arange(N)
        delta = i[:, None] - i[None, :]
        delta = log_bucket(delta, s, far) if log_buckets else delta.clamp(-s, s)
        return delta + s, 2 * s + 1
    extent = max(H, W) - 1 if max_distance is None else max_distance
    s = extent if span is None else span
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    y, x = y.flatten(), x.flatten()
    dy, dx = y[:, None] - y[None, :], x[:, None] - x[None, :]
    if log_buckets:
        dy, dx = log_bucket(dy, s, extent), log_bucket(dx, s, extent)
    else:
        dy, dx = dy.clamp(-s, s), dx.clamp(-s, s)
    offsets = (2 * s + 1) ** 2
    index = torch.empty(N, N, dtype=torch.long)
    index[P:, P:] = (dy + s) * (2 * s + 1) + (dx + s)
    index[:P, P:] = offsets
    index[P:, :P] = offsets + 1
    index[:P, :P] = offsets + 2
    return index, offsets + 3


class RelativePositionTable(nn.Module):
    """The relation embeddings ``LN(P)`` (num_relations, dim), shared by every layer."""

    def __init__(self, num_relations: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_relations, dim))
        self.norm = nn.LayerNorm(dim)
        trunc_normal_(self.weight, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.norm(self.weight)


class RelativeProjections:
    """Mixin (for an Attention: ``qkv``, ``num_heads``, ``head_dim``): Kr, Qr of the model's
    shared table through this layer's (or its own) weights.

    The table is bound by the model after construction (``bind_table``) and kept in a tuple
    so its parameters are registered once, on the model, not once per layer.
    """

    uses_relative_table = True

    def init_relative(self, dim: int, share: bool) -> None:
        self.share = share
        if not share:
            self.pos_k_proj = nn.Linear(dim, dim, bias=False)
            self.pos_q_proj = nn.Linear(dim, dim, bias=False)
        self._table: tuple[RelativePositionTable, ...] = ()

    def bind_table(self, table: RelativePositionTable) -> None:
        self._table = (table,)

    def relative_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kr, Qr: (heads, R, head_dim) each, from the shared table (no bias: a zero table
        contributes nothing)."""
        if not self._table:
            raise RuntimeError("this attention needs the model's RelativePositionTable (bind_table)")
        rel = self._table[0]()
        C = rel.shape[-1]
        if self.share:
            kr, qr = F.linear(rel, self.qkv.weight[C:2 * C]), F.linear(rel, self.qkv.weight[:C])
        else:
            kr, qr = self.pos_k_proj(rel), self.pos_q_proj(rel)
        return (kr.reshape(-1, self.num_heads, self.head_dim).transpose(0, 1),
                qr.reshape(-1, self.num_heads, self.head_dim).transpose(0, 1))


@register_attention("dis")
class DisentangledAttention(RelativeProjections, Attention):
    """DeBERTa's c2c + c2p + p2c attention as one SDPA call with an additive position bias."""

    def __init__(self, dim: int, num_heads: int = 8, *, positions: str = "2d",
                 span: Optional[int] = None, log_buckets: bool = False, share: bool = True,
                 **base) -> None:
        super().__init__(dim, num_heads=num_heads, **base)
        self.scale = (3 * self.head_dim) ** -0.5
        check_relative(positions, span)
        H, W = self.grid_size
        self.positions, self.span, self.log_buckets = positions, span, log_buckets
        # The offsets the relation table is laid out for: those of the construction grid.
        self.max_distance = self.num_prefix_tokens + H * W - 1 if positions == "1d" else max(H, W) - 1
        self.num_relations = 0
        self.build_relative_index()
        self.init_relative(dim, share)

    def build_relative_index(self) -> None:
        """The relation ids of the current grid as flat ids into (N, R) score matrices
        S[i, r] = q_i . Kr[r], M[j, r] = k_j . Qr[r]: c2p[i, j] = S[i, rel(i, j)] and
        p2c[i, j] = M[j, rel(j, i)]. The number of relations is the construction grid's."""
        index, self.num_relations = relative_index(self.grid_size, self.num_prefix_tokens, self.positions,
                                                   self.span, self.log_buckets, self.max_distance)
        device = self.qkv.weight.device
        rows = torch.arange(index.shape[0]) * self.num_relations
        self.register_buffer("c2p_index", (rows[:, None] + index).flatten().to(device), persistent=False)
        self.register_buffer("p2c_index", (rows[None, :] + index.T).flatten().to(device), persistent=False)

    def set_grid(self, grid_size: tuple[int, int]) -> None:
        """Relation ids on the new grid; offsets beyond the construction span clip to it."""
        super().set_grid(grid_size)
        self.build_relative_index()

    def position_bias(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(c2p + p2c) * scale: (B, heads, N, N) for q, k (B, heads, N, head_dim).

        S and M come from one batched matmul over (term, head); the gathers then read the
        (i, j) layout directly, so no transposed copy is made.
        """
        B, h, N, d = q.shape
        kr, qr = self.relative_projections()
        lhs = torch.stack([q, k]).transpose(1, 2).reshape(2 * h, B * N, d)
        rhs = torch.stack([kr, qr]).reshape(2 * h, -1, d)
        scores = torch.bmm(lhs, rhs.transpose(1, 2)).view(2, h, B, N * self.num_relations)
        c2p = scores[0].index_select(-1, self.c2p_index)
        p2c = scores[1].index_select(-1, self.p2c_index)
        return ((c2p + p2c) * self.scale).view(h, B, N, N).transpose(0, 1)

    def window_bias(self, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """An additive (N, N) locality window on top of the positions; none here (DisLAI has one)."""
        return None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim)."""
        attn_mask, is_causal = given_masks(attn_mask, is_causal)
        if is_causal:
            raise ValueError("disentangled attention does not support is_causal")
        bias = self.position_bias(q, k)
        window = self.window_bias(q.device, q.dtype)
        if window is not None:
            bias = bias + window
        if attn_mask is not None:
            bias = combine_masks(attn_mask, bias)
        return self.sdpa(q, k, v, attn_mask=bias)


@register_attention("dislai")
class DisLAIAttention(LocalityWindow, DisentangledAttention):
    """Disentangled attention inside the LAI window (seed 000's planned ViT-DisLAI)."""

    def __init__(self, dim: int, num_heads: int = 8, *, positions: str = "2d",
                 span: Optional[int] = None, log_buckets: bool = False, share: bool = True,
                 schedule: Optional[Sequence[Sequence]] = None, window: str = "2d",
                 by: str = "epoch", **base) -> None:
        super().__init__(dim, num_heads=num_heads, positions=positions, span=span,
                         log_buckets=log_buckets, share=share, **base)
        self.init_window(schedule, window, by)
