"""Single-scale deformable attention (Deformable-DETR, Zhu et al. 2021) over the ViT patch grid.

Each patch query predicts, per head, K sampling offsets (in patches) from its own reference
point (its patch centre) and K + P attention logits: one per sampling point and one per
prefix token (CLS). Values are read bilinearly with ``grid_sample`` at reference + offset
and mixed with the softmax of those logits, so a patch can also read the global CLS value.
Prefix queries (CLS) have no location: they attend to every token with ordinary softmax
attention, which also keeps timm's query/key weights in use and trainable.

Initialisation as in Deformable-DETR: offset and weight predictors have zero weights; the
offset bias places head h's points on a ray at angle 2 pi h / heads, point k at distance
k + 1 (in the max-norm); weight bias zero (uniform mixing). Values and output projection are
timm's ``qkv``/``proj``, so a plain ViT checkpoint initialises them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention, float32_region, given_masks, register_attention


@register_attention("deform")
class DeformableDETRAttention(Attention):
    """Deformable attention for patch queries, softmax attention for prefix queries.

    Option ``points``: sampling points per head and query. Overrides ``forward``: the
    sampling points are predicted from the tokens, not from q, k, v."""

    def __init__(self, dim: int, num_heads: int = 8, *, points: int = 4, **base) -> None:
        super().__init__(dim, num_heads=num_heads, **base)
        if points < 1:
            raise ValueError(f"points must be >= 1, got {points}")
        self.num_points = points
        self.sampling_offsets = nn.Linear(dim, num_heads * points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * (points + self.num_prefix_tokens))
        self.build_reference()
        self.reset_deformable_parameters()

    def build_reference(self) -> None:
        """Reference points (x, y) = each patch's centre on the current grid, in patches."""
        H, W = self.grid_size
        y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        reference = torch.stack([x, y], -1).reshape(-1, 2).float()
        self.register_buffer("reference", reference.to(self.qkv.weight.device), persistent=False)
        # (W, H), which forward divides by: a buffer, not a tensor copied to the device per layer
        self.register_buffer("grid_wh", torch.tensor([W, H], dtype=torch.float32,
                                                     device=self.qkv.weight.device), persistent=False)

    def set_grid(self, grid_size: tuple[int, int]) -> None:
        """Reference points on the new grid (offsets are in patches, so they carry over)."""
        super().set_grid(grid_size)
        self.build_reference()

    @torch.no_grad()
    def reset_deformable_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        ray = torch.stack([angle.cos(), angle.sin()], -1)
        ray = ray / ray.abs().amax(-1, keepdim=True)  # onto the unit square
        bias = ray[:, None, :] * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, :, None]
        self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def init_weights(self) -> None:
        """timm's init_weights_vit_* re-initialises every Linear; the model calls this after."""
        self.reset_deformable_parameters()

    def sampling_locations(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Np, C) patch tokens -> (B, heads, Np, K, 2) sampling points (x, y) in patches,
        in the weights' dtype (float32 under autocast: bf16 would put a point 4 patches out
        on a grid of 1/32 patch)."""
        B, Np, _ = x.shape
        x = x.to(self.sampling_offsets.weight.dtype)
        if torch.jit.is_scripting():
            offsets = self.sampling_offsets(x)
        else:
            with float32_region(x):
                offsets = self.sampling_offsets(x)
        offsets = offsets.view(B, Np, self.num_heads, self.num_points, 2)
        return (self.reference[None, :, None, None, :] + offsets).permute(0, 2, 1, 3, 4)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        attn_mask, is_causal = given_masks(attn_mask, is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("deformable attention takes no attn_mask / is_causal")
        B, N, C = x.shape
        P, (H, W), h, d, K = self.num_prefix_tokens, self.grid_size, self.num_heads, self.head_dim, self.num_points
        q, k, v = self.qkv_heads(x)
        patches = x[:, P:]
        loc = self.sampling_locations(patches)  # (B, h, Np, K, 2)
        # Pixel centres at align_corners=False: grid = (2 * loc + 1) / size - 1.
        grid = (2 * loc + 1) / self.grid_wh - 1
        value = v[:, :, P:].transpose(-1, -2).reshape(B * h, d, H, W)
        sampled = F.grid_sample(value, grid.reshape(B * h, H * W, K, 2), mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # (B*h, d, Np, K)
        sampled = sampled.view(B, h, d, H * W, K).permute(0, 1, 3, 4, 2)  # (B, h, Np, K, d)
        logits = self.attention_weights(patches).view(B, H * W, h, K + P).transpose(1, 2)
        weights = self.attn_drop(torch.softmax(logits, -1))  # (B, h, Np, K + P)
        out = (weights[..., :K, None] * sampled).sum(3)
        if P:
            out = out + weights[..., K:] @ v[:, :, :P]
            out = torch.cat([self.attend(q[:, :, :P], k, v), out], 2)
        return self.project(out)
