"""CPU cost of the ViT research variants, as ratios to the plain ViT measured in the same process.

1. Train step (forward, backward, SGD step) of ``--model`` at ``--batch`` for each variant,
   measured in alternating rounds (plain, variant, plain, variant, ...) and summarised by
   medians, so drifting load on a shared machine hits every model alike.
2. Performer vs softmax attention (one attention layer, forward + backward) at growing token
   counts: where linear attention starts to pay.

    python tools/benchmark_variants.py                  # both parts, ~5 min on 2 cores
    python tools/benchmark_variants.py --all --rounds 7 --threads 8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from models.attention import ATTENTION_KINDS  # noqa: E402
from utils import alternating_times, step_fn  # noqa: E402

# name -> (attention kind, extra constructor arguments, progress (epoch, step) to set)
STEP_VARIANTS: dict[str, tuple[str, dict, tuple[int, int]]] = {
    "lai r=2 (masked)": ("lai", {"schedule": [[0, 2], [1, None]]}, (0, 0)),
    "lai mask gone": ("lai", {"schedule": [[0, 2], [1, None]]}, (1, 0)),
    "dis (span 7)": ("dis", {"span": 7}, (0, 0)),
    "deform (K=4)": ("deform", {}, (0, 0)),
    "performer (m=256)": ("performer", {}, (0, 0)),
}
MORE_VARIANTS: dict[str, tuple[str, dict, tuple[int, int]]] = {  # with --all
    "dis (full span 13)": ("dis", {}, (0, 0)),
    "dislai r=2": ("dislai", {"span": 7, "schedule": [[0, 2], [1, None]]}, (0, 0)),
    "performer_lai r=2": ("performer_lai", {"schedule": [[0, 2], [1, None]]}, (0, 0)),
    "performer_dis (span 4)": ("performer_dis", {}, (0, 0)),
}


def alternating_medians(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in alternating_times(fns, rounds).items()}


def train_step_fn(model: torch.nn.Module, batch: int, img_size: int) -> Callable[[], None]:
    return step_fn(model, torch.randn(batch, 3, img_size, img_size), train=True,
                   optimizer=torch.optim.SGD(model.parameters(), lr=1e-4))


def benchmark_train_step(name: str, batch: int, rounds: int, variants: dict) -> list[dict]:
    torch.manual_seed(0)
    plain = models.create_model(name, drop_path_rate=0.0)
    img = plain.patch_embed.img_size[0]
    fns = {"plain": train_step_fn(plain, batch, img)}
    for label, (attn, extra, progress) in variants.items():
        model = models.create_model(name, attn=attn, attn_args=extra, drop_path_rate=0.0)
        model.set_progress(*progress)
        fns[label] = train_step_fn(model, batch, img)
    medians = alternating_medians(fns, rounds)
    return [{"variant": k, "seconds": v, "ratio": v / medians["plain"]} for k, v in medians.items()]


def attention_fn(attn: torch.nn.Module, tokens: int, dim: int) -> Callable[[], None]:
    x = torch.randn(1, tokens, dim, requires_grad=True)

    def step() -> None:
        attn(x).sum().backward()
    return step


def benchmark_crossover(token_counts: list[int], dim: int, heads: int, features: int,
                        rounds: int) -> list[dict]:
    rows = []
    for n in token_counts:
        side = int(n ** 0.5)
        grid = (side, n // side)
        kw = dict(num_heads=heads, qkv_bias=True, grid_size=grid, num_prefix_tokens=0)
        softmax = ATTENTION_KINDS["softmax"](dim, **kw)
        performer = ATTENTION_KINDS["performer"](dim, features=features, **kw)
        medians = alternating_medians({"softmax": attention_fn(softmax, n, dim),
                                       "performer": attention_fn(performer, n, dim)}, rounds)
        rows.append({"tokens": n, "softmax_s": medians["softmax"], "performer_s": medians["performer"],
                     "performer_over_softmax": medians["performer"] / medians["softmax"]})
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224", help="plain ViT entry to compare against")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per measurement")
    parser.add_argument("--all", action="store_true", help="also full-span dis, DisLAI, LAI/dis Performers")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 576, 1024, 2304, 4096],
                        help="token counts for the Performer crossover")
    parser.add_argument("--features", type=int, default=256, help="Performer random features")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-step", action="store_true", help="only the crossover")
    parser.add_argument("--skip-crossover", action="store_true", help="only the train step")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": machine(), "command": " ".join(sys.argv)}
    print(f"# {result['machine']}")
    if not args.skip_step:
        variants = {**STEP_VARIANTS, **(MORE_VARIANTS if args.all else {})}
        rows = benchmark_train_step(args.model, args.batch, args.rounds, variants)
        result["train_step"] = rows
        print(f"\ntrain step, {args.model}, batch {args.batch}, median of {args.rounds} alternating rounds")
        print("| variant | s / step | x plain |\n|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['seconds']:.3f} | {r['ratio']:.2f} |")
    if not args.skip_crossover:
        rows = benchmark_crossover(args.tokens, 384, 6, args.features, 3 * args.rounds)
        result["crossover"] = rows
        print(f"\nattention layer fwd+bwd, dim 384, 6 heads, batch 1, Performer m={args.features}, "
              f"median of {3 * args.rounds} alternating rounds")
        print("| tokens | softmax s | performer s | performer / softmax |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['tokens']} | {r['softmax_s']:.4f} | {r['performer_s']:.4f} | "
                  f"{r['performer_over_softmax']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
