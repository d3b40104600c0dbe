"""Datasets by name. Each returns a torch Dataset of (PIL image, class index) pairs."""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import datasets as tvd

from errors import UserError, one_line

from .decode import load_rgb, load_rgb_pil


class DataError(UserError):
    """Missing or malformed data; the message tells the user what to fix, in one line."""

    def __init__(self, message: str) -> None:
        # Raised in a DataLoader worker, the error reaches the main process re-raised as
        # DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback
        # ...\ndata.datasets.DataError: <message>"): keep only the line the user needs.
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


# What PIL raises for unreadable files: truncated or garbage data (OSError, including
# UnidentifiedImageError), bad headers (ValueError, SyntaxError), decompression bombs.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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
                 replace: bool = True, fast_decode: bool = True) -> None:
        super().__init__(root, transform=transform, loader=load_rgb if fast_decode else load_rgb_pil)
        self.skip_bad, self.replace = skip_bad, replace
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def _read(self, index: int):
        path, _ = self.samples[index]
        try:
            return self.loader(path)
        except _UNREADABLE as e:
            if not self.skip_bad:
                raise DataError(f"cannot read image {path}: {one_line(e)} "
                                f"(DATA.SKIP_BAD_IMAGES True skips such files)") from None
            self.bad[index] = True
            return None

    def __getitem__(self, index: int):
        if not self.replace:
            image = self._read(index)
            if image is None:
                return None
            return (self.transform(image) if self.transform is not None else image), self.samples[index][1]
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            image = self._read(candidate)
            if image is not None:
                break
        else:
            raise DataError(f"no readable image in {self.root}")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[candidate][1]

    def take_skipped(self) -> tuple[int, Optional[str]]:
        """(unreadable files met since the last call, the first of them by index); resets.
        Call it when no loader iterator over this dataset is running."""
        found = self.bad.nonzero().flatten()
        self.bad.zero_()
        return len(found), (self.samples[int(found[0])][0] if len(found) else None)


def collate_readable(batch: list):
    """default_collate of the items that are not None (unreadable images dropped in
    evaluation); None for a batch with none left."""
    items = [item for item in batch if item is not None]
    return default_collate(items) if items else None


def _image_folder(root: str, transform: Optional[Callable], skip_bad: bool = False,
                  replace: bool = True, fast_decode: bool = True) -> CheckedImageFolder:
    if not os.path.isdir(root):
        split = os.path.basename(os.path.normpath(root))
        raise DataError(f"dataset folder not found: {root} (DATA.DATA_PATH needs train/ and val/, "
                        f"each with one folder of images per class; {split}/ is missing)")
    try:
        return CheckedImageFolder(root, transform=transform, skip_bad=skip_bad, replace=replace,
                                  fast_decode=fast_decode)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root}: {one_line(e)}") from None


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
    fast = config.DATA.DECODER == "auto"
    if name in ("imagenet", "folder"):
        return _image_folder(os.path.join(root, split), transform, config.DATA.SKIP_BAD_IMAGES, replace=train,
                             fast_decode=fast)
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
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else None
