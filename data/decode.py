"""Reading images: Pillow's JPEG decoder (libjpeg-turbo), and for a random-resized crop only
the rows above the crop's bottom edge.

Why: decoding is the largest single cost of an ImageNet input pipeline (about 40% of a
worker's time with DeiT's augmentation, docs/DATA.md). Measured on 500x375 photos, Pillow's
decoder writes its 4-byte RGB pixels directly and is as fast as libjpeg-turbo through
torchvision's ``decode_jpeg`` (1.18 against 1.13 ms), whose 3-byte buffer costs another
0.2 ms to hand to Pillow; what the loaders of torchvision and timm add, ``convert("RGB")``,
copies an image that is already RGB. libjpeg decodes a JPEG top to bottom, one row at a time,
and every pixel of a row is final once the row is out (its chroma neighbours below are
read ahead), so a crop whose bottom edge is row r needs only rows 0..r-1: for DeiT's
random-resized crop of a 500x375 image, 88% of the rows on average, the same pixels.

``DATA.DECODER auto``: an RGB JPEG comes back as a ``DeferredJpeg``, its header read, its
pixels decoded when a transform first needs them: all of them (any Pillow operation calls
``load()``), or, in ``transforms.RowsRandomResizedCrop``, only ``rows(r)``. Greyscale, CMYK
and other formats are decoded and converted as Pillow does, at once. Decoding errors are
``UnreadableImage`` (an OSError with Pillow's message), so that the datasets can tell them
from a transform's own errors. ``DATA.DECODER pil`` is torchvision's loader as it is.
"""
from __future__ import annotations

import io
from typing import BinaryIO

from PIL import Image, ImageFile
from PIL.JpegImagePlugin import JpegImageFile

# What Pillow raises for data it cannot decode: truncated or garbage data (OSError), bad
# headers (ValueError, SyntaxError), decompression bombs (an Image.DecompressionBombError,
# raised when the header is read).
PILLOW_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImage(OSError):
    """A file whose header Pillow read but whose pixels it could not decode."""


class DeferredJpeg(JpegImageFile):
    """An RGB JPEG (Pillow's JpegImageFile, nothing added to its state) decoded on first use.

    ``rows(n)`` decodes into a new image only as far as row ``n`` and leaves this one as it
    was, so that the same file can be cropped again (or decoded whole) later. Those rows
    are those of the whole decode: libjpeg writes each output row once, in order."""

    def load(self):
        try:
            return super().load()
        except PILLOW_ERRORS as e:
            if isinstance(e, UnreadableImage):
                raise
            raise UnreadableImage(str(e)) from e

    def rows(self, n: int) -> Image.Image:
        """An image of this one's size whose rows 0..n-1 are decoded (the rest black)."""
        if not self.tile or n >= self.height:  # decoded already, or every row needed
            self.load()
            return self
        part = object.__new__(JpegImageFile)  # a copy of the unread state (Image.copy would decode)
        part.__dict__.update(self.__dict__)
        part.tile = [self.tile[0]._replace(extents=(0, 0, self.width, n))]
        try:
            ImageFile.ImageFile.load(part)
        except PILLOW_ERRORS:
            pass  # libjpeg's "too little data" when asked to finish early; any other error: below
        if part._im is None or not _row_written(part, n - 1):  # the decode stopped short
            self.load()  # raises Pillow's error for the file (or decodes it whole)
            return self
        return part


def _row_written(image: Image.Image, row: int) -> bool:
    """Whether the decoder reached ``row``: Pillow keeps RGB as 4 bytes a pixel, creates the
    image with the fourth byte 0 and JPEG decoding writes it 255."""
    return image._new(image._im.crop((0, row, 1, row + 1))).tobytes("raw", "RGBX")[3] == 255


def plain_rgb_jpeg(image: Image.Image) -> bool:
    """An opened (undecoded) image that is one RGB JPEG frame: what libjpeg decodes row by row
    and nvjpeg decodes (data/device_decode.py); not an MPO, greyscale or CMYK JPEG."""
    return type(image) is JpegImageFile and image.mode == "RGB" and len(image.tile) == 1


def _rgb(source: BinaryIO, fast: bool) -> Image.Image:
    image = Image.open(source)
    if not fast:
        return image.convert("RGB")
    if plain_rgb_jpeg(image):
        image.__class__ = DeferredJpeg  # decoded when a transform needs it
        return image
    image.load()  # decodes (the file may be closed after this)
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_rgb(data: bytes | bytearray, fast: bool = True) -> Image.Image:
    """An RGB PIL image from encoded bytes (``fast``: a DeferredJpeg for an RGB JPEG); raises
    what Pillow raises for unreadable data (``UnreadableImage`` when a DeferredJpeg decodes)."""
    return _rgb(io.BytesIO(data), fast)


def decode_whole(data: bytes | bytearray, fast: bool = True) -> Image.Image:
    """``decode_rgb``, every pixel decoded now (for a caller that reuses the image)."""
    image = decode_rgb(data, fast)
    image.load()
    return image


def load_rgb(path: str) -> Image.Image:
    """``DATA.DECODER auto``: the file's bytes read, a DeferredJpeg for an RGB JPEG, anything
    else decoded and converted to RGB now."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_rgb(data, fast=True)


def load_rgb_pil(path: str) -> Image.Image:
    """torchvision's default loader (``DATA.DECODER pil``): open and ``convert("RGB")``."""
    with open(path, "rb") as f:
        return _rgb(f, fast=False)
