"""Datasets on small data the tests make: JPEG folders, CIFAR's on-disk format, digits."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from config import load_config
from data import DataError, Digits, ShardedEvalSampler, build_loaders


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


def test_corrupt_image_names_the_file(tmp_path):
    root = make_image_folder(tmp_path)
    bad = root / "val" / "cat" / "0.jpg"
    bad.write_bytes(b"not a jpeg")
    loaders = build_loaders(folder_config(root), rank=0, world_size=1)
    with pytest.raises(DataError, match="cannot read image .*cat/0.jpg"):
        list(loaders.val)


def test_worker_error_reaches_the_main_process_as_one_line(tmp_path):
    """PyTorch re-raises a worker's exception with the worker's traceback in the message;
    DataError keeps only its own line, so main.py can print it as it is."""
    root = make_image_folder(tmp_path)
    (root / "train" / "dog" / "3.jpg").write_bytes(b"")
    loaders = build_loaders(folder_config(root, "DATA.NUM_WORKERS", "2"), rank=0, world_size=1)
    with pytest.raises(DataError) as info:
        list(loaders.train)
    assert str(info.value).startswith("cannot read image ") and "dog/3.jpg" in str(info.value)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


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


def test_cifar_on_disk_format(tmp_path, monkeypatch):
    """Files written in CIFAR-10's python format load through torchvision. torchvision checks
    the official MD5 sums, which generated files cannot match, so that check is bypassed."""
    import torchvision.datasets.cifar as cifar
    write_cifar10(tmp_path)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)
    cfg = load_config("configs/quickstart.yaml", ["DATA.DATASET", "cifar10", "DATA.DATA_PATH", str(tmp_path),
                                                  "DATA.IMG_SIZE", "32", "DATA.BATCH_SIZE", "5",
                                                  "DATA.DOWNLOAD", "False", "AUG.CROP_PAD", "4"])
    loaders = build_loaders(cfg, rank=0, world_size=1)
    assert len(loaders.train.dataset) == 20 and len(loaders.val.dataset) == 10
    images, _ = next(iter(loaders.train))
    assert images.shape == (5, 3, 32, 32)


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
