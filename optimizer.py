"""Optimizer with the usual ViT weight-decay exemptions and optional layer-wise LR decay."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

from config import ConfigError, source_of


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters trained without weight decay.

    Biases, norms and every 1-D parameter; the names a model lists in ``no_weight_decay()``
    (position embeddings, class token, relative-position tables); and any parameter whose
    name contains a substring from ``no_weight_decay_keywords()``.
    """
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    names = set()
    for name, param in model.named_parameters():
        if (param.ndim <= 1 or name.endswith(".bias") or name in listed
                or any(word in name for word in keywords)):
            names.add(name)
    return names


def build_optimizer(config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """``lr`` is the already batch-scaled base learning rate."""
    train = config.TRAIN
    skip = no_weight_decay_names(model)
    if train.LAYER_DECAY < 1.0:
        if not hasattr(model, "group_matcher"):
            raise ConfigError(f"{source_of(config, 'TRAIN.LAYER_DECAY')}: TRAIN.LAYER_DECAY: needs a model "
                              f"with group_matcher(); {type(model).__name__} has none")
        groups = param_groups_layer_decay(model, weight_decay=train.WEIGHT_DECAY,
                                          no_weight_decay_list=skip, layer_decay=train.LAYER_DECAY)
    else:
        groups = param_groups_weight_decay(model, weight_decay=train.WEIGHT_DECAY,
                                           no_weight_decay_list=skip)
    opt = train.OPTIMIZER
    kwargs = {}
    if opt.NAME in ("adamw", "lamb"):
        kwargs = dict(eps=opt.EPS, betas=tuple(opt.BETAS))
    elif opt.NAME == "sgd":
        kwargs = dict(momentum=opt.MOMENTUM, nesterov=True)
    return create_optimizer_v2(groups, opt=opt.NAME, lr=lr, weight_decay=train.WEIGHT_DECAY,
                               **kwargs)
