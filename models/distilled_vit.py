"""DeiT's distilled ViT: a distillation token beside the class token, read by a second head.

The class is timm's ``VisionTransformerDistilled`` (its parameter names, token layout and
heads: timm's ``deit_*_distilled_patch16_224`` state dicts load with strict=True and give
the same logits) on top of this repo's ViT, so the attention stays pluggable
(``MODEL.VIT.ATTN``) and the kinds see both prefix tokens. The entries join the ``vit``
family: their options are ``MODEL.VIT`` keys, as for any ViT.

Outputs: in eval mode the mean of the two heads (DeiT's and timm's inference); in training
mode the pair ``(class logits, distillation logits)`` as DeiT's model returns it, which
``losses.DistillationLoss`` takes apart. ``set_distilled_training(False)`` (timm's switch)
makes training return the mean too: training without a teacher uses it, so that both heads
learn what evaluation averages.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from timm.models.deit import VisionTransformerDistilled as _TimmDistilled

from .registry import register_model
from .vit import _CIFAR, _CIFAR_CFG, _DEIT_CFG, VisionTransformer, timm_method


class DistilledVisionTransformer(_TimmDistilled, VisionTransformer):
    """timm's distilled ViT (dist_token, head_dist, 2 prefix tokens) over this repo's ViT."""

    extra_prefix_tokens = 1  # the distillation token, after CLS: attention kinds see 2 prefix tokens

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("global_pool", "token") != "token" or not kwargs.get("class_token", True) \
                or kwargs.get("reg_tokens", 0):
            raise ValueError("a distilled ViT reads its class and distillation tokens: it needs "
                             "global_pool 'token', class_token True and no reg_tokens")
        super().__init__(**kwargs)
        self.distilled_training = True  # DeiT: (cls, dist) logits in training mode

    # The ViT's arguments, unchanged: the registry checks names and types against them.
    __init__.__signature__ = inspect.signature(VisionTransformer.__init__)

    # The ViT's _pos_embed (the attention layers follow a dynamic patch grid) around timm's
    # distilled one (class and distillation tokens, then the position embedding).
    _timm_pos_embed = timm_method(_TimmDistilled._pos_embed, "_timm_pos_embed")
    _pos_embed = VisionTransformer._pos_embed

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's groups (the distillation token joins the stem), plus the ViT's shared
        relative-position table."""
        matcher = dict(_TimmDistilled.group_matcher(self, coarse))
        matcher["stem"] += r"|^rel_pos\."
        return matcher


# timm's deit_*_distilled_patch16_224.fb_in1k weights and eval transform.
def _cfg(tag: str) -> dict[str, Any]:
    return dict(_DEIT_CFG, hf_hub_id=f"timm/{tag}.fb_in1k", classifier=("head", "head_dist"))


def _create(arch: dict[str, Any], overrides: dict[str, Any]) -> DistilledVisionTransformer:
    return DistilledVisionTransformer(**{**arch, **overrides})


@register_model(family="vit", pretrained_cfg=_cfg("deit_tiny_distilled_patch16_224"))
def vit_tiny_distilled_patch16_224(**kwargs) -> DistilledVisionTransformer:
    return _create(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model(family="vit", pretrained_cfg=_cfg("deit_small_distilled_patch16_224"))
def vit_small_distilled_patch16_224(**kwargs) -> DistilledVisionTransformer:
    return _create(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model(family="vit", pretrained_cfg=_cfg("deit_base_distilled_patch16_224"))
def vit_base_distilled_patch16_224(**kwargs) -> DistilledVisionTransformer:
    return _create(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


# CIFAR size (32x32, 16x16 tokens), no weights: for students on CIFAR and digits.
@register_model(family="vit", pretrained_cfg=dict(_CIFAR_CFG, classifier=("head", "head_dist")))
def vit_tiny_distilled_patch2_32(**kwargs) -> DistilledVisionTransformer:
    return _create(dict(_CIFAR, patch_size=2, embed_dim=192, depth=12, num_heads=3), kwargs)
