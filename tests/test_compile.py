"""TRAIN.COMPILE on the CPU (inductor): it trains like eager, its checkpoints are eager's,
runs resume across the switch, and a machine without a compiler is told so at start."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import compiling

from tests.conftest import QUICK, RUN, run_cmd, run_main, run_two_at_a_time

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each



def _epochs(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes_across_the_switch(out_dir):
    """One epoch of a 1-block quickstart ViT eager and compiled: the same mean loss within 1e-3;
    the compile time is logged once; the checkpoint has the bare model's keys. The compiled
    run resumes eagerly for a second epoch, then compiled again for a third."""
    def command(tag: str, epochs: int, compile_: bool) -> list[str]:
        return [sys.executable, "main.py", "--cfg", QUICK, "--output", str(out_dir), "--tag", tag, "--opts",
                "MODEL.VIT.DEPTH", "1", "TRAIN.EPOCHS", str(epochs), "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "100",
                "TRAIN.COMPILE", str(compile_)]

    def main_run(tag: str, epochs: int, compile_: bool) -> str:
        result = run_cmd(command(tag, epochs, compile_))
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    results = run_two_at_a_time([command("switch", 1, True), command("eager", 1, False)])  # side by side
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-3000:] for r in results]
    out = results[0].stdout
    assert "TRAIN.COMPILE: torch.compile compiles the model in the first step" in out
    took = re.findall(r"torch\.compile: the first step, compiling included, took ([\d.]+) s", out)
    assert len(took) == 1 and float(took[0]) > 0
    eager = _epochs(out_dir / RUN / "eager" / "metrics.jsonl")
    compiled = _epochs(out_dir / RUN / "switch" / "metrics.jsonl")
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], abs=1e-3)
    assert compiled[0]["val_acc1"] == pytest.approx(eager[0]["val_acc1"], abs=1.0)
    run = out_dir / RUN / "switch"
    keys = torch.load(run / "ckpt_epoch_0.pth", weights_only=True)["model"].keys()
    assert not any("_orig_mod" in k for k in keys)
    assert keys == torch.load(out_dir / RUN / "eager" / "ckpt_epoch_0.pth", weights_only=True)["model"].keys()

    out = main_run("switch", 2, False)  # compiled -> eager
    assert "resumed from" in out and "ckpt_epoch_0.pth" in out and "torch.compile" not in out
    out = main_run("switch", 3, True)  # eager -> compiled
    assert "resumed from" in out and "ckpt_epoch_1.pth" in out
    assert "torch.compile: the first step, compiling included, took" in out
    records = _epochs(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[2]["train_loss"] < records[0]["train_loss"]
    assert not any("_orig_mod" in k for k in torch.load(run / "ckpt_epoch_2.pth", weights_only=True)["model"])


def test_compile_without_a_compiler_is_one_line_before_anything_is_written(out_dir):
    result = run_main("--cfg", QUICK, "--output", str(out_dir), "--opts", "TRAIN.COMPILE", "True",
                      env={"CXX": "/nonexistent/g++"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "config error: --opts: TRAIN.COMPILE: inductor needs a C++ compiler for CPU kernels and none runs "
        "(/nonexistent/g++; set CXX, or install g++); or train eagerly with TRAIN.COMPILE False")
    assert not out_dir.exists()


def test_what_compiling_for_cuda_needs(monkeypatch):
    """No GPU here: what the CUDA check says when Triton or a C compiler is missing."""
    import torch.utils._triton as triton_utils
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    assert "needs Triton for CUDA kernels" in compiling.toolchain_missing(cuda)
    monkeypatch.setattr(triton_utils, "has_triton", lambda: True)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert "Triton needs a C compiler" in compiling.toolchain_missing(cuda)
    monkeypatch.delenv("CC")
    assert compiling.toolchain_missing(cuda) is None  # gcc is installed here
