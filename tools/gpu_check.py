"""What only a GPU can show, in one prepared script: a table on stdout and a JSON file.

    python tools/gpu_check.py                  # one GPU, under 8 minutes (--budget-s)
    python tools/gpu_check.py --dry-run        # the same code on the CPU at tiny shapes, seconds

Sections (each one's failure is recorded and the next runs; the JSON is rewritten after each;
every model is built with dynamo's caches reset, so no model inherits another's recompiles):

1. precision: ViT-S/16, ViT-B/16, DAT-T++, DAT-B++ and every ViT variant kind (lai, dis,
   dislai, performer, deform) at tiny and small: one train step in bf16 and in fp16 (the
   framework's autocast and LossScaler) is finite and its loss and (unscaled) gradient norm
   are within tolerance of float32 (TF32 off); which SDPA backend each model ran.
2. performer: each Performer attention kind's layer at ViT-S/16's width (--dry-run's too) with
   q and k of standard deviation 3, as trained weights give them (fresh weights hide an
   overflow), under bf16 and fp16 autocast against float32: finite, and within twice the
   softmax layer's error.
3. flex: the FlexAttention value and gradient tests on CUDA (``pytest -k cuda
   tests/test_flex.py``, in their own process); on the CPU they skip themselves.
4. na: neighborhood attention (models.dat_attention, the tiled op) against the plain gather
   reference (tools/benchmark_dat.py): outputs and gradients, fp32 and bf16; then its
   fwd+bwd FLOP/s against dense SDPA at the same tokens.
5. speed: bf16 train steps (AdamW) of ViT-S/16, ViT-B/16, DAT-T++ and DAT-B++, eager and
   channels-last alternating in this process, then torch.compile alternating with eager in a
   process of its own per model (killed, with its compile workers, after
   --compile-timeout-s): img/s, model FLOP utilisation (3x forward FLOPs of utils.count_macs
   x 2, over the GPU's dense bf16 peak: a table keyed by the exact device name, or
   --peak-tflops), peak memory, the first (compiling) step's time and which SDPA backend ran.

6. decode: ``DATA.DECODER nvjpeg``'s device step (data/device_decode.py: a batch of JPEGs
   decoded with nvjpeg, cropped, resized and flipped on the GPU) against the Pillow path a
   loader worker runs for the same crops (decode as far as the crop, timm's random-resized crop
   and flip, to uint8) on one CPU core: images/s of each and the ratio (how many loader cores
   one GPU's decoding stands in for), and the mean / max pixel difference between the two.

Goals printed last: ViT-B/16 bf16 train MFU >= 45%; DAT-T++ achieved train FLOP/s >= 0.5x
ViT-S/16's; neighborhood attention >= 0.5x the FLOP/s of dense SDPA at the same tokens, on
CUDA. Exit code 0 when every check passed and every goal was met or skipped, 1 otherwise.
What the CPU path lacks (CUDA, a known peak) is skipped by name, so ``--dry-run`` runs the
same code in the test suite (tests/test_gpu_check.py), with one size of each model's code
(at its tiny shapes the sizes differ only in width; the others are skipped by name).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models  # noqa: E402
from amp import LossScaler, autocast_factory  # noqa: E402
from benchmark_dat import NA_SHAPE, gather_neighborhood_attention  # noqa: E402
from compiling import toolchain_missing  # noqa: E402
from errors import run_tool  # noqa: E402
from models.dat_attention import neighborhood_attention  # noqa: E402
from utils import alternating_times, count_macs, peak_memory_mib, step_fn, synchronize  # noqa: E402

KINDS = ("lai", "dis", "dislai", "performer", "deform")
MAIN_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "dat_pp_tiny", "dat_pp_base")
PRECISION_MODELS = MAIN_MODELS + tuple(f"vit_{k}_{s}_patch16_224" for k in KINDS for s in ("tiny", "small"))
SPEED_BATCH = {"vit_small_patch16_224": 256, "vit_base_patch16_224": 256, "dat_pp_tiny": 128, "dat_pp_base": 64}
# relative tolerance of loss and gradient norm against float32, per autocast dtype
TOLERANCE = {"bfloat16": {"loss": 0.02, "grad_norm": 0.05}, "float16": {"loss": 0.005, "grad_norm": 0.02}}
# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, keyed by torch.cuda.get_device_name exactly:
# a part of a name would match another GPU ("L4" is in "L40" and "L40S", "H100" in "H100 PCIe").
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
               "NVIDIA H200": 989.0, "NVIDIA GH200 480GB": 989.0, "NVIDIA B200": 2250.0,
               "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-PCIE-40GB": 312.0,
               "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L40S": 362.0, "NVIDIA L40": 181.0, "NVIDIA L4": 121.0}
# Performer kinds checked with large q, k; performer_lai with its window gone from the start,
# so that the FAVOR+ estimate of the far keys runs.
PERFORMER_KINDS = {"performer": {}, "performer_lai": {"schedule": [[0, None]]}, "performer_dis": {}}
FLEX_TESTS = ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", "tests/test_flex.py"]
FLEX_TESTS_TIMEOUT_S = 300.0
SECTIONS = ("precision", "performer", "flex", "na", "speed", "decode")
GOALS = {"vit_base_mfu": 0.45, "dat_vs_vit_flops": 0.5, "na_vs_sdpa_flops": 0.5}
SDPA_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "efficient",
            "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
            "_scaled_dot_product_fused_attention_overrideable": "overrideable",
            "_scaled_dot_product_attention_math": "math"}


class Check:
    """The run's record: rows per section, skips by name, errors, goals; written as JSON."""

    def __init__(self, path: str, deadline: float, dry_run: bool, device: torch.device) -> None:
        self.path, self.deadline, self.dry_run, self.device = path, deadline, dry_run, device
        self.data: dict[str, Any] = {"env": {}, "precision": [], "performer": [], "flex": {}, "na": {},
                                     "speed": [], "decode": {}, "goals": [], "skipped": [], "errors": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        print(f"  skipped: {what}: {why}", flush=True)

    def error(self, what: str, e: BaseException) -> None:
        self.data["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc(limit=6)})
        print(f"  ERROR in {what}: {type(e).__name__}: {str(e)[:300]}", flush=True)

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------ helpers
def build(name: str, dry_run: bool, device: torch.device) -> tuple[nn.Module, int]:
    """The registered model at its size, or a tiny one of the same code for --dry-run; dynamo's
    caches are reset first (the compiled flex_attention would otherwise count this model's
    shapes against its recompile limit on top of the previous models')."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {}
    if dry_run:  # 32 px, 16 channels per head; two blocks per ViT and per DAT stage (its first two kinds)
        kwargs = {"img_size": 32}
        if name.startswith("vit"):
            heads = next(h for size, h in (("tiny", 3), ("small", 6), ("base", 12)) if f"_{size}_" in name)
            kwargs.update(depth=2, embed_dim=16 * heads)
        else:
            from models.dat import DAT_CONFIGS
            arch = DAT_CONFIGS[name]
            spec = arch["stage_spec"]
            kwargs.update(depths=tuple(min(2, len(s)) for s in spec), stage_spec=tuple(s[:2] for s in spec),
                          dims=tuple(16 * h for h in arch["heads"]), dim_stem=16 * arch["heads"][0])
    model = models.create_model(name, **kwargs).to(device)
    return model, model.pretrained_cfg["input_size"][-1]


def one_size_each(check: Check, section: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """``names``; under --dry-run the first size of each model's code, the others skipped by name:
    at the tiny shapes sizes differ only in width (ViT-B/16 runs ViT-S/16's code, DAT-B++
    DAT-T++'s, a small variant the tiny one's), so a second size runs no other code."""
    if not check.dry_run:
        return names
    kept: dict[str, str] = {}
    for name in names:
        kept.setdefault(re.sub(r"_(tiny|small|base)(?=_|$)", "", name), name)
    others = [name for name in names if name not in kept.values()]
    if others:
        check.skip(f"{section} {', '.join(others)}", "--dry-run runs one size of each model's code")
    return tuple(kept.values())


def sdpa_backends(fn: Callable[[], Any]) -> list[str]:
    """Which scaled_dot_product_attention kernels ran in ``fn`` (aten op names, profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key.split("::")[-1] for e in prof.key_averages()}
    return sorted({label for op, label in SDPA_OPS.items() if op in names}) or ["none"]


def device_peak_tflops(device: torch.device, flag: Optional[float]) -> tuple[Optional[float], str]:
    if flag:
        return flag, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for the CPU (--peak-tflops)"
    name = torch.cuda.get_device_name(device)
    if name in PEAK_TFLOPS:
        return PEAK_TFLOPS[name], f"table ({name})"
    return None, f"{name!r} is not in the table (--peak-tflops)"


@contextlib.contextmanager
def exact_float32():
    """float32 references without TF32 (cuDNN convolutions use it by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- sections
def env_section(check: Check, args) -> None:
    device = check.device
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                            "dry_run": check.dry_run, "threads": torch.get_num_threads(),
                            "compile_toolchain": toolchain_missing(device) or "ok"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    else:
        info.update(name=platform.processor() or platform.machine())
    info["peak_tflops"], info["peak_source"] = device_peak_tflops(device, args.peak_tflops)
    check.data["env"] = info
    print("env: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)


def train_step_numbers(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """Loss and unscaled gradient norm of one step, the way engine.train_one_epoch takes it:
    autocast, LossScaler backward / unscale; an fp16 overflow lowers the scale and retries,
    as a skipped training step would."""
    device = x.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    scaler = LossScaler(dtype == torch.float16, device.type)
    autocast = autocast_factory(dtype, device)
    backoffs = 0
    for _ in range(24):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with autocast():
            loss = F.cross_entropy(model(x).float(), y)
        scaler.backward(loss)
        norm = scaler.unscale_and_clip(optimizer, params, 0.0).item()
        finite = math.isfinite(loss.item()) and math.isfinite(norm)
        scaler.step(optimizer, skip=True)  # lr 0: nothing moves; the scale updates
        if finite or not scaler.enabled:
            break
        backoffs += 1
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grad_norm": norm, "finite": finite, "scale_backoffs": backoffs}


def precision_section(check: Check, names: tuple[str, ...]) -> None:
    device = check.device
    batch = 2 if check.dry_run else 8
    print(f"\n[precision] one train step per dtype, batch {batch}; tolerance vs float32 {TOLERANCE}", flush=True)
    print(f"{'model':32s} {'dtype':9s} {'loss':>9s} {'grad norm':>10s} {'d loss':>8s} {'d norm':>8s} "
          f"{'ok':>3s}  sdpa", flush=True)
    names = one_size_each(check, "precision", names)
    for name in names:
        if check.left() < 0:
            check.skip(f"precision {name}", "time budget")
            continue
        try:
            model, img = build(name, check.dry_run, device)
            model.train()
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, 3, img, img, generator=g).to(device)
            y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
            with exact_float32():
                ref = train_step_numbers(model, x, y, None)
            bf16 = torch.bfloat16
            backends = sdpa_backends(lambda: train_step_numbers(model, x, y, bf16))
            for dtype in (torch.bfloat16, torch.float16):
                got = train_step_numbers(model, x, y, dtype)
                label = str(dtype)[6:]
                d_loss = abs(got["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
                d_norm = abs(got["grad_norm"] - ref["grad_norm"]) / max(abs(ref["grad_norm"]), 1e-12)
                tol = TOLERANCE[label]
                ok = got["finite"] and d_loss <= tol["loss"] and d_norm <= tol["grad_norm"]
                check.data["precision"].append({"model": name, "dtype": label, **got, "loss_fp32": ref["loss"],
                                                "grad_norm_fp32": ref["grad_norm"], "rel_loss": d_loss,
                                                "rel_grad_norm": d_norm, "ok": ok, "sdpa": backends})
                print(f"{name:32s} {label:9s} {got['loss']:9.4f} {got['grad_norm']:10.4f} {d_loss:8.2e} "
                      f"{d_norm:8.2e} {'yes' if ok else 'NO':>3s}  {','.join(backends)}"
                      + (f"  (fp16 scale lowered {got['scale_backoffs']}x)" if got["scale_backoffs"] else ""),
                      flush=True)
            del model
        except Exception as e:  # noqa: BLE001  (recorded; the next model runs)
            check.error(f"precision {name}", e)
        check.write()


def performer_section(check: Check) -> None:
    """Each Performer kind's layer, built by a one-block ViT-S/16 (its width in --dry-run too:
    at a tiny width the overflow does not show), with q and k of std 3 on unit-variance
    tokens: under bf16 and fp16 autocast finite and within twice the softmax layer's
    relative error against float32."""
    device, batch = check.device, 2 if check.dry_run else 8
    print("\n[performer] attention layers with q, k of std 3 under autocast vs float32 "
          "(limit: 2x softmax's error)", flush=True)
    errors: dict[tuple[str, str], float] = {}
    for kind, attn_args in {"softmax": {}, **PERFORMER_KINDS}.items():
        if check.left() < 0:
            check.skip(f"performer {kind}", "time budget")
            continue
        try:
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = models.create_model("vit_small_patch16_224", depth=1, attn=kind, attn_args=attn_args or None)
            model.to(device)
            layer, dim = model.blocks[0].attn.eval(), model.embed_dim
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():  # rows of q and k: std 3 on unit-variance inputs
                layer.qkv.weight[:2 * dim] = (torch.randn(2 * dim, dim, generator=g) * 3 * dim ** -0.5).to(device)
            tokens = model.patch_embed.num_patches + model.num_prefix_tokens
            x = torch.randn(batch, tokens, dim, generator=g).to(device)
            with torch.no_grad(), exact_float32():
                ref = layer(x).float()
            for dtype in (torch.bfloat16, torch.float16):
                label = str(dtype)[6:]
                with torch.no_grad(), autocast_factory(dtype, device)():
                    out = layer(x).float()
                finite = bool(torch.isfinite(out).all())
                error = ((out - ref).norm() / ref.norm()).item() if finite else math.inf
                errors[kind, label] = error
                limit = 2 * errors.get(("softmax", label), math.nan) if kind != "softmax" else math.inf
                ok = finite and error <= limit
                check.data["performer"].append({"kind": kind, "dtype": label, "finite": finite, "rel_error": error,
                                                "limit": limit, "ok": ok})
                print(f"  {kind:14s} {label:9s} rel error {error:9.2e} (<= {limit:.2e})  {'ok' if ok else 'NOT OK'}",
                      flush=True)
            del model, layer
        except Exception as e:  # noqa: BLE001
            check.error(f"performer {kind}", e)
        check.write()


def start_child(cmd: list[str]) -> subprocess.Popen:
    """``cmd`` started in the repository in a session of its own (``finish_child`` may kill it
    with every process it starts)."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run_child(cmd: list[str], timeout_s: float) -> tuple[Optional[int], str]:
    return finish_child(start_child(cmd), timeout_s)


def finish_child(proc: subprocess.Popen, timeout_s: float) -> tuple[Optional[int], str]:
    """(exit code, output) of a ``start_child`` process, or (None, output) when it ran past
    ``timeout_s`` and was killed with every process it started (inductor's compile workers
    too). A timeout on a child, not SIGALRM in this process: an alarm raised inside inductor
    would leave its compile workers and caches broken."""
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, output
    except BaseException as e:
        output = kill_child(proc)
        if isinstance(e, subprocess.TimeoutExpired):
            return None, output
        raise


def kill_child(proc: subprocess.Popen) -> str:
    """Kill a ``start_child`` process and what it started; its output."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[0]


def flex_section(check: Check, tests: subprocess.Popen, started: float) -> None:
    """tests/test_flex.py's CUDA tests (FlexAttention against SDPA / the tiled op, values and
    gradients): ``tests``, pytest started at ``started`` (main starts it first, to run beside
    the untimed sections); on CUDA every one must run and pass."""
    print(f"\n[flex] {' '.join(FLEX_TESTS[1:])}", flush=True)
    limit = FLEX_TESTS_TIMEOUT_S
    code, output = finish_child(tests, max(started + limit - time.monotonic(), 0.0))
    lines = output.strip().splitlines() or [""]
    counts = {word.rstrip("s") if word.startswith("error") else word: int(n)
              for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xpassed|xfailed)\b", lines[-1])}
    passed, skipped = counts.get("passed", 0), counts.get("skipped", 0)
    ok = code == 0 and (check.device.type != "cuda" or (passed > 0 and not skipped))
    check.data["flex"] = {"command": " ".join(FLEX_TESTS[1:]), "exit_code": code, "counts": counts, "ok": ok,
                          "skips": [line for line in lines if line.startswith("SKIPPED")],
                          "output_tail": "\n".join(lines[-40:]) if not ok else ""}
    outcome = f"timed out after {limit:.0f} s" if code is None else f"{lines[-1]} (exit {code})"
    print(f"  {outcome} -> {'ok' if ok else 'NOT OK'}", flush=True)
    if not ok:
        print("\n".join("    " + line for line in lines[-40:]), flush=True)
    check.write()


def _max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def na_section(check: Check) -> None:
    device, record = check.device, check.data["na"]
    print("\n[na] neighborhood attention (tiled op) against the gather reference, then dense SDPA", flush=True)
    try:  # correctness at a shape that is not a multiple of the tile, against float32 gather
        shape = (2, 2, 15, 17, 16) if check.dry_run else (2, 2, 30, 44, 32)
        g = torch.Generator().manual_seed(0)
        base = [torch.randn(*shape, generator=g) for _ in range(3)] + [torch.randn(shape[1], 13, 13, generator=g)]

        def run(fn, dtype):
            inputs = [t.detach().clone().to(device, dtype).requires_grad_() for t in base]
            with exact_float32():
                out = fn(*inputs, 7)
                out.backward(torch.ones_like(out))
            return [out.detach()] + [t.grad for t in inputs]

        reference = run(gather_neighborhood_attention, torch.float32)
        names = ("out", "grad_q", "grad_k", "grad_v", "grad_rpb")
        for dtype in (torch.float32, torch.bfloat16):
            tiled = run(neighborhood_attention, dtype)
            ours = {n: _max_rel_error(a, b) for n, a, b in zip(names, tiled, reference)}
            if dtype == torch.float32:
                limits = dict.fromkeys(names, 1e-4)
            else:  # bf16: no worse than the gather reference computed in bf16 (x2, or 1e-2)
                plain = run(gather_neighborhood_attention, dtype)
                limits = {n: max(2 * _max_rel_error(a, b), 1e-2) for n, a, b in zip(names, plain, reference)}
            ok = all(ours[n] <= limits[n] for n in names)
            label = str(dtype)[6:]
            check.data["na"][f"vs_gather_{label}"] = {"shape": shape, "max_rel_error": ours, "limits": limits,
                                                      "ok": ok}
            print(f"  {label} vs float32 gather reference, shape {shape}: max rel error "
                  + ", ".join(f"{n} {ours[n]:.1e} (<= {limits[n]:.0e})" for n in names)
                  + f" -> {'ok' if ok else 'NOT OK'}", flush=True)
    except Exception as e:  # noqa: BLE001
        check.error("na vs gather", e)
    check.write()
    try:
        B, h, H, W, d = (2, 2, 14, 14, 16) if check.dry_run else (4 * NA_SHAPE[0],) + NA_SHAPE[1:]
        ks = 7
        dtype = torch.bfloat16 if device.type == "cuda" or check.dry_run else torch.float32
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, h, H, W, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        rpb = torch.randn(h, 2 * ks - 1, 2 * ks - 1, generator=g).to(device, dtype).requires_grad_()
        qd, kd, vd = (t.detach().reshape(B, h, H * W, d).requires_grad_() for t in (q, k, v))

        def na_step() -> None:
            out = neighborhood_attention(q, k, v, rpb, ks)
            out.backward(torch.ones_like(out))
            synchronize(device)

        def sdpa_step() -> None:
            out = F.scaled_dot_product_attention(qd, kd, vd)
            out.backward(torch.ones_like(out))
            synchronize(device)

        rounds = 3 if check.dry_run else 20
        times = alternating_times({"na": na_step, "sdpa": sdpa_step}, rounds, warmup=2)
        t_na, t_sdpa = statistics.median(times["na"]), statistics.median(times["sdpa"])
        # fwd+bwd counted as 3x the forward's useful products for both (2 FLOPs per MAC, 2 products)
        flops_na = 3 * 4 * B * h * H * W * d * ks * ks
        flops_sdpa = 3 * 4 * B * h * (H * W) ** 2 * d
        ratio = (flops_na / t_na) / (flops_sdpa / t_sdpa)
        record["vs_sdpa"] = {"shape": (B, h, H, W, d), "kernel": ks, "dtype": str(dtype)[6:],
                             "na_ms": t_na * 1e3, "sdpa_ms": t_sdpa * 1e3,
                             "na_tflops": flops_na / t_na / 1e12, "sdpa_tflops": flops_sdpa / t_sdpa / 1e12,
                             "flops_ratio": ratio, "sdpa": sdpa_backends(sdpa_step)}
        print(f"  fwd+bwd at {(B, h, H, W, d)} k {ks} {str(dtype)[6:]}: NA {t_na * 1e3:.2f} ms "
              f"({flops_na / t_na / 1e12:.2f} TFLOP/s), dense SDPA {t_sdpa * 1e3:.2f} ms "
              f"({flops_sdpa / t_sdpa / 1e12:.2f} TFLOP/s, {','.join(record['vs_sdpa']['sdpa'])}); "
              f"FLOP/s ratio {ratio:.3f}", flush=True)
    except Exception as e:  # noqa: BLE001
        check.error("na vs sdpa", e)
    check.write()


def decode_section(check: Check) -> None:
    import random

    import numpy as np
    from benchmark_data import imagenet_like_jpeg

    from config import load_config
    from data.decode import decode_rgb
    from data.device_decode import PlanCrop, Record, decode_batch
    from data.transforms import build_transform

    device = check.device
    print("\n[decode] DATA.DECODER nvjpeg on the device against a worker's Pillow path on one core", flush=True)
    try:
        count, size, img = (8, (100, 75), 32) if check.dry_run else (256, (500, 375), 224)
        opts = ["DATA.DATA_PATH", ROOT, "DATA.IMG_SIZE", str(img), "AUG.AUTO_AUGMENT", "none",
                "AUG.COLOR_JITTER", "0.0", "AUG.TRAIN_CROP", "rrc"]
        pil = build_transform(load_config("configs/vit/vit_small_patch16_224.yaml", opts), train=True)
        plan = PlanCrop(load_config("configs/vit/vit_small_patch16_224.yaml", opts + ["DATA.DECODER", "nvjpeg"]),
                        train=True)
        rng = np.random.default_rng(0)
        files = [imagenet_like_jpeg(rng, size) for _ in range(count)]  # tools/benchmark_data.py's
        records = [Record(torch.frombuffer(bytearray(f), dtype=torch.uint8), True, f"generated {i}", size[1], size[0])
                   for i, f in enumerate(files)]

        def seeded(fn):
            random.seed(0)
            torch.manual_seed(0)
            return fn()
        planned = seeded(lambda: [plan(r) for r in records])  # the worker's part of the device path
        reference = seeded(lambda: torch.stack([pil(decode_rgb(f)) for f in files]))
        decoded = decode_batch(planned, device).cpu()
        diff = (decoded.int() - reference.int()).abs()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a loader worker's core
        try:
            times = alternating_times({
                "pillow": lambda: [pil(decode_rgb(f)) for f in files],
                "device": lambda: (decode_batch(planned, device), synchronize(device))}, 3 if check.dry_run else 5)
        finally:
            torch.set_num_threads(threads)
        pillow_s, device_s = statistics.median(times["pillow"]), statistics.median(times["device"])
        check.data["decode"] = {"images": count, "size": size, "img_size": img, "pillow_img_s": count / pillow_s,
                                "device_img_s": count / device_s, "ratio": pillow_s / device_s,
                                "mean_abs_diff": diff.float().mean().item(), "max_abs_diff": diff.max().item()}
        print(f"  {count} JPEGs {size[0]}x{size[1]} -> {img}: Pillow path {count / pillow_s:.0f} img/s on one core, "
              f"{device.type} decode_batch {count / device_s:.0f} img/s ({pillow_s / device_s:.1f} cores); pixels "
              f"differ by {diff.float().mean().item():.2f} on average, at most {diff.max().item()}", flush=True)
    except Exception as e:  # noqa: BLE001
        check.error("decode", e)
    check.write()


def speed_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16


def speed_rounds(check: Check) -> int:
    return 2 if check.dry_run else 10


def speed_section(check: Check, names: tuple[str, ...], compile_models: int, peak: Optional[float],
                  compile_timeout_s: float = 150.0, compile_backend: str = "inductor") -> None:
    """Two passes: eager and channels-last for every model, then compiled (each alternating
    with eager again, in a process of its own), so that slow compiles cannot crowd out the
    eager figures."""
    device = check.device
    dtype = speed_dtype(device)
    autocast = autocast_factory(dtype, device)
    rounds = speed_rounds(check)
    print(f"\n[speed] train steps (AdamW), {str(dtype)[6:]} autocast, median of {rounds} alternating rounds",
          flush=True)
    print(f"{'model':24s} {'mode':14s} {'batch':>5s} {'img/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'peak MiB':>9s} {'1st step s':>10s}  sdpa", flush=True)
    names = one_size_each(check, "speed", names)
    why_no_compile = toolchain_missing(device)
    needed = 30.0 if check.dry_run else compile_timeout_s
    for compiling in (False, True):
        for i, name in enumerate(names):
            what = f"compile {name}" if compiling else f"speed {name}"
            if compiling and (why_no_compile or i >= compile_models):
                check.skip(what, why_no_compile or ("--dry-run compiles only with --compile-models N (tests/"
                                                    "test_compile.py compiles on the CPU)" if check.dry_run
                                                    else "--compile-models"))
                continue
            if check.left() < (needed if compiling else 0):
                check.skip(what, f"time budget ({check.left():.0f} s left)")
                continue
            try:
                base, img = build(name, check.dry_run, device)
                flops_per_image = 3 * 2 * count_macs(base, img)
                batch = 2 if check.dry_run else SPEED_BATCH.get(name, 64)
                if compiling:
                    del base
                    limit = min(compile_timeout_s, max(check.left(), 1.0))
                    rows = compiled_rows(check, name, batch, compile_backend, limit)
                    if rows is None:
                        continue
                else:
                    modes = {"eager": base, "channels_last": copy.deepcopy(base).to(memory_format=torch.channels_last)}
                    rows = _time_modes(check, name, modes, batch, img, autocast, rounds)
                    del base, modes
                if compiling:
                    rows["compile"]["speedup_vs_eager"] = rows["compile"]["img_s"] / rows["eager"]["img_s"]
                    rows = {"compile": rows["compile"]}  # eager was timed in the first pass
                for mode, row in rows.items():
                    row.update(model=name, mode=mode, dtype=str(dtype)[6:], gflop_per_image=flops_per_image / 1e9,
                               tflops=row["img_s"] * flops_per_image / 1e12)
                    row["mfu"] = row["tflops"] / peak if peak else None
                    check.data["speed"].append(row)
                    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
                    vs = f"  x{row['speedup_vs_eager']:.2f} vs eager" if "speedup_vs_eager" in row else ""
                    print(f"{name:24s} {mode:14s} {row['batch']:5d} {row['img_s']:9.1f} {row['tflops']:8.2f} "
                          f"{mfu:>6s} {row['peak_mib']:9.0f} {row['first_step_s']:10.2f}  "
                          f"{','.join(row['sdpa'])}{vs}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                check.error(what, e)
            check.write()


def compiled_rows(check: Check, name: str, batch: int, backend: str,
                  timeout_s: float) -> Optional[dict[str, dict[str, Any]]]:
    """The eager and compiled rows of ``name`` (``_time_modes``), timed by this script in a
    process of its own (``--compiled``): one that runs past ``timeout_s`` is killed with its
    compile workers and skipped by name; None then."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "compiled.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--compiled", name, "--batch", str(batch),
               "--compile-backend", backend, "--json", out] + (["--dry-run"] if check.dry_run else [])
        code, output = run_child(cmd, timeout_s)
        if code is None:
            check.skip(f"compile {name}", f"its process did not finish in {timeout_s:g} s (killed with its "
                                          f"compile workers)")
            return None
        if code != 0:
            raise RuntimeError(f"the compile process exited with {code}: {output[-2000:]}")
        with open(out) as f:
            result = json.load(f)
    for skipped in result["skipped"]:
        check.skip(skipped["what"], skipped["why"])
    return result["rows"]


def time_compiled(check: Check, name: str, batch: int, backend: str) -> int:
    """``--compiled NAME``, run by ``compiled_rows``: eager and torch.compile'd train steps of one
    model alternating in this fresh process; its rows and skips go to --json."""
    base, img = build(name, check.dry_run, check.device)
    modes = {"eager": base, "compile": torch.compile(copy.deepcopy(base), backend=backend)}
    rows = _time_modes(check, name, modes, batch, img, autocast_factory(speed_dtype(check.device), check.device),
                       speed_rounds(check))
    check.data = {"rows": rows, "skipped": check.data["skipped"]}
    check.write()
    return 0


def _time_modes(check: Check, name: str, modes: dict[str, nn.Module], batch: int, img: int,
                autocast, rounds: int) -> dict[str, dict[str, Any]]:
    """img/s, peak memory and first-step time of each mode's train step; on CUDA an
    out-of-memory batch is halved and retried."""
    device = check.device
    while True:
        try:
            x = torch.randn(batch, 3, img, img, device=device)
            fns, rows = {}, {}
            for mode, model in modes.items():
                inputs = x.contiguous(memory_format=torch.channels_last) if mode == "channels_last" else x
                fused = {"fused": True} if device.type == "cuda" else {}
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, **fused)
                fns[mode] = step_fn(model, inputs, True, autocast, optimizer, classes=modes["eager"].num_classes)
                start = time.perf_counter()
                fns[mode]()  # compiles a compiled model
                rows[mode] = {"batch": batch, "first_step_s": time.perf_counter() - start}
            times = alternating_times(fns, rounds, warmup=1)
            for mode, fn in fns.items():
                rows[mode]["img_s"] = batch / statistics.median(times[mode])
                rows[mode]["step_ms"] = statistics.median(times[mode]) * 1e3
                rows[mode]["peak_mib"] = peak_memory_mib(fn, device)
                rows[mode]["sdpa"] = sdpa_backends(fn)
            return rows
        except torch.cuda.OutOfMemoryError:
            if batch <= 1:
                raise
            fns = rows = None  # noqa: F841  (free the failed attempt's graphs)
            torch.cuda.empty_cache()
            check.skip(f"speed {name} batch {batch}", "out of memory: halved")
            batch //= 2


def goals_section(check: Check) -> None:
    data, cuda = check.data, check.device.type == "cuda"
    dry = "dry run (tiny shapes on the CPU)" if check.dry_run else None

    def best(model: str, key: str) -> Optional[float]:
        values = [r[key] for r in data["speed"] if r["model"] == model and r.get(key) is not None]
        return max(values) if values else None

    def goal(name: str, text: str, value: Optional[float], target: float, skip: Optional[str]) -> None:
        status = "skipped" if skip or value is None else ("met" if value >= target else "NOT MET")
        why = skip or ("not measured" if value is None else "")
        data["goals"].append({"goal": name, "text": text, "value": value, "target": target, "status": status,
                              "why": why})
        shown = "-" if value is None else f"{value:.3f}"
        print(f"  {text:58s} {shown:>8s} (>= {target})  {status}{': ' + why if why else ''}", flush=True)

    print("\n[goals]", flush=True)
    goal("vit_base_mfu", "ViT-B/16 bf16 train MFU (best mode)", best("vit_base_patch16_224", "mfu"),
         GOALS["vit_base_mfu"], dry or (None if data["env"].get("peak_tflops") else data["env"].get("peak_source")))
    dat, vit = best("dat_pp_tiny", "tflops"), best("vit_small_patch16_224", "tflops")
    goal("dat_vs_vit_flops", "DAT-T++ / ViT-S/16 achieved train FLOP/s (best modes)",
         dat / vit if dat and vit else None, GOALS["dat_vs_vit_flops"], dry)
    na = data["na"].get("vs_sdpa", {}).get("flops_ratio")
    goal("na_vs_sdpa_flops", "neighborhood attention / dense SDPA FLOP/s, fwd+bwd", na,
         GOALS["na_vs_sdpa_flops"], dry or (None if cuda else "NA on CUDA: not a CUDA device"))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the CPU at tiny shapes: the code path, in seconds")
    p.add_argument("--json", default="output/gpu_check.json", help="where the results go")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="start no new work after this many seconds, and no compile with less than "
                        "--compile-timeout-s left (the defaults keep a run under 8 minutes)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak, TFLOP/s, when it is not in the table")
    p.add_argument("--compile-models", type=int, default=None,
                   help="compile the first N speed models (default: all; with --dry-run: none)")
    p.add_argument("--compile-timeout-s", type=float, default=150.0,
                   help="kill a model's compiled timing (its own process, compile workers included) after "
                        "this long (DAT-T++'s compile took 58 min on the CPU)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the speed section (eager: dynamo only, seconds)")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--compiled", metavar="MODEL", help=argparse.SUPPRESS)  # compiled_rows' child process
    p.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    started = time.monotonic()
    if args.compile_models is None:
        args.compile_models = 0 if args.dry_run else len(MAIN_MODELS)
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run for the CPU code path", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    check = Check(args.json, started + args.budget_s, args.dry_run, device)
    if args.compiled:
        return time_compiled(check, args.compiled, args.batch, args.compile_backend)
    env_section(check, args)
    if device.type != "cuda":
        check.skip("CUDA", "the device is the CPU: CUDA kernels, NA on CUDA and MFU against a GPU peak are "
                           "not measured")
    only = set(args.only.split(","))
    if "flex" in only:  # beside the precision sections (numbers, not timings); collected before NA
        flex_tests, flex_started = start_child([sys.executable, *FLEX_TESTS]), time.monotonic()
    try:
        if "precision" in only:
            precision_section(check, PRECISION_MODELS)
        if "performer" in only:
            performer_section(check)
    except BaseException:
        if "flex" in only:
            kill_child(flex_tests)
        raise
    if "flex" in only:
        flex_section(check, flex_tests, flex_started)
    if "na" in only:
        na_section(check)
    if "speed" in only:
        speed_section(check, MAIN_MODELS, args.compile_models, check.data["env"]["peak_tflops"],
                      args.compile_timeout_s, args.compile_backend)
    if "decode" in only:
        decode_section(check)
    goals_section(check)
    failed = [r for r in check.data["precision"] + check.data["performer"] if not r["ok"]]
    failed += [check.data["flex"]] if check.data["flex"].get("ok") is False else []
    failed += [v for v in check.data["na"].values() if isinstance(v, dict) and v.get("ok") is False]
    unmet = [g for g in check.data["goals"] if g["status"] == "NOT MET"]
    check.data["summary"] = {"seconds": time.monotonic() - started, "failed_checks": len(failed),
                             "errors": len(check.data["errors"]), "goals_not_met": len(unmet),
                             "skipped": [s["what"] for s in check.data["skipped"]]}
    check.write()
    print(f"\n{len(failed)} failed check(s), {len(check.data['errors'])} error(s), {len(unmet)} goal(s) not met, "
          f"{len(check.data['skipped'])} skipped; {time.monotonic() - started:.0f} s; results in {args.json}",
          flush=True)
    return 0 if not (failed or unmet or check.data["errors"]) else 1


if __name__ == "__main__":
    run_tool(main)
