"""Write an ImageFolder (train/ and val/) as webdataset tar shards, for DATA.DATASET wds.

    python tools/make_shards.py /data/imagenet /data/imagenet-shards [--shard-size 1000] [--seed 0]

Why: a 64-GPU run reading 1.28 million small files from shared storage waits on the file
system's metadata server; a thousand 100 MB tars are read front to back. Each sample is
``<key>.jpg`` (the original file's bytes, not re-encoded, so the pixels and an accuracy
equal the folder's) and ``<key>.cls`` (the class index as text): the webdataset layout,
which the ``webdataset`` library reads too. Writes ``<out>/train-000000.tar`` ...,
``<out>/val-000000.tar`` ... and ``<out>/index.json`` (class names and samples per shard:
what gives a run its length without reading the tars). The training samples are shuffled
once (``--seed``) so that every shard mixes the classes; validation keeps the folder's order.
Images are the files ImageFolder lists (torchvision's extensions), classes its sorted
folder names. Tars are deterministic (no times, owners or modes of the source files) and
each is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shardlist import INDEX  # noqa: E402
from errors import UserError, run_tool  # noqa: E402


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    return info, io.BytesIO(data)


def _key(path: str, root: str, used: set) -> str:
    """The sample key: class folder / file stem, with the dots webdataset would split on
    replaced; made unique if two files map to the same key."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    folder, _, base = rel.rpartition("/")
    stem = re.sub(r"[.\s]", "_", os.path.splitext(base)[0]) or "image"
    key = f"{folder}/{stem}" if folder else stem
    candidate, n = key, 1
    while candidate in used:
        candidate, n = f"{key}_{n}", n + 1
    used.add(candidate)
    return candidate


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext in ("jpeg", "jpg") else ext


def write_shards(root: str, out: str, shard_size: int = 1000, seed: int = 0, log=print) -> dict:
    """Write the shards and index.json; returns the index."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out} is a file, not a folder: name a folder for the shards (new or empty)")
    splits = {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UserError(f"{folder} not found: {root} must hold train/ and val/, one folder of images per class")
        try:
            classes, class_to_idx = find_classes(folder)
            if split == "val" and classes != splits["train"][0]:
                raise UserError(f"the class folders of {root}/train and {root}/val differ")
            splits[split] = (classes, make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS))
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{folder}: {' '.join(str(e).split())}") from None
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the shard folder {out}: {e.strerror or e}") from None
    old = [n for n in os.listdir(out) if re.fullmatch(r"(train|val)-\d+\.tar", n)]
    if old:
        raise UserError(f"{out} already holds shards ({sorted(old)[0]}, ...): remove them or choose another folder")
    counts = {}
    for split, (classes, samples) in splits.items():
        order = np.random.default_rng(seed).permutation(len(samples)) if split == "train" else range(len(samples))
        used: set = set()
        names = []
        for first in range(0, len(samples), shard_size):
            name = f"{split}-{first // shard_size:06d}.tar"
            part = [samples[i] for i in order[first:first + shard_size]]
            tmp = os.path.join(out, f".{name}.tmp")
            with tarfile.open(tmp, "w") as tar:
                for path, label in part:
                    key = _key(path, os.path.join(root, split), used)
                    with open(path, "rb") as f:
                        tar.addfile(*_member(f"{key}.{_extension(path)}", f.read()))
                    tar.addfile(*_member(f"{key}.cls", str(label).encode()))
            os.replace(tmp, os.path.join(out, name))
            counts[name] = len(part)
            names.append(name)
        log(f"{split}: {len(samples)} images in {len(names)} shard(s) {names[0]} .. {names[-1]}")
    index = {"format": "webdataset shards 1", "classes": splits["train"][0], "counts": counts,
             "shard_size": shard_size, "seed": seed}
    with open(os.path.join(out, INDEX), "w") as f:
        json.dump(index, f, indent=1)
    log(f"wrote {os.path.join(out, INDEX)} ({len(index['classes'])} classes)")
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="ImageFolder root holding train/ and val/")
    p.add_argument("out", help="folder for the shards and index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (1000 ImageNet images: ~110 MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training samples' order")
    args = p.parse_args(argv)
    write_shards(args.root, args.out, args.shard_size, args.seed)
    return 0


if __name__ == "__main__":
    run_tool(main)
