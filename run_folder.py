"""The run folder OUTPUT/<MODEL.NAME>/<TAG>/: where it is, and refusing one that holds
another model's run before anything is written there (or, with --overwrite, moving that
run aside)."""
from __future__ import annotations

import os
import shutil
import time
from typing import Optional

import yaml

from config import MOVED
from errors import UserError

# What makes a run folder's checkpoints another model's: these keys, the family section
# and the input size.
ARCH_KEYS = ("NAME", "TYPE", "NUM_CLASSES", "IN_CHANS")
RUN_FILES = ("config.yaml", "metrics.jsonl")
RUN_PREFIXES = ("ckpt_", "log_rank")


class RunFolderError(UserError):
    """The output folder cannot take this run; the message says how to proceed."""


def run_dir(config) -> str:
    return os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)


def _current_keys(section: dict, family: str) -> dict:
    """A family section of a saved config with keys that have moved since renamed, so an
    older run of the same model still matches."""
    out = {}
    for key, value in section.items():
        new = MOVED.get(f"MODEL.{family}.{key}", "")
        if new.startswith(f"MODEL.{family}.ATTN_ARGS."):
            out.setdefault("ATTN_ARGS", {})[new.rsplit(".", 1)[1]] = value
        elif not new:
            out[key] = value
    return out


def conflict(config, out_dir: str) -> Optional[str]:
    """How the run recorded in ``out_dir/config.yaml`` builds a different model, or None."""
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return f"{path} is not valid YAML"
    ours = yaml.safe_load(config.dump())
    if not isinstance(saved, dict) or not isinstance(saved.get("MODEL"), dict):
        return f"{path} has no MODEL section"
    family = config.MODEL.TYPE.upper()
    pairs = [(f"MODEL.{k}", saved["MODEL"].get(k), ours["MODEL"][k]) for k in ARCH_KEYS]
    pairs.append((f"MODEL.{family}", _current_keys(saved["MODEL"].get(family) or {}, family),
                  ours["MODEL"].get(family) or {}))
    pairs.append(("DATA.IMG_SIZE", (saved.get("DATA") or {}).get("IMG_SIZE"), ours["DATA"]["IMG_SIZE"]))
    diffs = [f"{key} {old!r} here, {new!r} now" for key, old, new in pairs if old != new]
    return "; ".join(diffs[:3]) or None


def prepare(config, out_dir: str, is_main: bool) -> Optional[str]:
    """Refuse an output folder holding another model's run; with OVERWRITE (--overwrite),
    move that run's files aside instead, on rank 0 (returns where to)."""
    found = conflict(config, out_dir)
    if found and not config.OVERWRITE:
        raise RunFolderError(f"{out_dir} holds another model's run ({found}); choose another "
                             f"--tag or --output, or pass --overwrite to move that run aside")
    if not (config.OVERWRITE and is_main and os.path.isdir(out_dir)):
        return None
    old = [n for n in os.listdir(out_dir) if n in RUN_FILES or n.startswith(RUN_PREFIXES)]
    if not old:
        return None
    moved = os.path.join(out_dir, time.strftime("replaced-%Y%m%d-%H%M%S"))
    os.makedirs(moved)
    for name in old:
        shutil.move(os.path.join(out_dir, name), moved)
    return moved
