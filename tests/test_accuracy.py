"""The slow end-to-end accuracy checks, each run once: the README quickstart (>= 97% on digits, and
evaluate.sh reproduces its best) and bf16 autocast within one point of float32."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import AVG_POOL, QUICK, ROOT, RUN, final_line, last_acc, quiet_env, run_cmd, run_main

pytestmark = pytest.mark.slow


def test_quickstart_reaches_97_and_evaluate_sh_reproduces_the_best(out_dir):
    """The README's quickstart: >= 97% val top-1 on digits (98.9% for this seed; seeds 0-2
    all >= 98.6%, BENCHMARKS.md); evaluate.sh on ckpt_best.pth gives exactly the best
    accuracy the training log reported."""
    result = run_main("--cfg", QUICK, "--output", str(out_dir), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = out_dir / RUN / "quickstart"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 60 and records[-1]["epoch"] == 59
    best = max(r["val_acc1"] for r in records)
    assert best >= 97.0, f"best val top-1 {best:.2f} < 97"
    assert records[-1]["max_acc1"] == best
    # SAVE_FREQ 5 -> epochs 4, 9, ..., 59 saved; KEEP_CKPTS 3 keeps the newest three
    assert sorted(p.name for p in run.glob("ckpt_epoch_*.pth")) == \
        ["ckpt_epoch_49.pth", "ckpt_epoch_54.pth", "ckpt_epoch_59.pth"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["MODEL"]["NAME"] == RUN and saved["TRAIN"]["EPOCHS"] == 60

    ckpt = torch.load(run / "ckpt_best.pth", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "scaler", "ema", "epoch", "max_accuracy", "rng",
            "config"} <= set(ckpt)
    assert ckpt["max_accuracy"] == pytest.approx(best)

    ev = run_cmd(["bash", "evaluate.sh", "1", QUICK, str(run / "ckpt_best.pth"), "--output", str(out_dir)])
    assert ev.returncode == 0, ev.stderr[-3000:]
    acc1, _, images = last_acc(ev.stdout)
    assert "* Acc@1" in final_line(ev.stdout)
    assert acc1 == pytest.approx(best, abs=1e-3) and images == 360

    plot = run_cmd([shutil.which("python") and __import__("sys").executable, "tools/plot_curves.py",
                    str(run / "metrics.jsonl"), "-o", str(out_dir / "curves.png")])
    assert plot.returncode == 0 and (out_dir / "curves.png").stat().st_size > 10_000


def test_bf16_digits_accuracy_within_one_point_of_fp32(out_dir):
    """The quickstart ViT with average pooling (AVG_POOL) for 30 epochs, float32 and CPU bf16
    autocast, seeds 0-2, each pair side by side: the mean over seeds of the last five epochs'
    val top-1 agrees within 1 point. One seed alone cannot show it: bf16 changes the
    trajectory, and two equally good runs differ by ~0.7 points (std) on 360 images; one
    pair of six differed by 1.3 (BENCHMARKS.md)."""
    base = ["--cfg", QUICK, "--output", str(out_dir), "--opts", "TRAIN.EPOCHS", "30", "PRINT_FREQ", "1000",
            "SAVE_FREQ", "1000", *AVG_POOL]
    acc: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for seed in (0, 1, 2):
        runs = {tag: subprocess.Popen([sys.executable, "main.py", "--tag", f"{tag}_{seed}", "--seed", str(seed),
                                       *flags, *base], cwd=ROOT, env=quiet_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
                for tag, flags in (("fp32", ["--no-amp"]), ("bf16", ["--amp", "bfloat16"]))}
        for tag, proc in runs.items():
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err[-3000:]
            metrics = out_dir / RUN / f"{tag}_{seed}" / "metrics.jsonl"
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
            assert len(records) == 30
            acc[tag].append(sum(r["val_acc1"] for r in records[-5:]) / 5)
    assert "AMP: bfloat16 autocast on cpu" in (out_dir / RUN / "bf16_0" / "log_rank0.txt").read_text()
    fp32, bf16 = (sum(v) / len(v) for v in (acc["fp32"], acc["bf16"]))
    assert fp32 >= 97.0 and abs(bf16 - fp32) <= 1.0, acc
