"""The faster input pipeline changes speed, not images: the fast JPEG path decodes the same
pixels as Pillow, the fused ToTensor + Normalize gives the same values, and timm's
posterize keeps working with Pillow 13 (tools/benchmark_data.py measures the speed)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp
from torchvision import transforms as T

from config import load_config
from data.decode import FAST_DECODER, decode_rgb
from data.transforms import ToNormalizedTensor, build_transform, guard_posterize


def encoded(mode: str, fmt: str, seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    pixels = rng.integers(0, 255, (37, 53, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    if mode == "CMYK":
        image = Image.frombytes("CMYK", (53, 37), pixels.tobytes())
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt, save", [("RGB", "JPEG", {"quality": 90}), ("RGB", "JPEG", {"progressive": True}),
                                             ("RGB", "JPEG", {"subsampling": 0}), ("L", "JPEG", {}),
                                             ("CMYK", "JPEG", {}), ("RGB", "PNG", {})])
def test_fast_decoder_gives_pillows_pixels(mode, fmt, save):
    data = encoded(mode, fmt, **save)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for fast in (True, False):
        got = decode_rgb(data, fast)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)


def test_unreadable_bytes_raise_what_pillow_raises():
    data = encoded("RGB", "JPEG")
    for bad in (data[: len(data) // 2], data[:40], b"", b"not an image"):
        errors = []
        for fast in (True, False):
            with pytest.raises(OSError) as info:
                decode_rgb(bad, fast)
            errors.append((type(info.value), str(info.value).split(" <")[0]))
        assert errors[0] == errors[1]


def test_the_fast_decoder_is_in_use_where_installed():
    import torchvision.io
    shipped = hasattr(torchvision.io, "decode_jpeg")  # deprecated in 0.29, to be removed
    assert FAST_DECODER in ({"torchcodec", "torchvision"} if shipped else {"torchcodec", "pil"})


def test_fused_normalize_matches_to_tensor_and_normalize():
    image = Image.open(io.BytesIO(encoded("RGB", "PNG")))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = T.Normalize(mean, std)(T.ToTensor()(image))
    got = ToNormalizedTensor(mean, std)(image)
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    cfg = load_config("configs/vit/vit_small_patch16_224.yaml", ["DATA.DATA_PATH", "/tmp"])
    for train in (True, False):
        names = [type(t).__name__ for t in build_transform(cfg, train).transforms]
        assert "ToNormalizedTensor" in names and "Normalize" not in names and "MaybeToTensor" not in names


def test_posterize_to_zero_bits_gives_a_black_image_instead_of_failing():
    """RandAugment 'inc1' at magnitude 10 (reached with mstd) keeps 0 bits; Pillow 13 refuses
    that, which stopped DeiT-recipe epochs at about one image in 700."""
    image = Image.open(io.BytesIO(encoded("RGB", "PNG")))
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    try:
        op(image)
    except ValueError:
        pass  # the Pillow this guards against
    guard_posterize(T.Compose([type("Ops", (), {"ops": [op]})()]))
    assert np.asarray(op(image)).max() == 0
    cfg = load_config("configs/vit/vit_small_patch16_224.yaml",
                      ["DATA.DATA_PATH", "/tmp", "AUG.AUTO_AUGMENT", "rand-m10-n4-inc1"])
    transform = build_transform(cfg, train=True)
    for _ in range(60):  # 4 ops at magnitude 10: posterize to 0 bits in about one call in 4
        transform(image)
