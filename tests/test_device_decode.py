"""DATA.DECODER nvjpeg (data/device_decode.py) on the CPU: the crops, flips and pixels of the
Pillow path, its refusals, unreadable files, and a run through main.py."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from config import ConfigError, load_config
from data import DataError, build_loaders
from data.decode import load_rgb
from data.device_decode import PlanCrop, decode_batch, read_encoded
from data.transforms import build_transform

from tests.conftest import ENV, QUICK, folder_args, image_tree, main_here, truncate

pytestmark = pytest.mark.usefixtures("one_thread")

# the images of a photo-like test: a gradient with noise, JPEG-compressed; two RGB JPEG
# shapes each way round, a greyscale JPEG and a PNG (decoded by Pillow in the worker)
SHAPES = [(64, 48, "RGB", "jpg"), (100, 75, "RGB", "jpg"), (48, 64, "RGB", "jpg"), (75, 100, "RGB", "jpg"),
          (64, 48, "L", "jpg"), (100, 75, "RGB", "png")]


def photos(root):
    rng = np.random.default_rng(0)
    paths = []
    for k, (w, h, mode, ext) in enumerate(SHAPES):
        pixels = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None] * np.ones(3)
        pixels = (pixels + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
        paths.append(str(root / f"{k}.{ext}"))
        Image.fromarray(pixels).convert(mode).save(paths[-1])
    return paths


@pytest.mark.parametrize("train,interpolation,size", [(True, "bicubic", 40), (True, "bilinear", 56),
                                                      (False, "bicubic", 56), (False, "bilinear", 40)])
def test_device_decoding_draws_and_crops_as_the_pillow_path(tmp_path, train, interpolation, size):
    """For the same seed the workers draw timm's crop boxes and flips (the same random calls,
    so the next draws match too) and the batch decoded from the files is the Pillow path's
    within the resize's rounding: libjpeg-turbo's pixels bit for bit, then torch's
    antialiased float resize against Pillow's 8-bit two-pass one (measured: means 0.18-0.21
    levels, at most 4 with bicubic and 1 with bilinear on these images)."""
    paths = photos(tmp_path)
    opts = ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(tmp_path), "DATA.IMG_SIZE", str(size),
            "DATA.INTERPOLATION", interpolation, "AUG.HFLIP", "0.5",
            "TEST.CROP_PCT", "0.875", "TEST.RESIZE", "shorter"]
    pillow = build_transform(load_config(QUICK, opts), train)
    plan = build_transform(load_config(QUICK, opts + ["DATA.DECODER", "nvjpeg"]), train)
    assert isinstance(plan, PlanCrop)
    boxes = []
    if train:
        draw = pillow.transforms[0].get_params
        pillow.transforms[0].get_params = lambda *args: boxes.append(draw(*args)) or boxes[-1]
    random.seed(3), torch.manual_seed(3)
    expected = torch.stack([pillow(load_rgb(p)) for _ in range(3) for p in paths])
    after = (random.random(), torch.rand(1))
    random.seed(3), torch.manual_seed(3)
    records = [plan(read_encoded(p)) for _ in range(3) for p in paths]
    assert (random.random(), torch.rand(1)) == after
    assert [r.jpeg for r in records[:len(SHAPES)]] == [True] * 4 + [False] * 2
    if train:
        assert [tuple(r.box) for r in records] == boxes and any(r.flip for r in records) and \
            not all(r.flip for r in records)
    for record in records[:4]:  # the decode: bit-identical on the CPU
        assert torch.equal(decode_jpeg(record.data).permute(1, 2, 0),
                           torch.from_numpy(np.array(Image.open(record.path))))
    images = decode_batch(records, "cpu")
    assert images.dtype == torch.uint8 and images.shape == expected.shape == (3 * len(SHAPES), 3, size, size)
    diff = (images.int() - expected.int()).abs()
    assert diff.float().mean() < 0.5 and diff.max() <= (4 if interpolation == "bicubic" else 1), \
        (diff.float().mean(), diff.max())


@pytest.mark.parametrize("opts,key", [
    (["AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1"], "AUG.AUTO_AUGMENT"),
    (["AUG.TRAIN_CROP", "auto"], "AUG.TRAIN_CROP"),  # the quickstart's 8 px: the small-image recipe
    (["DATA.DATASET", "digits"], "DATA.DECODER"),
])
def test_nvjpeg_refuses_what_needs_pillow_images(tmp_path, opts, key):
    folder = [] if "digits" in opts else ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(tmp_path)]
    with pytest.raises(ConfigError) as info:
        load_config(QUICK, [*folder, "AUG.TRAIN_CROP", "rrc", "DATA.DECODER", "nvjpeg", *opts])
    message = str(info.value)
    assert f": {key}: " in message and "DATA.DECODER auto" in message and "\n" not in message, message


def test_a_jpeg_the_device_cannot_decode(tmp_path):
    """A truncated JPEG (its header reads): an error naming the file; with
    DATA.SKIP_BAD_IMAGES counted, replaced in training by the next image of its batch, dropped
    in evaluation."""
    root = image_tree(tmp_path / "data", per_class=(4, 2), size=12)
    truncate(root / "train" / "cat" / "1.jpg")
    truncate(root / "val" / "dog" / "0.jpg")
    opts = ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(root), "MODEL.NUM_CLASSES", "3", "DATA.BATCH_SIZE", "4",
            "DATA.DECODER", "nvjpeg", "AUG.TRAIN_CROP", "rrc"]
    loaders = build_loaders(load_config(QUICK, opts), rank=0, world_size=1)
    with pytest.raises(DataError, match=f"cannot read image {root}/val/dog/0.jpg: .*DATA.SKIP_BAD_IMAGES"):
        list(loaders.val)
    loaders = build_loaders(load_config(QUICK, opts + ["DATA.SKIP_BAD_IMAGES", "True"]), rank=0, world_size=1)
    sizes = [len(y) for x, y in loaders.val]
    batches = list(loaders.epoch(0, 0, 0))
    assert sum(sizes) == 5 and [len(y) for _, y in batches] == [4, 4, 4]
    assert all(x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 for x, _ in batches)
    assert loaders.skipped_images(ENV) == [
        f"train: skipped 1 unreadable image(s) (replaced by the next readable image), first: {root}/train/cat/1.jpg",
        f"val: skipped 1 unreadable image(s) (not counted), first: {root}/val/dog/0.jpg"]


def test_training_with_device_decoding(tmp_path, capsys):
    """One epoch of the quickstart ViT on an image folder, decoded by DATA.DECODER nvjpeg."""
    root = image_tree(tmp_path / "data", size=12)
    result = main_here(capsys, *folder_args(root, "DATA.DECODER", "nvjpeg", "AUG.TRAIN_CROP", "rrc",
                                            "AUG.HFLIP", "0.5"), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on 6 images" in result.stdout
