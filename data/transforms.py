"""Train and eval transforms. Training augmentation is timm's ``create_transform``."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.transforms import MaybeToTensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# DATA.INTERPOLATION -> torchvision's mode; the names are the key's choices (config.CHOICES).
INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST, "random": InterpolationMode.BICUBIC}


class ToNormalizedTensor:
    """ToTensor + Normalize in one step, in numpy: (pixel - 255 mean) / (255 std) written
    once into a CHW float array. Why: torchvision's pair makes seven passes and three
    tensors per image (to_tensor copies, permutes, divides; normalize clones, subtracts,
    divides), 2.3x the time of this on one core; and as torch ops in the main process
    (DATA.NUM_WORKERS 0) each one wakes torch's thread pool, which on a loaded machine costs
    milliseconds per image. Values agree with the pair to within 1e-6."""

    def __init__(self, mean, std) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._shift = np.array([255.0 * m for m in mean], np.float32).reshape(-1, 1, 1)
        self._scale = np.array([1.0 / (255.0 * s) for s in std], np.float32).reshape(-1, 1, 1)

    def __call__(self, pic):
        pixels = np.asarray(pic) if isinstance(pic, Image.Image) else None
        if pixels is None or pixels.dtype != np.uint8:  # tensors, 16-bit and float images: the pair
            tensor = pic if isinstance(pic, torch.Tensor) else T.functional.to_tensor(pic)
            return T.functional.normalize(tensor.float(), self.mean, self.std)
        hwc = pixels if pixels.ndim == 3 else pixels[:, :, None]
        out = np.empty((hwc.shape[2], hwc.shape[0], hwc.shape[1]), np.float32)
        np.subtract(hwc.transpose(2, 0, 1), self._shift, out=out, casting="unsafe")
        np.multiply(out, self._scale, out=out)
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def fuse_normalize(transform: T.Compose) -> T.Compose:
    """Replace each ToTensor (or timm's MaybeToTensor) + Normalize pair in ``transform`` by
    one ``ToNormalizedTensor``; random erasing after it still sees the same tensor."""
    steps, out = list(transform.transforms), []
    while steps:
        step = steps.pop(0)
        if isinstance(step, (T.ToTensor, MaybeToTensor)) and steps and isinstance(steps[0], T.Normalize):
            norm = steps.pop(0)
            step = ToNormalizedTensor([float(m) for m in torch.as_tensor(norm.mean).flatten()],
                                      [float(s) for s in torch.as_tensor(norm.std).flatten()])
        out.append(step)
    transform.transforms = out
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
    at = next(i for i, t in enumerate(transform.transforms) if isinstance(t, (T.ToTensor, MaybeToTensor)))
    transform.transforms.insert(at, step)


def build_transform(config, train: bool) -> T.Compose:
    size = config.DATA.IMG_SIZE
    interp = INTERPOLATIONS[config.DATA.INTERPOLATION]
    if train:
        aa = config.AUG.AUTO_AUGMENT
        trivial = aa == "trivialaugment"  # torchvision's; timm's policies (3a: DeiT III's 3-Augment) by name
        transform = create_transform(
            input_size=size, is_training=True, scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP, color_jitter=None if trivial else config.AUG.COLOR_JITTER or None,
            auto_augment=None if aa in ("", "none", "trivialaugment") else aa,
            interpolation=config.DATA.INTERPOLATION, re_prob=config.AUG.REPROB,
            re_mode=config.AUG.REMODE, re_count=config.AUG.RECOUNT,
            mean=tuple(config.DATA.MEAN), std=tuple(config.DATA.STD))
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
        return fuse_normalize(guard_posterize(transform))
    # timm's eval transform: resize to size / crop_pct (the shorter side, or squashed to a
    # square), then the center crop; crop_pct 1.0 with TEST.RESIZE square resizes straight to size
    resize = int(size / config.TEST.CROP_PCT)
    steps = [T.Resize((resize, resize) if config.TEST.RESIZE == "square" else resize, interpolation=interp),
             T.CenterCrop(size)]
    return T.Compose(steps + [ToNormalizedTensor(config.DATA.MEAN, config.DATA.STD)])
