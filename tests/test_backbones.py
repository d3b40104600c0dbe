"""docs/BACKBONES.md's example: features_only models feeding torchvision's FPN."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torchvision.ops import FeaturePyramidNetwork

import models


def test_dat_features_feed_torchvisions_fpn_at_256x320():
    torch.set_num_threads(1)
    backbone = models.create_model("dat_pp_tiny", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert backbone.feature_info.channels() == [64, 128, 256, 512]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=256)
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 256, 320))
        pyramid = fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 64, 80), (1, 128, 32, 40), (1, 256, 16, 20), (1, 512, 8, 10)]
    assert [tuple(p.shape) for p in pyramid.values()] == [(1, 256, 64, 80), (1, 256, 32, 40), (1, 256, 16, 20),
                                                          (1, 256, 8, 10)]
    assert all(torch.isfinite(p).all() for p in pyramid.values())


def test_vit_blocks_as_maps_feed_the_same_fpn():
    backbone = models.create_model("vit_dis_tiny_patch4_32", depth=4, features_only=True, out_indices=(1, 3)).eval()
    assert backbone.feature_info.channels() == [192, 192] and backbone.feature_info.reduction() == [4, 4]
    fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=64)
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 32, 32))
        pyramid = fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
    assert [tuple(m.shape) for m in maps] == [(2, 192, 8, 8)] * 2
    assert [tuple(p.shape) for p in pyramid.values()] == [(2, 64, 8, 8)] * 2
