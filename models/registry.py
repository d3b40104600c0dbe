"""Name -> constructor registry.

An entry is a small function that states the few arguments making one size and hands them
to a shared model class. The registry reads that class from the function's return
annotation, so it can validate constructor arguments (from YAML or code) *before* building:
a typo in a model section is an error, never silently ignored.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models", "model_info", "ModelArgumentError",
           "UnknownModelError"]


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return self.args[0]


class ModelArgumentError(TypeError):
    """A constructor argument the model rejects; ``arg`` names it when known."""

    def __init__(self, message: str, arg: Optional[str] = None) -> None:
        super().__init__(message)
        self.arg = arg


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # module name ('vit', 'dat'): selects the config section MODEL.<FAMILY>
    fn: Callable[..., nn.Module]
    cls: type  # the class the entry builds; its signature lists the accepted arguments
    fixed_args: dict[str, Any]  # arguments the entry itself passes (e.g. a variant's attn)

    def parameters(self) -> dict[str, inspect.Parameter]:
        params = dict(inspect.signature(self.cls.__init__).parameters)
        params.pop("self", None)
        return {k: p for k, p in params.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(fn: Callable[..., nn.Module],
                   fixed_args: Optional[dict[str, Any]] = None) -> Callable[..., nn.Module]:
    """Decorator: ``@register_model def vit_small_patch16_224(**kw) -> VisionTransformer``.

    ``fixed_args``: what the entry passes on its own that ``check_model_args`` should see."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    cls = typing.get_type_hints(fn).get("return")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"@register_model {name}: annotate the return type with the model class")
    family = fn.__module__.rsplit(".", 1)[-1]
    _REGISTRY[name] = ModelInfo(name=name, family=family, fn=fn, cls=cls,
                                fixed_args=dict(fixed_args or {}))
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_models())}"
        raise UnknownModelError(f"unknown model {name!r}{hint}") from None


def check_model_args(name: str, kwargs: dict[str, Any], complete: bool = True) -> None:
    """Raise ModelArgumentError naming the first argument the model does not take, or, when
    ``kwargs`` is the complete set, the class's own ``check_args(kwargs)`` objection (values
    that cannot work; its messages start with the argument's name)."""
    info = model_info(name)
    accepted = info.parameters()
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, list(accepted), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ModelArgumentError(f"model {name!r} takes no argument {key!r}{hint}", key)
    if complete and hasattr(info.cls, "check_args"):
        try:
            info.cls.check_args({**info.fixed_args, **kwargs})
        except ValueError as e:
            first = str(e).split()[0].rstrip(":") if str(e) else ""
            raise ModelArgumentError(f"model {name!r}: {e}", first if first in kwargs else None) from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; ``overrides`` replace the entry's defaults."""
    check_model_args(name, overrides)
    return model_info(name).fn(**overrides)
