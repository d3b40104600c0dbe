"""Backbones. Importing this package imports every module in it, and with them every
``@register_model`` entry and ``@register_attention`` kind: a new file here is enough."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .attention import ATTENTION_KINDS, register_attention  # noqa: E402
from .registry import (ModelArgumentError, UnknownModelError, check_model_args,  # noqa: E402
                       classifier_names, create_model, families, list_models, model_info,
                       register_model)

__all__ = ["create_model", "list_models", "model_info", "families", "register_model",
           "register_attention", "check_model_args", "classifier_names", "ATTENTION_KINDS",
           "ModelArgumentError", "UnknownModelError"]
