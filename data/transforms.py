"""Train and eval transforms. Training augmentation is timm's ``create_transform``."""
from __future__ import annotations

from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST, "random": InterpolationMode.BICUBIC}


def build_transform(config, train: bool) -> T.Compose:
    size = config.DATA.IMG_SIZE
    if train:
        aa = config.AUG.AUTO_AUGMENT
        transform = create_transform(
            input_size=size, is_training=True, scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP, color_jitter=config.AUG.COLOR_JITTER or None,
            auto_augment=None if aa in ("", "none") else aa,
            interpolation=config.DATA.INTERPOLATION, re_prob=config.AUG.REPROB,
            re_mode=config.AUG.REMODE, re_count=config.AUG.RECOUNT,
            mean=tuple(config.DATA.MEAN), std=tuple(config.DATA.STD))
        if size <= 32:
            # Random-resized crops destroy tiny images; use the CIFAR recipe (pad + crop).
            steps = [T.Resize((size, size), interpolation=_INTERP[config.DATA.INTERPOLATION])]
            if config.AUG.CROP_PAD:
                steps.append(T.RandomCrop(size, padding=config.AUG.CROP_PAD))
            transform.transforms[0] = T.Compose(steps)
        return transform
    interp = _INTERP[config.DATA.INTERPOLATION]
    if config.TEST.CROP:
        resize = int(size / config.TEST.CROP_PCT)
        steps = [T.Resize((resize, resize) if config.TEST.RESIZE == "square" else resize,
                          interpolation=interp), T.CenterCrop(size)]
    else:
        steps = [T.Resize((size, size), interpolation=interp)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(config.DATA.MEAN, config.DATA.STD)])
