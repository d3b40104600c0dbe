"""Speed of DAT / DAT++ on this machine; prints the figures recorded in docs/DAT.md.

1. Neighborhood attention, forward + backward at the DAT-T++ stage-1 shape (batch 16, 2 heads,
   56x56, 32 channels per head, k = 7): ours against a straightforward gather reference (each
   query's k x k keys gathered explicitly), time and peak memory, in the same process.
2. Training step of DAT-T++ against timm's vit_small_patch16_224 (batch 16, 224, AdamW), in
   alternating rounds, min of each: achieved FLOP/s, a step counted as 3x the forward FLOPs
   of torch.utils.flop_counter.
3. Eval and train images/s of every registered DAT model, and the 224 -> 384 scaling of DAT-B++.
4. (``--only flex``) neighborhood attention through FlexAttention against the tiled op at the
   DAT-T++ stage shapes (batch 16, k = 7), alternating rounds: forward without gradients on
   the CPU (FlexAttention has no CPU backward), forward + backward elsewhere. The first call
   of each shape compiles (not timed).

    python tools/benchmark_dat.py                 # na, step, models on the CPU
    python tools/benchmark_dat.py --only na,step  # parts: na, step, models, flex
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import models  # noqa: E402,F401  (registers the models)
from models.attention import flex_available  # noqa: E402
from models.dat_attention import neighborhood_attention  # noqa: E402
from models.registry import create_model, list_models  # noqa: E402
from utils import alternating_times, count_macs, peak_memory_mib, step_fn, synchronize  # noqa: E402


def gather_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  rpb: torch.Tensor, ks: int) -> torch.Tensor:
    """The straightforward formulation: gather every query's k x k keys, (B, h, H, W, d)."""
    B, h, H, W, d = q.shape
    rows = (torch.arange(H) - ks // 2).clamp(0, H - ks)[:, None] + torch.arange(ks)
    cols = (torch.arange(W) - ks // 2).clamp(0, W - ks)[:, None] + torch.arange(ks)
    kk = k[:, :, rows[:, None, :, None], cols[None, :, None, :]]
    vv = v[:, :, rows[:, None, :, None], cols[None, :, None, :]]
    rel_r = rows - torch.arange(H)[:, None] + ks - 1
    rel_c = cols - torch.arange(W)[:, None] + ks - 1
    bias = rpb[:, rel_r[:, None, :, None], rel_c[None, :, None, :]]
    logits = torch.einsum("bhijd,bhijxyd->bhijxy", q, kk) + bias
    attn = logits.flatten(-2).softmax(-1).view_as(logits)
    return torch.einsum("bhijxy,bhijxyd->bhijd", attn, vv)


NA_SHAPE = (16, 2, 56, 56, 32)


def _na_inputs(device: torch.device):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*NA_SHAPE, device=device, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 13, 13, device=device, requires_grad=True)
    return q, k, v, rpb


def _na_step(fn, inputs) -> None:
    out = fn(*inputs, 7)
    out.backward(torch.ones_like(out))
    synchronize(out.device)


def _na_child(which: str, threads: int, queue) -> None:
    """Runs in a fresh process: the peak resident memory of one step above its inputs."""
    torch.set_num_threads(threads)
    inputs = _na_inputs(torch.device("cpu"))
    fn = neighborhood_attention if which == "ours" else gather_neighborhood_attention
    queue.put(peak_memory_mib(lambda: _na_step(fn, inputs), torch.device("cpu")))


def _cpu_peak_mib(which: str, threads: int) -> float:
    # spawn, not fork: a child forked after OpenMP has run with several threads can hang
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_na_child, args=(which, threads, queue))
    proc.start()
    peak = queue.get()
    proc.join()
    return peak


def bench_neighborhood(device: torch.device, repeats: int) -> None:
    inputs = _na_inputs(device)
    times = alternating_times({"ours": lambda: _na_step(neighborhood_attention, inputs),
                               "ref": lambda: _na_step(gather_neighborhood_attention, inputs)},
                              max(repeats, 3))
    ours, ref = statistics.median(times["ours"]), statistics.median(times["ref"])
    print(f"[na] shape (B, heads, H, W, d) = {NA_SHAPE}, k=7, fwd+bwd, {device}, "
          f"{len(times['ours'])} alternating rounds")
    print(f"[na] median: ours {ours * 1e3:.1f} ms   gather reference {ref * 1e3:.1f} ms   "
          f"speed ratio {ref / ours:.1f}x")
    per_round = sorted(r / o for r, o in zip(times["ref"], times["ours"]))
    print(f"[na] ratio per round: min {per_round[0]:.1f}x  median "
          f"{statistics.median(per_round):.1f}x  max {per_round[-1]:.1f}x")
    if device.type == "cuda":
        peaks = {name: peak_memory_mib(lambda fn=fn: _na_step(fn, inputs), device) for name, fn in
                 (("ours", neighborhood_attention), ("reference", gather_neighborhood_attention))}
    else:
        peaks = {name: _cpu_peak_mib(name, torch.get_num_threads()) for name in ("ours", "reference")}
    print(f"[na] peak memory above inputs: ours {peaks['ours']:.0f} MiB   "
          f"reference {peaks['reference']:.0f} MiB   ratio {peaks['reference'] / peaks['ours']:.1f}x")


def forward_flops(model: nn.Module, img: int) -> float:
    """Forward FLOPs of one image: the framework's count (utils.count_macs) x 2."""
    return 2 * count_macs(model, img)


def best_time(model: nn.Module, batch: int, img: int, device: torch.device, repeats: int,
              train: bool) -> float:
    """Best of ``repeats`` timed steps (AdamW for training): on a shared machine the minimum
    is the figure least disturbed by other processes."""
    x = torch.randn(batch, 3, img, img, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    return min(alternating_times({"step": step_fn(model, x, train, optimizer=optimizer)}, repeats)["step"])


def bench_train_step(device: torch.device, repeats: int, batch: int = 16) -> None:
    """DAT-T++ and ViT-S training steps (AdamW) in alternating rounds, min of each: load from
    other processes hits both alike, and the ratio of achieved FLOP/s is what counts."""
    import timm
    fns, flops = {}, {}
    for name, build in (("dat_pp_tiny", lambda: create_model("dat_pp_tiny")),
                        ("vit_small_patch16_224", lambda: timm.create_model("vit_small_patch16_224"))):
        torch.manual_seed(0)
        model = build().to(device)
        flops[name] = 3 * forward_flops(model, 224) * batch
        x = torch.randn(batch, 3, 224, 224, device=device)
        fns[name] = step_fn(model, x, True, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))
    times = alternating_times(fns, repeats)
    results = {}
    for name, t in times.items():
        best = min(t)
        results[name] = flops[name] / best
        print(f"[step] {name}: {best:.2f} s/step (batch {batch}, min of {len(t)} alternating rounds), "
              f"{flops[name] / 1e9:.0f} GFLOP/step, {flops[name] / best / 1e9:.1f} GFLOP/s, {batch / best:.1f} img/s")
    per_round = [flops["dat_pp_tiny"] / d / (flops["vit_small_patch16_224"] / v)
                 for d, v in zip(times["dat_pp_tiny"], times["vit_small_patch16_224"])]
    print(f"[step] achieved FLOP/s ratio DAT-T++ / ViT-S = "
          f"{results['dat_pp_tiny'] / results['vit_small_patch16_224']:.2f} (per round: "
          f"{', '.join(f'{r:.2f}' for r in per_round)})")


def bench_models(device: torch.device, repeats: int, batch: int) -> None:
    per_image = {}
    for name in list_models("dat*"):
        torch.manual_seed(0)
        model = create_model(name).to(device)
        img = model.img_size
        gmacs = forward_flops(model, img) / 2e9
        t_eval = best_time(model, batch, img, device, repeats, train=False)
        t_train = best_time(model, batch, img, device, repeats, train=True)
        per_image[name] = t_eval / batch
        print(f"[models] {name:16s} {img}px {gmacs:6.2f} GMACs  eval {batch / t_eval:7.2f} img/s  "
              f"train {batch / t_train:7.2f} img/s  (batch {batch})", flush=True)
        del model
    for small, big in (("dat_pp_base", "dat_pp_base_384"), ("dat_base", "dat_base_384")):
        if small in per_image and big in per_image:
            print(f"[scaling] {small} -> {big}: eval time per image x{per_image[big] / per_image[small]:.2f} "
                  f"for x{(384 / 224) ** 2:.2f} tokens")


FLEX_SHAPES = ((16, 2, 56, 56, 32), (16, 4, 28, 28, 32), (16, 8, 14, 14, 32))  # DAT-T++ stages 1-3


def bench_flex(device: torch.device, repeats: int) -> None:
    if not flex_available():
        print("[flex] this torch has no FlexAttention")
        return
    train = device.type not in ("cpu", "mps")
    for shape in FLEX_SHAPES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(*shape, device=device, requires_grad=train) for _ in range(3))
        rpb = torch.randn(shape[1], 13, 13, device=device, requires_grad=train)

        def run(backend: str):
            def step() -> None:
                with torch.set_grad_enabled(train):
                    out = neighborhood_attention(q, k, v, rpb, 7, backend=backend)
                    if train:
                        out.backward(torch.ones_like(out))
                synchronize(device)
            return step
        times = alternating_times({"tiled": run("tiled"), "flex": run("flex")}, max(repeats, 3))
        tiled, flex = min(times["tiled"]), min(times["flex"])
        print(f"[flex] {shape} {'fwd+bwd' if train else 'fwd (no grad)'}: tiled {tiled * 1e3:.1f} ms, "
              f"flex {flex * 1e3:.1f} ms, flex / tiled {flex / tiled:.2f} (min of {len(times['flex'])} rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    parser.add_argument("--only", default="na,step,models", help="comma-separated parts to run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="batch of the per-model figures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    parts = set(args.only.split(","))
    unknown = parts - {"na", "step", "models", "flex"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    if "na" in parts:
        bench_neighborhood(device, args.repeats)
    if "step" in parts:
        bench_train_step(device, args.repeats)
    if "models" in parts:
        bench_models(device, args.repeats, args.batch)
    if "flex" in parts:
        bench_flex(device, args.repeats)


if __name__ == "__main__":
    main()
