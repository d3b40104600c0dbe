"""The models under torchvision's detectors and a segmentation head (docs/BACKBONES.md).

``backbone_with_fpn(name, ...)`` is what ``torchvision.models.detection.FasterRCNN`` /
``MaskRCNN`` / ``RetinaNet`` take as ``backbone`` (torchvision's ``BackboneWithFPN``
contract: an ``out_channels`` attribute, images in, an ordered dict of maps out): the model's
``features_only`` maps, then torchvision's ``FeaturePyramidNetwork`` over a multi-scale model
(DAT's four stages, strides 4-32), or ViTDet's ``SimpleFeaturePyramid`` over one map of a
plain ViT. The backbone keeps the model's training options: ``drop_path_rate`` and the other
constructor arguments pass through, ``set_grad_checkpointing`` reaches the blocks,
``group_matcher`` / ``no_weight_decay`` give timm's layer-wise lr decay, and
``param_groups(detector, ...)`` extends it to the whole detector.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models import group_parameters
from timm.models._features import FeatureGetterNet
from timm.optim import param_groups_layer_decay
from torch import Tensor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from .registry import create_model

__all__ = ["backbone_with_fpn", "FeaturePyramidBackbone", "SimpleFeaturePyramid", "SemanticFPN",
           "param_groups"]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., 2022, "Exploring Plain Vision Transformer
    Backbones for Object Detection"): the one map of a plain ViT (stride s, ``in_channels``)
    to maps at strides s / f for each of ``scale_factors`` (4, 2, 1, 0.5: strides 4-32 from a
    patch-16 ViT) by transposed convolutions or max pooling, each then 1x1 and 3x3 convolutions
    with LayerNorm to ``out_channels``; ``extra_blocks`` (torchvision's, LastLevelMaxPool by
    default) add coarser maps. Takes and returns ordered dicts of maps like torchvision's FPN,
    the outputs named '0', '1', ... (and 'pool')."""

    def __init__(self, in_channels: int, out_channels: int, scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 extra_blocks: Optional[ExtraFPNBlock] = None) -> None:
        super().__init__()
        self.scale_factors = tuple(scale_factors)
        self.stages = nn.ModuleList()
        for scale in self.scale_factors:
            dim = in_channels
            if scale == 4.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)]
                dim //= 4
            elif scale == 2.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)]
                dim //= 2
            elif scale == 1.0:
                layers = []
            elif scale == 0.5:
                layers = [nn.MaxPool2d(2, 2)]
            else:
                raise ValueError(f"scale_factors: {scale} is not one of 4, 2, 1, 0.5 (ViTDet's)")
            layers += [nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.stages.append(nn.Sequential(*layers))
        self.extra_blocks = LastLevelMaxPool() if extra_blocks is None else extra_blocks

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        if len(features) != 1:
            raise ValueError(f"SimpleFeaturePyramid takes one map, got {len(features)}")
        x = next(iter(features.values()))
        results = [stage(x) for stage in self.stages]
        names = [str(i) for i in range(len(results))]
        results, names = self.extra_blocks(results, list(results), names)
        return OrderedDict(zip(names, results))


class FeaturePyramidBackbone(nn.Module):
    """``body``: a timm ``FeatureGetterNet`` over one of our models (a list of NCHW maps);
    ``fpn``: maps (named '0', '1', ...) to a pyramid of ``out_channels`` maps. torchvision's
    BackboneWithFPN with timm's model hooks forwarded to the model inside."""

    def __init__(self, body: FeatureGetterNet, fpn: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body, self.fpn, self.out_channels = body, fpn, out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # (B, 3, H, W) -> {'0': (B, C, H/4, W/4), ...}
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The model's blocks recompute their activations in backward (the neck does not)."""
        self.body.model.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's layer groups (layer-wise lr decay): the model's own, in network order, then
        the neck in a group of its own, last (full lr, as a classifier's head)."""
        model = self.body.model
        layer_of = group_parameters(model, model.group_matcher(coarse), reverse=True)
        neck = max(layer_of.values(), default=-1) + 1
        prefix = "body.model."
        return lambda name: layer_of.get(name[len(prefix):], neck) if name.startswith(prefix) else neck

    def no_weight_decay(self) -> set[str]:
        """The model's exemptions (``no_weight_decay()`` names and ``no_weight_decay_keywords()``
        substrings: position embeddings, relative tables) as this module's parameter names."""
        model = self.body.model
        names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        words = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
        return {f"body.model.{n}" for n, _ in model.named_parameters()
                if n in names or any(w in n for w in words)}


def backbone_with_fpn(model_name: str, out_channels: int = 256, out_indices: Optional[Sequence[int]] = None,
                      extra_blocks: Optional[ExtraFPNBlock] = None, **kwargs: Any) -> FeaturePyramidBackbone:
    """A registered model as a torchvision detection backbone. ``kwargs`` go to
    ``create_model`` (``pretrained``, ``pretrained_cfg_overlay``, ``drop_path_rate``, sizes;
    a ViT needs ``dynamic_img_size=True`` for detection's varying image sizes).

    ``out_indices`` are the model's maps to use: by default all of a multi-scale model's
    (DAT: strides 4-32, into torchvision's FeaturePyramidNetwork) and the last block of a
    plain ViT (its maps share one stride, into ViTDet's SimpleFeaturePyramid, which takes
    one). ``extra_blocks``: torchvision's (LastLevelMaxPool, the 'pool' map, by default)."""
    model = create_model(model_name, **kwargs)
    single_scale = len({f["reduction"] for f in model.feature_info}) == 1
    if out_indices is None:
        out_indices = (-1,) if single_scale else tuple(range(len(model.feature_info)))
    if single_scale and len(out_indices) != 1:
        raise ValueError(f"out_indices {tuple(out_indices)!r}: {model_name}'s maps share one stride; "
                         f"the simple feature pyramid takes one (ViTDet: the last block, (-1,))")
    body = FeatureGetterNet(model, out_indices=out_indices, output_fmt="NCHW")
    channels = body.feature_info.channels()
    extra_blocks = LastLevelMaxPool() if extra_blocks is None else extra_blocks
    if single_scale:
        fpn = SimpleFeaturePyramid(channels[0], out_channels, extra_blocks=extra_blocks)
    else:
        fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extra_blocks)
    return FeaturePyramidBackbone(body, fpn, out_channels)


class SemanticFPN(nn.Module):
    """Semantic segmentation: Panoptic FPN's semantic branch (Kirillov et al., 2019) over a
    ``FeaturePyramidBackbone``'s first four maps (strides 4-32): each brought to stride 4 by
    3x3 conv-GroupNorm-ReLU stages with 2x bilinear upsampling, summed, classified by a 1x1
    conv and resized to the input. (B, 3, H, W) -> (B, num_classes, H, W) logits."""

    def __init__(self, backbone: FeaturePyramidBackbone, num_classes: int, channels: int = 128,
                 levels: int = 4) -> None:
        super().__init__()
        self.backbone, self.levels = backbone, levels

        def conv(dim_in: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(dim_in, channels, 3, padding=1, bias=False),
                                 nn.GroupNorm(min(32, channels), channels), nn.ReLU(inplace=True))

        # level i: max(i, 1) stages, i of them followed by upsampling to the next finer map
        self.heads = nn.ModuleList(
            nn.ModuleList(conv(backbone.out_channels if j == 0 else channels) for j in range(max(i, 1)))
            for i in range(levels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        maps = list(self.backbone(x).values())[:self.levels]
        total = 0
        for i, (feature, stages) in enumerate(zip(maps, self.heads)):
            for j, stage in enumerate(stages):
                feature = stage(feature)
                if i > 0:  # to the size of the map one level finer
                    feature = F.interpolate(feature, size=maps[i - 1 - j].shape[-2:], mode="bilinear",
                                            align_corners=False)
            total = total + feature
        return F.interpolate(self.classifier(total), size=x.shape[-2:], mode="bilinear", align_corners=False)


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.05,
                 layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups for a detector or segmenter holding one ``FeaturePyramidBackbone``:
    the backbone's from timm's ``param_groups_layer_decay`` over its ``group_matcher`` (the
    model's last block at ``lr * layer_decay``, the stem at ``lr * layer_decay ** depth``, the
    neck at ``lr``), every other parameter (RPN, box, mask or segmentation heads) at ``lr``;
    no weight decay on 1-D parameters and the model's exemptions. Each group's ``lr`` is set
    (any torch optimizer) and its ``lr_scale`` kept (timm's schedulers re-apply it)."""
    found = [m for m in model.modules() if isinstance(m, FeaturePyramidBackbone)]
    if len(found) != 1:
        raise ValueError(f"param_groups: {type(model).__name__} holds {len(found)} FeaturePyramidBackbone "
                         f"modules (backbone_with_fpn); it needs one")
    backbone = found[0]
    groups = param_groups_layer_decay(backbone, weight_decay=weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=backbone.no_weight_decay())
    own = {id(p) for p in backbone.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    groups += [dict(params=params, weight_decay=decay, lr_scale=1.0)
               for params, decay in (([p for p in rest if p.ndim > 1], weight_decay),
                                     ([p for p in rest if p.ndim <= 1], 0.0)) if params]
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups
