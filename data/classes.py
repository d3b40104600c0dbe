"""Class order as data, never an accident of sorting: which model class each class folder is.

A folder's classes come, in this order of precedence, from
  1. ``DATA.CLASS_MAP``: a file naming the model's classes in index order (timm's
     ``--class-map``: ``.txt``, one name per line; ``.pkl``, a {name: index} dict);
  2. ImageNet's synset lists, shipped by timm (``timm/data/_info/``): folders named by synsets
     of the list that the model's class count names (timm's ``infer_imagenet_subset``: 1,000
     for ImageNet-1k, 21,841 for fall11's 22k, ...);
  3. folders named by integers (ImageNet-V2's ``0`` .. ``999``): the integer is the class;
  4. otherwise (or where 2 or 3 do not fit but the folders are as many as the model's
     classes: a dataset of its own) the sorted folder names.
So a folder may hold a subset of the model's classes (ImageNet-A's 200 synsets, a val/ with 3
of 12 named classes), each labelled by its class in the model. Folders that none of these
explains are a one-line error naming the first of them.
"""
from __future__ import annotations

import csv
import json
import pkgutil
import re
from functools import lru_cache
from typing import Optional

from errors import UserError, one_line

SYNSET = re.compile(r"n\d{8}")
# The 200-class subsets of ImageNet-1k, as timm ships them (synsets in 1k order).
SUBSET_FILES = {"imagenet-a": "imagenet_a_synsets.txt", "imagenet-r": "imagenet_r_synsets.txt"}


class ClassError(UserError):
    """Class folders that do not name the model's classes (data.DataError's sibling: no
    import cycle with datasets.py)."""


def _info(name: str) -> str:
    return pkgutil.get_data("timm.data", f"_info/{name}").decode("utf-8")


@lru_cache(maxsize=None)
def imagenet_synsets(num_classes: int = 1000) -> Optional[tuple[str, ...]]:
    """The synsets of the ImageNet variant with ``num_classes`` classes, in its class order
    (timm's ImageNetInfo), or None when no ImageNet variant has that many."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": num_classes})
    return tuple(ImageNetInfo(subset).label_names()) if subset else None


@lru_cache(maxsize=None)
def subset_synsets(name: str) -> tuple[str, ...]:
    """ImageNet-A's or -R's 200 synsets (``SUBSET_FILES``)."""
    return tuple(_info(SUBSET_FILES[name]).split())


@lru_cache(maxsize=None)
def _lemmas() -> dict[str, str]:
    return dict(csv.reader(_info("imagenet_synset_to_lemma.txt").splitlines(), delimiter="\t"))


def lemma_names(synsets) -> list[str]:
    """A short readable name per synset: its first WordNet lemma (``tench``), with the synset
    added where two classes share it (ImageNet has two ``crane``s)."""
    lemmas = _lemmas()
    first = [lemmas.get(s, s).split(",")[0].strip() for s in synsets]
    counts = {n: first.count(n) for n in first}
    return [f"{n} ({s})" if counts[n] > 1 else n for n, s in zip(first, synsets)]


@lru_cache(maxsize=None)
def real_labels(path: str = "") -> tuple[tuple[int, ...], ...]:
    """ImageNet-ReaL's labels (Beyer et al. 2020), one list per validation image in file
    order (``ILSVRC2012_val_00000001.JPEG`` first): ``path``, else timm's shipped copy."""
    try:
        if path:
            with open(path) as f:
                text = f.read()
        else:
            text = _info("imagenet_real_labels.json")
        labels = json.loads(text)
        return tuple(tuple(int(c) for c in entry) for entry in labels)
    except (OSError, ValueError, TypeError) as e:
        raise ClassError(f"{path}: not ImageNet-ReaL's label file (a JSON list of class-index lists, one per "
                         f"validation image): {one_line(e)}") from None


def read_class_map(path: str, num_classes: int) -> list[str]:
    """DATA.CLASS_MAP: the model's class names by index (timm's format, read by timm)."""
    from timm.data.readers.class_map import load_class_map

    if not path.lower().endswith((".txt", ".pkl")):
        raise ClassError(f"DATA.CLASS_MAP: {path}: a class map is a .txt file (one class name per line, "
                         f"in the model's order) or timm's .pkl {{name: index}}")
    try:
        mapping = load_class_map(path)
    except (OSError, ValueError, AssertionError, Exception) as e:  # timm asserts; pickle raises its own
        raise ClassError(f"DATA.CLASS_MAP: cannot read {path}: {one_line(e)}") from None
    names = [""] * num_classes
    for name, index in mapping.items():
        if not isinstance(index, int) or not 0 <= index < num_classes:
            raise ClassError(f"DATA.CLASS_MAP: {path}: class {name!r} has index {index}, not one of the "
                             f"model's 0..{num_classes - 1} (MODEL.NUM_CLASSES {num_classes})")
        names[index] = str(name)
    return [n or str(i) for i, n in enumerate(names)]


def _first(items, limit: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def class_index(folders: list[str], num_classes: int, where: str, class_map: str = "",
                training: bool = False) -> tuple[dict[str, int], list[str]]:
    """({folder: the model's class index}, the model's class names by index) for the class
    folders ``folders`` of ``where``; ClassError (one line) when they are not the model's.
    ``training``: the folders define the model's classes (data.build checks their count)."""
    folders = sorted(folders)
    if class_map:
        names = read_class_map(class_map, num_classes)
        index = {name: i for i, name in enumerate(names)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise ClassError(f"{where}: class folders not in DATA.CLASS_MAP {class_map}: {_first(unknown)}")
        return {f: index[f] for f in folders}, names
    synsets = imagenet_synsets(num_classes)
    if synsets and folders and all(SYNSET.fullmatch(f) for f in folders):
        index = {s: i for i, s in enumerate(synsets)}
        unknown = [f for f in folders if f not in index]
        if not unknown:
            return {f: index[f] for f in folders}, lemma_names(synsets)
        if len(folders) != num_classes:
            raise ClassError(f"{where}: synset folders that are not among the model's {num_classes} ImageNet "
                             f"classes (timm's list): {_first(unknown)}")
    elif folders and all(f.isdigit() for f in folders):
        outside = [f for f in folders if int(f) >= num_classes]
        if not outside:
            return {f: int(f) for f in folders}, [str(i) for i in range(num_classes)]
        if len(folders) != num_classes:
            raise ClassError(f"{where}: class folders {_first(outside)} are class indices outside the model's "
                             f"0..{num_classes - 1} (MODEL.NUM_CLASSES {num_classes})")
    if len(folders) == num_classes or training:  # none of the lists above: sorted (training compares
        return {f: i for i, f in enumerate(folders)}, folders  # train/ with val/, then the count)
    raise ClassError(f"{where} has {len(folders)} class folders ({_first(folders, 3)}) but the model has "
                     f"{num_classes} classes: the folder's classes must be the model's; to evaluate on some of "
                     f"them, name the model's classes in DATA.CLASS_MAP (a .txt file, one per line in the "
                     f"model's order)")
