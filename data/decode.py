"""Reading images: the common JPEG through libjpeg-turbo straight into the image buffer.

Why: decoding is the largest single cost of an ImageNet input pipeline (about a third of a
worker's time with DeiT's augmentation). Pillow's loader decodes into its own buffer and
``convert("RGB")`` copies it; TorchCodec's ``decode_jpeg`` (or torchvision's, which 0.29
deprecated in TorchCodec's favour) writes the RGB pixels once, 1.2x faster on 500x375
photos (BENCHMARKS.md, "Input pipeline"). Both are libjpeg-turbo with the same settings, so
the pixels are the same bytes (tests/test_data.py checks it). Only 3-channel JPEGs take
that path: greyscale and CMYK JPEGs, other formats, and any file the fast decoder refuses
go through Pillow, whose conversions and error messages (``OSError: image file is
truncated``) stay those of the rest of the framework. ``DATA.DECODER pil`` turns it off.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Callable, Optional

import torch
from PIL import Image


def _find_decoder() -> tuple[Optional[Callable], str]:
    try:
        from torchcodec.decoders import decode_jpeg
        return decode_jpeg, "torchcodec"
    except Exception:  # not installed, or built for another torch: not an error, just slower
        pass
    try:
        from torchvision.io import decode_jpeg as deprecated

        def decode_jpeg(data: torch.Tensor) -> torch.Tensor:
            with warnings.catch_warnings():  # deprecated in 0.29 for TorchCodec: said once, in the docs
                warnings.simplefilter("ignore", DeprecationWarning)
                return deprecated(data)
        return decode_jpeg, "torchvision"
    except Exception:
        return None, "pil"


_DECODE_JPEG, FAST_DECODER = _find_decoder()


def _pil(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    return image.convert("RGB")


def decode_rgb(data: bytes | bytearray, fast: bool = True) -> Image.Image:
    """An RGB PIL image from encoded bytes; raises what Pillow raises for unreadable data."""
    if not fast or _DECODE_JPEG is None:
        return _pil(data)
    header = Image.open(io.BytesIO(data))  # reads the header only
    if header.format != "JPEG" or header.mode != "RGB":
        return header.convert("RGB")
    try:
        pixels = _DECODE_JPEG(torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data),
                                               dtype=torch.uint8))
    except Exception:
        return _pil(data)  # Pillow's verdict and message (a truncated file raises OSError there)
    if pixels.dim() != 3 or pixels.size(0) != 3:
        return _pil(data)
    hwc = pixels.permute(1, 2, 0).contiguous()  # the decoder's own HWC buffer (its CHW is a view of it)
    return Image.frombuffer("RGB", (hwc.size(1), hwc.size(0)), hwc.numpy(), "raw", "RGB", 0, 1)


def read_file(path: str) -> bytearray:
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(data)
    return data


def load_rgb(path: str) -> Image.Image:
    """torchvision's ImageFolder loader with the fast JPEG path (``decode_rgb``)."""
    return decode_rgb(read_file(path))


def load_rgb_pil(path: str) -> Image.Image:
    """Pillow only (``DATA.DECODER pil``): torchvision's default loader."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")
