"""Datasets and loaders: ImageFolder, CIFAR and digits on their real on-disk layouts, decoding,
uint8 batches normalised and erased on the device, bad folders and unreadable images (one line, or skipped and counted)."""
from __future__ import annotations

import io
import json
import pickle
import random
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from config import load_config
from data import build_loaders, DataError, Digits, ShardedEvalSampler
from data.decode import DeferredJpeg, UnreadableImage, decode_rgb, decode_whole
from data.transforms import build_transform, decode_rows, guard_posterize, RowsRandomResizedCrop, ToUint8Tensor

from tests.conftest import (ENV, QUICK, RUN, assert_untouched, folder_args, image_tree, last_acc, main_here,
                            one_error_line, previous_run, run_cmd, run_main, truncate)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each


# -------------------------------------------------------------------------------- data
def _no_val(root):
    shutil.rmtree(image_tree(root) / "val")


def _empty(root):
    root.mkdir()


def _no_images(root):
    image_tree(root)
    for path in (root / "train").rglob("*.jpg"):
        path.unlink()


def _classes_differ(root):
    image_tree(root)
    (root / "val" / "eel").rename(root / "val" / "emu")


@pytest.mark.parametrize("make, needles", [
    (_no_val, ["dataset folder not found", "val/ is missing"]),
    (_empty, ["dataset folder not found", "needs train/ and val/"]),
    (_no_images, ["train: Found no valid file for the classes cat, dog, eel"]),
    (_classes_differ, ["class folders of train/ and val/ differ: val lacks: eel; val has extra: emu"]),
], ids=["no val folder", "empty folder", "no images", "classes differ"])
def test_bad_dataset_folder(tmp_path, out_dir, capsys, make, needles):
    """main.main in this process (the same code path as the command, without paying for
    the imports again): exit code 2 and one line; the earlier run's files keep their bytes."""
    import main
    root = tmp_path / "data"
    make(root)
    argv = folder_args(root, "DATA.NUM_WORKERS", "0") + ["--output", str(out_dir)]
    before = previous_run(out_dir, argv)
    code = main.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert_untouched(before)


def test_unreadable_image_in_a_worker_is_one_line(tmp_path, out_dir):
    """DATA.SKIP_BAD_IMAGES off: the error raised inside a DataLoader worker process (which
    PyTorch re-raises with the worker's traceback in the message) still ends the run with
    one line naming the file (data.DataError keeps only its own line)."""
    root = image_tree(tmp_path / "data")
    (root / "train" / "dog" / "1.jpg").write_bytes(b"not a jpeg at all")
    result = run_main(*folder_args(root, "DATA.NUM_WORKERS", "2"), "--output", str(out_dir))
    line = one_error_line(result)
    assert "cannot read image" in line and "dog/1.jpg" in line and "DATA.SKIP_BAD_IMAGES" in line


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_counted_with_workers(tmp_path, out_dir):
    """DATA.SKIP_BAD_IMAGES on, two loader workers: the epoch completes, and the log names
    how many distinct files each split skipped and the first of them. Training replaces a
    bad image; validation drops it: the accuracy is over the 5 readable images of 6."""
    root = image_tree(tmp_path / "data")  # 12 training images = 3 full batches of 4
    (root / "train" / "cat" / "2.jpg").write_bytes(b"garbage")
    truncate(root / "train" / "eel" / "0.jpg")
    truncate(root / "val" / "dog" / "1.jpg")
    result = run_main(*folder_args(root, "DATA.NUM_WORKERS", "2", "DATA.SKIP_BAD_IMAGES", "True"),
                      "--output", str(out_dir), "--tag", "skip")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out_dir / RUN / "skip" / "log_rank0.txt").read_text()
    assert (f"Epoch 0: train: skipped 2 unreadable image(s) (replaced by the next readable image), "
            f"first: {root}/train/cat/2.jpg") in log
    assert f"Epoch 0: val: skipped 1 unreadable image(s) (not counted), first: {root}/val/dog/1.jpg" in log
    assert "on 5 images" in log and "on 6 images" not in log
    record = json.loads((out_dir / RUN / "skip" / "metrics.jsonl").read_text())
    assert 0 <= record["val_acc1"] <= 100 and (record["val_acc1"] * 5 / 100) % 1 < 1e-6  # k of 5 right
    # evaluated on two processes: the same 5 images, the one skipped file counted once
    ev = run_cmd(["bash", "evaluate.sh", "2", QUICK, str(out_dir / RUN / "skip" / "ckpt_epoch_0.pth"),
                  "--data-path", str(root), "--output", str(out_dir), "--opts", "DATA.DATASET", "folder",
                  "MODEL.NUM_CLASSES", "3", "DATA.BATCH_SIZE", "4", "DATA.SKIP_BAD_IMAGES", "True"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert last_acc(ev.stdout) == (pytest.approx(record["val_acc1"]), pytest.approx(100.0), 5)
    assert f"val: skipped 1 unreadable image(s) (not counted), first: {root}/val/dog/1.jpg" in ev.stdout


def test_skipping_keeps_batches_full_and_order_deterministic(tmp_path):
    """A bad file is replaced by the next readable one: full batches (equal step counts on
    every rank), the same batches for the same seed, a count reset by each report."""
    from config import load_config
    from data import build_loaders
    root = image_tree(tmp_path / "data")
    (root / "train" / "cat" / "0.jpg").write_bytes(b"")
    truncate(root / "train" / "cat" / "1.jpg")
    cfg = load_config(QUICK, ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(root), "MODEL.NUM_CLASSES", "3",
                              "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "2", "DATA.SKIP_BAD_IMAGES", "True"])
    epochs = []
    for _ in range(2):
        loaders = build_loaders(cfg, rank=0, world_size=1)
        loaders.generator.manual_seed(7)
        loaders.train.sampler.set_epoch(0)
        epochs.append([(x.clone(), y.clone()) for x, y in loaders.train])
        assert loaders.skipped_images(ENV) == [f"train: skipped 2 unreadable image(s) (replaced by the next "
                                               f"readable image), first: {root}/train/cat/0.jpg"]
        assert loaders.skipped_images(ENV) == []
    assert [y.numel() for _, y in epochs[0]] == [4, 4, 4]
    for (x0, y0), (x1, y1) in zip(*epochs):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    dataset = loaders.train.dataset  # the quickstart's training transform is not random
    assert dataset[0][1] == dataset[1][1] == 0 and torch.equal(dataset[0][0], dataset[2][0])  # cat/2 stands in


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    result = main_here(capsys, "--cfg", QUICK, "--data-path", str(tmp_path / "nowhere"), "--opts",
                      "DATA.DATASET", "imagenet")
    assert result.returncode == 2
    assert "DATA.DATA_PATH: dataset folder not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def encoded(mode: str, fmt: str, seed: int = 0, size: tuple[int, int] = (53, 37), **save) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    if mode == "CMYK":
        image = Image.frombytes("CMYK", size, pixels.tobytes())
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt, save", [("RGB", "JPEG", {"quality": 90}), ("RGB", "JPEG", {"progressive": True}),
                                             ("RGB", "JPEG", {"subsampling": 0}), ("L", "JPEG", {}),
                                             ("CMYK", "JPEG", {}), ("RGB", "PNG", {})])
def test_fast_decoder_gives_pillows_pixels(mode, fmt, save):
    """Decoded whole, or only down to a random-resized crop's bottom edge (an RGB JPEG is a
    DeferredJpeg): the pixels and the random crops of Pillow's open + convert and timm's RRC."""
    data = encoded(mode, fmt, **save)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for fast in (True, False):
        got = decode_rgb(data, fast)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)
    assert isinstance(decode_rgb(data), DeferredJpeg) == ((mode, fmt) == ("RGB", "JPEG"))
    timm_rrc = RandomResizedCropAndInterpolation(24, scale=(0.08, 1.0), interpolation="random")
    rows_rrc = decode_rows(T.Compose([timm_rrc])).transforms[0]
    assert isinstance(rows_rrc, RowsRandomResizedCrop)
    for seed in range(12):
        random.seed(seed)
        crop = np.asarray(timm_rrc(Image.fromarray(want)))
        random.seed(seed)
        assert np.array_equal(np.asarray(rows_rrc(decode_rgb(data))), crop)


def test_unreadable_bytes_raise_what_pillow_raises():
    """The same error as torchvision's loader, when the header is read or (a DeferredJpeg)
    decoded; a file cut short below a crop still gives that crop's rows."""
    data = encoded("RGB", "JPEG", size=(40, 200))
    for bad in (data[: len(data) // 2], data[:40], b"", b"not an image"):
        errors = []
        for fast in (True, False):
            with pytest.raises(OSError) as info:
                decode_whole(bad, fast)
            errors.append(str(info.value).split(" <")[0])
        assert errors[0] == errors[1]
    half = decode_rgb(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match="image file is truncated"):
        half.rows(150)  # below the cut
    whole = np.asarray(decode_rgb(data))
    assert np.array_equal(np.asarray(half.rows(40))[:40], whole[:40])


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_batches_normalised_on_the_device_are_the_float_paths(tmp_path, workers):
    """The workers send CHW uint8 (data/device.py normalises): for a fixed seed, erasing off,
    a training and a validation batch equal those of the former path (torchvision's ToTensor
    + Normalize in the worker) within 1e-6."""
    root = make_image_folder(tmp_path)
    opts = ["DATA.IMG_SIZE", "24", "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1", "AUG.REPROB", "0.0",
            "DATA.NUM_WORKERS", str(workers)]
    cfg = folder_config(root, *opts)
    new, old = (build_loaders(cfg, rank=0, world_size=1) for _ in range(2))
    raw, _ = next(iter(new.train.loader))
    assert raw.dtype == torch.uint8 and raw.shape == (4, 3, 24, 24)
    for loader in (old.train, old.val):  # the former path: float tensors from the workers
        steps = loader.dataset.transform.transforms
        assert isinstance(steps[-1], ToUint8Tensor)
        steps[-1:] = [T.ToTensor(), T.Normalize(cfg.DATA.MEAN, cfg.DATA.STD)]
    for first in (lambda loaders: loaders.epoch(1, 5, 0), lambda loaders: loaders.val):  # each seeds as it starts
        (x, y), (x_old, y_old) = next(iter(first(new))), next(iter(first(old)))
        assert x.dtype == torch.float32 and x.is_contiguous() and torch.equal(y, y_old)
        assert torch.allclose(x, x_old, atol=1e-6, rtol=0)


def test_an_epochs_augmentation_follows_its_batches_not_the_workers(tmp_path):
    """Random-resized crops, flips, RandAugment (seeded per batch in whichever process makes
    it, data.samplers.SeededBatches) and random erasing (per batch on the device): an epoch is
    the same with 0 and 2 loader workers, one resumed after its first batch continues it
    exactly, and the next epoch differs."""
    root = make_image_folder(tmp_path)
    opts = ["DATA.IMG_SIZE", "24", "AUG.TRAIN_CROP", "rrc", "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1",
            "AUG.REPROB", "0.5", "AUG.REMODE", "pixel"]
    epochs = {}
    for workers in (2, 0):
        loaders = build_loaders(folder_config(root, *opts, "DATA.NUM_WORKERS", str(workers)), rank=0, world_size=1)
        whole = [x for x, _ in loaders.epoch(2, 5, 0)]
        rest = [x for x, _ in loaders.epoch(2, 5, 0, skip=1)]
        assert len(rest) == len(whole) - 1 and all(torch.equal(a, b) for a, b in zip(whole[1:], rest))
        epochs[workers] = whole
    assert all(torch.equal(a, b) for a, b in zip(epochs[0], epochs[2]))
    assert not torch.equal(whole[0], whole[1]) and not torch.equal(whole[1], [x for x, _ in loaders.epoch(3, 5, 0)][1])


def test_every_transform_ends_in_uint8():
    cfg = load_config("configs/vit/vit_small_patch16_224.yaml", ["DATA.DATA_PATH", "/tmp"])
    image = Image.open(io.BytesIO(encoded("RGB", "PNG")))
    for train in (True, False):
        transform = build_transform(cfg, train)
        names = [type(t).__name__ for t in transform.transforms]
        assert names[-1] == "ToUint8Tensor" and "Normalize" not in names and "RandomErasing" not in names
        out = transform(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)


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


def make_image_folder(root, classes=("cat", "dog", "eel"), per_class=(6, 2), size=40):
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def folder_config(root, *opts):
    return load_config("configs/quickstart.yaml", ["DATA.DATASET", "imagenet", "DATA.DATA_PATH", str(root),
                                                   "MODEL.NUM_CLASSES", "3", "DATA.IMG_SIZE", "32",
                                                   "DATA.BATCH_SIZE", "4", *opts])


def test_image_folder_tree_loads_through_timm_transforms(tmp_path):
    root = make_image_folder(tmp_path)
    cfg = folder_config(root, "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1", "AUG.REPROB", "0.25",
                        "AUG.MIXUP", "0.8", "AUG.CUTMIX", "1.0")
    loaders = build_loaders(cfg, rank=0, world_size=1)
    images, targets = next(iter(loaders.train))
    assert images.shape == (4, 3, 32, 32) and targets.dtype == torch.int64
    mixed, soft = loaders.mixup(images, targets)
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
    val_images, _ = next(iter(loaders.val))
    assert val_images.shape[1:] == (3, 32, 32)


def test_mismatched_class_folders_and_class_count(tmp_path):
    root = make_image_folder(tmp_path)
    (root / "val" / "eel").rename(root / "val" / "emu")
    with pytest.raises(DataError, match="class folders of train/ and val/ differ: val lacks: eel; "
                                        "val has extra: emu$"):
        build_loaders(folder_config(root), rank=0, world_size=1)
    # a class missing from val/ is reported as such, not as a wrong MODEL.NUM_CLASSES
    shutil.rmtree(root / "val" / "emu")
    with pytest.raises(DataError, match="differ: val lacks: eel$"):
        build_loaders(folder_config(root), rank=0, world_size=1)
    (root / "val" / "eel").mkdir()
    (root / "train" / "eel" / "0.jpg").rename(root / "val" / "eel" / "0.jpg")
    with pytest.raises(DataError, match="set MODEL.NUM_CLASSES 3"):
        build_loaders(folder_config(root, "MODEL.NUM_CLASSES", "5"), rank=0, world_size=1)


@pytest.mark.parametrize("class_map, expected", [
    (None, "val has 3 class folders (cat, dog, eel) but the model has 12 classes: the folder's classes must be "
           "the model's; to evaluate on some of them, name the model's classes in DATA.CLASS_MAP"),
    (["ant", "bee", "cat", "cow", "dog", "elk", "emu", "eel", "fox", "gnu", "hen", "owl"], {"cat": 2, "dog": 4, "eel": 7}),
    (["ant", "bee", "cat", "cow", "dog"], "class folders not in DATA.CLASS_MAP"),
    (["10", "cat"], "classes.txt: class 'cat' has index 1, not one of the model's 0..0"),
], ids=["no class list", "class map", "class missing from the map", "map of another size"])
def test_evaluating_on_some_of_the_models_classes_needs_their_names(tmp_path, class_map, expected):
    """--eval of a 12-class model on a val/ with 3 class folders: with DATA.CLASS_MAP naming
    the model's classes each folder is labelled by its name's place in it (the accuracy is
    over those images); without, one line saying the folder's classes must be the model's
    (not 'set MODEL.NUM_CLASSES 3', which then fails to load the 12-class weights)."""
    from errors import UserError
    root = make_image_folder(tmp_path / "data", per_class=(0, 1))
    opts = ["MODE", "eval", "MODEL.NUM_CLASSES", "12" if class_map != ["10", "cat"] else "1"]
    if class_map is not None:
        (tmp_path / "classes.txt").write_text("\n".join(class_map) + "\n")
        opts += ["DATA.CLASS_MAP", str(tmp_path / "classes.txt")]
    cfg = folder_config(root, *opts)
    if isinstance(expected, str):
        with pytest.raises(UserError, match=re.escape(expected)):
            build_loaders(cfg, rank=0, world_size=1, train=False)
        return
    dataset = build_loaders(cfg, rank=0, world_size=1, train=False).val.dataset
    assert {folder: dataset.class_to_idx[folder] for folder in dataset.classes} == expected
    assert sorted(target for _, target in dataset.samples) == [2, 4, 7] and dataset.class_names == class_map


def test_corrupt_image_names_the_file(tmp_path):
    root = make_image_folder(tmp_path)
    bad = root / "val" / "cat" / "0.jpg"
    bad.write_bytes(b"not a jpeg")
    loaders = build_loaders(folder_config(root), rank=0, world_size=1)
    with pytest.raises(DataError, match="cannot read image .*cat/0.jpg"):
        list(loaders.val)


def write_cifar10(root, n_train=20, n_test=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    def batch(n):
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                "labels": rng.integers(0, 10, n).tolist()}
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train // 5), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


@pytest.mark.parametrize("cfg_file, opts, size", [
    ("configs/quickstart.yaml", ["DATA.DATASET", "cifar10", "DATA.IMG_SIZE", "32", "AUG.CROP_PAD", "4"], 32),
    ("configs/transfer/deit_small_cifar10.yaml", ["DATA.NUM_WORKERS", "0"], 224),
], ids=["at 32", "transfer at 224"])
def test_cifar_on_disk_format(tmp_path, monkeypatch, cfg_file, opts, size):
    """Files written in CIFAR-10's python format load through torchvision, at 32 x 32 or
    upsampled to the 224 x 224 of the transfer recipes (configs/transfer/). torchvision checks
    the official MD5 sums, which generated files cannot match, so that check is bypassed."""
    import torchvision.datasets.cifar as cifar
    write_cifar10(tmp_path)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)
    cfg = load_config(cfg_file, [*opts, "DATA.DATA_PATH", str(tmp_path), "DATA.BATCH_SIZE", "4",
                                 "DATA.DOWNLOAD", "False"])
    loaders = build_loaders(cfg, rank=0, world_size=1)
    assert len(loaders.train.dataset) == 20 and len(loaders.val.dataset) == 10
    images, _ = next(iter(loaders.train))
    assert images.shape == (4, 3, size, size)
    images, _ = next(iter(loaders.val))
    assert images.shape == (4, 3, size, size)


def test_missing_cifar_says_where_to_put_it(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["DATA.DATASET", "cifar100", "DATA.DATA_PATH", str(tmp_path),
                                                  "DATA.DOWNLOAD", "False", "MODEL.NUM_CLASSES", "100"])
    with pytest.raises(DataError, match="cifar-100-python/ exists"):
        build_loaders(cfg, rank=0, world_size=1)


def test_digits_split_is_fixed_and_stratified():
    train, val = Digits(train=True), Digits(train=False)
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert np.bincount(val.targets).min() >= 35  # every class present in proportion
    assert Digits(train=False).targets == val.targets
    image, label = train[0]
    assert image.size == (8, 8) and image.mode == "RGB" and 0 <= label < 10


@pytest.mark.parametrize("length, world", [(10, 3), (7, 2), (360, 8), (2, 4)])
def test_sharded_eval_sampler_covers_every_image_once(length, world):
    seen = sorted(i for r in range(world) for i in ShardedEvalSampler(length, r, world))
    assert seen == list(range(length))
