"""From a config to a model: the family section of MODEL.NAME (found in the registry,
checked against the model's signature), the translation of MODEL.* into constructor
arguments (``model_args``) and ``build_model``, which turns a constructor's refusal into a
ConfigError naming the key that set the value; and the teacher's name (TRAIN.DISTILL.TEACHER).

models/ know nothing of the config: this module is the one that reads both. Importing it
loads no torch; the registry is imported when a function runs.
"""
from __future__ import annotations

import copy
import difflib
import re
from typing import Any, Optional

from yacs.config import CfgNode as CN

from config import ConfigError, source_of, value_of
from errors import one_line

# Framework keys handed to every model whose constructor takes the argument (a family
# section may still set the argument itself).
MODEL_ARG_KEYS = {"num_classes": "MODEL.NUM_CLASSES", "in_chans": "MODEL.IN_CHANS",
                  "drop_rate": "MODEL.DROP_RATE", "drop_path_rate": "MODEL.DROP_PATH_RATE",
                  "img_size": "DATA.IMG_SIZE"}


def family(cfg: CN) -> str:
    """The model family of MODEL.NAME (the module of models/ that registered it): 'vit', 'dat'."""
    import models
    return models.model_info(cfg.MODEL.NAME).family


def check_teacher(cfg: CN, origin: dict[str, str]) -> None:
    """TRAIN.DISTILL.TEACHER names a registered model or a timm model (both need torch)."""
    name = cfg.TRAIN.DISTILL.TEACHER
    if not name or cfg.TRAIN.DISTILL.TYPE == "none":
        return
    import timm

    import models
    if name not in models.list_models() and not timm.is_model(name):
        close = difflib.get_close_matches(name, models.list_models() + timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{origin.get('TRAIN.DISTILL.TEACHER', 'defaults')}: TRAIN.DISTILL.TEACHER: {name!r} "
                          f"is neither a registered model (models.list_models()) nor a timm model{hint}")


def attach_model_section(cfg: CN, origin: dict[str, str], sections: dict) -> None:
    """Find MODEL.NAME's family, put its section into the config and check its arguments
    against the model's signature (names and types; values are the constructor's to judge)."""
    import models  # the registry: the one check that needs torch

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{origin.get(key, 'defaults')}: {key}: {message}")

    try:
        info = models.model_info(cfg.MODEL.NAME)
    except models.UnknownModelError as e:
        fail("MODEL.NAME", str(e))
    for name, section in sections.items():
        first = f"MODEL.{name}." + (next(iter(section)) if section else "")
        key = min((k for k in origin if k.startswith(f"MODEL.{name}.")), default=first)
        if name.lower() not in models.families():
            fail(key, f"MODEL.{name} names no model family (families: {', '.join(models.families())})")
        if name.lower() != info.family:
            fail(key, f"section MODEL.{name} does not apply to {cfg.MODEL.NAME} (family {info.family})")
    cfg.MODEL.set_new_allowed(True)
    cfg.MODEL[info.family.upper()] = CN(sections.get(info.family.upper(), {}), new_allowed=True)
    cfg.MODEL.set_new_allowed(False)
    try:
        models.check_model_args(info.name, model_args(cfg))
    except models.ModelArgumentError as e:
        key = _config_key(cfg, e.arg) if e.arg else f"MODEL.{info.family.upper()}"
        fail(key, str(e))


def _plain(value: Any) -> Any:
    """A config value as a constructor argument: mappings with lower-case keys."""
    if isinstance(value, dict):
        return {str(k).lower(): _plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


def model_args(cfg: CN) -> dict[str, Any]:
    """Constructor arguments of MODEL.NAME: the framework keys it takes (MODEL_ARG_KEYS),
    then its family section MODEL.<FAMILY>, keys lower-cased (lists become tuples where the
    default is a tuple)."""
    import models
    info = models.model_info(cfg.MODEL.NAME)
    params = info.parameters()
    kwargs = {arg: value_of(cfg, key) for arg, key in MODEL_ARG_KEYS.items() if arg in params}
    for key, value in (cfg.MODEL.get(info.family.upper()) or {}).items():
        arg = str(key).lower()
        kwargs[arg] = _plain(value)
        if arg in params and isinstance(params[arg].default, tuple) and isinstance(value, list):
            kwargs[arg] = tuple(kwargs[arg])
    return kwargs


def saved_model_args(saved: CN, where: str) -> dict[str, Any]:
    """``model_args`` of a saved config (a checkpoint's: the model as it was trained, as the
    tools build it); a config too old or partial to give them is a ConfigError naming ``where``."""
    try:
        return model_args(saved)
    except (KeyError, AttributeError) as e:
        raise ConfigError(f"the config saved in {where} lacks {e}: it cannot say how {saved.MODEL.NAME} "
                          f"was built") from None


def _config_key(cfg: CN, arg: str) -> str:
    """The config key that sets the (dotted) constructor argument ``arg``."""
    head, *rest = arg.split(".")
    name = family(cfg).upper()
    section = f"MODEL.{name}"
    if head in MODEL_ARG_KEYS and head.upper() not in (cfg.MODEL.get(name) or {}):
        return MODEL_ARG_KEYS[head]
    return ".".join([section, head.upper(), *(part.upper() for part in rest)])


def _mentioned_arg(message: str, kwargs: dict[str, Any]) -> Optional[str]:
    """The first constructor argument (or nested option) a message names."""
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message):
        if word in kwargs:
            return word
        for arg, value in kwargs.items():
            if isinstance(value, dict) and word in value:
                return f"{arg}.{word}"
    return None


def build_model(cfg: CN):
    """The model MODEL.NAME with the config's arguments (and TRAIN.GRAD_CHECKPOINT). What its
    constructor refuses (a ValueError, timm's assertions) becomes a ConfigError naming the
    key that set it."""
    import models
    kwargs = model_args(cfg)
    try:
        model = models.create_model(cfg.MODEL.NAME, **kwargs)
    except (models.ModelArgumentError, ValueError, AssertionError) as e:
        arg = getattr(e, "arg", None) or _mentioned_arg(str(e), kwargs)
        key = _config_key(cfg, arg) if arg else f"MODEL.{family(cfg).upper()}"
        message = one_line(e) or type(e).__name__
        raise ConfigError(f"{source_of(cfg, key)}: {key}: model {cfg.MODEL.NAME!r}: {message}") from None
    if cfg.TRAIN.GRAD_CHECKPOINT:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"{source_of(cfg, 'TRAIN.GRAD_CHECKPOINT')}: TRAIN.GRAD_CHECKPOINT: "
                              f"{type(model).__name__} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    return model
