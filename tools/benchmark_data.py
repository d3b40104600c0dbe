"""Images/s of the training input pipeline, ours against timm's, alternating in one process.

    python tools/benchmark_data.py [--cfg configs/vit/vit_small_patch16_224.yaml]
        [--root /tmp/vit-research-imagenet-like] [--workers 0 1 2] [--rounds 3] [--shards] [--pil]

Why: an 8-GPU ViT-S run eats thousands of images a second, and the loader workers that
decode and augment them are what a node runs out of first. This times one training epoch
(decode + the config's timm transforms as data/transforms.py builds them + collate, worker
start included) of our loader (``data.build_loaders``, the config's ImageFolder dataset)
against timm's ``create_dataset`` + ``create_loader`` with the same transform settings and
timm's defaults otherwise (uint8 batches normalised and randomly erased by its
``PrefetchLoader``, here on the CPU, persistent workers; with our posterize guard, without
which Pillow 13 stops timm's RandAugment too), one epoch of each in turn,
``utils.alternating_times``. ``--shards`` adds our loader reading the same images from
webdataset shards (``DATA.DATASET wds``, written once with tools/make_shards.py), ``--pil``
our loader with Pillow's decoder only (``DATA.DECODER pil``).

The first run writes an ImageFolder of ImageNet-like JPEGs (500x375, quality 90, smooth
colour fields plus grain, ~100 KB each) under ``--root`` and reuses it afterwards.
Repeated augmentation and mixing are off for both (they change neither the per-image
work nor, for mixing, the loader). The last line is
``loader img/s ours <x> timm <y> ratio <x/y>`` for the largest worker count.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # make_shards

from config import load_config  # noqa: E402
from data.transforms import guard_posterize  # noqa: E402
from errors import UserError, run_tool  # noqa: E402
from utils import alternating_times  # noqa: E402

SIZE = (500, 375)  # ImageNet's typical photo (its mean is about 470x390)


def make_imagenet_like(root: str, classes: int, train_per_class: int, val_per_class: int) -> None:
    """An ImageFolder of JPEGs that decode like photos: smooth colour fields (what JPEG
    compresses well) plus grain (what it does not), written once; a marker names the size."""
    from PIL import Image

    marker = os.path.join(root, "imagenet_like.json")
    spec = {"classes": classes, "train": train_per_class, "val": val_per_class, "size": list(SIZE), "quality": 90}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return
        raise UserError(f"{root} holds another generated set ({marker}): pass another --root or remove it")
    if os.path.exists(root) and os.listdir(root):
        raise UserError(f"{root} exists and is not a set this tool wrote: pass another --root")
    print(f"writing {classes * (train_per_class + val_per_class)} JPEGs to {root} (once)", flush=True)
    rng = np.random.default_rng(0)
    w, h = SIZE
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(SIZE, Image.BICUBIC)
                fine = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize(SIZE, Image.BILINEAR)
                pixels = 0.6 * np.asarray(coarse, np.float32) + 0.4 * np.asarray(fine, np.float32)
                pixels += rng.normal(0, 14, (h, w, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    os.path.join(folder, f"{split}_{c:03d}_{i:05d}.JPEG"), quality=90)
    with open(marker, "w") as f:
        json.dump(spec, f)


def ours_config(args, workers: int, dataset: str, path: str, *opts: str):
    return load_config(args.cfg, [
        "DATA.DATASET", dataset, "DATA.DATA_PATH", path, "DATA.NUM_WORKERS", str(workers),
        "DATA.BATCH_SIZE", str(args.batch_size), "DATA.REPEATED_AUG", "False",
        "MODEL.NUM_CLASSES", str(args.classes), "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", *opts])


def ours_epoch(config):
    """One epoch of our training loader per call, seeded as main.py seeds it."""
    from data import build_loaders

    loaders = build_loaders(config, rank=0, world_size=1)
    state = {"epoch": 0}

    def run() -> int:
        images = 0
        for x, _ in loaders.epoch(state["epoch"], config.SEED, rank=0):
            images += x.size(0)
        state["epoch"] += 1
        return images
    return run


def timm_epoch(config, root: str, workers: int):
    """One epoch of timm's loader per call, with our config's transform settings."""
    from timm.data import create_dataset, create_loader

    aug = config.AUG
    dataset = create_dataset("", root=root, split="train", is_training=True)
    loader = create_loader(
        dataset, input_size=(3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE),
        batch_size=config.DATA.BATCH_SIZE, is_training=True, scale=tuple(aug.SCALE), hflip=aug.HFLIP,
        color_jitter=aug.COLOR_JITTER or None,
        auto_augment=None if aug.AUTO_AUGMENT in ("", "none") else aug.AUTO_AUGMENT,
        interpolation=config.DATA.INTERPOLATION, mean=tuple(config.DATA.MEAN), std=tuple(config.DATA.STD),
        re_prob=aug.REPROB, re_mode=aug.REMODE, re_count=aug.RECOUNT, num_workers=workers,
        device=torch.device("cpu"), pin_memory=False)
    guard_posterize(loader.loader.dataset.transform)  # as ours: Pillow 13 refuses timm's 0-bit posterize

    def run() -> int:
        return sum(x.size(0) for x, _ in loader)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="configs/vit/vit_small_patch16_224.yaml", help="config whose DATA/AUG to use")
    p.add_argument("--root", default="/tmp/vit-research-imagenet-like", help="generated ImageFolder (written once)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--train-per-class", type=int, default=128, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs of each loader (alternating)")
    p.add_argument("--shards", action="store_true", help="also time our loader on webdataset shards of the set")
    p.add_argument("--pil", action="store_true", help="also time our loader with DATA.DECODER pil")
    args = p.parse_args(argv)

    make_imagenet_like(args.root, args.classes, args.train_per_class, args.val_per_class)
    shard_dir = os.path.join(args.root, "shards")
    if args.shards and not os.path.exists(os.path.join(shard_dir, "index.json")):
        from make_shards import write_shards
        write_shards(args.root, shard_dir, shard_size=256)
    images = args.classes * args.train_per_class
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{images} training images {SIZE[0]}x{SIZE[1]}, batch {args.batch_size}, config {args.cfg}, "
          f"{args.rounds} alternating rounds, img/s from the median epoch time", flush=True)
    extra = {name: opts for name, opts, on in
             (("shards", (), args.shards), ("pil", ("DATA.DECODER", "pil"), args.pil)) if on}
    print(f"{'workers':>7s} {'ours':>8s} {'timm':>8s} {'ratio':>6s}" + "".join(f" {n:>8s} {'/timm':>6s}" for n in extra),
          flush=True)
    rows = {}
    for workers in args.workers:
        fns = {"ours": ours_epoch(ours_config(args, workers, "imagenet", args.root)),
               "timm": timm_epoch(ours_config(args, workers, "imagenet", args.root), args.root, workers)}
        for name, opts in extra.items():
            fns[name] = ours_epoch(ours_config(args, workers, "wds" if name == "shards" else "imagenet",
                                               shard_dir if name == "shards" else args.root, *opts))
        counts = {name: fn() for name, fn in fns.items()}  # warm-up epoch; also the images per epoch
        times = alternating_times(fns, args.rounds, warmup=0)
        rate = {name: counts[name] / statistics.median(t) for name, t in times.items()}

        def to_timm(name: str) -> float:  # the median of the rounds' rate ratios
            return statistics.median((counts[name] / t) / (counts["timm"] / tt)
                                     for t, tt in zip(times[name], times["timm"]))
        ratio = to_timm("ours")
        row = f"{workers:>7d} {rate['ours']:8.1f} {rate['timm']:8.1f} {ratio:6.3f}"
        for name in extra:
            row += f" {rate[name]:8.1f} {to_timm(name):6.3f}"
        print(row, flush=True)
        rows[workers] = (rate["ours"], rate["timm"], ratio)
    ours, timm, ratio = rows[max(rows)]
    print(f"loader img/s ours {ours:.1f} timm {timm:.1f} ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    run_tool(main)
