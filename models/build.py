"""Config -> model. The only place that knows how MODEL.* maps onto constructor arguments."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from .registry import ModelArgumentError, check_model_args, create_model, model_info

# Generic MODEL.* keys handed to every model whose constructor accepts them.
_GENERIC = {"num_classes": "NUM_CLASSES", "drop_rate": "DROP_RATE",
            "drop_path_rate": "DROP_PATH_RATE", "in_chans": "IN_CHANS"}


def _compatible(value: Any, default: Any) -> bool:
    if default is None or default is Any or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) == isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def model_kwargs(config) -> dict[str, Any]:
    """Constructor arguments for MODEL.NAME from the generic keys and MODEL.<FAMILY>.

    Keys of the family section that the config defaults define themselves (e.g.
    MODEL.DAT.HEAD_MAP) belong to the framework and are not passed to the model.
    """
    from config import framework_model_keys  # late import: config imports models

    info = model_info(config.MODEL.NAME)
    accepted = info.parameters()
    kwargs = {arg: config.MODEL[key] for arg, key in _GENERIC.items() if arg in accepted}
    if "img_size" in accepted:
        kwargs["img_size"] = config.DATA.IMG_SIZE
    section = config.MODEL.get(info.family.upper(), None)
    reserved = framework_model_keys(info.family)
    for key, value in (section or {}).items():
        if key in reserved:
            continue
        arg = key.lower()
        check_model_args(info.name, {arg: value}, complete=False)
        default = accepted[arg].default
        if default is not accepted[arg].empty and not _compatible(value, default):
            raise ModelArgumentError(
                f"{arg}: expected {type(default).__name__}, "
                f"got {type(value).__name__} ({value!r})", arg)
        kwargs[arg] = tuple(value) if isinstance(value, list) and isinstance(default, tuple) else value
    check_model_args(info.name, kwargs)  # the whole set: options that cannot work together
    return kwargs


def build_model(config) -> nn.Module:
    return create_model(config.MODEL.NAME, **model_kwargs(config))
