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

Computation (``disentangled_logits``): a relation id depends on the offset (dy, dx) only (both
modes; 1-D is a 1 x N grid), so a query row y reads the table only at the H row offsets
y - y', and a tile of query columns only at the offsets its columns can see. The table
entries each (row, column tile) needs are gathered once per forward (batch independent;
the buffer ``rel_window_index``), one batched matmul scores every query of the row tile
against them, and c2p[i, j] / p2c[j, i] are then strided views of those scores (a query
one column further reads one column earlier): no (B, heads, N, relations) score matrix,
no index gather over the batch and no scatter-add in the backward (``_score_views``).
On the CPU one autograd.Function with a hand-written backward runs the whole attention a
head at a time (``_DisentangledAttention``: a head's (B, N, N) logits and probabilities
stay in cache); with attention dropout, while compiling, and on CUDA (where the position
scores are SDPA's additive bias) the logits come from ``_DisentangledLogits``. Values and
gradients equal the gather formulation (``DisentangledAttention.position_bias`` and
``attend_by_gather``, kept as the definition; tests/test_flex.py compares against it) within
float rounding.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .attention import Attention, float32_region, given_masks, register_attention
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


def relative_windows(index: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int,
                     positions: str = "2d", tile: Optional[int] = None, head_dim: int = 64
                     ) -> tuple[torch.Tensor, tuple[int, int, int, int, int], tuple[int, ...]]:
    """What ``disentangled_logits`` reads for the relation ids ``index`` (N, N) of ``relative_index``:
    (window index, layout (P, H, W, tiles, tile width), prefix relation ids).

    The positions are an H x W grid after P prefix tokens with relations of their own (2-D),
    or a 1 x N grid (1-D, CLS included). Query columns are cut into tiles of ``tile`` columns
    (default: the cheapest for ``head_dim``, see ``default_tile``); the window of query row y
    and tile t holds, for every key row y' and column c in [0, W + tile - 1), the relation
    of the offset (y - y', t * tile + tile - 1 - c) (clamped into the grid's offsets where no
    query of the tile uses it). Window index: (H * tiles * H * (W + tile - 1),) relation ids.
    Prefix ids: (prefix->prefix, prefix->patch, patch->prefix), or () without prefix tokens.
    """
    if positions == "1d":
        P, H, W = 0, 1, index.shape[0]
    else:
        P, (H, W) = num_prefix_tokens, grid_size
    tw = default_tile(W, head_dim) if tile is None else min(max(int(tile), 1), W)
    T = -(-W // tw)
    y = torch.arange(H).view(H, 1, 1, 1)
    t = torch.arange(T).view(1, T, 1, 1)
    y_key = torch.arange(H).view(1, 1, H, 1)
    c = torch.arange(W + tw - 1).view(1, 1, 1, -1)
    dx = (t * tw + tw - 1 - c).clamp(1 - W, W - 1)
    x = dx.clamp(min=0)
    ids = index[P + y * W + x, P + y_key * W + x - dx]
    prefix = (int(index[0, 0]), int(index[0, P]), int(index[P, 0])) if P else ()
    return ids.reshape(-1), (P, H, W, T, tw), prefix


def default_tile(width: int, head_dim: int, batch: int = 16) -> int:
    """Query columns per tile for ``disentangled_logits``: a tile of w columns scores each query
    against W + w - 1 columns of offsets (fewer wasted scores for small w) but needs its own
    gathered window of the table (more windows for small w). Minimises a CPU cost model
    (6.8 ns per score, 2 ns per window element, at ``batch`` images), ties to the wider tile."""
    best, choice = None, width
    for tw in range(width, 0, -1):
        tiles = -(-width // tw)
        cost = tiles * (width + tw - 1) * (6.8 * batch * tw + 2.0 * head_dim)
        if best is None or cost < best * 0.999:
            best, choice = cost, tw
    return choice


def _row_tiles(x: torch.Tensor, layout: tuple[int, int, int, int, int]) -> torch.Tensor:
    """Patch queries (or keys) x (B, h, H*W, d) -> (h * H * tiles, B * tile, d): the rows of
    each (head, row, column tile), zero-padded to whole tiles (a copy)."""
    _, H, W, T, tw = layout
    B, h, _, d = x.shape
    x = x.reshape(B, h, H, W, d)
    if T * tw != W:
        x = F.pad(x, (0, 0, 0, T * tw - W))
    return x.reshape(B, h, H, T, tw, d).permute(1, 2, 3, 0, 4, 5).reshape(h * H * T, B * tw, d)


def _untile_rows(g: torch.Tensor, layout: tuple[int, int, int, int, int], B: int) -> torch.Tensor:
    """Adjoint of ``_row_tiles``: (h * H * tiles, B * tile, d) -> (B, h, H*W, d)."""
    _, H, W, T, tw = layout
    d = g.shape[-1]
    g = g.view(-1, H, T, B, tw, d).permute(3, 0, 1, 2, 4, 5).reshape(B, -1, H, T * tw, d)
    return g[:, :, :, :W].reshape(B, -1, H * W, d)


def _score_views(logits: torch.Tensor, scores: torch.Tensor, layout: tuple[int, int, int, int, int],
                 transpose: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of views (patch block of ``logits``, the same entries of ``scores``): c2p[i, j]
    (``transpose=False``) or p2c[i, j] read from the key's scores (``transpose=True``).

    ``scores`` (h * H * tiles, B * tile, L), L = H * (W + tile - 1): row tile (y, t) holds, for
    its query (or key) column x = t * tile + u, the scores against window column
    c = tile - 1 - u + x' of key row y', so the entry of (x, y', x') lies at
    u * (L - 1) + y' * (W + tile - 1) + x' + tile - 1 of the row tile's flat (tile * L)
    scores: a slice, a reshape and an unfold."""
    P, H, W, T, tw = layout
    B, h = logits.shape[:2]
    L = scores.shape[-1]
    flat = scores.view(h, H, T, B, tw * L)
    if tw == 1:
        rel = flat.view(h, H, T, B, 1, H, W)
    else:
        rel = flat[..., tw - 1:tw - 1 + tw * (L - 1)].unflatten(-1, (tw, L - 1)).unfold(-1, W, W + tw - 1)
    # rel: (h, y, t, b, u, y', x'); logits patch block: (B, h, y_query, x_query, y_key, x_key)
    patch = logits[:, :, P:, P:].unflatten(2, (H, W)).unflatten(4, (H, W))
    full, rest = divmod(W, tw)
    pairs = []
    if not transpose:
        rel = rel.permute(3, 0, 1, 2, 4, 5, 6)                   # (b, h, y, t, u, y', x')
        if full:
            pairs.append((patch[:, :, :, :full * tw].unflatten(3, (full, tw)), rel[:, :, :, :full]))
        if rest:
            pairs.append((patch[:, :, :, full * tw:], rel[:, :, :, full, :rest]))
    else:  # the scores' rows are keys: (b, h, y', x', y, t, u)
        rel = rel.permute(3, 0, 5, 6, 1, 2, 4)
        if full:
            pairs.append((patch[..., :full * tw].unflatten(5, (full, tw)), rel[..., :full, :]))
        if rest:
            pairs.append((patch[..., full * tw:], rel[..., full, :rest]))
    return pairs


def _prefix_blocks(logits: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prefix->prefix, prefix->patch and patch->prefix blocks of ``logits`` (views)."""
    return logits[..., :P, :P], logits[..., :P, P:], logits[..., P:, :P]


def _rows_of(table: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """table[..., ids, :] for a few Python ints (no index tensor: none to trace as a constant)."""
    return torch.stack([table[..., i, :] for i in ids], -2)


def _gather_windows(kr: torch.Tensor, qr: torch.Tensor, window_index: torch.Tensor,
                    layout: tuple[int, int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Kr, Qr (h, R, d) gathered into the row tiles' windows, (h * H * tiles, L, d) each."""
    h, d = kr.shape[0], kr.shape[-1]
    return tuple(t.detach().index_select(1, window_index).view(h * layout[1] * layout[3], -1, d)
                 for t in (kr, qr))


def _add_window_scores(logits: torch.Tensor, rows: Sequence[torch.Tensor], windows: Sequence[torch.Tensor],
                       layout: tuple[int, int, int, int, int],
                       scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits (B, h, N, N) += c2p + p2c of the patches (no autograd): ``rows`` the row tiles
    of the scaled q and k (``_row_tiles``), ``windows`` Kr's and Qr's (``_gather_windows``).
    Returns the score buffer (one for both terms, reused by the next call)."""
    for lhs, window, transpose in zip(rows, windows, (False, True)):
        scores = torch.bmm(lhs, window.transpose(1, 2), out=scores)
        for block, rel in _score_views(logits, scores, layout, transpose):
            block.add_(rel)
    return scores


def _prefix_scores(qs: torch.Tensor, ks: torch.Tensor, kr: torch.Tensor, qr: torch.Tensor,
                   prefix: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """cq = qs . Kr[prefix ids], ck = ks . Qr[prefix ids]: (..., h, N, 3) for qs, ks (..., h, N, d)."""
    return (torch.matmul(qs, _rows_of(kr, prefix).transpose(-1, -2)),
            torch.matmul(ks, _rows_of(qr, prefix).transpose(-1, -2)))


def _add_prefix_scores(logits: torch.Tensor, cq: torch.Tensor, ck: torch.Tensor, P: int) -> None:
    """The prefix relations' c2p + p2c added into the prefix rows and columns of ``logits``."""
    pp, pn, np_ = _prefix_blocks(logits, P)
    pp.add_(cq[..., :P, 0:1]).add_(ck[..., :P, 0].unsqueeze(-2))
    pn.add_(cq[..., :P, 1:2]).add_(ck[..., P:, 2].unsqueeze(-2))
    np_.add_(cq[..., P:, 2:3]).add_(ck[..., :P, 1].unsqueeze(-2))


def _window_grads(grad: torch.Tensor, rows: Sequence[torch.Tensor], windows: Sequence[torch.Tensor],
                  layout: tuple[int, int, int, int, int], g: torch.Tensor,
                  grad_windows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of ``_add_window_scores`` for the logits' gradient ``grad`` (B, h, N, N):
    of the patch rows of q and k, (B, h, H*W, d) each; the windows' gradients are written
    into ``grad_windows``. ``g``: a zeroed buffer of the scores' shape; each term writes the
    same entries of it (the others stay zero), so it serves every call."""
    out = []
    for lhs, window, transpose, grad_window in zip(rows, windows, (False, True), grad_windows):
        for block, rel in _score_views(grad, g, layout, transpose):
            rel.copy_(block)
        out.append(_untile_rows(torch.bmm(g, window), layout, grad.shape[0]))
        torch.bmm(g.transpose(1, 2), lhs, out=grad_window)
    return out


def _prefix_score_grads(grad: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of cq, ck (``_add_prefix_scores``) for the logits' gradient ``grad``."""
    gcq, gck = grad.new_zeros(*grad.shape[:-1], 3), grad.new_zeros(*grad.shape[:-1], 3)
    pp, pn, np_ = _prefix_blocks(grad, P)
    gcq[..., :P, 0], gck[..., :P, 0] = pp.sum(-1), pp.sum(-2)
    gcq[..., :P, 1], gck[..., P:, 2] = pn.sum(-1), pn.sum(-2)
    gcq[..., P:, 2], gck[..., :P, 1] = np_.sum(-1), np_.sum(-2)
    return gcq, gck


def _add_prefix_grads(grad_x: torch.Tensor, gc: torch.Tensor, rows: torch.Tensor, P: int) -> None:
    """grad_x += gc @ rows for the prefix relations' score gradients gc (..., N, 3) and table
    rows (..., 3, d): a patch row has only its patch->prefix entry (column 2), so the
    patch rows take an outer product, the few prefix rows a matmul."""
    grad_x[..., :P, :] += torch.matmul(gc[..., :P, :2], rows[..., :2, :])
    grad_x[..., P:, :].addcmul_(gc[..., P:, 2:], rows[..., 2:, :])


def _table_grads(window_index: torch.Tensor, grad_windows: Sequence[torch.Tensor],
                 tables: Sequence[torch.Tensor], prefix: tuple[int, ...],
                 prefix_grads: Optional[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Kr's and Qr's gradients: the windows' added in once, then the prefix rows'
    (``prefix_grads``: (h, 3, d) each)."""
    out = []
    for n, (table, grad_window) in enumerate(zip(tables, grad_windows)):
        h, d = table.shape[0], table.shape[-1]
        gt = torch.zeros_like(table).index_add_(1, window_index, grad_window.reshape(h, -1, d))
        if prefix_grads is not None:
            for m, i in enumerate(prefix):
                gt[:, i] += prefix_grads[n][:, m]
        out.append(gt)
    return out


class _DisentangledLogits(torch.autograd.Function):
    """(q k^T + c2p + p2c) * scale + mask (B, h, N, N), or without q k^T (``content=False``),
    with a hand-written backward: each score's gradient is written once into a zero tensor
    (no scatter-add over the batch); the windows' gradients come out of the matmul in the
    table's layout and are added into the table once per entry."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, kr: torch.Tensor, qr: torch.Tensor,
                window_index: torch.Tensor, layout: tuple[int, int, int, int, int],
                prefix: tuple[int, ...], scale: float, content: bool,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        P = layout[0]
        B, h, N, d = q.shape
        # contiguous copies in one pass each (q, k are usually strided views of the qkv output)
        qs = torch.mul(q.detach(), scale, out=q.new_empty(q.shape))
        k = k.detach().contiguous()
        ks = k * scale
        kr, qr = kr.detach(), qr.detach()
        logits = torch.matmul(qs, k.transpose(-2, -1)) if content else qs.new_zeros(B, h, N, N)
        windows = _gather_windows(kr, qr, window_index, layout)
        rows = [_row_tiles(x[:, :, P:], layout) for x in (qs, ks)]
        _add_window_scores(logits, rows, windows, layout)
        if prefix:
            _add_prefix_scores(logits, *_prefix_scores(qs, ks, kr, qr, prefix), P)
        if mask is not None:
            logits.add_(mask)
        ctx.layout, ctx.prefix, ctx.scale, ctx.content = layout, prefix, scale, content
        ctx.save_for_backward(qs, ks, k, kr, qr, window_index, *rows, *windows)
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qs, ks, k, kr, qr, window_index, q_rows, k_rows, k_window, q_window = ctx.saved_tensors
        layout, prefix, scale = ctx.layout, ctx.prefix, ctx.scale
        P = layout[0]
        g = grad.new_zeros(q_rows.shape[0], q_rows.shape[1], k_window.shape[1])
        grad_windows = (torch.empty_like(k_window), torch.empty_like(q_window))
        patches = _window_grads(grad, (q_rows, k_rows), (k_window, q_window), layout, g, grad_windows)
        del g
        grad_q, grad_k = torch.zeros_like(qs), torch.zeros_like(ks)
        grad_q[:, :, P:], grad_k[:, :, P:] = patches
        prefix_grads = None
        if prefix:
            gcq, gck = _prefix_score_grads(grad, P)
            _add_prefix_grads(grad_q, gcq, _rows_of(kr, prefix), P)
            _add_prefix_grads(grad_k, gck, _rows_of(qr, prefix), P)
            prefix_grads = (torch.matmul(gcq.transpose(-1, -2), qs).sum(0),
                            torch.matmul(gck.transpose(-1, -2), ks).sum(0))
        grad_kr, grad_qr = _table_grads(window_index, grad_windows, (kr, qr), prefix, prefix_grads)
        grad_k.mul_(scale)
        if ctx.content:  # logits += qs k^T
            grad_q += torch.matmul(grad, k)
            grad_k += torch.matmul(grad.transpose(-2, -1), qs)
        return grad_q.mul_(scale), grad_k, grad_kr, grad_qr, None, None, None, None, None, None


def _head_chunks(heads: int, per_chunk: int) -> list[slice]:
    """Heads in equal chunks of at most ``per_chunk`` (a divisor of ``heads``)."""
    size = max(c for c in range(1, max(per_chunk, 1) + 1) if heads % c == 0)
    return [slice(i, i + size) for i in range(0, heads, size)]


class _DisentangledAttention(torch.autograd.Function):
    """softmax((q k^T + c2p + p2c) * scale + mask) v, a few heads at a time (about 4 MiB of
    logits: one head of ViT-S at batch 16, every head of a small model): the (heads, B, N, N)
    logits, probabilities and their gradients of a chunk stay in cache between the matmuls,
    the position scores and the softmax (SDPA's math path, or the whole-batch logits, make a
    round trip to memory for each of them). Keeps the probabilities for the backward."""

    CHUNK_BYTES = 4 << 20  # heads per chunk: as many as fit one chunk of logits this size (at least 1)

    @staticmethod
    def heads_per_chunk(B: int, N: int, element_size: int) -> int:
        return max(1, _DisentangledAttention.CHUNK_BYTES // (B * N * N * element_size))

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kr: torch.Tensor,
                qr: torch.Tensor, window_index: torch.Tensor, layout: tuple[int, int, int, int, int],
                prefix: tuple[int, ...], scale: float, mask: Optional[torch.Tensor]) -> torch.Tensor:
        P, H, _, T, _ = layout
        B, h, N, d = q.shape
        # head-major contiguous copies (q, k, v are usually strided views of the qkv output)
        qs = torch.mul(q.detach().transpose(0, 1), scale, out=q.new_empty(h, B, N, d))
        kc, vc = (t.detach().transpose(0, 1).contiguous() for t in (k, v))
        ks = kc * scale
        kr, qr = kr.detach(), qr.detach()
        windows = [w.view(h, H * T, *w.shape[1:]) for w in _gather_windows(kr, qr, window_index, layout)]
        rows = [_row_tiles(x.transpose(0, 1)[:, :, P:], layout).view(h, H * T, -1, d) for x in (qs, ks)]
        cq, ck = _prefix_scores(qs, ks, kr.unsqueeze(1), qr.unsqueeze(1), prefix) if prefix else (None, None)
        if mask is not None:
            mask = mask.expand(B, h, N, N).transpose(0, 1)
        probs, out, scores = q.new_empty(h, B, N, N), q.new_empty(h, B, N, d), None
        for c in _head_chunks(h, _DisentangledAttention.heads_per_chunk(B, N, q.element_size())):
            logits = torch.matmul(qs[c], kc[c].transpose(-2, -1), out=probs[c])     # (heads, B, N, N)
            scores = _add_window_scores(logits.transpose(0, 1), (rows[0][c].flatten(0, 1), rows[1][c].flatten(0, 1)),
                                        (windows[0][c].flatten(0, 1), windows[1][c].flatten(0, 1)), layout, scores)
            if prefix:
                _add_prefix_scores(logits, cq[c], ck[c], P)
            if mask is not None:
                logits.add_(mask[c])
            torch.softmax(logits, -1, out=logits)
            torch.matmul(logits, vc[c], out=out[c])
        del scores
        ctx.layout, ctx.prefix, ctx.scale = layout, prefix, scale
        ctx.save_for_backward(qs, kc, ks, vc, kr, qr, window_index, probs, out, *rows, *windows)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qs, kc, ks, vc, kr, qr, window_index, probs, out, q_rows, k_rows, k_window, q_window = ctx.saved_tensors
        layout, prefix, scale = ctx.layout, ctx.prefix, ctx.scale
        P = layout[0]
        h, B, N, d = qs.shape
        grad_out = grad_out.transpose(0, 1).contiguous()                    # (h, B, N, d)
        row_sums = (grad_out * out).sum(-1, keepdim=True)                     # rowsum(dP * P)
        grad_q, grad_k, grad_v = torch.empty_like(qs), torch.empty_like(kc), torch.empty_like(vc)
        grad_windows = (torch.empty_like(k_window), torch.empty_like(q_window))
        if prefix:
            gcq, gck = qs.new_empty(h, B, N, 3), qs.new_empty(h, B, N, 3)
        chunks = _head_chunks(h, _DisentangledAttention.heads_per_chunk(B, N, qs.element_size()))
        n = chunks[0].stop  # heads per chunk
        g = qs.new_zeros(n * q_rows.shape[1], q_rows.shape[2], k_window.shape[2])
        ds = qs.new_empty(n, B, N, N)
        for c in chunks:
            p = probs[c]
            torch.matmul(p.transpose(-2, -1), grad_out[c], out=grad_v[c])
            torch.matmul(grad_out[c], vc[c].transpose(-2, -1), out=ds).sub_(row_sums[c]).mul_(p)
            gq, gk = _window_grads(ds.transpose(0, 1), (q_rows[c].flatten(0, 1), k_rows[c].flatten(0, 1)),
                                   (k_window[c].flatten(0, 1), q_window[c].flatten(0, 1)), layout, g,
                                   (grad_windows[0][c].flatten(0, 1), grad_windows[1][c].flatten(0, 1)))
            if prefix:
                gcq[c], gck[c] = (t.transpose(0, 1) for t in _prefix_score_grads(ds.transpose(0, 1), P))
            torch.matmul(ds, kc[c], out=grad_q[c])                         # logits += qs k^T
            grad_q[c, :, P:] += gq.transpose(0, 1)
            torch.matmul(ds.transpose(-2, -1), qs[c], out=grad_k[c])
            grad_k[c, :, P:] += gk.transpose(0, 1).mul_(scale)
        del g, ds
        prefix_grads = None
        if prefix:
            krp, qrp = _rows_of(kr, prefix).unsqueeze(1), _rows_of(qr, prefix).unsqueeze(1)  # (h, 1, 3, d)
            _add_prefix_grads(grad_q, gcq, krp, P)
            _add_prefix_grads(grad_k, gck, qrp * scale, P)
            prefix_grads = (torch.matmul(gcq.transpose(-1, -2), qs).sum(1),
                            torch.matmul(gck.transpose(-1, -2), ks).sum(1))
        grad_kr, grad_qr = _table_grads(window_index, grad_windows, (kr, qr), prefix, prefix_grads)
        return (grad_q.mul_(scale).transpose(0, 1), grad_k.transpose(0, 1), grad_v.transpose(0, 1), grad_kr,
                grad_qr, None, None, None, None, None)


def disentangled_logits(q: torch.Tensor, k: torch.Tensor, kr: torch.Tensor, qr: torch.Tensor,
                        window_index: torch.Tensor, layout: tuple[int, int, int, int, int],
                        prefix: tuple[int, ...], scale: float, content: bool = True,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(q k^T + c2p + p2c) * scale + mask, (B, h, N, N): c2p[i, j] = q_i . Kr[rel(i, j)],
    p2c[i, j] = k_j . Qr[rel(j, i)]; without q k^T when ``content`` is False. ``mask``: an
    additive mask broadcastable to (B, h, N, N) (no gradient flows to it).

    q, k (B, h, N, d); Kr, Qr (h, R, d); ``window_index``, ``layout``, ``prefix`` from
    ``relative_windows``. Values and gradients equal the gather formulation
    (``DisentangledAttention.position_bias``) within float rounding."""
    return _DisentangledLogits.apply(q, k, kr, qr, window_index, layout, prefix, scale, content,
                                     None if mask is None else mask.detach())


def disentangled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kr: torch.Tensor,
                           qr: torch.Tensor, window_index: torch.Tensor,
                           layout: tuple[int, int, int, int, int], prefix: tuple[int, ...],
                           scale: float, mask: Optional[torch.Tensor] = None,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """softmax((q k^T + c2p + p2c) * scale + mask) v, (B, h, N, d).

    On the CPU: one head at a time in one autograd.Function (``_DisentangledAttention``);
    with attention dropout, or while compiling / exporting, the whole-batch logits
    (``disentangled_logits``), softmax, dropout and a matmul. Elsewhere (CUDA) the position
    scores are SDPA's additive bias. ``mask``: additive, broadcastable to (B, h, N, N), no
    gradient. A leaf for torch.fx (``torch.fx.wrap``): it branches on the device.

    The position scores run in float32 whatever the autocast (on the CPU the whole attention,
    whose logits it materialises), cast to q's dtype at the end: bf16 / fp16 would round the
    logits after each of their three terms."""
    dtype = q.dtype
    wide = torch.promote_types(dtype, torch.float32)  # float32, or float64 where given
    with float32_region(q):
        q32, k32, kr, qr = q.to(wide), k.to(wide), kr.to(wide), qr.to(wide)
        mask = None if mask is None else mask.detach().to(wide)
        if q.device.type == "cpu":
            if dropout_p == 0.0 and not torch.compiler.is_compiling():
                out = _DisentangledAttention.apply(q32, k32, v.to(wide), kr, qr, window_index, layout, prefix,
                                                   scale, mask)
            else:
                logits = disentangled_logits(q32, k32, kr, qr, window_index, layout, prefix, scale, mask=mask)
                out = torch.matmul(F.dropout(logits.softmax(-1), dropout_p), v.to(wide).contiguous())
            return out.to(dtype)
        bias = disentangled_logits(q32, k32, kr, qr, window_index, layout, prefix, scale, False, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(dtype), dropout_p=dropout_p, scale=scale)


torch.fx.wrap("disentangled_attention")


def resample_relative_table(weight: torch.Tensor, positions: str, old_span: int, new_span: int) -> torch.Tensor:
    """A relation table laid out for offsets up to ``old_span`` as one for ``new_span`` (what
    ``set_input_size`` needs): the offset embeddings interpolated over the (dy, dx) grid (2-D)
    or the offset line (1-D), the farthest offsets staying at the ends; the relations after
    the offsets (prefix, far) kept."""
    old, new = 2 * old_span + 1, 2 * new_span + 1
    count = old * old if positions == "2d" else old
    offsets, rest = weight[:count].T[None], weight[count:]  # (1, C, offsets)
    if positions == "2d":
        grid = F.interpolate(offsets.reshape(1, -1, old, old).float(), size=(new, new), mode="bilinear",
                             align_corners=True)
        offsets = grid.flatten(2)
    else:
        offsets = F.interpolate(offsets.float(), size=new, mode="linear", align_corners=True)
    return torch.cat([offsets[0].T.to(weight.dtype), rest])


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
        with float32_region(rel):  # in the weights' dtype, as the position scores (disentangled_attention)
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
        # what attend reads: the relation windows of row tiles (see disentangled_logits)
        window, self.rel_layout, self.prefix_relations = relative_windows(
            index, self.grid_size, self.num_prefix_tokens, self.positions, head_dim=self.head_dim)
        self.register_buffer("rel_window_index", window.to(device), persistent=False)

    def set_grid(self, grid_size: tuple[int, int]) -> None:
        """Relation ids on the new grid; offsets beyond the construction span clip to it."""
        super().set_grid(grid_size)
        self.build_relative_index()

    def relation_span(self) -> int:
        """The largest offset the relation table holds an embedding for."""
        return self.max_distance if self.span is None else self.span

    def fit_relations(self) -> None:
        """Relations laid out for the current grid as a layer built for it has them (the
        model's ``set_input_size``, which resamples the table to the new ``relation_span``)."""
        H, W = self.grid_size
        self.max_distance = self.num_prefix_tokens + H * W - 1 if self.positions == "1d" else max(H, W) - 1
        self.build_relative_index()

    def position_bias(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(c2p + p2c) * scale: (B, heads, N, N) for q, k (B, heads, N, head_dim).

        The gather formulation (what ``attend`` computes faster through ``disentangled_logits``;
        kept for tools/visualize.py and as the definition): S and M come from one batched
        matmul over (term, head), then ``c2p_index`` / ``p2c_index`` gather the (i, j) layout.
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
        kr, qr = self.relative_projections()
        mask = self.window_bias(q.device, q.dtype)
        if attn_mask is not None:
            N = q.shape[-2]
            mask = combine_masks(attn_mask, q.new_zeros(N, N) if mask is None else mask)
        return disentangled_attention(q, k, v, kr, qr, self.rel_window_index, self.rel_layout,
                                      self.prefix_relations, self.scale, mask,
                                      self.attn_drop.p if self.training else 0.0)

    def attend_by_gather(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``attend`` as it was before the row-tile windows: ``position_bias`` (every relation
        scored, gathered at (i, j)) plus the window as SDPA's additive bias. The reference
        ``attend`` equals (tests/test_flex.py) and the 'before' of tools/benchmark_variants.py
        --previous; slower, and (B, heads, N, N) in memory."""
        bias = self.position_bias(q, k)
        window = self.window_bias(q.device, q.dtype)
        if window is not None:
            bias = bias + window
        if attn_mask is not None:
            bias = combine_masks(attn_mask, bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                              dropout_p=self.attn_drop.p if self.training else 0.0)


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
