"""Self-attention for the ViT family: one class per attention kind.

``Attention`` is plain multi-head softmax attention through ``scaled_dot_product_attention``
with timm's parameter names (``qkv``, ``proj``, ``q_norm``, ``k_norm``), so timm weights load.
A new kind subclasses it and overrides ``attend`` (and ``__init__`` for extra parameters,
with ``check_options`` to validate them before anything is built), then registers itself in
``ATTENTION_KINDS``; ``MODEL.VIT.ATTN`` selects it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_KINDS: dict[str, type[nn.Module]] = {}


def register_attention(name: str):
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in ATTENTION_KINDS:
            raise ValueError(f"attention kind {name!r} registered twice")
        ATTENTION_KINDS[name] = cls
        return cls
    return wrap


@register_attention("softmax")
class Attention(nn.Module):
    """Softmax attention over tokens ``[prefix tokens (CLS...), patches in raster order]``.

    ``grid_size`` and ``num_prefix_tokens`` describe that layout for kinds that need
    positions (locality masks, relative positions, sampling on the patch grid).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_norm: bool = False, scale_norm: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Optional[type[nn.Module]] = None,
                 grid_size: tuple[int, int] = (14, 14), num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        norm_layer = norm_layer or nn.LayerNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def check_options(cls, **options) -> None:
        """Raise ValueError for bad values of this kind's own options. Runs at config time,
        before any model exists, so a YAML mistake fails in one line, not deep in a build."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, heads, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(x)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim)."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop.p if self.training else 0.0)
