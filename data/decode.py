"""Reading images: Pillow's JPEG decoder (libjpeg-turbo), keeping the RGB image it decodes into.

Why: decoding is the largest single cost of an ImageNet input pipeline (about 40% of a
worker's time with DeiT's augmentation). Measured on 500x375 photos (docs/DATA.md), Pillow's
decoder writes its 4-byte RGB pixels directly and is as fast as libjpeg-turbo through
torchvision's ``decode_jpeg`` (1.18 against 1.13 ms); handing ``decode_jpeg``'s 3-byte
buffer to Pillow, which every later transform needs, costs another 0.2 ms, so that path (the
default before) was 1.17x slower. What the loaders of torchvision and timm add on
top, ``convert("RGB")``, copies an image that is already RGB: skipped here for RGB images
(``DATA.DECODER auto``), 1.05x faster, the same pixels. Greyscale, CMYK and other formats
are converted as Pillow converts them; errors (``OSError: image file is truncated``) are
Pillow's. ``DATA.DECODER pil`` is torchvision's loader as it is.
"""
from __future__ import annotations

import io
from typing import BinaryIO

from PIL import Image


def _rgb(source: BinaryIO, fast: bool) -> Image.Image:
    image = Image.open(source)
    if not fast:
        return image.convert("RGB")
    image.load()  # decodes (the file may be closed after this)
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_rgb(data: bytes | bytearray, fast: bool = True) -> Image.Image:
    """An RGB PIL image from encoded bytes; raises what Pillow raises for unreadable data."""
    return _rgb(io.BytesIO(data), fast)


def load_rgb(path: str) -> Image.Image:
    """torchvision's ImageFolder loader without its copy of an RGB image (``DATA.DECODER auto``)."""
    with open(path, "rb") as f:
        return _rgb(f, fast=True)


def load_rgb_pil(path: str) -> Image.Image:
    """torchvision's default loader (``DATA.DECODER pil``): open and ``convert("RGB")``."""
    with open(path, "rb") as f:
        return _rgb(f, fast=False)
