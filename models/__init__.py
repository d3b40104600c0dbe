"""Backbones. Importing this package registers every model family."""
from . import dat, vit  # noqa: F401  (registers models)
from .build import build_model, model_kwargs
from .registry import (ModelArgumentError, UnknownModelError, create_model, list_models,
                       model_info, register_model)

__all__ = ["build_model", "model_kwargs", "create_model", "list_models", "model_info",
           "register_model", "ModelArgumentError", "UnknownModelError"]
