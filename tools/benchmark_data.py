"""Images/s of the training input pipeline, ours against timm's, alternating in one process,
and where each one's time goes, stage by stage.

    python tools/benchmark_data.py [--cfg configs/vit/vit_small_patch16_224.yaml]
        [--root /tmp/vit-research-imagenet-like] [--workers 0 1 2] [--rounds 3] [--stages 40]
        [--shards] [--pil]

Why: an 8-GPU ViT-S run eats thousands of images a second, and the loader workers that
decode and augment them are what a node runs out of first. First the stages (``--stages N``
images, 0: none): per image, ours and timm's, one thread, alternating rounds seeded alike:
decode (the whole image), decode + crop + resize (ours decodes only the rows above the crop),
crop + resize alone, flip, RandAugment, to a uint8 tensor, collate, the worker -> main
process transfer, normalisation and random erasing (the last two as the main process runs
them on the CPU). Then one training epoch per round (decode + the config's timm transforms
as data/transforms.py builds them + collate + the main process's normalisation and erasing,
worker start included) of our loader (``data.build_loaders``, the config's ImageFolder
dataset, on the CPU) against timm's ``create_dataset`` + ``create_loader`` with the same
transform settings and timm's defaults otherwise (uint8 batches normalised and randomly
erased by its ``PrefetchLoader``, here on the CPU, persistent workers; with our posterize
guard, without which Pillow 13 stops timm's RandAugment too), one epoch of each in turn,
``utils.alternating_times``; per worker count the median img/s and ratio, and the slowest
and fastest round's (``--workers`` with no counts: the stages only). ``--shards`` adds our
loader reading the same images from webdataset shards (``DATA.DATASET wds``, written once
with tools/make_shards.py), ``--pil`` our loader with torchvision's image loader
(``DATA.DECODER pil``).

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
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # make_shards

from config import load_config  # noqa: E402
from data.transforms import guard_posterize  # noqa: E402
from errors import UserError, run_tool  # noqa: E402
from utils import alternating_times  # noqa: E402

SIZE = (500, 375)  # ImageNet's typical photo (its mean is about 470x390)
# stages shown apart that "decode + crop + resize (RRC)" times together (ours decodes only the
# rows above the crop, data/decode.py)
PARTS = ("decode (whole image)", "crop + resize (RRC)")


def imagenet_like_jpeg(rng: np.random.Generator, size: tuple[int, int] = SIZE) -> bytes:
    """One JPEG (quality 90) that decodes like a photo: smooth colour fields (what JPEG
    compresses well) plus grain (what it does not)."""
    import io

    from PIL import Image

    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    pixels = 0.6 * np.asarray(coarse, np.float32) + 0.4 * np.asarray(fine, np.float32)
    pixels += rng.normal(0, 14, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_imagenet_like(root: str, classes: int, train_per_class: int, val_per_class: int) -> None:
    """An ImageFolder of ``imagenet_like_jpeg`` files, written once; a marker names the size."""
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
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                with open(os.path.join(folder, f"{split}_{c:03d}_{i:05d}.JPEG"), "wb") as f:
                    f.write(imagenet_like_jpeg(rng))
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


def _pair_ms(mine, theirs, items, rounds: int = 3) -> tuple[float, float]:
    """Mean ms (what sets a worker's rate; RandAugment's ops differ 10x in cost) of ``mine``
    and ``theirs`` over ``items``, alternating rounds, each round seeded alike (the same
    random crops, flips and RandAugment draws for both), after a round untimed (the first
    pass over the files, the first calls of a code path)."""
    import random

    times = ([], [])
    for timed in [False] + [True] * rounds:
        for fn, out in zip((mine, theirs), times):
            random.seed(0)
            np.random.seed(0)
            torch.manual_seed(0)
            for item in items:
                start = time.perf_counter()
                fn(item)
                if timed:
                    out.append(time.perf_counter() - start)
    return 1e3 * statistics.mean(times[0]), 1e3 * statistics.mean(times[1])


def stage_profile(config, root: str, images: int, batch: int) -> list[tuple[str, float, float]]:
    """(stage, ours ms, timm's ms) per image, one thread, the stages of both loaders timed
    alternately on the same ``images`` training JPEGs; the batch stages on a ``batch``."""
    from multiprocessing.reduction import ForkingPickler

    from timm.data import create_transform
    from timm.data.loader import fast_collate
    from timm.data.random_erasing import RandomErasing

    from data.datasets import collate_readable
    from data.decode import load_rgb, load_rgb_pil
    from data.device import Normalize, SeededErasing, batch_seed
    from data.transforms import build_transform

    torch.set_num_threads(1)
    aug = config.AUG
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs)[:images]
    ours = build_transform(config, train=True).transforms
    timm = guard_posterize(create_transform(
        input_size=config.DATA.IMG_SIZE, is_training=True, scale=tuple(aug.SCALE), hflip=aug.HFLIP,
        color_jitter=aug.COLOR_JITTER or None, auto_augment=aug.AUTO_AUGMENT, interpolation=config.DATA.INTERPOLATION,
        use_prefetcher=True)).transforms
    rows = [("decode (whole image)", *_pair_ms(lambda p: load_rgb(p).load(), load_rgb_pil, paths)),
            ("decode + crop + resize (RRC)", *_pair_ms(lambda p: ours[0](load_rgb(p)),
                                                      lambda p: timm[0](load_rgb_pil(p)), paths))]
    pictures = [load_rgb_pil(p) for p in paths]
    for i, name in enumerate(("crop + resize (RRC)", "flip", "RandAugment")):
        rows.append((name, *_pair_ms(ours[i], timm[i], pictures)))
        pictures = [ours[i](p) for p in pictures]
    rows.append(("to uint8 tensor", *_pair_ms(ours[3], timm[3], pictures)))
    ours_items = [(ours[3](pictures[i % len(pictures)]), 0) for i in range(batch)]
    timm_items = [(timm[3](pictures[i % len(pictures)]), 0) for i in range(batch)]
    reps = [None] * 5

    def per_image(mine, theirs) -> tuple[float, float]:
        return tuple(t / batch for t in _pair_ms(mine, theirs, reps))
    rows.append(("collate", *per_image(lambda _: collate_readable(ours_items), lambda _: fast_collate(timm_items))))
    # a worker's collate writes into shared memory (ours: default_collate; timm's fast_collate
    # does not, so pickling it for the main process copies it there)
    ours_batch = collate_readable(ours_items)
    ours_batch[0].share_memory_()
    mine, theirs = per_image(lambda _: ForkingPickler.loads(ForkingPickler.dumps(ours_batch)),
                             lambda _: ForkingPickler.loads(ForkingPickler.dumps(fast_collate(timm_items))))
    rows.append(("worker -> main transfer", mine, theirs - rows[-1][2]))
    normalize = Normalize(config.DATA.MEAN, config.DATA.STD, "cpu")
    timm_batch = fast_collate(timm_items)[0]
    mean = torch.tensor([255 * m for m in config.DATA.MEAN]).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in config.DATA.STD]).view(1, 3, 1, 1)
    rows.append(("normalise (main process, CPU)", *per_image(lambda _: normalize(ours_batch[0]),
                                                             lambda _: timm_batch.to(torch.float32).sub_(mean).div_(std))))
    if aug.REPROB > 0:
        seeded = SeededErasing(probability=aug.REPROB, mode=aug.REMODE, max_count=aug.RECOUNT, device="cpu")
        timms = RandomErasing(probability=aug.REPROB, mode=aug.REMODE, max_count=aug.RECOUNT, device="cpu")
        floats = normalize(ours_batch[0])

        def erase_ours(_):
            seeded.seed(batch_seed(0, 0))
            seeded(floats.clone())
        clone = per_image(lambda _: floats.clone(), lambda _: floats.clone())
        mine, theirs = per_image(erase_ours, lambda _: timms(floats.clone()))
        rows.append(("random erasing (main process, CPU)", mine - clone[0], theirs - clone[1]))
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="configs/vit/vit_small_patch16_224.yaml", help="config whose DATA/AUG to use")
    p.add_argument("--root", default="/tmp/vit-research-imagenet-like", help="generated ImageFolder (written once)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--train-per-class", type=int, default=128, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="loader worker counts to time (none: the stages only)")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs of each loader (alternating)")
    p.add_argument("--shards", action="store_true", help="also time our loader on webdataset shards of the set")
    p.add_argument("--pil", action="store_true", help="also time our loader with DATA.DECODER pil")
    p.add_argument("--stages", type=int, default=40, help="images for the per-stage profile (0: none)")
    args = p.parse_args(argv)

    make_imagenet_like(args.root, args.classes, args.train_per_class, args.val_per_class)
    shard_dir = os.path.join(args.root, "shards")
    if args.shards and not os.path.exists(os.path.join(shard_dir, "index.json")):
        from make_shards import write_shards
        write_shards(args.root, shard_dir, shard_size=256)
    images = args.classes * args.train_per_class
    if args.stages:
        config = ours_config(args, 0, "imagenet", args.root)
        print(f"per-image stage times (ms, mean over {args.stages} images x 3 rounds, one thread; batch stages on a "
              f"batch of {args.batch_size}):", flush=True)
        print(f"{'stage':<36s} {'ours':>7s} {'timm':>7s}")
        total = [0.0, 0.0]
        for name, mine, theirs in stage_profile(config, args.root, args.stages, args.batch_size):
            print(f"{name:<36s} {mine:7.3f} {theirs:7.3f}", flush=True)
            total = [total[0] + mine, total[1] + theirs]
        print(f"{'total':<36s} {total[0]:7.3f} {total[1]:7.3f}", flush=True)
    if not args.workers:
        return 0
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{images} training images {SIZE[0]}x{SIZE[1]}, batch {args.batch_size}, config {args.cfg}, "
          f"{args.rounds} alternating rounds, img/s from the median epoch time", flush=True)
    extra = {name: opts for name, opts, on in
             (("shards", (), args.shards), ("pil", ("DATA.DECODER", "pil"), args.pil)) if on}
    print(f"{'workers':>7s} {'ours':>8s} {'timm':>8s} {'ratio':>6s} {'ratio min-max':>13s} {'ours min-max':>13s} "
          f"{'timm min-max':>13s}" + "".join(f" {n:>8s} {'/timm':>6s}" for n in extra), flush=True)
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

        def ratios(name: str) -> list[float]:  # each round's rate ratio
            return [(counts[name] / t) / (counts["timm"] / tt) for t, tt in zip(times[name], times["timm"])]

        def to_timm(name: str) -> float:  # the median of the rounds' rate ratios
            return statistics.median(ratios(name))

        def spread(name: str) -> str:  # the slowest and fastest round's img/s
            return f"{counts[name] / max(times[name]):6.1f}-{counts[name] / min(times[name]):<6.1f}"
        ratio = to_timm("ours")
        row = (f"{workers:>7d} {rate['ours']:8.1f} {rate['timm']:8.1f} {ratio:6.3f} "
               f"{min(ratios('ours')):6.3f}-{max(ratios('ours')):<6.3f} {spread('ours')} {spread('timm')}")
        for name in extra:
            row += f" {rate[name]:8.1f} {to_timm(name):6.3f}"
        print(row, flush=True)
        rows[workers] = (rate["ours"], rate["timm"], ratio)
    ours, timm, ratio = rows[max(rows)]
    print(f"loader img/s ours {ours:.1f} timm {timm:.1f} ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    run_tool(main)
