"""Vision Transformer (Dosovitskiy et al.) on timm's implementation, attention pluggable.

Parameter names are timm's, so a timm state dict of the same name loads with strict=True.
The attention class is chosen by name (``attn``: ``MODEL.VIT.ATTN`` in YAML) from
``models.attention.ATTENTION_KINDS`` and configured by ``attn_args`` (``MODEL.VIT.ATTN_ARGS``:
the kind's own options); everything else is timm's VisionTransformer.

Research variants (docs/VARIANTS.md) register as ``vit_<variant>_<size>`` next to each plain
entry: lai, dis, dislai, performer, deform (``attn`` fixed to that kind).

For a timm user every kind is timm's ViT: ``pretrained_cfg``, ``dynamic_img_size`` /
``dynamic_img_pad``, ``set_input_size``, ``forward_intermediates`` (and ``features_only``),
``group_matcher``, ``set_grad_checkpointing``, ``reset_classifier``. When the patch grid
changes every attention layer gets ``set_grid`` (models/attention.py).
"""
from __future__ import annotations

from functools import partial
from types import FunctionType
from typing import Any, Callable, Optional, Union

import torch
import torch.fx
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block as _TimmBlock
from timm.models.vision_transformer import VisionTransformer as _TimmViT

from . import deformable_vit, locality, performer  # noqa: F401  (register attention kinds)
from .attention import attention_kind, check_attention_args
from .disentangled import RelativePositionTable, resample_relative_table
from .registry import model_info, register_model


def timm_method(method: FunctionType, name: str) -> FunctionType:
    """A copy of a timm method under another name: TorchScript compiles a method under its
    function's ``__name__``, so an override can call the method it replaces by this name."""
    return FunctionType(method.__code__, method.__globals__, name, method.__defaults__, method.__closure__)


class Block(_TimmBlock):
    """timm's pre-norm block (its parameter names and forward) with the attention built by
    ``attention``: the kind with the model's token grid and options bound, which timm's
    ``attn_layer`` (a class) cannot carry. timm's block gets an ``nn.Identity`` for it, and
    the attention is built first, so that random initialisation runs in timm's order."""

    def __init__(self, dim: int, num_heads: int, attention: Callable[..., nn.Module], *,
                 qkv_bias: bool = False, qk_norm: bool = False, scale_attn_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, attn_layer: Any = None,
                 **block_args: Any) -> None:
        # attn_layer: timm's VisionTransformer passes its default; the kind replaces it
        attn = attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                         scale_norm=scale_attn_norm, proj_bias=proj_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, norm_layer=norm_layer)
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                         scale_attn_norm=scale_attn_norm, proj_bias=proj_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, norm_layer=norm_layer, attn_layer=nn.Identity,
                         **block_args)
        self.attn = attn


class VisionTransformer(_TimmViT):
    """timm's ViT with an attention kind chosen by name and the framework's model hooks.

    ``attn`` names the kind (``models.attention.ATTENTION_KINDS``), ``attn_args`` holds its
    options (its keyword-only constructor arguments), forwarded unchanged to every layer.
    """

    extra_prefix_tokens = 0  # tokens a subclass puts between CLS and the patches (DeiT's distillation token)

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_norm: bool = False,
                 init_values: Optional[float] = None, class_token: bool = True,
                 reg_tokens: int = 0, no_embed_class: bool = False,
                 fc_norm: Optional[bool] = None, drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 weight_init: str = "", attn: str = "softmax",
                 attn_args: Optional[dict[str, Any]] = None, pos_embed: str = "learn",
                 dynamic_img_size: bool = False, dynamic_img_pad: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        grid = (img_size // patch_size, img_size // patch_size)
        attention = partial(attention_kind(attn), grid_size=grid,
                            num_prefix_tokens=int(class_token) + reg_tokens + self.extra_prefix_tokens,
                            **(attn_args or {}))
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, init_values=init_values,
            class_token=class_token, reg_tokens=reg_tokens, no_embed_class=no_embed_class,
            fc_norm=fc_norm, drop_rate=drop_rate, pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, weight_init=weight_init, pos_embed=pos_embed,
            dynamic_img_size=dynamic_img_size, dynamic_img_pad=dynamic_img_pad,
            block_fn=partial(Block, attention=attention))
        self.attn_kind = attn
        self.default_out_indices = min(3, depth)  # features_only: the last 3 blocks, as timm's ViT
        for index, block in enumerate(self.blocks):
            if hasattr(block.attn, "set_layer_index"):
                block.attn.set_layer_index(index)
        if getattr(self.blocks[0].attn, "uses_relative_table", False):
            # One relative-position table for all layers (DeBERTa), outside the blocks so a
            # plain ViT state dict lacks exactly this module.
            self.rel_pos = RelativePositionTable(self.blocks[0].attn.num_relations, embed_dim)
            for block in self.blocks:
                block.attn.bind_table(self.rel_pos)

    @staticmethod
    def check_args(kwargs: dict[str, Any]) -> None:
        """The registry's static check (config time): the attention kind exists and
        ``attn_args`` are options of it, with the types of their defaults."""
        check_attention_args(kwargs.get("attn", "softmax"), kwargs.get("attn_args"))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's set plus the relative-position table (an embedding, like pos_embed)."""
        names = set(super().no_weight_decay())
        if hasattr(self, "rel_pos"):
            names.add("rel_pos.weight")
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's groups; the shared relative-position table joins the stem (an embedding used
        by every layer, so layer-wise lr decay scales it like pos_embed)."""
        matcher = dict(super().group_matcher(coarse))
        matcher["stem"] += r"|^rel_pos\."
        return matcher

    def set_input_size(self, img_size: Optional[Union[int, tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, tuple[int, int]]] = None) -> None:
        """timm's (patch embedding and resampled pos_embed), then every attention layer
        moves to the new patch grid; a relative-position table is resampled to the offsets a
        model built at this size holds (dynamic sizes instead clip to the built ones)."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self._set_attention_grid(self.patch_embed.grid_size)
        if hasattr(self, "rel_pos"):  # the relations and table of a model built at this size
            attn = self.blocks[0].attn
            old = attn.relation_span()
            for block in self.blocks:
                block.attn.fit_relations()
            if attn.relation_span() != old:
                with torch.no_grad():
                    table = resample_relative_table(self.rel_pos.weight, attn.positions, old, attn.relation_span())
                self.rel_pos.weight = nn.Parameter(table)

    def _set_attention_grid(self, grid_size: tuple[int, int]) -> None:
        grid = (int(grid_size[0]), int(grid_size[1]))
        for block in self.blocks:
            if block.attn.grid_size != grid:
                block.attn.set_grid(grid)

    # timm's _pos_embed under a name of its own, which TorchScript (no super()) can call
    # beside the override below.
    _timm_pos_embed = timm_method(_TimmViT._pos_embed, "_timm_pos_embed")

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``_pos_embed``; with ``dynamic_img_size`` the attention layers first move to
        this input's patch grid (eagerly; torch.fx and TorchScript keep the grid the model has
        when captured)."""
        if not torch.jit.is_scripting():
            if self.dynamic_img_size and not isinstance(x, torch.fx.Proxy):
                self._set_attention_grid((x.shape[1], x.shape[2]))
        return self._timm_pos_embed(x)

    def set_progress(self, epoch: int, step: int) -> None:
        """Training-progress hook, called by the loop before every step and evaluation;
        forwarded to attention layers with schedules (e.g. a growing locality window)."""
        for module in self.modules():
            if module is not self and hasattr(module, "set_progress"):
                module.set_progress(epoch, step)

    def adapt_pretrained(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resample the absolute position embedding of weights trained at another resolution."""
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.shape != self.pos_embed.shape:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            state_dict = dict(state_dict)
            state_dict["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=self.patch_embed.grid_size, num_prefix_tokens=prefix)
        return state_dict


def _create_vit(arch: dict[str, Any], overrides: dict[str, Any]) -> VisionTransformer:
    return VisionTransformer(**{**arch, **overrides})


# pretrained_cfg (timm's fields): which weights the name loads with ``pretrained=True`` and
# how they were evaluated (mean/std, crop, interpolation).
_VIT_CFG = dict(first_conv="patch_embed.proj", classifier="head", license="apache-2.0",
                interpolation="bicubic", fixed_input_size=True)
_DEIT_CFG = dict(_VIT_CFG, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.875,
                 paper_ids="arXiv:2012.12877",
                 paper_name="Training data-efficient image transformers & distillation through attention")
# CIFAR sizes have no weights; their eval transform is configs/vit/cifar_base.yaml's (no crop).
_CIFAR_CFG = dict(_VIT_CFG, hf_hub_id="", num_classes=10, input_size=(3, 32, 32), crop_pct=1.0,
                  mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


# ImageNet sizes: timm's names, so timm's entries and pretrained_cfgs stay (timm's default
# weights and eval transform); these build the same model (timm's state dicts load strictly).
@register_model
def vit_tiny_patch16_224(**kwargs) -> VisionTransformer:
    return _create_vit(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vit_small_patch16_224(**kwargs) -> VisionTransformer:
    return _create_vit(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vit_base_patch16_224(**kwargs) -> VisionTransformer:
    return _create_vit(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vit_large_patch16_224(**kwargs) -> VisionTransformer:
    return _create_vit(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


@register_model
def vit_huge_patch14_224(**kwargs) -> VisionTransformer:
    """Headless ImageNet-21k weights (num_classes 0): fine-tuning starts a new head."""
    return _create_vit(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), kwargs)


# CIFAR sizes (32x32 input): 8x8 tokens at patch 4, 16x16 at patch 2.
_CIFAR = dict(img_size=32, num_classes=10)


@register_model(pretrained_cfg=_CIFAR_CFG)
def vit_tiny_patch4_32(**kwargs) -> VisionTransformer:
    return _create_vit(dict(_CIFAR, patch_size=4, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model(pretrained_cfg=_CIFAR_CFG)
def vit_small_patch4_32(**kwargs) -> VisionTransformer:
    return _create_vit(dict(_CIFAR, patch_size=4, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model(pretrained_cfg=_CIFAR_CFG)
def vit_base_patch4_32(**kwargs) -> VisionTransformer:
    return _create_vit(dict(_CIFAR, patch_size=4, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model(pretrained_cfg=_CIFAR_CFG)
def vit_tiny_patch2_32(**kwargs) -> VisionTransformer:
    return _create_vit(dict(_CIFAR, patch_size=2, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model(pretrained_cfg=_CIFAR_CFG)
def vit_small_patch2_32(**kwargs) -> VisionTransformer:
    return _create_vit(dict(_CIFAR, patch_size=2, embed_dim=384, depth=12, num_heads=6), kwargs)


# Research variants: one entry per plain entry above, e.g. vit_lai_small_patch16_224,
# vit_dislai_tiny_patch4_32. The name fixes the kind (another attn= is refused); performer_lai
# and performer_dis have no names of their own: a plain name with MODEL.VIT.ATTN.
VARIANTS = ("lai", "dis", "dislai", "performer", "deform")  # registered name part = attention kind
_PLAIN = (vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224,
          vit_large_patch16_224, vit_huge_patch14_224, vit_tiny_patch4_32, vit_small_patch4_32,
          vit_base_patch4_32, vit_tiny_patch2_32, vit_small_patch2_32)


def _register_variant(attn: str, plain: Callable[..., VisionTransformer]) -> None:
    """``vit_<attn>_<size>``: the plain entry with ``attn`` fixed, and its pretrained_cfg (a
    variant fine-tunes from the plain weights; its own layers start fresh)."""
    def entry(**kwargs) -> VisionTransformer:
        return plain(**{"attn": attn, **kwargs})

    entry.__name__ = entry.__qualname__ = plain.__name__.replace("vit_", f"vit_{attn}_", 1)
    entry.__doc__ = f"{plain.__name__} with {attn!r} attention."
    cfg = {k: v for k, v in model_info(plain.__name__).pretrained_cfg.items() if k not in ("architecture", "tag")}
    register_model(entry, fixed_args={"attn": attn}, pretrained_cfg=cfg)


for _attn in VARIANTS:
    for _plain in _PLAIN:
        _register_variant(_attn, _plain)
