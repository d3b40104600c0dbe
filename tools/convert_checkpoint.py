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

``--hub DIR --model NAME`` writes the weights as a hub-style folder: ``DIR/model.safetensors``
and ``DIR/config.json`` (timm's hub layout: ``architecture``, ``num_classes`` and the
registered model's ``pretrained_cfg``). ``--pretrained DIR`` loads it, and so does
``--pretrained hf-hub:<org>/<repo>`` once the folder is uploaded there (or copied into the
Hugging Face cache):

    python tools/convert_checkpoint.py --trust dat_pp_tiny_in1k_224.pth --hub dat_pp_tiny --model dat_pp_tiny
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from collections import OrderedDict
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import save_atomic  # noqa: E402
from errors import UserError, one_line, run_tool  # noqa: E402
from models.weights import EMA_KEYS, WEIGHT_KEYS, WeightsError, read_weights, state_dict_of  # noqa: E402

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
            ema_out = f"{os.path.splitext(out)[0]}_ema.safetensors"
            _save_safetensors(state_dict_of(ckpt[key], f"{src}:{key}"), ema_out,
                              {**metadata, "weights": key})
            written.append(ema_out)
            break
    return written


def export_hub_folder(ckpt: dict, src: str, folder: str, name: str) -> list[str]:
    """``folder/model.safetensors`` (the model weights) and ``folder/config.json``."""
    import json

    import models
    try:
        info = models.model_info(name)
    except models.UnknownModelError as e:
        raise UserError(f"--model: {e}") from None
    state = state_dict_of(ckpt, src)
    heads = [h for h in models.classifier_names(info.pretrained_cfg) if f"{h}.weight" in state]
    classes = state[f"{heads[0]}.weight"].shape[0] if heads else 0
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, "model.safetensors")
    _save_safetensors(state, weights, {"format": "pt", "source": os.path.basename(src)})
    config = {"architecture": name, "num_classes": classes,
              "pretrained_cfg": {k: v for k, v in info.pretrained_cfg.items() if k != "architecture"}}
    config["pretrained_cfg"]["num_classes"] = classes
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return [weights, os.path.join(folder, "config.json")]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint to convert")
    p.add_argument("output", nargs="?", help="safe checkpoint to write (.pth)")
    p.add_argument("--trust", action="store_true",
                   help="you trust the file's source: unpickle it (may run code in it) to convert it")
    p.add_argument("--safetensors", metavar="FILE", help="also export the model weights as safetensors")
    p.add_argument("--hub", metavar="DIR", help="also write a hub-style folder (model.safetensors + config.json)")
    p.add_argument("--model", help="with --hub: the registered model the weights are for (default: the "
                                   "checkpoint's model_name)")
    args = p.parse_intermixed_args(argv)
    if not (args.output or args.safetensors or args.hub):
        p.error("give OUT, --safetensors FILE and/or --hub DIR")
    ckpt = load(args.input, args.trust)
    changes: list[str] = []
    safe = to_plain(ckpt, "checkpoint", changes)
    for change in changes:
        print(f"converted {change}")
    buffer = io.BytesIO()
    torch.save(safe, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # proves it before anything is written
    if args.output:
        save_atomic(safe, args.output)
        print(f"wrote {args.output} (loads with torch.load(weights_only=True))")
    if args.safetensors:
        for path in export_safetensors(safe, args.input, args.safetensors):
            print(f"wrote {path}")
    if args.hub:
        name = args.model or safe.get("model_name")
        if not isinstance(name, str) or not name:
            raise UserError("--hub needs --model NAME: the checkpoint does not say which model it holds")
        for path in export_hub_folder(safe, args.input, args.hub, name):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_tool(main)
