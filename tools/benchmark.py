"""Params, GMACs and images/s of registered models; ViTs are also timed against timm.

    python tools/benchmark.py vit_small_patch16_224 [MODEL...] [--batch-size 16] [--rounds 5]
    python tools/benchmark.py vit_base_patch16_224 dat_pp_base --grad-checkpoint --batch-size 8
    python tools/benchmark.py vit_small_patch16_224 dat_pp_tiny --compile --threads 1

For a ViT with a timm namesake, our model and timm's are measured alternately in the same
process (A B A B ...) and the median ratio is printed: a lone absolute time on a shared
machine means little, a ratio measured side by side does. ``--grad-checkpoint`` instead
times a training step with gradient checkpointing off and on (alternating in one process)
and measures each step's peak memory (resident size on the CPU, the allocator on CUDA).
``--compile`` times a training step eager and under torch.compile the same way, and says
how long the first (compiling) step took.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from errors import UserError, run_tool  # noqa: E402
from utils import alternating_times, count_macs, count_params, peak_memory_mib, step_fn  # noqa: E402


def grad_checkpoint_row(name: str, model: torch.nn.Module, batch: torch.Tensor, rounds: int) -> str:
    """Train-step time and peak memory with checkpointing off and on, alternating."""
    def step(enable: bool):
        fn = step_fn(model, batch, train=True)

        def run() -> None:
            model.set_grad_checkpointing(enable)
            fn()
        return run

    runs = {"off": step(False), "on": step(True)}
    times = alternating_times(runs, rounds)
    peaks: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            peaks[mode].append(peak_memory_mib(runs[mode], batch.device))
    t = {m: statistics.median(v) for m, v in times.items()}
    p = {m: statistics.median(v) for m, v in peaks.items()}
    return (f"{name:24s} step off {t['off']:.2f} s  on {t['on']:.2f} s  time x{t['on'] / t['off']:.2f}   "
            f"peak off {p['off']:.0f} MiB  on {p['on']:.0f} MiB  saved {1 - p['on'] / p['off']:.0%}")


def compile_row(name: str, model: torch.nn.Module, batch: torch.Tensor, rounds: int) -> str:
    """Train-step time eager and under torch.compile (inductor), alternating in one process
    (the compiled module shares the eager one's parameters); the first compiled step's time."""
    compiled = torch.compile(model)
    runs = {"eager": step_fn(model, batch, train=True),
            "compiled": step_fn(compiled, batch, train=True, classes=model.num_classes)}
    start = time.perf_counter()
    runs["compiled"]()
    first = time.perf_counter() - start
    times = alternating_times(runs, rounds)
    t = {m: statistics.median(v) for m, v in times.items()}
    per_round = sorted(e / c for e, c in zip(times["eager"], times["compiled"]))
    return (f"{name:24s} step eager {t['eager']:.2f} s  compiled {t['compiled']:.2f} s  "
            f"speedup x{t['eager'] / t['compiled']:.2f} (rounds x{per_round[0]:.2f}-x{per_round[-1]:.2f})  "
            f"first compiled step {first:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="registered model names")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="timed alternations per mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="time and peak memory of a train step with gradient checkpointing off / on")
    p.add_argument("--compile", action="store_true",
                   help="time a train step eager / torch.compile'd, alternating, and the compile")
    args = p.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--rounds", args.rounds)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)

    import timm
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}")
    if not (args.grad_checkpoint or args.compile):
        print(f"{'model':32s} {'params(M)':>9s} {'GMACs':>7s} {'eval img/s':>10s} {'train img/s':>11s}"
              f" {'eval/timm':>9s} {'train/timm':>10s}")
    for name in args.models:
        torch.manual_seed(0)
        try:
            ours = models.create_model(name).to(device)
        except (models.UnknownModelError, models.ModelArgumentError) as e:
            raise UserError(str(e)) from None
        size = ours.pretrained_cfg["input_size"][-1]
        batch = torch.randn(args.batch_size, 3, size, size, device=device)
        if args.grad_checkpoint:
            print(grad_checkpoint_row(name, ours, batch, args.rounds), flush=True)
            continue
        if args.compile:
            print(compile_row(name, ours, batch, args.rounds), flush=True)
            continue
        params, macs = count_params(ours), count_macs(ours, size)
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
