"""The label loss a training step minimises (TRAIN.LOSS): timm's criteria for hard labels,
label smoothing, soft (mixup/cutmix) targets, or DeiT III's binary cross-entropy.

Distillation wraps this criterion (distillation.py); the loop never branches on the kind.
"""
from __future__ import annotations

import torch.nn as nn
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


def build_criterion(config, mixup) -> nn.Module:
    """``mixup`` (timm's Mixup, or None) decides the target form: with it, targets arrive
    as (smoothed, mixed) class distributions; without it, as class indices.

    bce: one sigmoid per class (timm's BinaryCrossEntropy). Mixed targets are used as they
    come (their smoothing is Mixup's) or, with TRAIN.LOSS.BCE_TARGET_THRESH >= 0, made 0/1
    as DeiT III does; index targets get MODEL.LABEL_SMOOTHING."""
    if config.TRAIN.LOSS.NAME == "bce":
        thresh = config.TRAIN.LOSS.BCE_TARGET_THRESH
        return BinaryCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING,
                                  target_threshold=thresh if thresh >= 0 else None)
    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup already smooths the targets
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()
