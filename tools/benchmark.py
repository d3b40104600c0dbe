"""Params, GMACs and images/s of registered models; ViTs are also timed against timm.

    python tools/benchmark.py vit_small_patch16_224 [MODEL...] [--batch-size 16] [--rounds 5]

For a ViT with a timm namesake, our model and timm's are measured alternately in the same
process (A B A B ...) and the median ratio is printed: a lone absolute time on a shared
machine means little, a ratio measured side by side does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from errors import UserError, run_tool  # noqa: E402
from utils import alternating_times, count_macs, count_params, step_fn  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="registered model names")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="timed alternations per mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    import timm
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}")
    print(f"{'model':32s} {'params(M)':>9s} {'GMACs':>7s} {'eval img/s':>10s} {'train img/s':>11s}"
          f" {'eval/timm':>9s} {'train/timm':>10s}")
    for name in args.models:
        torch.manual_seed(0)
        try:
            ours = models.create_model(name).to(device)
        except (models.UnknownModelError, models.ModelArgumentError) as e:
            raise UserError(str(e)) from None
        img = ours.patch_embed.img_size[0] if hasattr(ours, "patch_embed") else 224
        size = getattr(ours, "img_size", img)
        size = size[0] if isinstance(size, (tuple, list)) else size
        params, macs = count_params(ours), count_macs(ours, size)
        batch = torch.randn(args.batch_size, 3, size, size, device=device)
        candidates = {"ours": ours}
        if name in timm.list_models(name):
            candidates["timm"] = timm.create_model(name, num_classes=ours.num_classes).to(device)
        row = {}
        for mode in ("eval", "train"):
            times = alternating_times({k: step_fn(m, batch, mode == "train") for k, m in candidates.items()},
                                      args.rounds, warmup=2)
            row[mode] = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
        ratio = lambda mode: (f"{row[mode]['ours'] / row[mode]['timm']:.3f}" if "timm" in row[mode] else "-")
        print(f"{name:32s} {params / 1e6:9.2f} {macs / 1e9:7.2f} {row['eval']['ours']:10.1f} "
              f"{row['train']['ours']:11.1f} {ratio('eval'):>9s} {ratio('train'):>10s}", flush=True)
    return 0


if __name__ == "__main__":
    run_tool(main)
