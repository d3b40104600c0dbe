"""Convert a checkpoint into one that loads without unpickling code, and export safetensors.

    python tools/convert_checkpoint.py --trust swin_tiny.pth swin_tiny_safe.pth
    python tools/convert_checkpoint.py ckpt_best.pth --safetensors best.safetensors

main.py reads checkpoints with ``torch.load(weights_only=True)``, which refuses files that
pickle arbitrary objects (the Swin and DAT reference repos save an ``argparse.Namespace`` or
a yacs config next to the weights; numpy scalars are common too), because unpickling such a
file can run any code its author put in it. Once you have decided to trust a file, ``--trust``
loads it with ``weights_only=False`` once and writes OUT with the same structure made of
plain values: tensors are kept, namespaces and other objects become dicts or strings, numpy
values become Python numbers or tensors. Without ``--trust`` such a file is refused.

``--safetensors FILE`` writes the model weights (what ``--eval``/``--pretrained`` would load:
``model``, ``state_dict`` or ``model_ema``, or the top level) as safetensors, with
``model_name``/``config`` as metadata when the checkpoint has them. EMA weights, when the
checkpoint holds them besides the model (ours under ``ema``, DeiT's ``model_ema``, timm's
``state_dict_ema``), go to a separate ``<FILE stem>_ema.safetensors``, so each file loads as
it is with ``--pretrained FILE``.

``--hub DIR --model NAME`` writes the folder timm's ``save_for_hf`` writes (it is called):
``DIR/model.safetensors`` and ``DIR/config.json`` (``architecture``, ``num_classes``,
``model_args``, ``pretrained_cfg``). The weights must load strictly into the model the
checkpoint's saved config describes (``--cfg FILE`` for a checkpoint that holds none; else
NAME's registered defaults), and config.json states that model's arguments and the run's input
size, normalisation and crop, not the registered defaults. ``--pretrained local-dir:DIR`` (or
``DIR``) and ``timm.create_model("local-dir:DIR", pretrained=True)`` load it, and so does
``hf-hub:<org>/<repo>`` once the folder is uploaded there (``timm.models.push_to_hf_hub``, or
copied into the Hugging Face cache):

    python tools/convert_checkpoint.py --trust dat_pp_tiny_in1k_224.pth --hub dat_pp_tiny --model dat_pp_tiny
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
from collections import OrderedDict
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import save_atomic  # noqa: E402
from errors import UserError, one_line, run_tool  # noqa: E402
from models.weights import (EMA_KEYS, WEIGHT_KEYS, WeightsError, ema_export, load_weights,  # noqa: E402
                            read_weights, state_dict_of)

PLAIN = (str, int, float, bool, type(None))


def to_plain(obj: Any, where: str, changes: list[str]) -> Any:
    """``obj`` with every value a tensor, str, number, bool, None, list, tuple or dict;
    what had to change is noted in ``changes`` as 'where: type -> kind'."""
    def note(kind: str) -> None:
        changes.append(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} -> {kind}")

    if isinstance(obj, torch.Tensor) or type(obj) in PLAIN:
        return obj
    try:
        import numpy as np
        if isinstance(obj, np.generic):  # before the float check: np.float64 is a float
            note("Python value")
            return obj.item()
        if isinstance(obj, np.ndarray):
            note("tensor")
            return torch.from_numpy(obj.copy())
    except ImportError:
        pass
    if isinstance(obj, dict):
        if type(obj) not in (dict, OrderedDict):  # OrderedDict: state_dict()'s own type
            note("dict")
        return {(k if isinstance(k, PLAIN) else str(k)): to_plain(v, f"{where}.{k}", changes)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if type(obj) not in (list, tuple):
            note("tuple" if isinstance(obj, tuple) else "list")
        items = [to_plain(v, f"{where}[{i}]", changes) for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, argparse.Namespace):
        note("dict")
        return to_plain(dict(vars(obj)), where, changes)
    for base in PLAIN[:-1]:  # subclasses such as IntEnum
        if isinstance(obj, base):
            note(base.__name__)
            return base(obj)
    note("str")
    return str(obj)


def load(path: str, trust: bool) -> dict:
    """Safe read first; the unsafe one only for a refused file and only with --trust."""
    try:
        return read_weights(path)
    except WeightsError as e:
        if not trust or "refused for safety" not in str(e):
            raise
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # the user vouched for it
    except Exception as e:
        raise UserError(f"cannot unpickle {path} even with --trust: "
                        f"{type(e).__name__}: {one_line(e, 300)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Atomic like checkpoint.save_atomic: a temporary file, then a rename."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        # clone: safetensors refuses tensors sharing storage (tied weights, views)
        save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_safetensors(ckpt: dict, src: str, out: str) -> list[str]:
    """Write the model weights to ``out`` and separate EMA weights to ``<stem>_ema``;
    returns the files written."""
    weights = state_dict_of(ckpt, src)
    metadata = {"format": "pt", "source": os.path.basename(src)}
    for key in ("model_name", "config"):
        if isinstance(ckpt.get(key), str):
            metadata[key] = ckpt[key]
    _save_safetensors(weights, out, metadata)
    written = [out]
    chosen = next((k for k in WEIGHT_KEYS if isinstance(ckpt.get(k), dict)), None)
    for key in EMA_KEYS:
        if key != chosen and isinstance(ckpt.get(key), dict) and ckpt[key]:
            ema_out = ema_export(out)  # where --eval --use-ema looks for it
            _save_safetensors(state_dict_of(ckpt[key], f"{src}:{key}"), ema_out,
                              {**metadata, "weights": key})
            written.append(ema_out)
            break
    return written


def training_only(arg: str) -> bool:
    """A constructor argument that only regularises training (timm's rule: drop rates), not
    part of the architecture config.json states."""
    return arg in ("drop_rate", "drop_path_rate", "drop_block_rate") or arg.endswith("_drop_rate")


def hub_model(ckpt: dict, src: str, state: dict, name: str, cfg_file: str) -> tuple[torch.nn.Module, dict, Any]:
    """(the model the weights load into strictly, its constructor arguments, the config they
    came from or None): built from ``cfg_file``, else from the checkpoint's saved config, else
    with ``name``'s registered defaults (and the weights' class count)."""
    import models
    from config import load_config, saved_config
    from model_config import model_args, saved_model_args
    if cfg_file:
        cfg, where = load_config(cfg_file, ["DATA.DATASET", "fake"]), cfg_file  # the data are not read
    else:
        cfg, where = saved_config(ckpt.get("config")), f"the config saved in {src}"
    if cfg is not None and name and cfg.MODEL.NAME != name:
        raise UserError(f"--model {name}: {where} says the weights are a {cfg.MODEL.NAME}")
    name = cfg.MODEL.NAME if cfg is not None else name
    if not name:
        raise UserError("--hub needs --model NAME (or --cfg FILE): the checkpoint does not say which model it holds")
    try:
        info = models.model_info(name)
        if cfg is not None:
            kwargs = model_args(cfg) if cfg_file else saved_model_args(cfg, src)
        else:
            heads = [h for h in models.classifier_names(info.pretrained_cfg) if f"{h}.weight" in state]
            kwargs = ({"num_classes": state[f"{heads[0]}.weight"].shape[0]}
                      if heads and "num_classes" in info.parameters() else {})
        model = models.create_model(name, **kwargs)
    except (models.UnknownModelError, models.ModelArgumentError, ValueError, AssertionError) as e:
        raise UserError(f"--model {name}: {one_line(e, 300)}") from None
    try:
        load_weights(model, state, src)
    except WeightsError as e:
        hint = "" if cfg is not None else " (registered defaults; a checkpoint without a saved config needs --cfg FILE)"
        raise UserError(f"--model {name}{hint}: {e}") from None
    return model, kwargs, cfg


def hub_export(ckpt: dict, src: str, name: str, cfg_file: str = "") -> tuple[torch.nn.Module, dict, dict]:
    """(the model holding the weights, its ``model_args``, the ``data_config``: the run's input
    size, normalisation, interpolation and crop) for timm's ``save_for_hf``."""
    state = state_dict_of(ckpt, src)
    model, kwargs, cfg = hub_model(ckpt, src, state, name, cfg_file)
    data_config: dict[str, Any] = {}
    if cfg is not None:  # the run's evaluation transform, as its config says (a saved one may lack keys)
        data, test = cfg.get("DATA", {}), cfg.get("TEST", {})
        for field, value in (("mean", data.get("MEAN")), ("std", data.get("STD")),
                             ("interpolation", data.get("INTERPOLATION")), ("crop_pct", test.get("CROP_PCT"))):
            if value is not None:
                data_config[field] = tuple(value) if isinstance(value, list) else value
        if test.get("RESIZE") == "square":
            data_config["crop_mode"] = "squash"
    return model, {k: v for k, v in kwargs.items() if not training_only(k)}, data_config


def write_hub_folder(folder: str, model: torch.nn.Module, model_args: dict, data_config: dict) -> list[str]:
    """``folder/model.safetensors`` and ``folder/config.json`` as timm's ``save_for_hf`` writes
    them (what ``push_to_hf_hub`` uploads and ``local-dir:``/``hf-hub:`` read), each file
    replaced whole: written into a temporary folder inside ``folder``, then renamed."""
    from timm.models import save_for_hf
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp.{os.getpid()}")
    written = [os.path.join(folder, name) for name in ("model.safetensors", "config.json")]
    try:
        save_for_hf(model, tmp, model_args=model_args, data_config=data_config, safe_serialization=True)
        for path in written:
            os.replace(os.path.join(tmp, os.path.basename(path)), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def check_destinations(args: argparse.Namespace) -> None:
    """Every file the command writes has a folder to go to: checked before anything is written."""
    for flag, path in (("OUT", args.output), ("--safetensors", args.safetensors)):
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise UserError(f"{flag} {path} is a folder: name the file to write")
        if not os.path.isdir(folder):
            raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    if args.hub and os.path.exists(args.hub) and not os.path.isdir(args.hub):
        raise UserError(f"--hub {args.hub} is a file: name a folder (new or existing)")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint to convert")
    p.add_argument("output", nargs="?", help="safe checkpoint to write (.pth)")
    p.add_argument("--trust", action="store_true",
                   help="you trust the file's source: unpickle it (may run code in it) to convert it")
    p.add_argument("--safetensors", metavar="FILE", help="also export the model weights as safetensors")
    p.add_argument("--hub", metavar="DIR", help="also write a hub-style folder (model.safetensors + config.json)")
    p.add_argument("--model", help="with --hub: the registered model the weights are for (default: the "
                                   "checkpoint's model_name); they must load into it strictly")
    p.add_argument("--cfg", metavar="FILE", default="",
                   help="with --hub: the config (YAML) the weights were trained with, for a checkpoint that "
                        "holds none (default: the checkpoint's saved config, else the model's registered defaults)")
    args = p.parse_intermixed_args(argv)
    if not (args.output or args.safetensors or args.hub):
        p.error("give OUT, --safetensors FILE and/or --hub DIR")
    check_destinations(args)
    ckpt = load(args.input, args.trust)
    changes: list[str] = []
    safe = to_plain(ckpt, "checkpoint", changes)
    for change in changes:
        print(f"converted {change}")
    buffer = io.BytesIO()
    torch.save(safe, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # proves it before anything is written
    if args.hub:  # checked before anything is written
        name = args.model or safe.get("model_name")
        hub = hub_export(safe, args.input, name if isinstance(name, str) else "", args.cfg)
    if args.output:
        save_atomic(safe, args.output)
        print(f"wrote {args.output} (loads with torch.load(weights_only=True))")
    if args.safetensors:
        for path in export_safetensors(safe, args.input, args.safetensors):
            print(f"wrote {path}")
    if args.hub:
        for path in write_hub_folder(args.hub, *hub):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_tool(main)
