"""This repository's models in timm's registry, with argument checks in front of it.

An entry is a small function that states the few arguments making one size and hands them
to a shared model class. ``register_model`` puts it into timm's registry (as DeiT does: one
namespace, so ``timm.create_model``, ``timm.list_models``, ``timm.models.get_pretrained_cfg``
and every tool built on them see it) with its ``pretrained_cfg``, and keeps what the checks
need: the class (read from the function's return annotation), the arguments the name fixes
and the family. A name timm already has (``vit_small_patch16_224``) stays timm's: nothing of
timm's is overwritten; the entry builds the same model (timm's state dict loads strictly,
same logits) and takes timm's pretrained_cfg.

``check_model_args`` checks constructor arguments (from YAML or code) *before* building: a
typo, a value of the wrong type or an argument the name fixes (a ``vit_lai_*`` name's
``attn``) is an error naming the argument, never ignored. Both ``create_model`` and
``timm.create_model`` run it. The factory arguments are timm's: ``pretrained`` (the
pretrained_cfg names the weights, ``pretrained_cfg_overlay`` may replace them, e.g.
``{"file": path}``), ``features_only`` / ``out_indices`` (a timm FeatureGetterNet over the
model's ``forward_intermediates``), ``output_stride`` (only a model's own stride: none of
these models dilates). Every model gets ``pretrained_cfg`` / ``default_cfg`` with timm's
fields, its input size the one it was built for.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import timm
import torch.nn as nn
from timm.models import get_pretrained_cfg, is_model, resolve_pretrained_cfg
from timm.models import register_model as timm_register_model

__all__ = ["register_model", "create_model", "list_models", "model_info", "families",
           "check_model_args", "check_arguments", "classifier_names", "ModelArgumentError",
           "UnknownModelError"]


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return self.args[0]


class ModelArgumentError(TypeError):
    """An argument the model does not take, or one of the wrong type. ``arg`` names it,
    dotted for a nested option (``attn_args.schedule``)."""

    def __init__(self, message: str, arg: Optional[str] = None) -> None:
        super().__init__(message)
        self.arg = arg


@dataclass(frozen=True)
class ModelInfo:
    """What the checks know of a name; the name itself lives in timm's registry."""
    name: str
    family: str  # the entry's module name ('vit', 'dat'): config section MODEL.<FAMILY>
    fn: Callable[..., nn.Module]  # the entry: constructor arguments -> model
    cls: type  # the class the entry builds; its signature lists the accepted arguments
    fixed_args: dict[str, Any]  # arguments the name fixes (a variant's attn): not overridable
    timm_owned: bool  # timm registered the name first: timm's entry and pretrained_cfg stay

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's registered pretrained_cfg of the name (weights, input size, eval transform)."""
        return get_pretrained_cfg(self.name).to_dict()

    def parameters(self) -> dict[str, inspect.Parameter]:
        return keyword_parameters(self.cls)


_CHECKS: dict[str, ModelInfo] = {}  # this repository's names -> what check_model_args reads


def keyword_parameters(cls: type, keyword_only: bool = False) -> dict[str, inspect.Parameter]:
    """The named constructor arguments of ``cls`` (only those after ``*`` if asked)."""
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    kinds = (inspect.Parameter.KEYWORD_ONLY,) if keyword_only else \
        (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {k: p for k, p in params.items() if p.kind in kinds}


# timm's pretrained_cfg fields every model has (models add weights, license, paper, ...).
DEFAULT_CFG = dict(url="", hf_hub_id="", num_classes=1000, input_size=(3, 224, 224), pool_size=None,
                   crop_pct=0.875, crop_mode="center", interpolation="bicubic", fixed_input_size=True,
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="", classifier="")


def classifier_names(pretrained_cfg: Optional[dict[str, Any]]) -> tuple[str, ...]:
    """The classifier modules a pretrained_cfg names (timm's ``classifier``: one name, a tuple
    of names such as a distilled ViT's two heads, or '' for none): the one place they are
    named, read by fine-tuning surgery and tools."""
    names = (pretrained_cfg or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def register_model(fn: Optional[Callable[..., nn.Module]] = None, *,
                   fixed_args: Optional[dict[str, Any]] = None,
                   pretrained_cfg: Optional[dict[str, Any]] = None,
                   family: Optional[str] = None):
    """Decorator: ``@register_model def vit_tiny_patch4_32(**kw) -> VisionTransformer``,
    or ``@register_model(pretrained_cfg={...})``: the name joins timm's registry.

    ``fixed_args``: what the name fixes (``check_model_args`` refuses another value);
    ``pretrained_cfg``: timm's fields for the entry (DEFAULT_CFG fills the rest; a name timm
    already has takes timm's and must not state one); ``family``: the config section's
    family when not the module's name (a module that adds a model to another family, e.g.
    DeiT's distilled ViT to ``vit``)."""
    if fn is None:
        return lambda f: register_model(f, fixed_args=fixed_args, pretrained_cfg=pretrained_cfg,
                                        family=family)
    name = fn.__name__
    if name in _CHECKS:
        raise ValueError(f"model {name!r} is registered twice")
    cls = typing.get_type_hints(fn).get("return")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"@register_model {name}: annotate the return type with the model class")
    timm_owned = is_model(name)
    if timm_owned and pretrained_cfg is not None:
        raise ValueError(f"@register_model {name}: timm has this name; its pretrained_cfg is timm's "
                         f"(register it without one)")
    _CHECKS[name] = ModelInfo(name=name, family=family or fn.__module__.rsplit(".", 1)[-1], fn=fn,
                              cls=cls, fixed_args=dict(fixed_args or {}), timm_owned=timm_owned)
    if not timm_owned:
        _register_in_timm(name, fn, {**DEFAULT_CFG, **(pretrained_cfg or {})})
    return fn


def _register_in_timm(name: str, fn: Callable[..., nn.Module], cfg: dict[str, Any]) -> None:
    """timm's entry point for ``name``: timm's register_model reads the pretrained_cfg from the
    entry module's ``default_cfgs`` (as timm's own modules declare it)."""
    def entry(pretrained: bool = False, pretrained_cfg: Any = None,
              pretrained_cfg_overlay: Optional[dict] = None, cache_dir: Any = None,
              **kwargs: Any) -> nn.Module:
        if cache_dir is not None:
            raise ModelArgumentError(f"cache_dir: model {name!r} reads weights from huggingface_hub's "
                                     f"cache (set HF_HUB_CACHE)", "cache_dir")
        cfg = resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay).to_dict()
        return _build(name, pretrained, cfg, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__, entry.__doc__ = fn.__module__, fn.__doc__
    sys.modules[fn.__module__].__dict__.setdefault("default_cfgs", {})[name] = cfg
    timm_register_model(entry)


def list_models(pattern: str = "*") -> list[str]:
    """This repository's names matching a shell-style pattern, sorted (each one also in
    ``timm.list_models``)."""
    return sorted(n for n in _CHECKS if fnmatch.fnmatch(n, pattern))


def families() -> list[str]:
    """The model families (module names) that registered at least one model."""
    return sorted({info.family for info in _CHECKS.values()})


def model_info(name: str) -> ModelInfo:
    try:
        return _CHECKS[name]
    except (KeyError, TypeError):
        same = [n for n in _CHECKS if n.lower() == str(name).lower()]  # VIT_TINY_PATCH4_32: the one it means
        close = same or difflib.get_close_matches(str(name).lower(), list(_CHECKS), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_models())}"
        raise UnknownModelError(f"unknown model {name!r}{hint}") from None


def _compatible(value: Any, default: Any) -> bool:
    """Whether ``value`` may stand for an argument whose default is ``default``: the same
    type, an int for a float, a list for a tuple; None and untyped defaults take anything."""
    if default is None or default is inspect.Parameter.empty or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) == isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_arguments(params: dict[str, inspect.Parameter], kwargs: dict[str, Any], owner: str,
                    prefix: str = "") -> None:
    """Raise ModelArgumentError for the first of ``kwargs`` that ``params`` lacks (with close
    matches) or whose value does not fit the default's type. ``prefix`` dots nested names."""
    for key, value in kwargs.items():
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ModelArgumentError(f"{owner} takes no argument {key!r}{hint}", prefix + key)
        default = params[key].default
        if not _compatible(value, default):
            raise ModelArgumentError(f"{key}: expected {type(default).__name__}, got "
                                     f"{type(value).__name__} ({value!r})", prefix + key)


def check_model_args(name: str, kwargs: dict[str, Any]) -> None:
    """Check ``kwargs`` for the registered ``name`` without building: names and types against
    the class's signature, the arguments the name fixes, then the class's own
    ``check_args(kwargs)`` hook for nested options (a ViT's ``attn_args``). Values that cannot
    work are the constructor's to refuse."""
    info = model_info(name)
    check_arguments(info.parameters(), kwargs, f"model {name!r}")
    for key, fixed in info.fixed_args.items():
        if key in kwargs and kwargs[key] != fixed:
            plain = name.replace(f"_{fixed}_", "_", 1)  # vit_lai_tiny_patch4_32 -> vit_tiny_patch4_32
            hint = f" (build {plain} with {key}={kwargs[key]!r})" if plain in _CHECKS else ""
            raise ModelArgumentError(f"{key}: model {name!r} is {key}={fixed!r} by its name, not "
                                     f"{kwargs[key]!r}{hint}", key)
    if hasattr(info.cls, "check_args"):
        info.cls.check_args({**info.fixed_args, **kwargs})


def _build(name: str, pretrained: bool, cfg: dict[str, Any], features_only: bool = False,
           out_indices: Any = None, output_stride: Optional[int] = None,
           pretrained_model_args: Optional[dict[str, Any]] = None, **overrides: Any) -> nn.Module:
    """The model ``name`` with ``overrides`` checked and replacing the entry's defaults, its
    pretrained_cfg ``cfg`` (input size the built one), weights and feature wrapper as asked."""
    check_model_args(name, overrides)
    info = model_info(name)
    model = info.fn(**overrides)
    size = getattr(model, "img_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", None)
    stride = getattr(model, "output_stride", None)
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        cfg["input_size"] = (getattr(model, "in_chans", cfg["input_size"][0]), *size)
        if cfg.get("pool_size") and stride:
            cfg["pool_size"] = tuple(side // stride for side in size)
    model.pretrained_cfg = model.default_cfg = cfg
    model.pretrained_model_args = pretrained_model_args or {}
    if output_stride is not None and output_stride != stride:
        raise ModelArgumentError(f"output_stride {output_stride}: model {name!r} has the fixed output stride "
                                 f"{stride} (no dilation)", "output_stride")
    if pretrained:
        from .weights import load_pretrained
        source = cfg.get("file") or (f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else "")
        if not source:
            raise ModelArgumentError(f"pretrained: no weights are registered for {name!r}; pass "
                                     f"pretrained_cfg_overlay={{'file': PATH}} (a file, hub-style folder, "
                                     f"timm:<name>.<tag> or hf-hub:<repo>)", "pretrained")
        load_pretrained(model, source)
    if features_only:
        from timm.models._builder import pretrained_cfg_for_features
        from timm.models._features import FeatureGetterNet
        default = getattr(model, "default_out_indices", len(getattr(model, "feature_info", [])) or 1)
        model = FeatureGetterNet(model, out_indices=default if out_indices is None else out_indices,
                                 output_fmt="NCHW")
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(cfg)
    return model


def create_model(name: str, pretrained: bool = False, pretrained_cfg_overlay: Optional[dict] = None,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for this repository's names (checked first: an unknown name is
    one line with close matches); ``kwargs`` are timm's factory arguments (``features_only``,
    ``out_indices``, ``output_stride``) and constructor arguments replacing the entry's
    defaults. A name timm owns is built by its entry here with timm's pretrained_cfg."""
    info = model_info(name)
    if not info.timm_owned:
        return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay,
                                 **kwargs)
    cfg = resolve_pretrained_cfg(name, None, pretrained_cfg_overlay).to_dict()
    kwargs.setdefault("num_classes", cfg["num_classes"])  # as timm's entry (ViT-H/14's weights are headless)
    return _build(name, pretrained, cfg, **kwargs)
