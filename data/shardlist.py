"""Where webdataset shards are and how many samples each holds (config.py's ``validate``
checks DATA.DATA_PATH with it before a run starts; plain Python, but importing it loads the
data package, torch included).

DATA.DATA_PATH for ``DATA.DATASET wds`` is a folder holding ``train-*.tar`` and
``val-*.tar``, or a brace pattern (``{a,b}`` lists, ``{000000..000146}`` ranges, nested; glob
wildcards allowed after expansion) naming the shards of both splits, e.g.
``/data/in1k/imagenet-{train-{000000..001281},val-{000000..000049}}.tar``: a shard belongs to
the split whose name is a word of its file name (``train``; ``val`` or ``validation``).

Counts come from ``index.json`` beside the shards (tools/make_shards.py writes it:
``{"classes": [...], "counts": {"train-000000.tar": 1000, ...}}``); a shard it does not
list is counted by reading its tar headers once (a sequential pass over the file).
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from typing import Iterator, Optional

INDEX = "index.json"
SPLIT_WORDS = {"train": "train", "val": "val", "validation": "val"}


class ShardPathError(ValueError):
    """DATA.DATA_PATH names no usable shards; the message says what is missing."""


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``a{1,2}b`` -> a1b a2b, ``{08..10}`` -> 08 09 10."""
    depth, start = 0, None
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1:i], pattern[i + 1:]
                return [head + alt + rest for alt in _alternatives(body) for rest in expand_braces(tail)]
    return [pattern]


def _alternatives(body: str) -> list[str]:
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        lo, hi = bounds.groups()
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        return [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    parts, depth, current = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (ch == "{") - (ch == "}")
        current += ch
    parts.append(current)
    return [text for part in parts for text in expand_braces(part)]


def split_of(path: str) -> Optional[str]:
    words = re.split(r"[^a-z]+", os.path.basename(path).lower())
    found = {SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS}
    return found.pop() if len(found) == 1 else None


def find_shards(path: str, need_train: bool = True) -> dict[str, list[str]]:
    """{"train": [...], "val": [...]} shard paths in name order; ShardPathError when the
    folder or pattern names none (or a split has none, or a named file is missing)."""
    if os.path.isdir(path):
        found = {split: sorted(glob.glob(os.path.join(glob.escape(path), f"{split}-*.tar")))
                 for split in ("train", "val")}
        where = f"{path} (a folder of train-*.tar and val-*.tar shards, as tools/make_shards.py writes)"
    else:
        names = expand_braces(path)
        files, missing = [], []
        for name in names:
            matched = sorted(glob.glob(name)) if glob.has_magic(name) else ([name] if os.path.isfile(name) else [])
            files.extend(matched)
            if not matched:
                missing.append(name)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ShardPathError(f"shard not found: {missing[0]}{more}; DATA.DATA_PATH is a folder of shards "
                                 f"or a brace pattern naming them")
        found = {"train": [], "val": []}
        for name in files:
            split = split_of(name)
            if split is None:
                raise ShardPathError(f"shard {name}: its file name names neither split (a word 'train' or "
                                     f"'val' in it tells which split a shard belongs to)")
            found[split].append(name)
        found = {split: sorted(set(names)) for split, names in found.items()}
        where = f"pattern {path}"
    for split in ("train", "val") if need_train else ("val",):
        if not found[split]:
            raise ShardPathError(f"no {split} shards in {where}")
    return found


def read_index(folder: str) -> dict:
    """The folder's index.json ({} when there is none); ShardPathError when unreadable."""
    path = os.path.join(folder, INDEX)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            index = json.load(f)
        if not isinstance(index.get("counts", {}), dict):
            raise ValueError("'counts' is not a mapping")
        return index
    except (OSError, ValueError) as e:
        raise ShardPathError(f"cannot read the shard index {path}: {e}") from None


def sample_keys(path: str) -> Iterator[str]:
    """The keys of the samples in a tar shard, in order, reading its headers only (the
    webdataset rule: a sample is the consecutive files sharing the name before the first
    dot of the file name)."""
    current = None
    with tarfile.open(path, "r:") as tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError):
                return
            if member is None:
                return
            parts = split_member(member.name) if member.isfile() else None
            if parts and parts[0] != current:
                current = parts[0]
                yield current


def split_member(name: str) -> Optional[tuple[str, str]]:
    """(key, extension) of a tar member, webdataset's way; None for a name without a dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def shard_counts(paths: list[str]) -> tuple[list[int], Optional[list[str]]]:
    """Samples per shard (index.json where it lists the shard, else its headers) and the
    class names of the first index found (None without one)."""
    counts, classes, indexes = [], None, {}
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in indexes:
            indexes[folder] = read_index(folder)
            if classes is None and indexes[folder].get("classes") is not None:
                classes = list(indexes[folder]["classes"])
        listed = indexes[folder].get("counts", {}).get(os.path.basename(path))
        if listed is None:
            try:
                listed = sum(1 for _ in sample_keys(path))
            except (OSError, tarfile.TarError) as e:
                raise ShardPathError(f"cannot read shard {path}: {e}") from None
        counts.append(int(listed))
    return counts, classes
