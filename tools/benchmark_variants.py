"""CPU cost of the ViT research variants, as ratios to the plain ViT measured in the same process.

1. Train step (forward, backward, SGD step) of ``--model`` at ``--batch`` for each variant,
   measured in alternating rounds (plain, variant, plain, variant, ...; the order reversed every
   other round) and summarised by the minimum over rounds (the figure least disturbed by other
   processes on a shared machine); the ratio is min(variant) / min(plain). The registered
   defaults come first (what ``vit_<kind>_<size>`` trains: dis / DisLAI at their default span,
   the whole grid; LAI / DisLAI at epoch 0 of the default schedule); other settings are extra rows.
2. Performer vs softmax attention (one attention layer, forward + backward) at growing token
   counts: where linear attention starts to pay.
3. (``--flex``) LAI's window through FlexAttention against SDPA with the additive window, one
   ``vit_small`` attention layer at r = 1 and 2 (batch 16, 197 tokens), alternating rounds:
   forward without gradients on the CPU (FlexAttention has no CPU backward), forward +
   backward elsewhere. The first call compiles (not timed).

    python tools/benchmark_variants.py --threads 1 --rounds 4 --skip-crossover   # the issue's figures
    python tools/benchmark_variants.py --only dis,dislai --rounds 4              # a subset (labels' first words)
    python tools/benchmark_variants.py --only "dis (default: span = grid)" --previous  # before/after, one process
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

# name -> (attention kind, extra constructor arguments, progress (epoch, step) to set).
# The registered defaults first: no extra arguments, at the start of training.
STEP_VARIANTS: dict[str, tuple[str, dict, tuple[int, int]]] = {
    "dis (default: span = grid)": ("dis", {}, (0, 0)),
    "dislai (default: span = grid; r=1 at epoch 0)": ("dislai", {}, (0, 0)),
    "lai (default: r=1 at epoch 0)": ("lai", {}, (0, 0)),
    "lai mask gone": ("lai", {}, (40, 0)),
    "deform (K=4)": ("deform", {}, (0, 0)),
    "performer (m=256)": ("performer", {}, (0, 0)),
    "dis span 7": ("dis", {"span": 7}, (0, 0)),
    "dislai mask gone": ("dislai", {}, (40, 0)),
}
MORE_VARIANTS: dict[str, tuple[str, dict, tuple[int, int]]] = {  # with --all
    "lai r=2": ("lai", {}, (10, 0)),
    "dislai span 7; r=2": ("dislai", {"span": 7}, (10, 0)),
    "dis 1d positions": ("dis", {"positions": "1d"}, (0, 0)),
    "performer_lai r=2": ("performer_lai", {"schedule": [[0, 2], [1, None]]}, (0, 0)),
    "performer_dis (span 4)": ("performer_dis", {}, (0, 0)),
}


def alternating_minimums(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, tuple[float, float]]:
    """(min, median) seconds per call of each function over alternating rounds."""
    return {name: (min(t), statistics.median(t)) for name, t in alternating_times(fns, rounds).items()}


def train_step_fn(model: torch.nn.Module, batch: int, img_size: int) -> Callable[[], None]:
    return step_fn(model, torch.randn(batch, 3, img_size, img_size), train=True,
                   optimizer=torch.optim.SGD(model.parameters(), lr=1e-4))


def with_previous_disentangled(model: torch.nn.Module) -> torch.nn.Module:
    """The model's disentangled layers computing what they did before the row-tile windows:
    every relation's scores gathered at (i, j), the bias into SDPA
    (``DisentangledAttention.attend_by_gather``, the code this replaced), for before/after
    ratios in one process."""
    for block in model.blocks:
        block.attn.attend = (lambda q, k, v, attn_mask=None, is_causal=False, a=block.attn:
                             a.attend_by_gather(q, k, v, attn_mask))
    return model


def benchmark_train_step(name: str, batch: int, rounds: int, variants: dict,
                         previous: bool = False) -> list[dict]:
    torch.manual_seed(0)
    plain = models.create_model(name, drop_path_rate=0.0)
    img = plain.patch_embed.img_size[0]
    fns = {"plain": train_step_fn(plain, batch, img)}
    for label, (attn, extra, progress) in variants.items():
        model = models.create_model(name, attn=attn, attn_args=extra, drop_path_rate=0.0)
        model.set_progress(*progress)
        fns[label] = train_step_fn(model, batch, img)
        if previous and attn in ("dis", "dislai"):
            torch.manual_seed(0)
            model = models.create_model(name, attn=attn, attn_args=extra, drop_path_rate=0.0)
            model.set_progress(*progress)
            fns[f"{label}, previous code"] = train_step_fn(with_previous_disentangled(model), batch, img)
    times = alternating_minimums(fns, rounds)
    best, median = times["plain"]
    return [{"variant": k, "seconds": t, "ratio": t / best, "median_ratio": m / median}
            for k, (t, m) in times.items()]


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
        times = alternating_minimums({"softmax": attention_fn(softmax, n, dim),
                                      "performer": attention_fn(performer, n, dim)}, rounds)
        soft, perf = times["softmax"][0], times["performer"][0]
        rows.append({"tokens": n, "softmax_s": soft, "performer_s": perf, "performer_over_softmax": perf / soft})
    return rows


def benchmark_lai_flex(device: torch.device, rounds: int) -> list[dict]:
    from models.attention import flex_available
    if not flex_available():
        print("this torch has no FlexAttention")
        return []
    train = device.type not in ("cpu", "mps")
    rows = []
    for radius in (1, 2):
        layers = {}
        for backend in ("sdpa", "flex"):
            torch.manual_seed(0)
            layers[backend] = ATTENTION_KINDS["lai"](384, num_heads=6, qkv_bias=True, grid_size=(14, 14),
                                                     schedule=[[0, radius]], backend=backend).to(device)
        x = torch.randn(16, 197, 384, device=device, requires_grad=train)

        def run(layer: torch.nn.Module) -> Callable[[], None]:
            def step() -> None:
                with torch.set_grad_enabled(train):
                    out = layer(x)
                    if train:
                        out.sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            return step
        times = alternating_minimums({k: run(v) for k, v in layers.items()}, rounds)
        sdpa, flex = times["sdpa"][0], times["flex"][0]
        rows.append({"radius": radius, "mode": "fwd+bwd" if train else "fwd, no grad", "sdpa_s": sdpa,
                     "flex_s": flex, "flex_over_sdpa": flex / sdpa})
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
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per measurement")
    parser.add_argument("--all", action="store_true", help="also LAI r=2, DisLAI span 7, 1-D dis, LAI/dis Performers")
    parser.add_argument("--only", default="", help="comma-separated variants to time (first word of the "
                        "label, e.g. dis,dislai; a full label for one row); default: all rows")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 576, 1024, 2304, 4096],
                        help="token counts for the Performer crossover")
    parser.add_argument("--features", type=int, default=256, help="Performer random features")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-step", action="store_true", help="only the crossover")
    parser.add_argument("--skip-crossover", action="store_true", help="only the train step")
    parser.add_argument("--previous", action="store_true",
                        help="also dis/DisLAI rows computed by the code before the row-tile windows")
    parser.add_argument("--flex", action="store_true", help="also LAI's window: FlexAttention vs SDPA")
    parser.add_argument("--device", default="cpu", help="device of the --flex part")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": machine(), "command": " ".join(sys.argv)}
    print(f"# {result['machine']}")
    if not args.skip_step:
        variants = {**STEP_VARIANTS, **(MORE_VARIANTS if args.all or args.only else {})}
        if args.only:
            wanted = set(args.only.split(","))
            variants = {k: v for k, v in variants.items() if k in wanted or k.split()[0] in wanted}
        rows = benchmark_train_step(args.model, args.batch, args.rounds, variants, args.previous)
        result["train_step"] = rows
        print(f"\ntrain step, {args.model}, batch {args.batch}, min of {args.rounds} alternating rounds "
              f"(x plain: min / min; median ratio for reference)")
        print("| variant | s / step (min) | x plain | x plain (medians) |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['seconds']:.3f} | {r['ratio']:.2f} | {r['median_ratio']:.2f} |")
    if not args.skip_crossover:
        rows = benchmark_crossover(args.tokens, 384, 6, args.features, 3 * args.rounds)
        result["crossover"] = rows
        print(f"\nattention layer fwd+bwd, dim 384, 6 heads, batch 1, Performer m={args.features}, "
              f"min of {3 * args.rounds} alternating rounds")
        print("| tokens | softmax s | performer s | performer / softmax |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['tokens']} | {r['softmax_s']:.4f} | {r['performer_s']:.4f} | "
                  f"{r['performer_over_softmax']:.2f} |")
    if args.flex:
        rows = benchmark_lai_flex(torch.device(args.device), max(args.rounds, 3))
        result["lai_flex"] = rows
        for r in rows:
            print(f"LAI r={r['radius']} ({r['mode']}): sdpa {r['sdpa_s'] * 1e3:.1f} ms, "
                  f"flex {r['flex_s'] * 1e3:.1f} ms, flex / sdpa {r['flex_over_sdpa']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
