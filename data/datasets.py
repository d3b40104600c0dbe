"""Datasets by name. Each returns a torch Dataset of (PIL image, class index) pairs."""
from __future__ import annotations

import functools
import os
import re
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import datasets as tvd

from errors import UserError, one_line

from .classes import SUBSET_FILES, SYNSET, class_index, imagenet_synsets, real_labels, subset_synsets
from .decode import PILLOW_ERRORS, UnreadableImage, load_rgb, load_rgb_pil
from .device_decode import Record, read_encoded

# DATA.DECODER -> the image folders' loader: an RGB image, or (nvjpeg) the file for the device to decode
LOADERS = {"auto": load_rgb, "pil": load_rgb_pil, "nvjpeg": read_encoded}


class DataError(UserError):
    """Missing or malformed data; the message tells the user what to fix, in one line."""

    def __init__(self, message: str) -> None:
        # Raised in a DataLoader worker, the error reaches the main process re-raised as
        # DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback
        # ...\ndata.datasets.DataError: <message>"): keep only the line the user needs.
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


class CheckedImageFolder(tvd.ImageFolder):
    """ImageFolder whose unreadable images fail with the file's path, or, with
    ``skip_bad=True`` (DATA.SKIP_BAD_IMAGES), are skipped: for training (``replace``)
    replaced by the next readable image, for evaluation dropped (the item is None, which
    ``collate_readable`` leaves out), so that an accuracy never counts an image twice.

    Replacing keeps every training batch full, so all ranks take the same number of steps,
    and the replacement (the next index, usually the same class) depends only on the file,
    so runs stay deterministic. Bad files are marked in a boolean tensor in shared memory
    that the loader workers write and the main process reads (``take_skipped``): the count
    is of distinct files, whichever worker met them.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, skip_bad: bool = False,
                 replace: bool = True, decoder: str = "auto",
                 class_index: Optional[Callable[[list[str]], tuple[dict[str, int], list[str]]]] = None) -> None:
        self._class_index = class_index
        self.class_names: Optional[list[str]] = None  # the model's classes by index (class_index's)
        super().__init__(root, transform=transform, loader=LOADERS[decoder])
        self.skip_bad, self.replace = skip_bad, replace
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """The class folders, each labelled by ``class_index`` (data.classes: the model's
        class of that folder) where given, else by sorted position (torchvision's)."""
        folders, index = super().find_classes(directory)
        if self._class_index is not None:
            index, self.class_names = self._class_index(folders)
        return folders, index

    def _unreadable(self, index: int, error: Exception) -> None:
        if not self.skip_bad:
            raise DataError(f"cannot read image {self.samples[index][0]}: {one_line(error)} "
                            f"(DATA.SKIP_BAD_IMAGES True skips such files)") from None
        self.bad[index] = True

    def _item(self, index: int):
        """(transformed image, class) of sample ``index``, None for an unreadable file. A JPEG
        is decoded in the transform (data/decode.py: as far as its crop needs), so its
        decoding errors are caught there; a transform's own errors pass."""
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except PILLOW_ERRORS as e:
            return self._unreadable(index, e)
        try:
            return (self.transform(image) if self.transform is not None else image), target
        except UnreadableImage as e:
            return self._unreadable(index, e)

    def __getitem__(self, index: int):
        if not self.replace:
            return self._item(index)
        for offset in range(len(self.samples)):
            item = self._item((index + offset) % len(self.samples))
            if item is not None:
                return item
        raise DataError(f"no readable image in {self.root}")

    def take_skipped(self) -> tuple[int, Optional[str]]:
        """(unreadable files met since the last call, the first of them by index); resets.
        Call it when no loader iterator over this dataset is running."""
        found = self.bad.nonzero().flatten()
        self.bad.zero_()
        return len(found), (self.samples[int(found[0])][0] if len(found) else None)


def collate_readable(batch: list):
    """default_collate of the items that are not None (unreadable images dropped in
    evaluation); None for a batch with none left. CHW uint8 images (transforms.ToUint8Tensor,
    views of HWC pixels) are stacked as HWC, one memcpy each straight into the batch (in a
    loader worker, in shared memory), and the batch is NCHW in channels-last memory: a
    transposing stack cost a worker 60 us an image, the device does the transpose in
    normalising (data/device.py)."""
    items = [item for item in batch if item is not None]
    if not items:
        return None
    images = [item[0] for item in items]
    if isinstance(images[0], Record):  # DATA.DECODER nvjpeg: the list, decoded on the device (device_decode)
        return images, default_collate([item[1] for item in items])
    if all(isinstance(im, torch.Tensor) and im.dtype == torch.uint8 and im.dim() == 3 for im in images):
        targets = default_collate([item[1] for item in items])
        return default_collate([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2), targets
    return default_collate(items)


def _image_folder(root: str, transform: Optional[Callable], skip_bad: bool = False,
                  replace: bool = True, decoder: str = "auto", class_index=None,
                  cls=CheckedImageFolder, **kwargs) -> CheckedImageFolder:
    if not os.path.isdir(root):
        split = os.path.basename(os.path.normpath(root))
        raise DataError(f"dataset folder not found: {root} (DATA.DATA_PATH needs train/ and val/, "
                        f"each with one folder of images per class; {split}/ is missing)")
    try:
        return cls(root, transform=transform, skip_bad=skip_bad, replace=replace, decoder=decoder,
                   class_index=class_index, **kwargs)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root}: {one_line(e)}") from None


# ------------------------------------------------------------------ the ImageNet family
# Evaluation-only sets; DATA.DATA_PATH is the set's own folder (docs/DATA.md has each layout).
# ImageNet-C's corruptions (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
# Common Corruptions and Perturbations", ICLR 2019) and AlexNet's top-1 error on each, averaged
# over the five severities: the normalisation of the corruption error (CE) and its mean (mCE),
# as published with the benchmark (github.com/hendrycks/robustness, ImageNet-C/test.py).
ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
# The four held-out corruptions also shipped with ImageNet-C: top-1 reported, not in the mCE.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
REAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.\w+")


def _subfolders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def _layout_error(name: str, root: str, what: str) -> DataError:
    return DataError(f"{root} is not {name}'s layout (DATA.DATASET {name}, docs/DATA.md): {what}")


class RealLabelled(CheckedImageFolder):
    """ImageNet's val/ with ImageNet-ReaL's labels (Beyer et al., "Are we done with
    ImageNet?", 2020): each image's target is its ReaL classes, padded with -1 to the longest
    list (a fixed width, so batches stack). Images ReaL leaves unlabelled are not evaluated;
    ``unlabelled`` counts them."""

    def __init__(self, root: str, labels_file: str = "", **kwargs) -> None:
        super().__init__(root, **kwargs)
        labels = real_labels(labels_file)
        kept, real = [], []
        for path, target in self.samples:
            match = REAL_FILE.fullmatch(os.path.basename(path))
            number = int(match.group(1)) if match else 0
            if not 1 <= number <= len(labels):
                raise _layout_error("imagenet-real", os.path.dirname(root), f"{path} is not one of the "
                                    f"{len(labels)} ILSVRC2012_val_NNNNNNNN images that ReaL labels")
            if labels[number - 1]:
                kept.append((path, target))
                real.append(labels[number - 1])
        self.unlabelled = len(self.samples) - len(kept)
        self.samples = self.imgs = kept
        self.targets = [t for _, t in kept]
        width = max(map(len, labels))
        self.real = torch.full((len(kept), width), -1, dtype=torch.long)
        for i, classes in enumerate(real):
            self.real[i, :len(classes)] = torch.tensor(classes)
        self.bad = torch.zeros(len(kept), dtype=torch.bool).share_memory_()

    def __getitem__(self, index: int):
        item = super().__getitem__(index)
        return None if item is None else (item[0], self.real[index])


def _imagenet_set(config, transform: Optional[Callable]) -> Dataset:
    """One evaluation set of the ImageNet family (config.DATA.DATASET) from DATA.DATA_PATH."""
    name, root = config.DATA.DATASET, config.DATA.DATA_PATH
    if name == "imagenet-c":
        raise DataError("DATA.DATASET imagenet-c is evaluated per corruption and severity (corruption_sets), "
                        "with --eval")
    classes = functools.partial(class_index, num_classes=config.MODEL.NUM_CLASSES, class_map=config.DATA.CLASS_MAP)
    if config.MODEL.NUM_CLASSES != 1000 and not config.DATA.CLASS_MAP and name != "imagenet-v2":
        raise DataError(f"DATA.DATASET {name} labels images by ImageNet-1k's 1,000 synsets: the model has "
                        f"MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES}")
    common = dict(transform=transform, skip_bad=config.DATA.SKIP_BAD_IMAGES, replace=False,
                  decoder=config.DATA.DECODER)
    if not os.path.isdir(root):
        raise DataError(f"DATA.DATASET {name}: folder not found: {root}")
    folders = _subfolders(root)
    if name == "imagenet-real":
        val = os.path.join(root, "val")
        labels = os.path.join(root, "real.json")
        return _image_folder(val, cls=RealLabelled, labels_file=labels if os.path.isfile(labels) else "",
                             class_index=lambda f: classes(f, where=val), **common)
    if name == "imagenet-v2":
        bad = [f for f in folders if not f.isdigit()]
        if bad or not folders:
            raise _layout_error(name, root, f"class folders are 0..999, found {bad[0] if bad else 'none'}")
    elif name in SUBSET_FILES:
        subset = subset_synsets(name)
        bad = [f for f in folders if f not in subset]
        if bad or not folders:
            raise _layout_error(name, root, f"class folders are {len(subset)} synsets of timm's "
                                            f"{SUBSET_FILES[name]}, found {bad[0] if bad else 'none'}")
    elif name == "imagenet-sketch":
        bad = [f for f in folders if not SYNSET.fullmatch(f)]
        if bad or not folders:
            raise _layout_error(name, root, f"class folders are ImageNet synsets (n01440764 ...), "
                                            f"found {bad[0] if bad else 'none'}")
    dataset = _image_folder(root, class_index=lambda f: classes(f, where=root), **common)
    if name in SUBSET_FILES:  # the model chooses among the subset's classes only, as the sets' papers do
        index = {s: i for i, s in enumerate(imagenet_synsets(1000))}
        dataset.class_subset = [index[s] for s in subset_synsets(name)]
    return dataset


def corruption_sets(config, transform: Optional[Callable]) -> list[tuple[str, int, Dataset]]:
    """ImageNet-C: (corruption, severity, its synset folders) for every
    DATA_PATH/<corruption>/<1..5>/ there is, in name and severity order."""
    root = config.DATA.DATA_PATH
    if not os.path.isdir(root):
        raise DataError(f"DATA.DATASET imagenet-c: folder not found: {root}")
    sets = []
    for corruption in _subfolders(root):
        severities = _subfolders(os.path.join(root, corruption))
        if corruption not in ALEXNET_ERRORS and corruption not in EXTRA_CORRUPTIONS:
            raise _layout_error("imagenet-c", root, f"{corruption}/ is not one of its corruptions "
                                                    f"({', '.join(list(ALEXNET_ERRORS)[:3])}, ...)")
        if not severities or any(s not in "12345" or len(s) != 1 for s in severities):
            raise _layout_error("imagenet-c", root, f"{corruption}/ holds severity folders 1..5, found "
                                                    f"{', '.join(severities) or 'none'}")
        for severity in severities:
            folder = os.path.join(root, corruption, severity)
            sub = config.clone()
            sub.defrost()
            sub.DATA.DATASET, sub.DATA.DATA_PATH = "imagenet-sketch", folder  # the same layout: synset folders
            sets.append((corruption, int(severity), _imagenet_set(sub, transform)))
    if not sets:
        raise _layout_error("imagenet-c", root, "no <corruption>/<severity>/ folders")
    return sets


class Digits(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), offline.

    A fixed stratified 80/20 split, so every run and every machine sees the same val set.
    Pixel values 0..16 are stretched to 0..255 and replicated to RGB.
    """

    def __init__(self, train: bool, transform: Optional[Callable] = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        idx_train, idx_val = train_test_split(np.arange(len(images)), test_size=0.2,
                                              stratify=digits.target, random_state=0)
        idx = idx_train if train else idx_val
        self.images, self.targets = images[idx], digits.target[idx].tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _cifar(name: str, root: str, train: bool, transform: Optional[Callable], download: bool):
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        return cls(root, train=train, transform=transform, download=False)
    except RuntimeError:
        pass
    if download:
        try:
            return cls(root, train=train, transform=transform, download=True)
        except Exception:  # no network, proxy errors, partial files: all mean "put it there yourself"
            pass
    raise DataError(f"{name} not found under {os.path.abspath(root)}: download it (no network here) "
                    f"and extract it so that {os.path.join(root, folder)}/ exists")


def _shards(config, split: str, transform: Optional[Callable], rank: int, world_size: int) -> Dataset:
    from .shardlist import ShardPathError, find_shards, shard_counts
    from .shards import ShardDataset

    try:
        paths = find_shards(config.DATA.DATA_PATH, need_train=split == "train")[split]
        counts, classes = shard_counts(paths)
    except ShardPathError as e:
        raise DataError(str(e)) from None
    batch = config.DATA.BATCH_SIZE if split == "train" else (config.TEST.BATCH_SIZE or config.DATA.BATCH_SIZE)
    return ShardDataset(paths, counts, classes, transform, train=split == "train", rank=rank,
                        world_size=world_size, batch_size=batch, seed=config.SEED,
                        skip_bad=config.DATA.SKIP_BAD_IMAGES, shuffle_buffer=config.DATA.SHUFFLE_BUFFER,
                        num_classes=config.MODEL.NUM_CLASSES, fast_decode=config.DATA.DECODER == "auto")


def build_dataset(config, train: bool, transform: Optional[Callable], rank: int = 0,
                  world_size: int = 1) -> Dataset:
    """``rank`` and ``world_size`` matter to streamed shards (wds), which split the data
    between processes themselves; map-style datasets leave that to the sampler."""
    name, root = config.DATA.DATASET, config.DATA.DATA_PATH
    split = "train" if train else "val"
    if name in ("imagenet", "folder"):
        folder = os.path.join(root, split)
        classes = functools.partial(class_index, num_classes=config.MODEL.NUM_CLASSES, where=folder,
                                    class_map=config.DATA.CLASS_MAP, training=config.MODE == "train")
        return _image_folder(folder, transform, config.DATA.SKIP_BAD_IMAGES, replace=train,
                             decoder=config.DATA.DECODER, class_index=classes)
    if name.startswith("imagenet-"):
        return _imagenet_set(config, transform)
    if name == "wds":
        return _shards(config, split, transform, rank, world_size)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root or "data_cache", train, transform, config.DATA.DOWNLOAD)
    if name == "digits":
        return Digits(train=train, transform=transform)
    if name == "fake":
        size = config.DATA.FAKE_SIZE if train else max(1, config.DATA.FAKE_SIZE // 4)
        return tvd.FakeData(size=size, image_size=(3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE),
                            num_classes=config.MODEL.NUM_CLASSES, transform=transform,
                            random_offset=0 if train else 1_000_000)
    raise DataError(f"unknown dataset {name!r}")


def num_classes_of(dataset: Dataset) -> Optional[int]:
    """The model classes a dataset's labels index (its class list's), else its class count."""
    names = getattr(dataset, "class_names", None)
    if names is not None:
        return len(names)
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else None
