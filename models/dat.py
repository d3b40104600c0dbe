"""DAT (Vision Transformer with Deformable Attention, CVPR 2022) and DAT++ (2023).

A four-stage pyramid on NCHW maps. Each stage is a list of blocks whose kind is named by one
letter of ``stage_spec`` ('N' neighborhood, 'D' deformable, 'L' local window, 'S' shifted
window, and two kinds no released model uses: 'P' spatial-reduction attention and 'X' a
ConvNeXt-style depthwise-convolution block), looked up in ``models.dat_attention.DAT_BLOCKS``:
a new kind is one class registered there. Module
and parameter names are those of the released checkpoints, so their state dicts load with
``strict=True``; ``adapt_pretrained`` resizes the position tables for another resolution and
the framework's fine-tuning maps a 21k head to a subset (``MODEL.HEAD_MAP``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .dat_attention import DAT_BLOCKS, LayerNormProxy, PointwiseConv, StageArgs
from .registry import register_model

Tensor = torch.Tensor

__all__ = ["DAT", "DATStage"]

Points = list[Optional[Tensor]]  # per block: sampled positions or reference points, or None

# Position tables resampled when the resolution changes, and kept out of weight decay.
POSITION_TABLES = ("rpe_table", "rpb", "relative_position_bias_table")
# Buffers that depend only on the model's own sizes: always taken from the model.
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


class PlainMlp(nn.Module):
    """Per-token MLP of DAT v1 (keys ``chunk.linear1``, ``chunk.linear2``)."""

    def __init__(self, dim: int, expansion: int, drop: float) -> None:
        super().__init__()
        self.chunk = nn.Sequential(OrderedDict(
            linear1=nn.Linear(dim, dim * expansion), act=nn.GELU(), drop1=nn.Dropout(drop),
            linear2=nn.Linear(dim * expansion, dim), drop2=nn.Dropout(drop)))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.chunk(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DWConvMlp(nn.Module):
    """DAT++ MLP: 1x1 conv, depthwise 3x3 conv as a residual on the hidden map, GELU, 1x1."""

    def __init__(self, dim: int, expansion: int, drop: float) -> None:
        super().__init__()
        hidden = dim * expansion
        self.linear1 = nn.Sequential(PointwiseConv(dim, hidden))
        self.drop1 = nn.Dropout(drop)
        self.dwc = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.linear2 = nn.Sequential(PointwiseConv(hidden, dim))
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        h = self.drop1(self.linear1(x))
        h = self.act(h + self.dwc(h))
        return self.drop2(self.linear2(h))


class DATStage(nn.Module):
    """One stage: ``len(spec)`` blocks, block d of kind ``DAT_BLOCKS[spec[d]]`` built by its
    ``for_stage(args)``. A pre-norm block (every released kind) is ``x += DWConv(x)`` (if
    use_lpu), ``x += DropPath(attn_d(LN(x)))``, ``x += DropPath(mlp_d(LN(x)))``.

    The blocks' parts live in parallel ModuleLists (``attns``, ``mlps``, ``layer_norms`` with
    two norms per block, ``local_perception_units``), as in the released checkpoints. A kind
    with ``pre_norm = False`` ('X') makes a ConvNeXt-style block
    ``x += DropPath(mlp_d(LN(attn_d(x))))`` with its norm in ``ln_cnvnxt[str(d)]`` (its two
    ``layer_norms`` are identities), as in the reference code.
    """

    def __init__(self, spec: Sequence[str], args: StageArgs, *, dim_in: int, expansion: int,
                 use_dwc_mlp: bool, use_lpu: bool, drop_path: Sequence[float]) -> None:
        super().__init__()
        unknown = [kind for kind in spec if kind not in DAT_BLOCKS]
        if unknown:
            raise ValueError(f"unknown block kind {unknown[0]!r} in stage_spec (known: "
                             f"{', '.join(DAT_BLOCKS)})")
        dim = args.dim
        self.spec = tuple(spec)
        self.pre_norm = tuple(getattr(DAT_BLOCKS[kind], "pre_norm", True) for kind in spec)
        self.proj = PointwiseConv(dim_in, dim) if dim_in != dim else nn.Identity()
        self.layer_norms = nn.ModuleList(LayerNormProxy(dim) if self.pre_norm[i // 2] else nn.Identity()
                                         for i in range(2 * len(spec)))
        self.ln_cnvnxt = nn.ModuleDict({str(d): LayerNormProxy(dim) for d, pre in enumerate(self.pre_norm)
                                        if not pre})
        mlp = DWConvMlp if use_dwc_mlp else PlainMlp
        self.mlps = nn.ModuleList(mlp(dim, expansion, args.proj_drop) for _ in spec)
        self.attns = nn.ModuleList(DAT_BLOCKS[kind].for_stage(args) for kind in spec)
        if use_lpu:
            self.local_perception_units = nn.ModuleList(
                nn.Conv2d(dim, dim, 3, 1, 1, groups=dim) for _ in spec)
        else:
            self.local_perception_units = None
        self.drop_paths = nn.ModuleList(DropPath(p) if p > 0 else nn.Identity() for p in drop_path)
        self.grad_checkpointing = False

    def block(self, d: int, x: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Block d: x (B, C, H, W) -> (B, C, H, W), its sampled positions, reference points."""
        if self.local_perception_units is not None:
            x = x + self.local_perception_units[d](x)
        attn = self.attns[d]
        if self.pre_norm[d]:
            y, pos, ref = attn(self.layer_norms[2 * d](x))
            x = x + self.drop_paths[d](y)
            x = x + self.drop_paths[d](self.mlps[d](self.layer_norms[2 * d + 1](x)))
        else:
            y, pos, ref = attn(x)
            x = x + self.drop_paths[d](self.mlps[d](self.ln_cnvnxt[str(d)](y)))
        return x, pos, ref

    def forward(self, x: Tensor) -> tuple[Tensor, Points, Points]:
        """x (B, C_in, H, W) -> (B, C, H, W), with each block's sampled positions and
        reference points (None for non-deformable blocks). With ``grad_checkpointing`` each
        block's activations are recomputed in the backward pass instead of kept."""
        x = self.proj(x)
        positions, references = [], []
        for d in range(len(self.attns)):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, pos, ref = checkpoint(self.block, d, x, use_reentrant=False)
            else:
                x, pos, ref = self.block(d, x)
            positions.append(pos)
            references.append(ref)
        return x, positions, references


def _stage_sizes(img_size: int, patch_size: int, use_conv_patches: bool) -> list[int]:
    """Side of the map each stage runs on (img/4/2^i for the released settings)."""
    if use_conv_patches:  # two 3x3 stride-2 pad-1 convs, then 3x3 stride-2 pad-1 downsampling
        n = (((img_size + 1) // 2) + 1) // 2
        sizes = [n]
        for _ in range(3):
            sizes.append((sizes[-1] + 1) // 2)
    else:  # patch_size x patch_size patches, then 2x2 stride-2 downsampling
        sizes = [img_size // patch_size]
        for _ in range(3):
            sizes.append(sizes[-1] // 2)
    if min(sizes) < 1:
        raise ValueError(f"img_size {img_size} is too small for four stages")
    return sizes


class DAT(nn.Module):
    """DAT / DAT++ image classifier and backbone, with timm's model API.

    Per-stage arguments are 4-tuples. ``deform_version`` selects v1 (1) or DAT++ (2) formulas
    in the deformable attention; ``use_conv_patches`` selects the DAT++ convolutional stem and
    3x3 downsampling (else the v1 patch stem and 2x2 downsampling). ``drop_rate`` is the
    dropout after attention projections and in the MLPs (the released models use 0).
    ``sr_ratios`` are the key downsampling factors of 'P' blocks (no released model has any).
    ``na_backend`` computes the neighborhood attention ('N'): 'auto' (FlexAttention on CUDA,
    the tiled custom op elsewhere), 'tiled' or 'flex' (``MODEL.DAT.NA_BACKEND``).
    ``num_classes=0`` has no classifier (forward returns the pooled features);
    ``global_pool=''`` does not pool (forward returns the normalised NCHW map, or per-position
    logits with a classifier). ``img_size`` sizes the position tables and buffers of the
    released layout; the model runs on any input whose sides are multiples of 32.
    """

    output_stride = 32

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", expansion: int = 4, dim_stem: int = 64,
                 dims: tuple = (64, 128, 256, 512), depths: tuple = (2, 4, 18, 2),
                 stage_spec: tuple = (("N", "D"), ("N", "D") * 2, ("N", "D") * 9, ("D", "D")),
                 heads: tuple = (2, 4, 8, 16), window_sizes: tuple = (7, 7, 7, 7),
                 groups: tuple = (1, 2, 4, 8), use_pes: tuple = (True, True, True, True),
                 strides: tuple = (8, 4, 2, 1), offset_range_factor: tuple = (-1, -1, -1, -1),
                 no_offs: tuple = (False, False, False, False),
                 use_dwc_mlps: tuple = (True, True, True, True),
                 use_lpus: tuple = (True, True, True, True), use_conv_patches: bool = True,
                 ksizes: tuple = (9, 7, 5, 3), nat_ksizes: tuple = (7, 7, 7, 7),
                 sr_ratios: tuple = (8, 4, 2, 1), deform_version: int = 2, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 na_backend: str = "auto") -> None:
        super().__init__()
        for name, value in (("dims", dims), ("stage_spec", stage_spec), ("heads", heads),
                            ("window_sizes", window_sizes), ("groups", groups),
                            ("use_pes", use_pes), ("strides", strides),
                            ("offset_range_factor", offset_range_factor), ("no_offs", no_offs),
                            ("use_dwc_mlps", use_dwc_mlps), ("use_lpus", use_lpus),
                            ("ksizes", ksizes), ("nat_ksizes", nat_ksizes), ("depths", depths),
                            ("sr_ratios", sr_ratios)):
            if len(value) != 4:
                raise ValueError(f"DAT: {name} needs one entry per stage (4), got {value!r}")
        for i, (spec, depth) in enumerate(zip(stage_spec, depths)):
            if len(spec) != depth:
                raise ValueError(f"DAT: stage {i} has depth {depth} but stage_spec {spec!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"DAT: global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
        if num_classes < 0:
            raise ValueError(f"DAT: num_classes must be >= 0 (0: no classifier), got {num_classes}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.use_conv_patches = use_conv_patches
        self.grad_checkpointing = False
        stem_stride = 4 if use_conv_patches else patch_size
        self.output_stride = 8 * stem_stride
        # timm's description of the stage outputs (forward_intermediates, features_only)
        self.feature_info = [dict(num_chs=dims[i], reduction=stem_stride * 2 ** i, module=f"stages.{i}")
                             for i in range(4)]
        if use_conv_patches:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(in_chans, dim_stem // 2, 3, 2, 1), LayerNormProxy(dim_stem // 2), nn.GELU(),
                nn.Conv2d(dim_stem // 2, dim_stem, 3, 2, 1), LayerNormProxy(dim_stem))
        else:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(in_chans, dim_stem, patch_size, patch_size), LayerNormProxy(dim_stem))
        sizes = _stage_sizes(img_size, patch_size, use_conv_patches)
        n_blocks = sum(depths)
        rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.stages = nn.ModuleList()
        dim_in = dim_stem
        for i in range(4):
            args = StageArgs(
                q_size=(sizes[i], sizes[i]), dim=dims[i], heads=heads[i], window_size=window_sizes[i],
                groups=groups[i], use_pe=use_pes[i], stride=strides[i],
                offset_range_factor=offset_range_factor[i], no_off=no_offs[i], ksize=ksizes[i],
                nat_ksize=nat_ksizes[i], sr_ratio=sr_ratios[i], deform_version=deform_version,
                attn_drop=attn_drop_rate, proj_drop=drop_rate, na_backend=na_backend)
            self.stages.append(DATStage(
                stage_spec[i], args, dim_in=dim_in, expansion=expansion, use_dwc_mlp=use_dwc_mlps[i],
                use_lpu=use_lpus[i], drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])]))
            dim_in = 2 * dims[i]
        self.down_projs = nn.ModuleList()
        for i in range(3):
            conv = (nn.Conv2d(dims[i], 2 * dims[i], 3, 2, 1, bias=False) if use_conv_patches
                    else nn.Conv2d(dims[i], 2 * dims[i], 2, 2, 0, bias=False))
            self.down_projs.append(nn.Sequential(conv, LayerNormProxy(2 * dims[i])))
        self.cls_norm = LayerNormProxy(dims[-1])
        self.cls_head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Truncated-normal linear layers, unit LayerNorms (the released code meant to do this;
        its loop never matched a module). Convolutions keep PyTorch's default."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay_keywords(self) -> set[str]:
        return set(POSITION_TABLES)

    def no_weight_decay(self) -> set[str]:
        """The relative-position tables by full name: timm's optimizer factory
        (``create_optimizer_v2``) reads only this, not ``no_weight_decay_keywords``."""
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in POSITION_TABLES}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups in network order, timm's convention (used by layer-wise lr decay).

        Fine: the stem, then one group per block (stage i, block d); a stage's input
        ``proj`` joins its first block, ``down_projs.i`` and ``cls_norm`` join the block
        before them (timm's suffix 99999 means "previous group"); the head is unmatched,
        hence last. A block's two LayerNorms are ``layer_norms.2d`` and ``.2d+1``: a regex
        group cannot halve an index, so there is one pattern per d. Coarse: one group per stage.
        """
        if coarse:
            blocks = [(r"^stages\.(\d+)\.", None), (r"^down_projs\.(\d+)\.", (99999,))]
        else:
            depth = max(len(stage.attns) for stage in self.stages)
            blocks = [(r"^stages\.(\d+)\.proj\.", (0,)),
                      (r"^stages\.(\d+)\.(?:attns|mlps|local_perception_units|ln_cnvnxt)\.(\d+)\.", None)]
            blocks += [(rf"^stages\.(\d+)\.layer_norms\.(?:{2 * d}|{2 * d + 1})\.", (d,))
                       for d in range(depth)]
            blocks.append((r"^down_projs\.(\d+)\.", (99999,)))
        return dict(stem=r"^patch_proj\.", blocks=blocks + [(r"^cls_norm\.", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (torch.utils.checkpoint, non-reentrant)
        instead of keeping its activations: less memory, one more forward per block."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.cls_head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none); ``global_pool`` 'avg' or ''
        (no pooling), None keeps the current one."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
            self.global_pool = global_pool
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
        self.num_classes = num_classes
        if num_classes > 0:
            ref = self.patch_proj[0].weight
            self.cls_head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            self._init_weights(self.cls_head)
        else:
            self.cls_head = nn.Identity()

    def forward_features_with_points(self, x: Tensor) -> tuple[Tensor, Points, Points]:
        """As ``forward_features``, plus every block's sampled positions and reference points
        ((B, groups, Hk, Wk, 2), (y, x) in [-1, 1]; None for non-deformable blocks), in network
        order: what tools/visualize.py draws."""
        x = self.patch_proj(x)
        positions, references = [], []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.down_projs[i - 1](x)
            x, pos, ref = stage(x)
            positions += pos
            references += ref
        return x, positions, references

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> the last stage's map (B, C, H/32, W/32), before ``cls_norm``."""
        return self.forward_features_with_points(x)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, C, h, w) -> (B, num_classes): ``cls_norm``, average pooling, ``cls_head``
        (``pre_logits``: without the classifier). Without pooling (``global_pool=''``) the
        normalised map, through the classifier position by position if there is one."""
        x = self.cls_norm(x)
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
            return x if pre_logits else self.cls_head(x)
        if pre_logits or isinstance(self.cls_head, nn.Identity):
            return x
        return self.cls_head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """Stage outputs (before downsampling; strides 4, 8, 16, 32, channels ``dims``), timm's
        semantics: ``indices`` None = all, an int n = the last n, a sequence = those stages
        (negative from the end); ``norm`` applies ``cls_norm`` to the last stage's output;
        ``stop_early`` skips the stages after the last one taken. Returns (final map as
        ``forward_features``, intermediates), or only the intermediates."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (DAT's maps are NCHW), got {output_fmt!r}")
        take, max_index = _take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.patch_proj(x)
        for i, stage in enumerate(stages):
            if i > 0:
                x = self.down_projs[i - 1](x)
            x = stage(x)[0]
            if i in take:
                intermediates.append(self.cls_norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and their downsampling), the
        classifier (``prune_head``: ``reset_classifier(0, '')``) and ``cls_norm``
        (``prune_norm``, or when the last stage, whose channels it normalises, is dropped).
        Returns the absolute indices, as timm's FeatureGetterNet expects."""
        take, max_index = _take_indices(len(self.stages), indices)
        if max_index < len(self.stages) - 1 and not prune_head:
            raise ValueError(f"prune_head: the classifier is sized for the last stage, which indices "
                             f"{indices!r} drop; prune it (prune_head=True)")
        if prune_norm or max_index < len(self.stages) - 1:
            self.cls_norm = nn.Identity()
        self.stages = self.stages[:max_index + 1]
        self.down_projs = self.down_projs[:max_index]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def adapt_pretrained(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Make a released (or our) state dict fit this model before ``load_state_dict``.

        - position tables (``rpe_table``, ``rpb``, ``relative_position_bias_table``) whose size
          differs are resampled bicubically (224 -> 384 fine-tuning);
        - derived buffers (``relative_position_index``, ``attn_mask``) are taken from this model.
        """
        own = self.state_dict()
        out = {}
        for key, value in state_dict.items():
            leaf = key.rsplit(".", 1)[-1]
            if leaf in DERIVED_BUFFERS and key in own:
                out[key] = own[key].clone()
            elif leaf in POSITION_TABLES and key in own and own[key].shape != value.shape:
                out[key] = _resize_table(leaf, value, own[key].shape)
            else:
                out[key] = value
        return out


def _take_indices(n: int, indices: Optional[Union[int, Sequence[int]]]) -> tuple[list[int], int]:
    """timm's feature_take_indices, its assertion turned into a ValueError naming ``indices``."""
    try:
        return feature_take_indices(n, indices)
    except AssertionError as e:
        raise ValueError(f"indices {indices!r}: {e}") from None


def _resize_table(kind: str, table: Tensor, shape: torch.Size) -> Tensor:
    """Bicubic resampling of a position table to ``shape``.

    rpe_table / rpb (heads, h, w) are grids over a normalised or relative displacement whose
    end points correspond at any resolution, so corners are aligned. Swin's
    relative_position_bias_table ((2w-1)^2, heads) is resampled as Swin does (corners not
    aligned).
    """
    dtype = table.dtype
    if kind == "relative_position_bias_table":
        side, new_side = round(table.shape[0] ** 0.5), round(shape[0] ** 0.5)
        grid = table.float().t().reshape(1, table.shape[1], side, side)
        grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
        return grid.reshape(shape[1], -1).t().contiguous().to(dtype)
    grid = F.interpolate(table.float().unsqueeze(0), size=tuple(shape[1:]), mode="bicubic",
                         align_corners=True)
    return grid.squeeze(0).to(dtype)


_DAT_PP = dict(patch_size=4, expansion=4, strides=(8, 4, 2, 1),
               stage_spec=(("N", "D"), ("N", "D") * 2, ("N", "D") * 9, ("D", "D")),
               depths=(2, 4, 18, 2), window_sizes=(7, 7, 7, 7), use_pes=(True,) * 4,
               offset_range_factor=(-1, -1, -1, -1), no_offs=(False,) * 4,
               use_dwc_mlps=(True,) * 4, use_lpus=(True,) * 4, use_conv_patches=True,
               ksizes=(9, 7, 5, 3), nat_ksizes=(7, 7, 7, 7), deform_version=2)
_DAT_V1 = dict(patch_size=4, expansion=4, strides=(-1, -1, 1, 1), window_sizes=(7, 7, 7, 7),
               use_pes=(False, False, True, True), offset_range_factor=(-1, -1, 2, 2),
               no_offs=(False,) * 4, use_dwc_mlps=(False,) * 4, use_lpus=(False,) * 4,
               use_conv_patches=False, ksizes=(9, 7, 5, 3), deform_version=1)
_V1_DEEP = (("L", "S"), ("L", "S"), ("L", "D") * 9, ("L", "D"))
_PP_T = dict(dim_stem=64, dims=(64, 128, 256, 512), heads=(2, 4, 8, 16), groups=(1, 2, 4, 8))
_PP_S = dict(dim_stem=96, dims=(96, 192, 384, 768), heads=(3, 6, 12, 24), groups=(1, 2, 3, 6))
_PP_B = dict(dim_stem=128, dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32), groups=(2, 4, 8, 16))
_V1_S = dict(dim_stem=96, dims=(96, 192, 384, 768), heads=(3, 6, 12, 24), groups=(-1, -1, 3, 6))
_V1_B = dict(dim_stem=128, dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32), groups=(-1, -1, 4, 8))

# The released configurations (constructor arguments of each registered name).
DAT_CONFIGS: dict[str, dict[str, Any]] = {
    "dat_pp_tiny": dict(_DAT_PP, **_PP_T, drop_path_rate=0.2),
    "dat_pp_small": dict(_DAT_PP, **_PP_S, drop_path_rate=0.4),
    "dat_pp_base": dict(_DAT_PP, **_PP_B, drop_path_rate=0.7),
    "dat_pp_base_384": dict(_DAT_PP, **_PP_B, img_size=384, drop_path_rate=0.6),
    "dat_tiny": dict(_DAT_V1, **_V1_S, depths=(2, 2, 6, 2), drop_path_rate=0.2,
                     stage_spec=(("L", "S"), ("L", "S"), ("L", "D") * 3, ("L", "D"))),
    "dat_small": dict(_DAT_V1, **_V1_S, depths=(2, 2, 18, 2), stage_spec=_V1_DEEP,
                      drop_path_rate=0.3),
    "dat_base": dict(_DAT_V1, **_V1_B, depths=(2, 2, 18, 2), stage_spec=_V1_DEEP,
                     drop_path_rate=0.5),
    "dat_base_384": dict(_DAT_V1, **_V1_B, depths=(2, 2, 18, 2), stage_spec=_V1_DEEP,
                         img_size=384, window_sizes=(12, 12, 12, 12), drop_path_rate=0.5),
}


def _create_dat(name: str, overrides: dict[str, Any]) -> DAT:
    return DAT(**{**DAT_CONFIGS[name], **overrides})


_PAPERS = {1: ("arXiv:2201.00520", "Vision Transformer with Deformable Attention"),
           2: ("arXiv:2309.01430", "DAT++: Spatially Dynamic Vision Transformer with Deformable Attention")}


def _cfg(name: str, crop_pct: float = 0.875) -> dict[str, Any]:
    """timm's pretrained_cfg of a released model. No hub weights: the released .pth files are on
    the authors' pages (pass pretrained_cfg_overlay={'file': path}). The evaluation transform is
    DAT's: resize to a square of size / crop_pct, centre crop (timm's crop_mode 'squash')."""
    config = DAT_CONFIGS[name]
    size = config.get("img_size", 224)
    paper_id, paper_name = _PAPERS[config["deform_version"]]
    return dict(hf_hub_id="", url="", num_classes=1000, input_size=(3, size, size),
                pool_size=(size // 32, size // 32), fixed_input_size=False, crop_pct=crop_pct,
                crop_mode="squash", interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), first_conv="patch_proj.0", classifier="cls_head",
                license="apache-2.0", paper_ids=paper_id, paper_name=paper_name,
                origin_url="https://github.com/LeapLabTHU/DAT",
                notes=("released weights: the authors' .pth files (github.com/LeapLabTHU/DAT), "
                       "loaded with pretrained_cfg_overlay={'file': path}",))


@register_model(pretrained_cfg=_cfg("dat_pp_tiny"))
def dat_pp_tiny(**kwargs: Any) -> DAT:
    """DAT-T++: 23.96M params, 4.26 GMACs at 224, 83.9% ImageNet-1K top-1."""
    return _create_dat("dat_pp_tiny", kwargs)


@register_model(pretrained_cfg=_cfg("dat_pp_small"))
def dat_pp_small(**kwargs: Any) -> DAT:
    """DAT-S++: 53.13M params, 9.38 GMACs at 224, 84.6%."""
    return _create_dat("dat_pp_small", kwargs)


@register_model(pretrained_cfg=_cfg("dat_pp_base"))
def dat_pp_base(**kwargs: Any) -> DAT:
    """DAT-B++: 93.69M params, 16.50 GMACs at 224, 84.9%."""
    return _create_dat("dat_pp_base", kwargs)


# Released evaluated without a crop: TEST.CROP_PCT 1.0 with TEST.RESIZE square (resize to 384 x 384).
@register_model(pretrained_cfg=_cfg("dat_pp_base_384", crop_pct=1.0))
def dat_pp_base_384(**kwargs: Any) -> DAT:
    """DAT-B++ at 384 (fine-tuned from 224): 94.12M params, 49.50 GMACs, 85.9%."""
    return _create_dat("dat_pp_base_384", kwargs)


@register_model(pretrained_cfg=_cfg("dat_tiny"))
def dat_tiny(**kwargs: Any) -> DAT:
    """DAT-T (v1): 28.3M params, 4.56 GMACs at 224, 82.0%."""
    return _create_dat("dat_tiny", kwargs)


@register_model(pretrained_cfg=_cfg("dat_small"))
def dat_small(**kwargs: Any) -> DAT:
    """DAT-S (v1): 49.7M params, 8.96 GMACs at 224, 83.7%."""
    return _create_dat("dat_small", kwargs)


@register_model(pretrained_cfg=_cfg("dat_base"))
def dat_base(**kwargs: Any) -> DAT:
    """DAT-B (v1): 87.9M params, 15.72 GMACs at 224, 84.0%."""
    return _create_dat("dat_base", kwargs)


@register_model(pretrained_cfg=_cfg("dat_base_384"))
def dat_base_384(**kwargs: Any) -> DAT:
    """DAT-B (v1) at 384 with 12x12 windows: 88.2M params, 49.45 GMACs, 84.8%."""
    return _create_dat("dat_base_384", kwargs)
