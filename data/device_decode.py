"""``DATA.DECODER nvjpeg``: JPEG batches decoded on the training device, cropped, resized and
flipped there; the loader workers only read the files and draw the geometry.

Why: decoding and the random-resized crop are about 75% of a worker's time without
RandAugment (docs/DATA.md's stage table), and an 8-GPU node runs out of cores before its GPUs
run out of work. nvjpeg (torchvision's ``decode_jpeg(device="cuda")``) decodes a batch of
JPEGs on the GPU; the crop is a slice and the resize an antialiased interpolation there.

The augmentation stays timm's: a worker reads a file's bytes and its header (``read_encoded``;
PIL reads the size without decoding), then ``PlanCrop`` draws what timm's transform would
draw (the random-resized crop's ``get_params`` with the same ``random`` calls, the flip's
``torch.rand``, the 'random' interpolation's choice), or for evaluation computes the resize
and the centre crop of ``transforms.build_transform``. ``decode_records`` (called by
``device.DeviceLoader``) decodes and applies them: the same pixels as the Pillow path on the
CPU up to the resize's rounding (tests/test_device_decode.py). Files that are not RGB JPEGs
(PNG, greyscale, CMYK) are decoded by Pillow in the worker and travel as RGB pixels; the
device then only crops and resizes them. Augmentation that needs Pillow images in the
workers (RandAugment, colour jitter, DeiT III's simple random crop, the small-image recipe)
is refused by ``config.validate``.
"""
from __future__ import annotations

import io
import random
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg

from .decode import decode_rgb, plain_rgb_jpeg


class Record(NamedTuple):
    """One image on its way to the device: what to decode and what to do with it."""
    data: torch.Tensor  # the file's bytes (1-D) if ``jpeg``, else its RGB pixels (HWC), Pillow's decode
    jpeg: bool
    path: str  # for the error naming an image the device could not decode
    height: int  # of the image
    width: int
    box: tuple = ()  # (top, left, height, width) of the image to resize ...
    resize: tuple = ()  # ... to (height, width) ...
    crop: tuple = ()  # ... then (top, left, height, width) of the resized image to keep
    flip: bool = False  # then mirrored left to right
    mode: str = "bicubic"  # the resize's interpolation: bicubic | bilinear


def read_encoded(path: str) -> Record:
    """The ImageFolder loader of ``DATA.DECODER nvjpeg``: an RGB JPEG's bytes and size (its
    header read, nothing decoded), anything else decoded to RGB by Pillow as ``DATA.DECODER
    auto`` does. Raises what Pillow raises for a file whose header it cannot read."""
    with open(path, "rb") as f:
        data = f.read()
    header = Image.open(io.BytesIO(data))  # reads the header only
    if plain_rgb_jpeg(header):
        return Record(torch.frombuffer(bytearray(data), dtype=torch.uint8), True, path, header.height, header.width)
    pixels = np.array(decode_rgb(data))
    return Record(torch.from_numpy(pixels), False, path, header.height, header.width)


def _stand_in(height: int, width: int) -> torch.Tensor:
    """An 'image' of that size for timm's ``get_params``, which reads only the size (no memory)."""
    return torch.empty((), dtype=torch.uint8).expand(1, height, width)


class PlanCrop:
    """The workers' transform under ``DATA.DECODER nvjpeg``: a ``Record`` with the geometry of
    ``transforms.build_transform(config, train)`` filled in, drawn from the same random
    numbers in the same order (the training transform is timm's random-resized crop and flip,
    nothing else: config.validate refuses the rest)."""

    def __init__(self, config, train: bool) -> None:
        self.train, self.size = train, config.DATA.IMG_SIZE
        self.scale, self.ratio = tuple(config.AUG.SCALE), (3.0 / 4.0, 4.0 / 3.0)  # timm's create_transform's
        self.hflip = config.AUG.HFLIP
        self.interpolation = config.DATA.INTERPOLATION
        self.resize_to = int(self.size / config.TEST.CROP_PCT)
        self.square = config.TEST.RESIZE == "square"

    def __call__(self, record: Record) -> Record:
        h, w, size = record.height, record.width, self.size
        if self.train:
            box = RandomResizedCropAndInterpolation.get_params(_stand_in(h, w), self.scale, self.ratio)
            mode = self.interpolation
            if mode == "random":  # timm's choice among (bilinear, bicubic), after the crop's draws
                mode = random.choice(("bilinear", "bicubic"))
            flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)  # RandomHorizontalFlip's draw
            return record._replace(box=box, resize=(size, size), crop=(0, 0, size, size), flip=flip, mode=mode)
        r = self.resize_to  # torchvision's Resize(r): the shorter side to r, the longer int(r * long / short)
        resized = (r, r) if self.square else (r, int(r * w / h)) if h <= w else (int(r * h / w), r)
        top, left = int(round((resized[0] - size) / 2.0)), int(round((resized[1] - size) / 2.0))  # CenterCrop's
        mode = "bicubic" if self.interpolation == "random" else self.interpolation  # transforms.INTERPOLATIONS
        return record._replace(box=(0, 0, h, w), resize=resized, crop=(top, left, size, size), mode=mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(train={self.train}, size={self.size})"


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """A CHW uint8 image resized on its device as Pillow resamples (its filters, antialiased),
    in one float32 pass rounded back to uint8. Pillow rounds to uint8 between its horizontal
    and vertical passes: the two differ by 0.2 levels on average, and where bicubic
    overshoots and is clipped, by more (docs/DATA.md)."""
    if tuple(image.shape[-2:]) == tuple(size):  # Pillow returns such an image unchanged
        return image
    x = F.interpolate(image.unsqueeze(0).float(), size=tuple(size), mode=mode, align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def _geometry(image: torch.Tensor, record: Record) -> torch.Tensor:
    """Crop, resize, crop and flip one CHW uint8 image as its record says, on its device."""
    top, left, h, w = record.box
    image = _resize(image[:, top:top + h, left:left + w], tuple(record.resize), record.mode)
    top, left, h, w = record.crop
    image = image[:, top:top + h, left:left + w]
    return image.flip(-1) if record.flip else image


def decode_batch(records: Sequence[Record], device: torch.device | str) -> torch.Tensor:
    """The records' images as one uint8 NCHW batch on ``device``: the JPEGs decoded together
    (nvjpeg on CUDA, libjpeg-turbo on the CPU), every image cropped, resized and flipped as
    its record says. Raises decode_jpeg's RuntimeError when a JPEG does not decode."""
    device = torch.device(device)
    jpegs = [r.data for r in records if r.jpeg]
    decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else ())
    height, width = records[0].crop[2:]
    batch = torch.empty((len(records), 3, height, width), dtype=torch.uint8, device=device)
    for k, record in enumerate(records):
        image = next(decoded) if record.jpeg else \
            record.data.to(device, non_blocking=True).permute(2, 0, 1)
        batch[k] = _geometry(image, record)
    return batch


def _undecodable(records: Sequence[Record], device: torch.device) -> dict[int, str]:
    """{position: decode_jpeg's message} of the records whose JPEG fails alone."""
    bad = {}
    for k, record in enumerate(records):
        if record.jpeg:
            try:
                decode_jpeg(record.data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                bad[k] = str(e).strip().splitlines()[-1].split(", ")[-1]
    return bad


def decode_records(records: Sequence[Record], targets: torch.Tensor, device: torch.device | str,
                   dataset) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, targets) of a batch of records, ``decode_batch``'s, with
    DATA.SKIP_BAD_IMAGES's rules for a JPEG whose header read but whose data does not decode:
    found by decoding the batch's JPEGs one at a time, it stops the run with an error naming
    the file, or with ``dataset.skip_bad`` is counted (``dataset.bad``, as the workers count
    files they cannot open) and, in training (``dataset.replace``), replaced by the next
    readable image of its batch, in evaluation dropped (None when none is left)."""
    device = torch.device(device)
    try:
        return decode_batch(records, device), targets
    except RuntimeError:
        bad = _undecodable(records, device)
        if not bad:
            raise
    from .datasets import DataError  # datasets reads files with this module's read_encoded
    first = min(bad)
    if not getattr(dataset, "skip_bad", False):
        raise DataError(f"cannot read image {records[first].path}: {bad[first]} "
                        f"(DATA.SKIP_BAD_IMAGES True skips such files)")
    paths = [path for path, _ in dataset.samples]
    for k in bad:
        dataset.bad[paths.index(records[k].path)] = True
    good = [k for k in range(len(records)) if k not in bad]
    if not good:
        if getattr(dataset, "replace", False):
            raise DataError(f"no image of a training batch decodes, first: {records[first].path}")
        return None
    keep = good
    if getattr(dataset, "replace", False):  # the next readable image of the batch stands in (cyclically)
        keep = [next((g for g in good if g > k), good[0]) if k in bad else k for k in range(len(records))]
    index = torch.tensor(keep, device=targets.device)
    return decode_batch([records[k] for k in keep], device), targets.index_select(0, index)


__all__ = ["PlanCrop", "Record", "decode_batch", "decode_records", "read_encoded"]
