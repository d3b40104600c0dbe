"""Reading weights and fitting them to a model: the one place for both, used by
``create_model(..., pretrained=...)`` and by the framework (--pretrained, --resume, --eval,
the distillation teacher, tools/).

A source is a file (``.pth`` read with ``torch.load(weights_only=True)``, or
``.safetensors``), a hub-style folder (``model.safetensors`` + ``config.json``, as timm's
``save_for_hf`` writes it; ``DIR`` or timm's spelling ``local-dir:DIR``),
``timm:<name>.<tag>`` (the weights of a timm pretrained tag) or ``hf-hub:<org>/<repo>``.
The hub ones come through huggingface_hub's cache (``HF_HOME``; with ``HF_HUB_OFFLINE=1``
nothing is downloaded): the cache is looked at first, the network only when allowed and
answering at once, and a file that is nowhere is a ``WeightsError`` saying where to put it.

Fitting (``adapt_weights``) is the fine-tuning surgery: classifier rows chosen by a head
map (a 21k head to 1k: a file of indices, or one built from timm's synset lists by name,
``imagenet-22k-to-imagenet-1k``), the model's ``adapt_pretrained`` hook (resolution-dependent
tables), the first convolution for another ``in_chans``, a classifier of another size
dropped. ``load_weights`` then loads strictly, or for fine-tuning leaves only the layers
the model adds fresh.

Errors here are ``WeightsError`` (a ValueError naming the file); the framework reports
them like its own user errors, one line and exit 2 (``errors.user_errors``).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .registry import classifier_names

WEIGHT_KEYS = ("model", "state_dict", "model_ema")
# Where EMA weights sit: ours ('ema'), DeiT's ('model_ema'), timm's train.py ('state_dict_ema').
EMA_KEYS = ("ema", "model_ema", "state_dict_ema")
HUB_WEIGHTS, HUB_CONFIG = "model.safetensors", "config.json"
LOCAL_DIR = "local-dir:"  # timm.create_model's prefix of a hub-style folder


class WeightsError(ValueError):
    """Weights that cannot be found, read or fitted; the message names the file."""


@dataclass
class Source:
    """Where named weights are on this machine: ``path`` (a weights file) and the hub
    config that came with them (``config.json``: architecture, pretrained_cfg), if any."""
    path: str
    config: dict = field(default_factory=dict)


def hub_file(repo: str, filename: str) -> str:
    """``filename`` of hub repo ``repo`` from huggingface_hub's cache, downloaded only when
    it is missing there, downloads are allowed (not ``HF_HUB_OFFLINE``) and the hub (or the
    HTTPS proxy) answers at once: offline, the hub's own retries would cost ~30 s before
    the same answer."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE
    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or an unusable cache entry
        pass
    folder = os.path.join(HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
    blocker = _file_on_the_way(HF_HUB_CACHE)
    if blocker:
        raise WeightsError(f"{filename} of {repo}: the Hugging Face cache {HF_HUB_CACHE} cannot exist, {blocker} "
                           f"is a file: HF_HOME (or HF_HUB_CACHE) must name a folder")
    why = "HF_HUB_OFFLINE is set"
    if not HF_HUB_OFFLINE:
        why = _unreachable(ENDPOINT)
    if not why:
        from huggingface_hub.utils import logging as hub_logging
        verbosity = hub_logging.get_verbosity()
        hub_logging.set_verbosity_error()  # its retry messages are not the user's business
        try:
            return hf_hub_download(repo, filename)
        except Exception as e:  # no such repo or file, a refusing proxy: all mean the same to the user
            why = f"downloading it failed ({type(e).__name__})"
        finally:
            hub_logging.set_verbosity(verbosity)
    raise WeightsError(f"{filename} of {repo} is not in the Hugging Face cache ({folder}) and {why}; "
                       f"run `hf download {repo} {filename}` where there is network and copy "
                       f"the cache here (HF_HOME), or pass the file's path")


def _file_on_the_way(folder: str) -> Optional[str]:
    """The file that stands where ``folder`` or one of its parents should be, if any."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path if os.path.exists(path) and not os.path.isdir(path) else None


def _unreachable(endpoint: str, timeout: float = 2.0) -> str:
    """Why the hub cannot be reached ('' if it can): one TCP connection to its host, or to
    the HTTPS proxy when one is set, within ``timeout`` seconds, the name lookup included
    (in a thread: the lookup itself has no timeout)."""
    import socket
    import threading
    from urllib.parse import urlsplit
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), "")
    target = urlsplit(proxy if "//" in proxy else f"http://{proxy}" if proxy else endpoint)
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if answered:
        return ""
    return (f"no network answers ({'the proxy ' if proxy else ''}{host}:{port} did not answer within "
            f"{timeout:g} s; set HF_HUB_OFFLINE=1 to skip this check)")


def resolve(source: str) -> Source:
    """The local file behind ``source`` (see the module docstring)."""
    if source.startswith("timm:"):
        from timm.models import get_pretrained_cfg
        name = source[len("timm:"):]
        try:
            cfg = get_pretrained_cfg(name)
        except RuntimeError:  # a known model, an unknown tag
            cfg = None
        if cfg is None or not cfg.hf_hub_id:
            raise WeightsError(f"{source}: timm has no pretrained weights named {name!r} on the hub "
                               f"(see timm.list_pretrained())")
        path = hub_file(cfg.hf_hub_id, cfg.hf_hub_filename or HUB_WEIGHTS)
        return Source(path, {"architecture": name.split(".")[0], "pretrained_cfg": cfg.to_dict()})
    if source.startswith("hf-hub:"):
        repo = source[len("hf-hub:"):]
        return Source(hub_file(repo, HUB_WEIGHTS), _hub_config(repo))
    if source.startswith(LOCAL_DIR):  # timm's name for a hub-style folder
        source = source[len(LOCAL_DIR):]
        if not os.path.isdir(source):
            raise WeightsError(f"{LOCAL_DIR}{source}: no such folder")
    if os.path.isdir(source):
        path = os.path.join(source, HUB_WEIGHTS)
        if not os.path.isfile(path):
            raise WeightsError(f"{source} is a folder, not a checkpoint file (nor a hub-style weights folder: "
                               f"no {HUB_WEIGHTS}); name the file in it")
        config_path = os.path.join(source, HUB_CONFIG)
        return Source(path, _json(config_path) if os.path.isfile(config_path) else {})
    if not os.path.isfile(source):
        raise WeightsError(f"weights not found: {source}")
    return Source(source)


def _hub_config(repo: str) -> dict:
    try:
        return _json(hub_file(repo, HUB_CONFIG))
    except WeightsError:
        return {}  # the weights alone are enough


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable JSON config ({e})") from None
    return data if isinstance(data, dict) else {}


def read_weights(source: str) -> dict:
    """The weights or checkpoint ``source`` names (see the module docstring) as a dict,
    read without executing pickled code. A ``torch.save`` (zip) file is memory-mapped, not
    read: a tensor's bytes come from the file when first touched, so what a process leaves
    untouched (evaluation: the optimizer state) is never read, and the ranks of one node
    share the page cache instead of holding a private copy each."""
    path = resolve(source).path
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            damage = _damage(path)
            raise WeightsError(f"{path} {damage}" if damage else f"cannot read safetensors file {path}: {e}") from None
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # not the legacy (pre-1.6) format, which cannot be mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:
        text = " ".join(str(e).split())
        damage = _damage(path, "unexpected EOF" in text)
        if damage:
            raise WeightsError(f"{path} {damage}") from None
        if "Weights only load failed" in text or "Unpickl" in type(e).__name__:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f" (it holds {found.group(1)})" if found else ""
            raise WeightsError(
                f"{path} needs arbitrary unpickling{what}, refused for safety (weights_only=True); "
                f"if you trust its source, convert it once: "
                f"python tools/convert_checkpoint.py --trust {path} OUT.pth") from None
        raise WeightsError(f"cannot read checkpoint {path}: {type(e).__name__}: {text}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _damage(path: str, cut_short: bool = False) -> str:
    """What a weights file that torch or safetensors could not read is, when its bytes say it
    ('' if they do not): empty, zeros, text, or a torch.save zip (or, ``cut_short``, any
    file) that ends before its end."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4096)
            f.seek(max(0, size - 65_558))  # the zip's end record: in its last 22 + 65,535 bytes
            tail = f.read()
    except OSError:
        return ""
    if size == 0:
        return "is not a checkpoint: empty file"
    if not head.strip(b"\0"):
        which = f"all {size}" if size <= len(head) else f"the first {len(head)} of its {size}"
        return f"is not a checkpoint: {which} bytes are zeros (as a crash or power loss leaves a file)"
    zipped = head[:4] == b"PK\x03\x04"[:len(head[:4])]
    end = tail.rfind(b"PK\x05\x06")
    if cut_short or (zipped and not 0 <= end <= len(tail) - 22):
        return (f"is truncated at byte {size} (its end is missing: an interrupted copy or save); "
                f"copy or save it again")
    if b"\0" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return ""
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"is not a checkpoint: a text file (it begins {first!r})"
    return ""


def ema_export(path: str) -> str:
    """Where tools/convert_checkpoint.py --safetensors puts the EMA weights of a checkpoint
    exported as ``path``: ``<stem>_ema.safetensors`` beside it."""
    return f"{os.path.splitext(path)[0]}_ema.safetensors"


def state_dict_of(obj: dict, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Weights under 'model', 'state_dict' or 'model_ema', or at the top level; strips
    a DDP 'module.' prefix."""
    for key in WEIGHT_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{where} holds no weights (looked under {', '.join(WEIGHT_KEYS)} and the top level)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def ema_state_dict_of(obj: dict, where: str = "checkpoint") -> Optional[dict[str, torch.Tensor]]:
    """The EMA weights of a checkpoint, under the first of EMA_KEYS that holds any (a DDP
    'module.' prefix stripped); None when it holds none."""
    for key in EMA_KEYS:
        if isinstance(obj.get(key), dict) and obj[key]:
            return state_dict_of(obj[key], f"{where} ({key})")
    return None


def mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """(missing, unexpected, shape mismatches) of ``state`` against ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    return missing, unexpected, shapes


def _summary(label: str, items: list) -> str:
    if not items:
        return ""
    more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
    return f"{len(items)} {label}: {', '.join(items[:3])}{more}"


def report(missing: list, unexpected: list, shapes: list) -> str:
    return "; ".join(s for s in (_summary("missing", missing), _summary("unexpected", unexpected),
                                 _summary("shape mismatches", shapes)) if s)


# timm's ImageNet class lists (timm.data.ImageNetInfo), the names of a named head map
# ``<from>-to-<to>``: e.g. imagenet-22k-to-imagenet-1k, the usual 21,841 -> 1,000 classes.
SYNSET_LISTS = ("imagenet-1k", "imagenet-12k", "imagenet-22k", "imagenet-22k-ms", "imagenet-21k-goog",
                "imagenet-21k-miil")


def named_head_map(head_map: str) -> Optional[tuple[str, str]]:
    """(from, to) of a head map named ``<from>-to-<to>`` after two of SYNSET_LISTS; None for
    another name (a file's); WeightsError for a list timm does not ship."""
    source, to, target = head_map.partition("-to-")
    if not to or os.sep in head_map:
        return None
    unknown = [name for name in (source, target) if name not in SYNSET_LISTS]
    if unknown:
        raise WeightsError(f"head_map {head_map}: {unknown[0]!r} is not one of timm's class lists "
                           f"({', '.join(SYNSET_LISTS)}); name a map <from>-to-<to> or give a file of indices")
    return source, target


def synset_head_map(source: str, target: str) -> tuple[torch.Tensor, int]:
    """For each class of the ``target`` list, its row in a classifier over the ``source`` list
    (-1 where the source lacks it: ImageNet-22k has no n04399382, teddy bear), and the size of
    the source list. Built from the synset lists timm ships, so no map file is needed."""
    from timm.data import ImageNetInfo
    rows = {synset: i for i, synset in enumerate(ImageNetInfo(source).label_names())}
    index = [rows.get(synset, -1) for synset in ImageNetInfo(target).label_names()]
    return torch.tensor(index), len(rows)


def read_head_map(head_map: str, rows: int) -> torch.Tensor:
    """Class indices selecting rows of a ``rows``-class classifier: a file's (whitespace
    separated), or a named map's (``named_head_map``; -1 marks a class the classifier lacks)."""
    named = None if os.path.isfile(head_map) else named_head_map(head_map)
    if named is not None:
        index, size = synset_head_map(*named)
        if size != rows:
            from timm.data import infer_imagenet_subset
            guess = infer_imagenet_subset({"num_classes": rows})
            hint = f" (as {guess} has: use {guess}-to-{named[1]})" if guess in SYNSET_LISTS else ""
            raise WeightsError(f"head_map {head_map}: maps a {size}-class {named[0]} classifier, the pretrained "
                               f"one has {rows} classes{hint}")
        return index
    try:
        with open(head_map) as f:
            words = f.read().split()
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"head_map {head_map}: cannot read: {e}") from None
    bad = [w for w in words if not w.isdigit()]
    if bad or not words:
        what = f"{bad[0]!r} is not a class index" if bad else "the file holds no indices"
        raise WeightsError(f"head_map {head_map}: {what} (one integer per line expected)")
    index = torch.tensor([int(w) for w in words])
    if index.max() >= rows:
        raise WeightsError(f"head_map {head_map}: index {int(index.max())} is out of range "
                           f"for the pretrained classifier's {rows} classes")
    return index


def classifiers(model: nn.Module) -> tuple[str, ...]:
    """The model's classifier modules, as its pretrained_cfg names them (``classifier_names``)."""
    return classifier_names(getattr(model, "pretrained_cfg", None))


def select_head_rows(model: nn.Module, state: dict[str, torch.Tensor], head_map: str,
                     logger: Optional[logging.Logger] = None) -> dict[str, torch.Tensor]:
    """Keep the classifier rows the ``head_map`` names (a 21k head to 1k), in every classifier
    the weights hold (a distilled ViT's two heads). A class the pretrained classifier lacks
    keeps the model's own (fresh) row, and is logged."""
    heads = [h for h in classifiers(model) if f"{h}.weight" in state]
    if not heads:
        named = " or ".join(f"{h}.weight" for h in classifiers(model)) or "(none named).weight"
        raise WeightsError(f"head_map {head_map} needs a classifier {named} in the pretrained weights")
    index = read_head_map(head_map, state[f"{heads[0]}.weight"].shape[0])
    lacking = index < 0
    own = model.state_dict() if lacking.any() else {}
    state = dict(state)
    for head in heads:
        for key in (f"{head}.weight", f"{head}.bias"):
            if key not in state:
                continue
            rows = state[key][index.clamp(min=0)]
            if lacking.any():
                if key not in own or own[key].shape != rows.shape:
                    found = tuple(own[key].shape) if key in own else "none"
                    raise WeightsError(f"head_map {head_map}: {int(lacking.sum())} of its classes are not in the "
                                       f"pretrained {key} and take the model's rows, but the model's is {found}, "
                                       f"not {tuple(rows.shape)} (MODEL.NUM_CLASSES {len(index)})")
                rows[lacking] = own[key][lacking].to(rows.dtype)
            state[key] = rows
    if lacking.any() and logger is not None:
        logger.info(f"head_map {head_map}: classes {lacking.nonzero().flatten().tolist()} are not in the "
                    f"pretrained classifier and keep the model's initial rows")
    return state


def adapt_weights(model: nn.Module, state: dict[str, torch.Tensor], head_map: str = "",
                  drop_head: bool = True, logger: Optional[logging.Logger] = None) -> dict[str, torch.Tensor]:
    """Foreign weights made to fit ``model``: ``head_map`` selecting classifier rows, the
    model's ``adapt_pretrained`` hook (resolution-dependent tables, position embeddings),
    the first convolution summed or repeated for another ``in_chans`` (timm's
    adapt_input_conv), each classifier of another size dropped (those the pretrained_cfg
    names; unless not ``drop_head``: evaluation needs the classifier the weights were
    trained with). Each change is logged."""
    if head_map:
        state = select_head_rows(model, state, head_map, logger)
    before = {k: tuple(v.shape) for k, v in state.items()}
    if hasattr(model, "adapt_pretrained"):
        state = model.adapt_pretrained(state)
    own = model.state_dict()
    state = dict(state)
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    weight = f"{first_conv}.weight" if first_conv else None
    if weight in state and weight in own and state[weight].shape[1] != own[weight].shape[1]:
        from timm.models import adapt_input_conv
        state[weight] = adapt_input_conv(own[weight].shape[1], state[weight])
    heads = classifiers(model) if drop_head else ()
    dropped = [k for k in state if any(k.startswith(h + ".") for h in heads)
               and (k not in own or state[k].shape != own[k].shape)]
    for key in dropped:
        del state[key]
    if logger is not None:
        for k, v in state.items():
            if k in before and before[k] != tuple(v.shape):
                logger.info(f"pretrained: resampled {k} {before[k]} -> {tuple(v.shape)}")
        if dropped:
            logger.info(f"pretrained: dropped classifiers of another size ({', '.join(dropped)})")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str, missing_ok: bool = False,
                 logger: Optional[logging.Logger] = None) -> None:
    """Load ``state`` into ``model``; any mismatch is a WeightsError naming it. With
    ``missing_ok`` (fine-tuning) the layers the model adds stay fresh and are logged, but
    keys it lacks or shapes it cannot take still mean another model's weights."""
    missing, unexpected, shapes = mismatch(model, state)
    if unexpected or shapes or (missing and not missing_ok):
        fits = "does not fit" if missing_ok else "does not match"
        found = report([] if missing_ok else missing, unexpected, shapes)
        raise WeightsError(f"{where} {fits} {type(model).__name__}: {found}")
    model.load_state_dict(state, strict=not missing_ok)
    if missing and logger is not None:
        logger.warning(f"loading {where}: {report(missing, [], [])}")


def load_pretrained(model: nn.Module, source: str, head_map: str = "",
                    logger: Optional[logging.Logger] = None) -> None:
    """Fine-tuning's start (--pretrained, ``create_model(..., pretrained=True)``): the named
    weights fitted (``adapt_weights``); only the layers the model adds (or a dropped
    classifier) stay fresh."""
    state = adapt_weights(model, state_dict_of(read_weights(source), source), head_map, logger=logger)
    load_weights(model, state, source, missing_ok=True, logger=logger)
    if logger is not None:
        logger.info(f"pretrained: loaded {len(state)} of the model's {len(model.state_dict())} tensors from {source}")
