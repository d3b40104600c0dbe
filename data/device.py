"""uint8 batches from the loader workers -> normalised (and randomly erased) float batches on
the training device, timm's ``PrefetchLoader`` way.

Why: a worker that normalises sends float32, 4x the bytes of the uint8 image through shared
memory, through pinning and over PCIe, and spends its core on arithmetic that the device does
in microseconds. Workers here stop at the CHW uint8 image (``transforms.ToUint8Tensor``);
this wrapper moves each batch to the device, normalises it there in one pass each of subtract
and multiply (the same float32 operations as the worker's numpy step did: the same values),
and applies random erasing (timm's ``RandomErasing`` with ``device=``) to the normalised batch.
On CUDA with loader workers the next batch is copied and normalised on a side stream while
the model runs on the current one; on the CPU, and with ``DATA.NUM_WORKERS 0`` (where
fetching a batch of streamed shards augments it in this process, drawing from the global
random state that a mid-epoch checkpoint saves; map-style sets seed theirs per batch,
``samplers.SeededBatches``) batches are fetched only when asked for, so the order of random
draws is that of the unwrapped loader.

Random erasing draws from generators of its own, seeded per batch from (the epoch's seed,
the batch's index in the epoch): a resumed epoch erases every remaining batch as the
uninterrupted run did, with or without workers, and the draws of mixup, drop path or a
prefetch never shift them.
"""
from __future__ import annotations

import math
import random
from typing import Iterator, Optional, Sequence

import torch
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader

from .device_decode import decode_records
from .samplers import derived_seed


class SeededErasing(RandomErasing):
    """timm's RandomErasing (its probability, areas, aspect ratios, counts and fill modes),
    drawing the boxes from a ``random.Random`` and the fill from a ``torch.Generator`` on the
    batch's device, both reseeded by ``seed(s)``, instead of the global random state."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rng = random.Random(0)
        self.generator = torch.Generator(device=self.device)

    def seed(self, seed: int) -> None:
        self.rng.seed(seed)
        self.generator.manual_seed(seed)

    def _erase(self, img: torch.Tensor, chan: int, img_h: int, img_w: int, dtype: torch.dtype) -> None:
        rng = self.rng
        if rng.random() > self.probability:
            return
        area = img_h * img_w
        count = self.min_count if self.min_count == self.max_count else rng.randint(self.min_count, self.max_count)
        for _ in range(count):
            for _attempt in range(10):
                target_area = rng.uniform(self.min_area, self.max_area) * area / count
                aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < img_w and h < img_h:
                    top = rng.randint(0, img_h - h)
                    left = rng.randint(0, img_w - w)
                    img[:, top:top + h, left:left + w] = self._fill((chan, h, w), dtype)
                    break

    def _fill(self, size: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
        shape = size if self.per_pixel else (size[0], 1, 1)
        fill = torch.empty(shape, dtype=dtype, device=self.device)
        return fill.normal_(generator=self.generator) if self.per_pixel or self.rand_color else fill.zero_()


def batch_seed(epoch_seed: int, step: int) -> int:
    """The erasing seed of batch ``step`` of the epoch seeded ``epoch_seed``."""
    return derived_seed(epoch_seed, step)


class Normalize:
    """(pixel - 255 mean) * 1 / (255 std) of a uint8 NCHW batch (any memory layout), into a new
    contiguous float32 batch on ``device``: the worker's former numpy step, element for element."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.shift = torch.tensor([255.0 * m for m in mean], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32,
                                  device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # the cast first, then in place: 1.9x faster on the CPU than one mixed-dtype torch.sub
        out = images.to(self.shift.device, torch.float32, memory_format=torch.contiguous_format)
        return out.sub_(self.shift).mul_(self.scale)


class DeviceLoader:
    """A DataLoader's batches on ``device``, uint8 images normalised and erased there (see the
    module's docstring); a batch of encoded JPEGs and their crops (``DATA.DECODER nvjpeg``) is
    decoded, cropped and resized there first (``device_decode.decode_records``); a batch of
    other images (a transform of one's own that makes float tensors) is only moved. Anything
    else (``dataset``, ``sampler``, ``len``) is the loader's."""

    def __init__(self, loader: DataLoader, device: torch.device | str, mean: Sequence[float], std: Sequence[float],
                 erasing: Optional[SeededErasing] = None, epoch_seed: int = 0, start: int = 0) -> None:
        self.loader, self.device = loader, torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalize = Normalize(mean, std, self.device)
        self.erasing, self.epoch_seed, self.start = erasing, epoch_seed, start
        self.prefetch = self.device.type == "cuda" and loader.num_workers > 0
        self._stream = None

    def over(self, loader: DataLoader, epoch_seed: int, start: int = 0) -> "DeviceLoader":
        """The same device stage over ``loader``, whose first batch is batch ``start`` of the
        epoch seeded ``epoch_seed`` (Loaders.epoch: a resumed epoch's rest)."""
        other = DeviceLoader(loader, self.device, self.mean, self.std, self.erasing, epoch_seed, start)
        other._stream = self._stream
        return other

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _prepare(self, batch, step: int):
        if batch is None:  # evaluation: every image of the batch unreadable (collate_readable)
            return None
        images, targets = batch
        targets = targets.to(self.device, non_blocking=True)
        if isinstance(images, list):  # DATA.DECODER nvjpeg: encoded JPEGs and their crops
            decoded = decode_records(images, targets, self.device, self.loader.dataset)
            if decoded is None:  # evaluation: no image of the batch decodes
                return None
            images, targets = decoded
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = self.normalize(images)
            if self.erasing is not None:
                self.erasing.seed(batch_seed(self.epoch_seed, step))
                images = self.erasing(images)
        return images, targets

    def __iter__(self) -> Iterator:
        if not self.prefetch:
            for step, batch in enumerate(self.loader, start=self.start):
                yield self._prepare(batch, step)
            return
        # timm's PrefetchLoader: the next batch is copied and normalised on a side stream; the
        # side stream waits for the consumer's queued work before it allocates (blocks the
        # consumer freed may be handed to it), the consumer waits for the side stream's batch.
        if self._stream is None:  # one stream for the loader's life: the allocator pools per stream
            self._stream = torch.cuda.Stream(device=self.device)
        ready = None
        for step, batch in enumerate(self.loader, start=self.start):
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                prepared = self._prepare(batch, step)
            if ready is not None:
                yield ready[0]
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            ready = (prepared,)
        if ready is not None:
            yield ready[0]


def device_stage(loader: DataLoader, config, device: torch.device | str, train: bool) -> DeviceLoader:
    """``loader`` with the config's normalisation, and for training its random erasing."""
    aug = config.AUG
    erasing = SeededErasing(probability=aug.REPROB, mode=aug.REMODE, max_count=aug.RECOUNT,
                            device=torch.device(device)) if train and aug.REPROB > 0 else None
    return DeviceLoader(loader, device, config.DATA.MEAN, config.DATA.STD, erasing)


__all__ = ["DeviceLoader", "Normalize", "SeededErasing", "batch_seed", "device_stage"]
