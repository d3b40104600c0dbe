"""Performer attention (FAVOR+, Choromanski et al. 2021) and its LAI / disentangled forms.

Softmax kernel ``exp(q.k / sqrt(d))`` estimated with positive orthogonal random features

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),   x' = x / d^(1/4),

``W``: m rows, orthogonal Gaussian blocks with chi(d)-distributed norms. Attention is
``D^-1 phi(Q) (phi(K)^T V)``: linear in the number of tokens.

Options: ``features`` (m) and ``redraw`` (steps between draws, 0: never). The features are a
buffer (saved in checkpoints) drawn from a generator seeded by ``(layer index, redraw count)``,
with ``redraw count = step // redraw`` in training:
every DDP rank draws the same features without any communication, and a resumed run
continues with the same ones.

Local-exact estimator (``performer_lai``, ``performer_dis``). The patch grid is cut into
tiles; a query sees the keys of its own and the neighbouring tiles ("near", plus the prefix
tokens) through the exact kernel, and the keys of all other tiles ("far") through the
feature map, using per-tile sums of ``phi(k) v^T``; no N x N matrix is formed. Prefix
queries (CLS) see every key exactly (one row per prefix token, linear cost).
With the LAI window active, far keys are masked anyway, so the estimator is exact local
attention; once the window is gone the near keys stay exact and the far ones are estimated.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import Attention, float32_region, given_masks, register_attention
from .disentangled import RelativeProjections, check_relative
from .locality import LocalityWindow

_SEED = 0x5EED_FA70
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def orthogonal_features(num_features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(num_features, dim) float64: stacked random orthogonal blocks, rows scaled to chi(dim)
    norms so each row is marginally N(0, I) while rows within a block stay orthogonal."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        blocks.append(q.T)
    w = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return w * norms[:, None]


def log_features(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """log(phi(x) sqrt(m)) = W x' - |x'|^2 / 2 with x' = x * scale: (..., d) -> (..., m)."""
    return x @ (w * scale).T - (0.5 * scale * scale) * x.square().sum(-1, keepdim=True)


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """FAVOR+ estimate of softmax(q k^T * scale^2) v; q, k, v: (B, h, N, d) -> (B, h, N, d).

    Stabilised by subtracting each query's max log-feature and the keys' global max: both
    cancel between numerator and denominator. A ones column on v gives the denominator
    from the same matmul.
    """
    lq, lk = log_features(q, w, scale), log_features(k, w, scale)
    phq = torch.exp(lq - lq.amax(-1, keepdim=True).detach())
    phk = torch.exp(lk - lk.amax((-2, -1), keepdim=True).detach())
    kv = phk.transpose(-1, -2) @ F.pad(v, (0, 1), value=1.0)  # (B, h, m, d + 1): last = sum phi(k)
    out = phq @ kv
    return out[..., :-1] / out[..., -1:]


@register_attention("performer")
class PerformerAttention(Attention):
    """FAVOR+ attention with timm's parameter names plus the ``features`` buffers."""

    def __init__(self, dim: int, num_heads: int = 8, *, features: int = 256, redraw: int = 1000,
                 **base) -> None:
        super().__init__(dim, num_heads=num_heads, **base)
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        if redraw < 0:
            raise ValueError(f"redraw must be >= 0 (0: never), got {redraw}")
        self.num_features, self.redraw_interval = features, redraw
        self.layer_index = 0
        self.register_buffer("features", torch.empty(features, self.head_dim))
        self.register_buffer("redraw_count", torch.zeros((), dtype=torch.long))
        self.redraw(0)

    @property
    def feature_scale(self) -> float:
        """x' = x * feature_scale; the kernel estimates exp(q.k * feature_scale^2)."""
        return self.head_dim ** -0.25

    def set_layer_index(self, index: int) -> None:
        """Called by the model once built: features differ between layers."""
        self.layer_index = index
        self.redraw(self.drawn)

    @torch.no_grad()
    def redraw(self, count: int) -> None:
        generator = torch.Generator().manual_seed(_SEED + 1_000_003 * self.layer_index + count)
        w = orthogonal_features(self.num_features, self.head_dim, generator)
        self.features.copy_(w.to(self.features.dtype))
        self.redraw_count.fill_(count)
        # the count on the host, which set_progress compares every step: reading the buffer
        # would be a device-to-host sync per layer and step
        self.drawn = count

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "redraw_count" in state_dict:  # once per load: the host count follows the buffer
            self.drawn = int(state_dict[prefix + "redraw_count"])

    def set_progress(self, epoch: int, step: int) -> None:
        """Redraw every ``redraw`` optimizer steps in training (0: never).
        Evaluation keeps the features it was given (e.g. from a checkpoint)."""
        if self.training and self.redraw_interval:
            count = step // self.redraw_interval
            if count != self.drawn:
                self.redraw(count)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim); linear in N. The
        estimator runs in float32 with autocast off (under bf16 / fp16 autocast its matmuls
        would round the exponentials of the features, and fp16 overflows them)."""
        attn_mask, is_causal = given_masks(attn_mask, is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("performer attention takes no attn_mask / is_causal")
        if torch.jit.is_scripting():
            return self.estimate(q.float(), k.float(), v.float()).to(q.dtype)
        with float32_region(q):
            return self.estimate(q.float(), k.float(), v.float()).to(q.dtype)

    def estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention estimate for float32 q, k, v; variants override this."""
        return favor_attention(q, k, v, self.features.float(), self.feature_scale)


# ----------------------------------------------------------------------------- tiles
def _tile(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B, nTy, nTx, ty * tx, C), zero-padded to whole tiles."""
    B, H, W, C = x.shape
    ty, tx = tile
    x = F.pad(x, (0, 0, 0, (-W) % tx, 0, (-H) % ty))
    nty, ntx = x.shape[1] // ty, x.shape[2] // tx
    return x.view(B, nty, ty, ntx, tx, C).permute(0, 1, 3, 2, 4, 5).reshape(B, nty, ntx, ty * tx, C)


def _untile(x: torch.Tensor, grid: tuple[int, int], tile: tuple[int, int]) -> torch.Tensor:
    """(B, nTy, nTx, ty * tx, C) -> (B, H * W, C), dropping the padding."""
    B, nty, ntx, _, C = x.shape
    ty, tx = tile
    x = x.view(B, nty, ntx, ty, tx, C).permute(0, 1, 3, 2, 4, 5).reshape(B, nty * ty, ntx * tx, C)
    return x[:, :grid[0], :grid[1]].reshape(B, grid[0] * grid[1], C)


def _near(x: torch.Tensor, reach: tuple[int, int]) -> torch.Tensor:
    """(B, nTy, nTx, L, C) -> (B, nTy, nTx, n * L, C): the tiles within ``reach`` tiles of
    each tile (zeros outside the grid), n = (2 ry + 1)(2 rx + 1)."""
    ry, rx = reach
    nty, ntx = x.shape[1], x.shape[2]
    x = F.pad(x, (0, 0, 0, 0, rx, rx, ry, ry))
    shifted = [x[:, ry + dy:ry + dy + nty, rx + dx:rx + dx + ntx]
               for dy in range(-ry, ry + 1) for dx in range(-rx, rx + 1)]
    return torch.cat(shifted, dim=3)


class TileLayout:
    """Static index bookkeeping of the local-exact estimator for one grid and tile size.

    ``grid`` is (H, W) of the patch grid (2-D) or (1, N) of the whole sequence (1-D faithful
    mode, no prefix tokens). Tiles are ``tile`` patches; queries see ``reach`` tiles around
    their own exactly. ``positions`` gives (y, x) of each near-key slot for masks/relations.
    """

    def __init__(self, grid: tuple[int, int], tile: tuple[int, int]) -> None:
        H, W = grid
        self.grid, self.tile = grid, tile
        self.reach = (1 if H > 1 else 0, 1)
        y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        coords = torch.stack([y, x, torch.ones_like(y)], -1)[None].float()  # (1, H, W, 3)
        q = _tile(coords, tile)[0]  # (nTy, nTx, L, 3)
        k = _near(_tile(coords, tile), self.reach)[0]  # (nTy, nTx, nL, 3)
        self.query_yx, self.query_valid = q[..., :2].long(), q[..., 2] > 0
        self.key_yx, self.key_valid = k[..., :2].long(), k[..., 2] > 0

    def chebyshev(self) -> torch.Tensor:
        """(nTy, nTx, L, nL) Chebyshev distance between each query and near-key slot."""
        d = (self.query_yx[..., :, None, :] - self.key_yx[..., None, :, :]).abs()
        return d.amax(-1)

    def key_mask(self, radius: Optional[int]) -> torch.Tensor:
        """(nTy, nTx, L, nL) True = the near key is used: valid, and inside the window if
        ``radius`` is set. Padded query rows see every valid key (their output is dropped)."""
        mask = self.key_valid[..., None, :].expand(*self.query_yx.shape[:-1], -1)
        if radius is not None:
            inside = self.chebyshev() <= radius
            mask = mask & (inside | ~self.query_valid[..., None])
        return mask.contiguous()


def local_global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           layout: TileLayout, near_mask: torch.Tensor, logit_scale: float,
                           near_bias: Optional[torch.Tensor] = None,
                           prefix: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                           far: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The local-exact estimator for the grid queries.

    q, k, v: (B, h, H*W, d) grid tokens. near_mask: (nTy, nTx, L, nL [+P]) keys used exactly.
    near_bias: (B, h, nTy, nTx, L, nL [+P]) added to the exact logits (relative terms).
    prefix: (k_prefix, v_prefix), (B, h, P, d): prefix keys seen exactly by every query.
    far: (log phi(q), log phi(k)) of shape (B, h, H*W, m): far keys through the feature map
    (None: far keys are masked). Returns (B, h, H*W, d).
    """
    B, h, N, d = q.shape
    grid, tile = layout.grid, layout.tile
    merge = lambda t: t.reshape(B * h, grid[0], grid[1], t.shape[-1])  # noqa: E731
    qt = _tile(merge(q), tile)  # (Bh, nTy, nTx, L, d)
    kt, vt = _tile(merge(k), tile), _tile(merge(v), tile)
    kn, vn = _near(kt, layout.reach), _near(vt, layout.reach)  # (Bh, nTy, nTx, nL, d)
    if prefix is not None:
        kp, vp = (t.reshape(B * h, 1, 1, -1, d).expand(-1, kn.shape[1], kn.shape[2], -1, -1) for t in prefix)
        kn, vn = torch.cat([kn, kp], 3), torch.cat([vn, vp], 3)
    logits = (qt @ kn.transpose(-1, -2)) * logit_scale  # (Bh, nTy, nTx, L, nL + P)
    if near_bias is not None:
        logits = logits + near_bias.reshape(logits.shape)
    logits = logits.masked_fill(~near_mask, float("-inf"))
    if far is None:
        out = torch.softmax(logits, -1) @ vn
        return _untile(out, grid, tile).view(B, h, N, d)
    lq, lk = far
    m = lq.shape[-1]
    lqt = _tile(merge(lq), tile)  # (Bh, nTy, nTx, L, m)
    lkt = _tile(merge(lk), tile)
    kvalid = _tile(torch.ones(1, *grid, 1, device=q.device, dtype=q.dtype), tile)
    cq = lqt.amax(-1, keepdim=True).detach()
    ck = lkt.masked_fill(kvalid == 0, float("-inf")).amax((1, 2, 3, 4), keepdim=True).detach()
    phq, phk = torch.exp(lqt - cq), torch.exp(lkt - ck) * kvalid
    # Per-tile sums of phi(k) v^T and phi(k); far = all - near.
    sums = torch.cat([phk.transpose(-1, -2) @ vt, phk.sum(-2).unsqueeze(-1)], -1)  # (.., m, d+1)
    near_sums = _near(sums.flatten(-2).unsqueeze(3), layout.reach)
    near_sums = near_sums.sum(3).view(sums.shape)
    far_sums = sums.sum((1, 2), keepdim=True) - near_sums
    far_out = (phq @ far_sums) / m  # (Bh, nTy, nTx, L, d + 1)
    c = torch.maximum(logits.amax(-1, keepdim=True), cq + ck).detach()
    e = torch.exp(logits - c)
    g = torch.exp(cq + ck - c)
    num = e @ vn + g * far_out[..., :d]
    den = e.sum(-1, keepdim=True) + g * far_out[..., d:]
    out = num / den.clamp_min(_FLOAT32_TINY)  # the estimator runs in float32 (see ``attend``)
    return _untile(out, grid, tile).view(B, h, N, d)


@register_attention("performer_lai")
class LAIPerformerAttention(LocalityWindow, PerformerAttention):
    """Performer with the LAI window: exact inside the window (near tiles), far keys masked
    while the window is active and estimated with FAVOR+ once it is gone.

    Tiles are ``max(r, 4)`` patches wide (r: the current radius, else the schedule's last
    finite one), so the near tiles always contain the window. 1-D faithful mode tiles the
    flattened sequence (CLS included) instead of the grid.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, features: int = 256, redraw: int = 1000,
                 schedule: Optional[Sequence[Sequence]] = None, window: str = "2d",
                 by: str = "epoch", **base) -> None:
        super().__init__(dim, num_heads=num_heads, features=features, redraw=redraw, **base)
        self.tile_layouts: list[TileLayout] = []
        self.layouts_grid: Optional[tuple[int, int]] = None
        self.stage = 0
        self.init_window(schedule, window, by)

    def build_window(self) -> None:
        """The window's hook (radius or grid changed): the layout of the current radius.

        Every radius of the schedule gets its tile layout and near-key mask (buffer
        ``near_mask_<i>``, with prefix columns) when the grid is set, so the buffers stay
        the same through training and a new radius only moves ``stage``."""
        radii = list(dict.fromkeys(r for _, r in self.lai.schedule))
        if self.layouts_grid != self.grid_size:
            finite = [r for _, r in self.lai.schedule if r is not None]
            final = finite[-1] if finite else 0  # the tiles once the window is gone
            P, (H, W) = self.num_prefix_tokens, self.grid_size
            self.tile_layouts = []
            for i, radius in enumerate(radii):
                size = max(final if radius is None else radius, 4)
                if self.lai.window == "1d":
                    layout, prefix_cols = TileLayout((1, P + H * W), (1, size)), 0
                else:
                    layout, prefix_cols = TileLayout(self.grid_size, (size, size)), P
                mask = layout.key_mask(radius)
                mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], prefix_cols)], -1)
                self.tile_layouts.append(layout)
                self.register_buffer(f"near_mask_{i}", mask.to(self.features.device), persistent=False)
            self.layouts_grid = self.grid_size
        self.stage = radii.index(self.lai.radius)

    def window_bias(self, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The current window as an additive (N, N) mask, for inspection: the estimator
        itself never forms it."""
        mask = self.lai.mask()
        if mask is None:
            return None
        return torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill_(~mask.to(device), float("-inf"))

    def estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, heads, N, head_dim) float32 -> (B, heads, N, head_dim)."""
        layout, mask = self.tile_layouts[self.stage], self.get_buffer(f"near_mask_{self.stage}")
        w, s = self.features.float(), self.feature_scale
        P = 0 if self.lai.window == "1d" else self.num_prefix_tokens
        qg, kg, vg = q[:, :, P:], k[:, :, P:], v[:, :, P:]
        far = None if self.lai.radius is not None else (log_features(qg, w, s), log_features(kg, w, s))
        prefix = (k[:, :, :P], v[:, :, :P]) if P else None
        out = local_global_attention(qg, kg, vg, layout, mask, s * s, prefix=prefix, far=far)
        if P:  # prefix queries: every key, exactly
            cls = F.scaled_dot_product_attention(q[:, :, :P], k, v)
            out = torch.cat([cls, out], 2)
        return out


@register_attention("performer_dis")
class DisentangledPerformerAttention(RelativeProjections, PerformerAttention):
    """Disentangled (c2c + c2p + p2c) Performer with relative, not absolute, position terms.

    Relations: the patch offset (dy, dx) when max(|dy|, |dx|) <= ``span``, one learned
    "far" relation beyond it, and the three prefix relations of ``dis``. Near keys (the tiles
    around the query, ``max(span, 4)`` patches wide) get the exact score. For far keys
    the position terms are ``q_i . Kr[far]`` and ``k_j . Qr[far]``: a per-query and a per-key
    scalar, folded into the feature maps, so they stay linear in the number of tokens.
    All scores are divided by sqrt(3 d) as in DeBERTa.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, features: int = 256, redraw: int = 1000,
                 span: Optional[int] = 4, share: bool = True, **base) -> None:
        super().__init__(dim, num_heads=num_heads, features=features, redraw=redraw, **base)
        self.init_relative(dim, share)
        check_relative("2d", span)
        self.positions, self.span_arg = "2d", span
        self.set_span(max(self.grid_size) - 1 if span is None else span)

    def set_span(self, s: int) -> None:
        """Relation ids for offsets up to ``s`` and the layout that reads them."""
        self.span = s
        offsets = (2 * s + 1) ** 2
        # ids: offsets, prefix->patch, patch->prefix, prefix->prefix, far
        self.prefix_to_patch, self.patch_to_prefix, self.prefix_to_prefix = offsets, offsets + 1, offsets + 2
        self.far_relation = offsets + 3
        self.num_relations = offsets + 4
        self.build_layout()

    def relation_span(self) -> int:
        """The largest offset the relation table holds an embedding for."""
        return self.span

    def fit_relations(self) -> None:
        """The span a layer built for the current grid has (``span`` null: the grid's extent);
        the model's ``set_input_size`` resamples the table to it."""
        if self.span_arg is None:
            self.set_span(max(self.grid_size) - 1)

    def build_layout(self) -> None:
        """Tiles of ``max(span, 4)`` patches on the current grid, and as buffers the near
        keys' relation ids both ways and mask (prefix columns last), and the prefix
        queries' relations to every token and back."""
        s, P, device = self.span, self.num_prefix_tokens, self.features.device
        self.layout = TileLayout(self.grid_size, (max(s, 4), max(s, 4)))
        dy = self.layout.query_yx[..., :, None, 0] - self.layout.key_yx[..., None, :, 0]
        dx = self.layout.query_yx[..., :, None, 1] - self.layout.key_yx[..., None, :, 1]
        rel, rev = self.relation(dy, dx), self.relation(-dy, -dx)  # rel(i, j), rel(j, i)
        to_prefix = torch.full((*rel.shape[:-1], P), self.patch_to_prefix)
        self.register_buffer("near_rel", torch.cat([rel, to_prefix], -1).to(device), persistent=False)
        self.register_buffer("near_rev", rev.to(device), persistent=False)
        mask = self.layout.key_mask(None)
        mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], P)], -1)
        self.register_buffer("near_mask", mask.to(device), persistent=False)
        # A prefix query's relation to every token, and every token's relation to it.
        N = P + self.grid_size[0] * self.grid_size[1]
        prefix_rel = torch.full((N,), self.prefix_to_patch)
        prefix_rel[:P] = self.prefix_to_prefix
        prefix_rev = torch.full((N,), self.patch_to_prefix)
        prefix_rev[:P] = self.prefix_to_prefix
        self.register_buffer("prefix_rel", prefix_rel.to(device), persistent=False)
        self.register_buffer("prefix_rev", prefix_rev.to(device), persistent=False)

    def set_grid(self, grid_size: tuple[int, int]) -> None:
        """Tiles on the new grid; the span (and so the relation table) stays, offsets beyond
        it are the far relation."""
        super().set_grid(grid_size)
        self.build_layout()

    @property
    def feature_scale(self) -> float:
        return (3 * self.head_dim) ** -0.25

    def relation(self, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """Relation ids of patch offsets: the offset within the span, else ``far``."""
        s = self.span
        ids = (dy + s) * (2 * s + 1) + (dx + s)
        return torch.where(torch.maximum(dy.abs(), dx.abs()) <= s, ids, torch.full_like(ids, self.far_relation))

    def estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, heads, N, head_dim) float32 -> (B, heads, N, head_dim)."""
        B, h, N, d = q.shape
        P, (H, W), layout = self.num_prefix_tokens, self.grid_size, self.layout
        scale = self.feature_scale ** 2
        kr, qr = (t.float().unsqueeze(0) for t in self.relative_projections())  # (1, h, R, d)
        c2p = q @ kr.transpose(-1, -2) * scale  # (B, h, N, R): q_i . Kr[r]
        p2c = k @ qr.transpose(-1, -2) * scale  # (B, h, N, R): k_j . Qr[r]
        qg, kg, vg = q[:, :, P:], k[:, :, P:], v[:, :, P:]
        # Exact near scores: c2p gathered by rel(i, j), p2c of near keys by rel(j, i).
        tiled = lambda t: _tile(t.reshape(B * h, H, W, t.shape[-1]), layout.tile)  # noqa: E731
        c2p_t = tiled(c2p[:, :, P:])  # (Bh, nTy, nTx, L, R)
        bias = torch.take_along_dim(c2p_t, self.near_rel.unsqueeze(0), -1)
        p2c_near = _near(tiled(p2c[:, :, P:]), layout.reach)  # (Bh, nTy, nTx, nL, R)
        R = p2c_near.shape[-1]
        rev = self.near_rev  # (nTy, nTx, L, nL)
        flat = (torch.arange(rev.shape[-1], device=rev.device) * R + rev).flatten(-2)
        p2c_g = torch.take_along_dim(p2c_near.flatten(-2), flat.unsqueeze(0), -1)
        p2c_g = p2c_g.unflatten(-1, rev.shape[-2:])  # (Bh, nTy, nTx, L, nL)
        p2c_prefix = p2c[:, :, :P, self.prefix_to_patch].reshape(B * h, 1, 1, 1, P)
        p2c_prefix = p2c_prefix.expand(-1, p2c_g.shape[1], p2c_g.shape[2], p2c_g.shape[3], -1)
        bias = bias + torch.cat([p2c_g, p2c_prefix], -1)
        w = self.features.float()
        far = (log_features(qg, w, self.feature_scale) + c2p[:, :, P:, self.far_relation, None],
               log_features(kg, w, self.feature_scale) + p2c[:, :, P:, self.far_relation, None])
        out = local_global_attention(qg, kg, vg, layout, self.near_mask, scale, near_bias=bias,
                                     prefix=(k[:, :, :P], v[:, :, :P]) if P else None, far=far)
        if P:  # prefix queries: every key exactly, with the prefix relations
            p2c_cls = torch.take_along_dim(p2c, self.prefix_rev.view(1, 1, N, 1), -1)
            cls_bias = c2p[:, :, :P][..., self.prefix_rel] + p2c_cls.transpose(-1, -2)
            cls = F.scaled_dot_product_attention(q[:, :, :P], k, v, attn_mask=cls_bias, scale=scale)
            out = torch.cat([cls, out], 2)
        return out
