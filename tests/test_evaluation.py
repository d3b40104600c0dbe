"""--eval and --throughput: the '* Acc@1' line, the report files (per-class, confusion matrix,
predictions, metrics.json) equal on 1 and 2 processes, weight-file layouts, EMA weights, crops."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import QUICK, RUN, last_acc, main_here, run_cmd

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each


def test_eval_accepts_weight_file_layouts_and_rejects_another_model(trained, out_dir, tmp_path, capsys):
    """Weights under 'state_dict', bare, or as a DDP-wrapped 'model_ema' evaluate alike; weights
    of another depth are refused in one line naming what is missing."""
    weights = trained.checkpoint(1)["model"]
    layouts = {"state_dict": {"state_dict": weights}, "bare": weights,
               "ema_ddp": {"model_ema": {f"module.{k}": v for k, v in weights.items()}}}
    results = set()
    for name, obj in layouts.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        ev = main_here(capsys, "--cfg", QUICK, "--output", str(out_dir), "--eval", "--resume", str(path))
        assert ev.returncode == 0, ev.stderr[-3000:]
        results.add(last_acc(ev.stdout))
    assert len(results) == 1

    ev = main_here(capsys, "--cfg", QUICK, "--output", str(out_dir), "--eval", "--resume", str(tmp_path / "bare.pth"),
                  "--opts", "MODEL.VIT.DEPTH", "5")
    assert ev.returncode == 2
    message = ev.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "does not match" in message and "missing" in message and "blocks.4" in message


def test_throughput_mode(out_dir, capsys):
    result = main_here(capsys, "--cfg", QUICK, "--output", str(out_dir), "--throughput", "--batch-size", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval" in result.stdout and "train step" in result.stdout and "img/s" in result.stdout


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files_and_distributed_evaluation_gathers_each_image_once(trained, tmp_path, capsys):
    out, ckpt, record = trained.out, trained.run / "ckpt_epoch_1.pth", trained.records()[-1]
    one = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--tag", "eval1", "--eval", "--resume", str(ckpt))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cmd(["bash", "evaluate.sh", "2", QUICK, str(ckpt), "--output", str(out)])  # tag 'eval'
    assert two.returncode == 0, two.stderr[-3000:]
    assert "* Acc@1" in two.stdout.strip().splitlines()[-1]
    acc1, acc5, images = last_acc(one.stdout)
    assert last_acc(two.stdout) == (acc1, acc5, images) and images == 360
    assert acc1 == pytest.approx(record["val_acc1"], abs=1e-3)
    folder1, folder2 = out / RUN / "eval1", out / RUN / "eval"
    for name in ("per_class_accuracy.csv", "predictions.csv"):
        assert (folder1 / name).read_bytes() == (folder2 / name).read_bytes(), f"{name}: 1 vs 2 processes"
    single, double = (json.loads((f / "metrics.json").read_text()) for f in (folder1, folder2))
    assert single.pop("loss") == pytest.approx(double.pop("loss"), rel=1e-6)  # other batches: float32 rounding
    assert single == double
    predictions = read_csv(folder1 / "predictions.csv")
    assert [row["file"] for row in predictions] == [str(i) for i in range(360)]  # digits: each index once
    assert list(predictions[0]) == ["file", "label"] + [f"{w}{i}" for i in range(1, 6) for w in ("top", "prob")]
    for row in predictions:
        probs = [float(row[f"prob{i}"]) for i in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    hits = sum(row["top1"] == row["label"] for row in predictions)
    assert 100 * hits / 360 == pytest.approx(acc1, abs=1e-3)
    per_class = read_csv(folder1 / "per_class_accuracy.csv")
    assert [row["name"] for row in per_class] == [str(c) for c in range(10)]
    assert sum(int(row["images"]) for row in per_class) == 360
    correct = sum(float(row["acc1"]) * int(row["images"]) / 100 for row in per_class)
    assert correct == pytest.approx(hits, abs=0.01)
    metrics = json.loads((folder1 / "metrics.json").read_text())
    assert metrics["acc1"] == pytest.approx(acc1, abs=1e-3) and metrics["images"] == 360
    assert metrics["weights"] == "model" and metrics["checkpoint"] == str(ckpt)
    confusions = metrics["top_confusions"]
    assert confusions and all({"true", "predicted", "count"} == set(c) for c in confusions)
    assert (folder1 / "confusion_matrix.png").stat().st_size > 10_000
    assert "evaluation report: per_class_accuracy.csv, confusion_matrix.png" in one.stdout


def test_use_ema_evaluates_the_ema_weights(trained, tmp_path, capsys):
    out, ckpt, record = trained.out, trained.run / "ckpt_epoch_1.pth", trained.records()[-1]
    result = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--tag", "ema", "--eval", "--resume", str(ckpt),
                      "--use-ema")
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_acc(result.stdout)[0] == pytest.approx(record["ema_acc1"], abs=1e-3)
    assert json.loads((out / RUN / "ema" / "metrics.json").read_text())["weights"] == "EMA"
    plain = tmp_path / "plain.pth"
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, plain)
    refused = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--eval", "--resume", str(plain), "--use-ema")
    assert refused.returncode == 2 and "holds no EMA weights" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_test_crop_pct_overrides_the_crop(trained, capsys):
    out, ckpt = trained.out, trained.run / "ckpt_epoch_1.pth"
    result = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--tag", "crop", "--eval", "--resume", str(ckpt),
                      "--test-crop-pct", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / RUN / "crop" / "metrics.json").read_text())
    assert metrics["crop_pct"] == 0.5  # quickstart itself does not crop
    bad = main_here(capsys, "--cfg", QUICK, "--eval", "--resume", str(ckpt), "--test-crop-pct", "0")
    assert bad.returncode == 2 and "TEST.CROP_PCT: must be in (0, 1]" in bad.stderr


def test_image_folders_name_files_and_leave_out_unreadable_images(tmp_path, capsys):
    """'file' is the image path where the dataset has one; an unreadable image skipped with
    DATA.SKIP_BAD_IMAGES is not in the report, and no image is there twice."""
    from config import load_config
    from model_config import build_model
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    readable = []
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = data / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                path = folder / f"{i}.png"
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
                if split == "val":
                    readable.append(str(path))
    (data / "val" / "dog" / "broken.png").write_bytes(b"not an image")
    opts = ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(data), "MODEL.NUM_CLASSES", "2",
            "DATA.SKIP_BAD_IMAGES", "True"]
    weights = tmp_path / "w.pth"
    torch.save({"model": build_model(load_config(QUICK, opts)).state_dict()}, weights)
    out = tmp_path / "out"
    result = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--tag", "eval", "--eval", "--pretrained", str(weights),
                      "--opts", *opts)
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_acc(result.stdout)[2] == 6
    rows = read_csv(out / RUN / "eval" / "predictions.csv")
    assert sorted(row["file"] for row in rows) == sorted(readable)
    assert {row["label"] for row in rows} == {"cat", "dog"}
    assert [row["name"] for row in read_csv(out / RUN / "eval" / "per_class_accuracy.csv")] == ["cat", "dog"]
