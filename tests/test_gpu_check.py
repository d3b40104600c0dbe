"""tools/gpu_check.py: the GPU script's code runs on the CPU (--dry-run, tiny shapes), and
its GPU-only judgements (peak table, goals) are checked with made-up figures."""
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
    """Every model kind trains a step in bf16 and fp16 within tolerance of fp32, NA matches the
    gather reference, every speed model times eager and channels-last, the first also
    compiled; what needs CUDA (or a known peak) is skipped by name; exit code 0; the JSON
    holds it all."""
    out = tmp_path / "gpu_check.json"
    result = run_cmd([sys.executable, "tools/gpu_check.py", "--dry-run", "--json", str(out), "--compile-models", "1",
                      "--compile-timeout-s", "300"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["env"]["device"] == "cpu" and data["env"]["dry_run"] is True
    assert not data["errors"]
    rows = {(r["model"], r["dtype"]): r for r in data["precision"]}
    assert set(rows) == {(m, d) for m in gpu_check.PRECISION_MODELS for d in ("bfloat16", "float16")}
    assert all(r["ok"] and r["finite"] for r in rows.values())
    assert "cpu_flash" in rows[("vit_base_patch16_224", "bfloat16")]["sdpa"]
    assert data["na"]["vs_gather_float32"]["ok"] and data["na"]["vs_gather_bfloat16"]["ok"]
    assert data["na"]["vs_sdpa"]["flops_ratio"] > 0
    speed = {(r["model"], r["mode"]) for r in data["speed"]}
    first = gpu_check.MAIN_MODELS[0]
    assert speed == {(m, mode) for m in gpu_check.MAIN_MODELS for mode in ("eager", "channels_last")} | {
        (first, "compile")}
    assert all(r["img_s"] > 0 and r["mfu"] is None for r in data["speed"])
    compiled = next(r for r in data["speed"] if r["mode"] == "compile")
    assert compiled["speedup_vs_eager"] > 0 and compiled["first_step_s"] > 0
    skipped = [s["what"] for s in data["skipped"]]
    assert "CUDA" in skipped and all(f"compile {m}" in skipped for m in gpu_check.MAIN_MODELS[1:])
    assert {g["goal"]: g["status"] for g in data["goals"]} == dict.fromkeys(gpu_check.GOALS, "skipped")
    for header in ("[precision]", "[na]", "[speed]", "[goals]"):
        assert header in result.stdout
    assert "0 failed check(s), 0 error(s), 0 goal(s) not met" in result.stdout


def test_peaks_and_goals_on_a_gpu_as_the_script_would_judge_them(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    assert gpu_check.device_peak_tflops(cuda, None) == (989.0, "table (H200)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert gpu_check.device_peak_tflops(cuda, None)[0] == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX 6000 Ada")
    assert gpu_check.device_peak_tflops(cuda, None)[0] is None
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
