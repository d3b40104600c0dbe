"""Evaluate one set of weights at several test resolutions and crops: one table.

    python tools/eval_sweep.py --cfg CFG --resume CKPT --img-sizes 224,256,288 --crop-pcts 0.875,0.95,1.0
    torchrun --nproc_per_node 8 tools/eval_sweep.py --cfg CFG --pretrained W --img-sizes 224,384 --data-path D

What DeiT and DAT users compare for the train/test resolution discrepancy (FixRes): the same
weights at every DATA.IMG_SIZE x TEST.CROP_PCT setting, each evaluated as ``main.py --eval``
evaluates (``main.run`` in this process: every image once over the processes, the same report
files), with the weights fitted to each size as --pretrained fits them (the model's
``adapt_pretrained`` resamples position embeddings and tables). A list left out is the
config's value (after the flags; --test-crop-pct gives one crop). main.py's flags and --opts
work as there. Writes, in OUTPUT/MODEL.NAME/TAG (--tag, default sweep):

    <size>px_crop<pct>/     each setting's --eval report (metrics.json, per-class accuracy, ...)
    sweep.md, sweep.json    the table: size, crop, top-1, top-5, loss, images
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import source_of  # noqa: E402
from errors import UserError, run_tool  # noqa: E402
from flags import build_parser, config_from_args  # noqa: E402

TAG = "sweep"  # the folder without --tag


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = build_parser(__doc__)
    parser.add_argument("--img-sizes", metavar="S,S,...", help="test resolutions (DATA.IMG_SIZE), e.g. 224,256,288")
    parser.add_argument("--crop-pcts", metavar="P,P,...", help="center-crop fractions (TEST.CROP_PCT), "
                                                               "e.g. 0.875,0.95,1.0")
    return parser.parse_args(argv)


def values(text: Optional[str], flag: str, kind: Callable[[str], Any], fits: Callable[[Any], bool],
           what: str) -> list:
    """A comma-separated list of ``kind``, each ``fits``; [] when not given."""
    out = []
    for word in text.split(",") if text else []:
        try:
            value = kind(word)
        except ValueError:
            value = None
        if value is None or not fits(value):
            raise UserError(f"{flag}: {word.strip()!r} is not {what} (a comma-separated list, e.g. {flag} "
                            f"{'224,256' if kind is int else '0.875,1.0'})")
        out.append(value)
    return out


def settings(args: argparse.Namespace) -> tuple[Any, list[tuple[int, float, Any]]]:
    """The config as given (MODE eval) and (size, crop, config) per setting, every one
    loaded and checked before anything runs."""
    sizes = values(args.img_sizes, "--img-sizes", int, lambda v: v > 0, "a positive integer")
    crops = values(args.crop_pcts, "--crop-pcts", float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
    if crops and args.test_crop_pct is not None:
        raise UserError("--test-crop-pct and --crop-pcts together: pass the crops to sweep with --crop-pcts")
    if getattr(args, "eval_sets", None):
        raise UserError("--eval-sets: a sweep evaluates the config's data set; sweep one set at a time "
                        "(--opts DATA.DATASET ...)")
    if args.resume and args.pretrained:
        raise UserError(f"--resume ({args.resume}) and --pretrained ({args.pretrained}): pass the weights to "
                        f"evaluate once")
    weights = args.resume or args.pretrained
    if not weights:
        raise UserError("needs weights: pass --resume CKPT or --pretrained CKPT")
    # Evaluated as --pretrained weights are: fitted to each size (strictly otherwise).
    given = argparse.Namespace(**{**vars(args), "eval": "eval", "resume": "",
                                  "pretrained": weights, "tag": args.tag or TAG})
    config = config_from_args(given)
    out = []
    for size in sizes or [config.DATA.IMG_SIZE]:
        for crop in crops or [config.TEST.CROP_PCT]:
            one = argparse.Namespace(**{**vars(given), "test_crop_pct": crop,
                                        "opts": [*given.opts, "DATA.IMG_SIZE", str(size)]})
            out.append((size, crop, config_from_args(one)))
    return config, out


def write_table(config, rows: list[dict], out_dir: str) -> str:
    """sweep.md and sweep.json in ``out_dir``; the markdown."""
    first = rows[0]
    mark = (config.DATA.IMG_SIZE, config.TEST.CROP_PCT)
    lines = [f"# {config.MODEL.NAME}: {first['weights']} weights of {first['checkpoint']} on {first['dataset']}", "",
             f"Each image is resized ({first['resize']}, {first['interpolation']}) to size / crop, then "
             f"center-cropped to size x size; * the config's setting (DATA.IMG_SIZE {mark[0]}, TEST.CROP_PCT {mark[1]:g}).", "",
             "| size | crop | top-1 | top-5 | loss | images |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        star = "*" if (r["img_size"], r["crop_pct"]) == mark else ""
        lines.append(f"| {r['img_size']}{star} | {r['crop_pct']:g} | {r['acc1']:.3f} | {r['acc5']:.3f} | "
                     f"{r['loss']:.4f} | {r['images']} |")
    keys = ("img_size", "crop_pct", "acc1", "acc5", "loss", "images", "report")
    table = {"model": config.MODEL.NAME, "weights": first["weights"], "checkpoint": first["checkpoint"],
             "dataset": first["dataset"], "resize": first["resize"], "interpolation": first["interpolation"],
             "config": {"img_size": mark[0], "crop_pct": mark[1]},
             "settings": [{k: r[k] for k in keys} for r in rows]}
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    return text


def main(argv: Optional[list[str]] = None) -> int:
    import torch.distributed as dist

    from main import run
    from run_folder import run_dir
    from utils import abort_distributed, init_distributed

    config, runs = settings(parse_args(argv))
    out_dir = run_dir(config)
    env = init_distributed(config.DEVICE, config.DIST_TIMEOUT, source_of(config, "DEVICE"))
    finished, rows = False, []
    try:
        for size, crop, one in runs:
            folder = os.path.join(out_dir, f"{size}px_crop{crop:g}")
            code = run(one, env, folder)
            if code:
                return code
            if env.is_main:
                with open(os.path.join(folder, "metrics.json")) as f:
                    rows.append({**json.load(f), "report": os.path.relpath(folder, out_dir)})
        if env.is_main:
            print(write_table(config, rows, out_dir) + f"\nwritten: sweep.md, sweep.json in {out_dir}")
        finished = True
    finally:
        if dist.is_initialized():
            if finished:
                dist.destroy_process_group()
            else:  # peers may wait in a collective: make them fail fast
                abort_distributed()
    return 0


if __name__ == "__main__":
    run_tool(main)
