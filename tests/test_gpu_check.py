"""tools/gpu_check.py: the GPU script's code runs on the CPU (--dry-run, tiny shapes), and
its GPU-only judgements (peak table, goals, a compile past its timeout) are checked with
made-up figures."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import ROOT, run_cmd

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_on_the_cpu(tmp_path):
    """One size of each model's code (ViT-S/16, DAT-T++, each variant kind's tiny; the other
    sizes differ only in width at these shapes and are skipped by name) trains a step in bf16
    and fp16 within tolerance of fp32, each Performer kind with q, k of std 3 is as close as
    softmax (CPU autocast shows its fp16 overflow), the flex CUDA tests skip themselves, NA
    matches the gather reference, ViT-S/16 and DAT-T++ time eager and channels-last, the first
    also compiled in its own process (dynamo only: tests/test_compile.py pays for inductor),
    nvjpeg's decode step (here libjpeg-turbo) is timed against the Pillow path and gives its
    pixels within the resize's rounding; what needs CUDA (or a known peak) is skipped by name;
    exit code 0; the JSON holds it all."""
    out = tmp_path / "gpu_check.json"
    result = run_cmd([sys.executable, "tools/gpu_check.py", "--dry-run", "--json", str(out), "--compile-models", "1",
                      "--compile-backend", "eager", "--compile-timeout-s", "300"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["env"]["device"] == "cpu" and data["env"]["dry_run"] is True
    assert not data["errors"]
    speed_models = ("vit_small_patch16_224", "dat_pp_tiny")
    precision_models = speed_models + tuple(f"vit_{k}_tiny_patch16_224" for k in gpu_check.KINDS)
    rows = {(r["model"], r["dtype"]): r for r in data["precision"]}
    assert set(rows) == {(m, d) for m in precision_models for d in ("bfloat16", "float16")}
    assert all(r["ok"] and r["finite"] for r in rows.values())
    assert "cpu_flash" in rows[("vit_small_patch16_224", "bfloat16")]["sdpa"]
    performer = {(r["kind"], r["dtype"]): r["ok"] for r in data["performer"]}
    assert performer == {(k, d): True for k in ("softmax", *gpu_check.PERFORMER_KINDS) for d in ("bfloat16", "float16")}
    assert data["flex"]["ok"] and data["flex"]["counts"]["skipped"] >= 2 and "passed" not in data["flex"]["counts"]
    assert data["na"]["vs_gather_float32"]["ok"] and data["na"]["vs_gather_bfloat16"]["ok"]
    assert data["na"]["vs_sdpa"]["flops_ratio"] > 0
    speed = {(r["model"], r["mode"]) for r in data["speed"]}
    assert speed == {(m, mode) for m in speed_models for mode in ("eager", "channels_last")} | {
        ("vit_small_patch16_224", "compile")}
    assert all(r["img_s"] > 0 and r["mfu"] is None for r in data["speed"])
    compiled = next(r for r in data["speed"] if r["mode"] == "compile")
    assert compiled["speedup_vs_eager"] > 0 and compiled["first_step_s"] > 0
    skipped = [s["what"] for s in data["skipped"]]
    assert "CUDA" in skipped and "compile dat_pp_tiny" in skipped
    for section, names in (("precision", gpu_check.PRECISION_MODELS), ("speed", gpu_check.MAIN_MODELS)):
        others = [m for m in names if m not in precision_models]
        assert f"{section} {', '.join(others)}" in skipped and "dat_pp_base" in others
    assert {g["goal"]: g["status"] for g in data["goals"]} == dict.fromkeys(gpu_check.GOALS, "skipped")
    decode = data["decode"]
    assert decode["pillow_img_s"] > 0 and decode["device_img_s"] > 0 and decode["images"] == 8
    assert decode["mean_abs_diff"] < 1 and decode["max_abs_diff"] <= 4
    for header in ("[precision]", "[performer]", "[flex]", "[na]", "[speed]", "[decode]", "[goals]"):
        assert header in result.stdout
    assert "0 failed check(s), 0 error(s), 0 goal(s) not met" in result.stdout


def test_peaks_and_goals_on_a_gpu_as_the_script_would_judge_them(monkeypatch, tmp_path):
    cuda = torch.device("cuda", 0)

    def peak(name: str):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return gpu_check.device_peak_tflops(cuda, None)

    assert peak("NVIDIA H200") == (989.0, "table (NVIDIA H200)")
    # exact names: "L4" is in "NVIDIA L40", "H100" in "NVIDIA H100 PCIe", "L40" in "NVIDIA L40S"
    assert [peak(f"NVIDIA {n}")[0] for n in ("L4", "L40", "L40S", "H100 PCIe", "H100 80GB HBM3")] == \
        [121.0, 181.0, 362.0, 756.0, 989.0]
    assert peak("NVIDIA RTX 6000 Ada")[0] is None and peak("NVIDIA L4 Ti")[0] is None
    assert gpu_check.device_peak_tflops(cuda, 91.1) == (91.1, "--peak-tflops")

    check = gpu_check.Check(str(tmp_path / "g.json"), 0.0, False, cuda)
    check.data["env"] = {"peak_tflops": 989.0}
    check.data["speed"] = [
        {"model": "vit_base_patch16_224", "mode": "eager", "tflops": 400.0, "mfu": 400 / 989},
        {"model": "vit_base_patch16_224", "mode": "compile", "tflops": 470.0, "mfu": 470 / 989},
        {"model": "vit_small_patch16_224", "mode": "compile", "tflops": 300.0, "mfu": 300 / 989},
        {"model": "dat_pp_tiny", "mode": "channels_last", "tflops": 120.0, "mfu": 120 / 989}]
    check.data["na"] = {"vs_sdpa": {"flops_ratio": 0.2}}
    gpu_check.goals_section(check)
    goals = {g["goal"]: (g["status"], round(g["value"], 3)) for g in check.data["goals"]}
    assert goals == {"vit_base_mfu": ("met", 0.475), "dat_vs_vit_flops": ("NOT MET", 0.4),
                     "na_vs_sdpa_flops": ("NOT MET", 0.2)}


def test_each_model_starts_with_dynamo_reset_and_a_compile_past_its_timeout_is_killed(monkeypatch, tmp_path):
    """No SIGALRM: the compiled timing runs in a process of its own, killed (with its compile
    workers) at its timeout and skipped by name; every model is built after a dynamo reset."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    gpu_check.build("vit_small_patch16_224", True, torch.device("cpu"))
    assert resets == [1]
    check = gpu_check.Check(str(tmp_path / "g.json"), float("inf"), True, torch.device("cpu"))
    assert gpu_check.compiled_rows(check, "vit_small_patch16_224", 2, "eager", timeout_s=0.5) is None
    assert check.data["skipped"] == [{"what": "compile vit_small_patch16_224", "why": "its process did not finish "
                                      "in 0.5 s (killed with its compile workers)"}]
