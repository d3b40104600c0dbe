"""Train and eval transforms, up to the uint8 image. Training augmentation is timm's
``create_transform``; normalisation and random erasing are data/device.py's."""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .decode import DeferredJpeg
from .device_decode import PlanCrop

# DATA.INTERPOLATION -> torchvision's mode; the names are the key's choices (config.CHOICES).
INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST, "random": InterpolationMode.BICUBIC}


class ToUint8Tensor:
    """The end of every transform: an RGB PIL image -> a CHW uint8 tensor, a view of the
    image's pixels (HWC in memory). Normalisation and random erasing follow on the training
    device (data/device.py); ``datasets.collate_readable`` copies the images once, end to end,
    into the shared-memory batch, NCHW in channels-last memory. Why: the float tensor of a
    worker that normalises is 4x the bytes; timm's uint8 path (``MaybePILToTensor`` +
    ``fast_collate``) copies each image twice more (transposed, then into a batch that is
    copied again into shared memory)."""

    def __call__(self, pic) -> torch.Tensor:
        if isinstance(pic, torch.Tensor):
            return pic
        if pic.mode != "RGB":
            pic = pic.convert("RGB")
        return torch.from_numpy(np.array(pic)).permute(2, 0, 1)  # np.array: writable (torch warns otherwise)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RowsRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's random-resized crop (the same random draws, the same pixels) that decodes a
    ``decode.DeferredJpeg`` only down to the crop's bottom edge: 88% of the rows of a
    500x375 image on average with DeiT's scale (0.08, 1), decoded in 1.28 ms against 1.39
    for the whole image (one thread, medians of 15 alternating rounds over 60 files)."""

    def __call__(self, img):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        if isinstance(self.interpolation, (tuple, list)):
            interpolation = random.choice(self.interpolation)
        else:
            interpolation = self.interpolation
        if isinstance(img, DeferredJpeg):
            img = img.rows(i + h)
        return F.resized_crop(img, i, j, h, w, self.size, interpolation)


def decode_rows(transform: T.Compose) -> T.Compose:
    """Replace timm's random-resized crop at the head of ``transform`` by ``RowsRandomResizedCrop``."""
    first = transform.transforms[0]
    if type(first) is RandomResizedCropAndInterpolation:
        rows = RowsRandomResizedCrop.__new__(RowsRandomResizedCrop)
        rows.__dict__.update(first.__dict__)
        transform.transforms[0] = rows
    return transform


def uint8_output(transform: T.Compose) -> T.Compose:
    """Replace timm's ``MaybePILToTensor`` (its uint8 path, ``use_prefetcher=True``) by
    ``ToUint8Tensor``."""
    transform.transforms = [ToUint8Tensor() if isinstance(t, MaybePILToTensor) else t for t in transform.transforms]
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's posterize for every bit count its policies produce: RandAugment's increasing
    posterize keeps 4 - int(0.4 m) bits, 0 at magnitude 10 (which 'mstd' reaches), and
    AutoAugment's levels 0-2 keep 0 bits. Pillow 13 refuses 0 bits; older Pillow (and the
    TensorFlow reference) returned a black image, which this keeps."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def guard_posterize(transform: T.Compose) -> T.Compose:
    """Give the posterize ops of timm's RandAugment / AutoAugment / AugMix in ``transform``
    the 0-bit case (``_posterize``); without it a DeiT-recipe epoch stops at about one
    image in 700 with 'bits must be between or equal to 1 and 8'."""
    for step in transform.transforms:
        ops = list(getattr(step, "ops", []) or [])
        for sub in getattr(step, "policy", []) or []:
            ops.extend(sub)
        for op in ops:
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize
    return transform


def simple_random_crop(size: int, padding: int, interpolation: InterpolationMode) -> T.Compose:
    """DeiT III's simple random crop (AUG.TRAIN_CROP src): the shorter side resized to
    ``size``, reflect padding, a random ``size`` x ``size`` crop; no zoom, unlike RRC."""
    return T.Compose([T.Resize(size, interpolation=interpolation),
                      T.RandomCrop(size, padding=padding or None, padding_mode="reflect")])


def _insert_before_tensor(transform: T.Compose, step) -> None:
    """Put a PIL-image step after the crops and flips, before the tensor conversion."""
    at = next(i for i, t in enumerate(transform.transforms) if isinstance(t, (ToUint8Tensor, MaybePILToTensor)))
    transform.transforms.insert(at, step)


def build_transform(config, train: bool) -> T.Compose | PlanCrop:
    if config.DATA.DECODER == "nvjpeg":  # the workers draw the geometry; the device decodes and applies it
        return PlanCrop(config, train)
    size = config.DATA.IMG_SIZE
    interp = INTERPOLATIONS[config.DATA.INTERPOLATION]
    if train:
        aa = config.AUG.AUTO_AUGMENT
        trivial = aa == "trivialaugment"  # torchvision's; timm's policies (3a: DeiT III's 3-Augment) by name
        transform = create_transform(
            input_size=size, is_training=True, scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP, color_jitter=None if trivial else config.AUG.COLOR_JITTER or None,
            auto_augment=None if aa in ("", "none", "trivialaugment") else aa,
            interpolation=config.DATA.INTERPOLATION, use_prefetcher=True)  # uint8 out; the rest on the device
        if trivial:
            _insert_before_tensor(transform, T.TrivialAugmentWide(interpolation=interp))
        if config.AUG.TRAIN_CROP == "src":
            transform.transforms[0] = simple_random_crop(size, config.AUG.CROP_PAD, interp)
        elif size <= 32 and config.AUG.TRAIN_CROP == "auto":
            # Random-resized crops destroy tiny images; use the CIFAR recipe (pad + crop).
            steps = [T.Resize((size, size), interpolation=interp)]
            if config.AUG.CROP_PAD:
                steps.append(T.RandomCrop(size, padding=config.AUG.CROP_PAD))
            transform.transforms[0] = T.Compose(steps)
        return uint8_output(guard_posterize(decode_rows(transform)))
    # timm's eval transform: resize to size / crop_pct (the shorter side, or squashed to a
    # square), then the center crop; crop_pct 1.0 with TEST.RESIZE square resizes straight to size
    resize = int(size / config.TEST.CROP_PCT)
    steps = [T.Resize((resize, resize) if config.TEST.RESIZE == "square" else resize, interpolation=interp),
             T.CenterCrop(size)]
    return T.Compose(steps + [ToUint8Tensor()])
