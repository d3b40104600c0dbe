"""The slow end-to-end accuracy checks, each run once: the README quickstart (>= 97% on digits, and
evaluate.sh reproduces its best) and bf16 autocast within one point of float32."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import AVG_POOL, QUICK, RUN, final_line, last_acc, run_two_at_a_time

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
# one process's share of the trainings: main.py's main on each argument list in turn (the
# imports paid once, as main_here does); its exit code the worst of theirs
WORKER = "import json, sys, main; sys.exit(max([main.main(args) for args in json.loads(sys.argv[1])]))"


@pytest.fixture(scope="module")
def trainings(request, tmp_path_factory) -> Path:
    """The output folder of every training the selected tests check, shared between two
    processes (CI's two cores), longest first, each to the process with less work so far: the
    quickstart (60 epochs), the bf16 runs (30, ~1.25x float32's time per epoch), the float32
    runs (30). Each trains on one thread, so side by side changes no number; run apart, each
    test left the second core idle (the quickstart alone, or float32 waiting for its bf16 pair)."""
    out = tmp_path_factory.mktemp("accuracy") / "out"
    tests = {item.originalname for item in request.session.items if item.path == Path(__file__)}
    jobs: list[tuple[float, list[str]]] = []  # (cost in float32 epochs, main.py's arguments)
    if "test_quickstart_reaches_97_and_evaluate_sh_reproduces_the_best" in tests:
        jobs.append((60, ["--cfg", QUICK, "--output", str(out)]))
    if "test_bf16_digits_accuracy_within_one_point_of_fp32" in tests:
        for tag, flags, cost in (("bf16", ["--amp", "bfloat16"], 37.5), ("fp32", ["--no-amp"], 30)):
            jobs += [(cost, ["--tag", f"{tag}_{seed}", "--seed", str(seed), *flags, "--cfg", QUICK, "--output",
                             str(out), "--opts", "TRAIN.EPOCHS", "30", "PRINT_FREQ", "1000", "SAVE_FREQ", "1000",
                             *AVG_POOL]) for seed in SEEDS]
    shares: list[list[list[str]]] = [[], []]
    load = [0.0, 0.0]
    for cost, args in jobs:
        i = load.index(min(load))
        shares[i].append(args)
        load[i] += cost
    shares = [share for share in shares if share]
    results = run_two_at_a_time([[sys.executable, "-c", WORKER, json.dumps(share)] for share in shares], timeout=900)
    for share, result in zip(shares, results):
        assert result.returncode == 0, (share, result.stderr[-3000:])
    return out


def test_quickstart_reaches_97_and_evaluate_sh_reproduces_the_best(trainings, out_dir):
    """The README's quickstart: >= 97% val top-1 on digits (98.6% for this seed, as `python
    main.py --cfg configs/quickstart.yaml` gives it; seeds 0-2 all >= 98.6%, BENCHMARKS.md);
    evaluate.sh on ckpt_best.pth gives exactly the best accuracy the training log reported."""
    run = trainings / RUN / "quickstart"
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

    curves = trainings / "curves.png"
    ev, plot = run_two_at_a_time([
        ["bash", "evaluate.sh", "1", QUICK, str(run / "ckpt_best.pth"), "--output", str(out_dir)],
        [sys.executable, "tools/plot_curves.py", str(run / "metrics.jsonl"), "-o", str(curves)]])
    assert ev.returncode == 0, ev.stderr[-3000:]
    acc1, _, images = last_acc(ev.stdout)
    assert "* Acc@1" in final_line(ev.stdout)
    assert acc1 == pytest.approx(best, abs=1e-3) and images == 360
    assert plot.returncode == 0 and curves.stat().st_size > 10_000


def test_bf16_digits_accuracy_within_one_point_of_fp32(trainings):
    """The quickstart ViT with average pooling (AVG_POOL) for 30 epochs, float32 and CPU bf16
    autocast, seeds 0-2: the mean over seeds of the last five epochs' val top-1 agrees within
    1 point. One seed alone cannot show it: bf16 changes the trajectory, and two equally good
    runs differ by ~0.7 points (std) on 360 images; one pair of six differed by 1.3
    (BENCHMARKS.md)."""
    acc: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for tag in acc:
        for seed in SEEDS:
            metrics = trainings / RUN / f"{tag}_{seed}" / "metrics.jsonl"
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
            assert len(records) == 30
            acc[tag].append(sum(r["val_acc1"] for r in records[-5:]) / 5)
    assert "AMP: bfloat16 autocast on cpu" in (trainings / RUN / "bf16_0" / "log_rank0.txt").read_text()
    fp32, bf16 = (sum(v) / len(v) for v in (acc["fp32"], acc["bf16"]))
    assert fp32 >= 97.0 and abs(bf16 - fp32) <= 1.0, acc
