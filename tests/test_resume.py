"""Stopping and resuming: a run stopped any way (deleted checkpoint, kill -9, SIGTERM, Ctrl-C, a bad
validation image) and run again ends with the weights of a run never interrupted, bit for bit,
whatever varies (precision, recipe, data format, compilation); a resumed run follows the new
command where it can and refuses in one line where it cannot."""
from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time

import main as main_module
import pytest
import torch
import yaml

from config import load_config

from tests.conftest import (AVG_POOL, FAST, ONE_EPOCH, QUICK, ROOT, RUN, folder_args, image_tree, log_has, one_line_error,
                            quiet_env, records, run_main, truncate, wait_for)


# ------------------------------------------------------------- 1. resume, changed command
def test_a_resumed_run_follows_the_new_epochs_and_learning_rate(out_dir, capsys):
    """A finished 2-epoch run rerun with more epochs and another lr: every changed key is
    logged, epochs 2-3 train on the schedule of the new command (not the checkpoint's), and
    config.yaml holds the new values with the change recorded beneath them."""
    base = ["--cfg", QUICK, "--output", str(out_dir), "--tag", "more", "--opts", *FAST]
    assert main_module.main(base) == 0
    capsys.readouterr()
    changed = base + ["TRAIN.EPOCHS", "4", "TRAIN.BASE_LR", "1.0e-4"]
    assert main_module.main(changed) == 0
    out = capsys.readouterr().out
    assert "resume: TRAIN.EPOCHS 2 in the checkpoint, 4 now" in out
    assert "resume: TRAIN.BASE_LR 0.002 in the checkpoint, 0.0001 now" in out
    run = out_dir / RUN / "more"
    got = records(run)
    assert [r["epoch"] for r in got] == [0, 1, 2, 3]
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    cfg = load_config(QUICK, [*FAST, "TRAIN.EPOCHS", "4", "TRAIN.BASE_LR", "1.0e-4"])
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, model, 1e-4)
    sched = build_scheduler(cfg, opt, 44, cfg.TRAIN.WARMUP_LR, cfg.TRAIN.MIN_LR)
    for record in got[2:]:  # the lr after each epoch's last step, on the 4-epoch cosine from 1e-4
        sched.step_update(44 * (record["epoch"] + 1))
        assert record["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), record["epoch"]
    assert got[2]["lr"] < 1e-4
    text = (run / "config.yaml").read_text()
    assert yaml.safe_load(text)["TRAIN"]["EPOCHS"] == 4
    history = [line for line in text.splitlines() if line.startswith("# resumed")]
    assert len(history) == 1 and "ckpt_epoch_1.pth" in history[0]
    assert "TRAIN.BASE_LR 0.002 -> 0.0001" in history[0] and "TRAIN.EPOCHS 2 -> 4" in history[0]


def test_a_stopped_epoch_resumes_by_images_seen_at_another_batch_size(out_dir):
    """SIGTERM in epoch 0 at batch 32 (44 steps), then the same command with
    --batch-size 64 (22 steps): the run goes on after the images already seen, not after
    as many steps of the new size, and finishes the epoch's 22 steps."""
    args = ["--cfg", QUICK, "--output", str(out_dir), "--tag", "bs", "--opts", *ONE_EPOCH, "PRINT_FREQ", "1"]
    run = out_dir / RUN / "bs"
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=quiet_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(log_has(run / "log_rank0.txt", "Train [0][20/44]"), proc, "step 20")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    step = int([l for l in stdout.splitlines() if "stopped at epoch 0 step" in l][0].split("step ")[1].split("/")[0])
    again = run_main("--batch-size", "64", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume: DATA.BATCH_SIZE 32 in the checkpoint, 64 now" in again.stdout
    assert (f"resume: {step * 32} images of epoch 0 were seen at another batch size or process count; "
            f"at 64 images per step that is step {step // 2} of 22") in again.stdout
    assert f"(epoch 0 after step {step // 2}," in again.stdout
    trained = [l for l in again.stdout.splitlines() if "Train [0][" in l]
    assert trained[0].split("Train [0][")[1].startswith(f"{step // 2 + 1}/22]") and "[22/22]" in trained[-1]


def test_a_change_that_cannot_be_honoured_is_refused(out_dir, capsys):
    base = ["--cfg", QUICK, "--output", str(out_dir), "--tag", "opt", "--opts", *ONE_EPOCH]
    assert main_module.main(base) == 0
    capsys.readouterr()
    err = one_line_error(capsys, *base, "TRAIN.EPOCHS", "2", "TRAIN.OPTIMIZER.NAME", "sgd")
    assert "cannot resume" in err and "TRAIN.OPTIMIZER.NAME 'sgd' (it was 'adamw')" in err
    err = one_line_error(capsys, *base, "TRAIN.EPOCHS", "2", "TRAIN.LAYER_DECAY", "0.5")
    assert "optimizer state does not fit" in err and "--pretrained" in err


# ------------------------------------------------------------------------------ 8. Ctrl-C
def test_ctrl_c_stops_at_a_step_boundary_saves_and_resumes(out_dir):
    args = ["--cfg", QUICK, "--output", str(out_dir), "--tag", "int", "--opts", *ONE_EPOCH, "PRINT_FREQ", "1",
            "DATA.NUM_WORKERS", "1"]
    run = out_dir / RUN / "int"
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=quiet_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(log_has(run / "log_rank0.txt", "Train [0][10/44]"), proc, "step 10")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75 and "Traceback" not in stderr, stderr[-3000:]
    stop = [l for l in stdout.splitlines() if "SIGINT: stopped at epoch 0 step" in l]
    assert stop, stdout[-2000:]
    step = int(stop[0].split("step ")[1].split("/")[0])
    assert (run / f"ckpt_epoch_0_step_{step}.pth").exists()
    again = run_main(*args)
    assert again.returncode == 0 and f"(epoch 0 after step {step}," in again.stdout, again.stderr[-3000:]


def test_a_second_ctrl_c_stops_at_once(monkeypatch, capsys, out_dir):
    """The StopSignal policy (a second SIGINT a second or more after the first raises, a
    launcher's copy within the second does not), and main.py's one line and exit 130."""
    from utils import StopSignal
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    stop = StopSignal()
    stop._handle(signal.SIGINT, None)
    clock[0] += 0.5
    stop._handle(signal.SIGINT, None)  # torchrun passing on the same Ctrl-C
    assert stop.requested() and stop.received == "SIGINT"
    clock[0] += 1.0
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    monkeypatch.undo()

    import engine
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code = main_module.main(["--cfg", QUICK, "--output", str(out_dir), "--opts", *ONE_EPOCH])
    err = capsys.readouterr().err.strip()
    assert code == 130 and len(err.splitlines()) == 1 and "second Ctrl-C" in err


# ------------------------------------------------------------------------- 5. found late
def test_an_unreadable_validation_image_keeps_the_epochs_training(tmp_path, out_dir):
    """The bad file shows only at validation: the run stops with one line naming it, the
    epoch's training saved; once the file is fixed the same command validates that epoch
    without training it again, and goes on."""
    root = image_tree(tmp_path / "data")
    good = (root / "val" / "dog" / "1.jpg").read_bytes()
    truncate(root / "val" / "dog" / "1.jpg")
    args = [*folder_args(root), "--output", str(out_dir), "--tag", "late"]
    result = run_main(*args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot read image" in result.stderr and "dog/1.jpg" in result.stderr
    run = out_dir / RUN / "late"
    assert (run / "ckpt_epoch_0_step_3.pth").exists() and not (run / "metrics.jsonl").exists()
    (root / "val" / "dog" / "1.jpg").write_bytes(good)
    again = run_main(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(epoch 0 after step 3," in again.stdout and "Train [0]" not in again.stdout
    assert [r["epoch"] for r in records(run)] == [0]


def _assert_same_run(reference: dict, other: dict, what: str) -> None:
    for part in ("model", "ema"):
        for key, value in reference[part].items():
            assert torch.equal(value, other[part][key]), f"{part}.{key} differs after {what}"
    assert other["optimizer"]["state"][0]["step"] == reference["optimizer"]["state"][0]["step"]
    assert other["optimizer"]["state"][0]["exp_avg"].equal(reference["optimizer"]["state"][0]["exp_avg"])
    assert other["lr_scheduler"] == reference["lr_scheduler"]
    assert other["max_accuracy"] == reference["max_accuracy"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(out_dir):
    """Run 2 epochs: the reference. (a) Delete the last checkpoint and run the same command
    again: it auto-resumes after epoch 0. (b) Under another tag with mid-epoch checkpoints
    (TRAIN.SAVE_EVERY_STEPS), kill -9 the run at a random moment after its first one and
    run the same command again: it resumes from the newest checkpoint, mid-epoch or not.
    Both must reproduce the reference bit for bit (weights, EMA, optimizer, schedule)."""
    args = ["--cfg", QUICK, "--output", str(out_dir), "--tag", "resume", "--opts", *FAST,
            "SAVE_FREQ", "1", "DETERMINISTIC", "True", "TRAIN.EMA.ENABLED", "True"]
    first = run_main(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    run = out_dir / RUN / "resume"
    uninterrupted = torch.load(run / "ckpt_epoch_1.pth", weights_only=True)
    (run / "ckpt_epoch_1.pth").unlink()
    second = run_main(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "ckpt_epoch_0.pth" in second.stdout
    _assert_same_run(uninterrupted, torch.load(run / "ckpt_epoch_1.pth", weights_only=True), "resume")

    # (b) kill -9 at a random step; SAVE_EVERY_STEPS 7 does not divide the 44 steps/epoch
    killed_args = [a if a != "resume" else "killed" for a in args] + ["TRAIN.SAVE_EVERY_STEPS", "7"]
    killed = out_dir / RUN / "killed"
    delay = random.Random(2026).uniform(0.0, 2.0)
    proc = subprocess.Popen([sys.executable, "main.py", *killed_args], cwd=ROOT, env=quiet_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(killed.glob("ckpt_epoch_*_step_*.pth")) and time.time() < deadline:
            assert proc.poll() is None, "the run ended before its first mid-epoch checkpoint"
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended within {delay:.2f}s of its first checkpoint"
        proc.kill()  # SIGKILL: no handler, no cleanup
    finally:
        proc.wait()
    assert proc.returncode == -9
    left = sorted(p.name for p in killed.glob("ckpt_epoch_*.pth"))
    again = run_main(*killed_args)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [l for l in again.stdout.splitlines() if "resumed from" in l]
    assert resumed, f"no resume after kill -9 {delay:.2f}s in (checkpoints {left})"
    _assert_same_run(uninterrupted, torch.load(killed / "ckpt_epoch_1.pth", weights_only=True),
                     f"kill -9 {delay:.2f}s after the first mid-epoch checkpoint ({resumed[0]})")
    records = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for got, want in zip(records, reference[:1] + reference[-1:]):
        assert got["train_loss"] == want["train_loss"] and got["val_acc1"] == want["val_acc1"]


def test_sigterm_stops_at_a_step_boundary_and_the_rerun_matches_an_uninterrupted_run(out_dir):
    """SIGTERM in the middle of an epoch: the step finishes, a mid-epoch checkpoint is
    saved, the exit code is 75. The same command resumes after that step and ends with
    the weights of a run that was never interrupted."""
    base = ["--cfg", QUICK, "--output", str(out_dir), "--opts", *ONE_EPOCH, "PRINT_FREQ", "5",
            "DETERMINISTIC", "True", "TRAIN.EMA.ENABLED", "True"]
    reference = run_main(*base[:4], "--tag", "ref", *base[4:])
    assert reference.returncode == 0, reference.stderr[-3000:]

    args = [*base[:4], "--tag", "pre", *base[4:]]
    run = out_dir / RUN / "pre"
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=quiet_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(log_has(run / "log_rank0.txt", "Train [0][5/44]"), proc, "step 5")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    line = [l for l in stdout.splitlines() if "SIGTERM: stopped at epoch 0 step" in l]
    assert line, stdout[-2000:]
    step = int(line[0].split("step ")[1].split("/")[0])
    assert 5 <= step < 44 and (run / f"ckpt_epoch_0_step_{step}.pth").exists()
    assert not (run / "ckpt_epoch_0.pth").exists() and not (run / "metrics.jsonl").exists()

    again = run_main(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(epoch 0 after step {step}," in again.stdout
    want = torch.load(out_dir / RUN / "ref" / "ckpt_epoch_0.pth", weights_only=True)
    got = torch.load(run / "ckpt_epoch_0.pth", weights_only=True)
    for part in ("model", "ema"):
        for key, value in want[part].items():
            assert torch.equal(value, got[part][key]), f"{part}.{key} differs"
    assert got["optimizer"]["state"][0]["step"] == want["optimizer"]["state"][0]["step"] == 44
    record = json.loads((run / "metrics.jsonl").read_text())
    ref_record = json.loads((out_dir / RUN / "ref" / "metrics.jsonl").read_text())
    assert record["train_loss"] == ref_record["train_loss"]  # the epoch's average survives the stop


def test_fp16_on_the_cpu_resumes_bit_for_bit_with_its_scaler_and_saves_float32(out_dir):
    """2 epochs of the quickstart (AVG_POOL) under CPU fp16 autocast with a GradScaler: the
    reference. Deleting the last checkpoint and rerunning resumes after epoch 0 and
    reproduces it bit for bit, loss scale and its growth counter included (a scaler not
    restored would count only epoch 1's steps). Model, EMA and optimizer state in the
    checkpoints are float32."""
    args = ["--cfg", QUICK, "--output", str(out_dir), "--tag", "fp16", "--amp", "float16", "--opts", *FAST,
            *AVG_POOL, "SAVE_FREQ", "1", "DETERMINISTIC", "True", "TRAIN.EMA.ENABLED", "True"]
    first = run_main(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "AMP: float16 autocast on cpu, loss-scaled" in first.stdout
    run = out_dir / RUN / "fp16"
    steps = 1437 // 32
    epoch0 = torch.load(run / "ckpt_epoch_0.pth", weights_only=True)
    uninterrupted = torch.load(run / "ckpt_epoch_1.pth", weights_only=True)
    assert epoch0["scaler"]["_growth_tracker"] == steps and epoch0["scaler"]["scale"] == 2.0 ** 16
    assert uninterrupted["scaler"]["_growth_tracker"] == 2 * steps
    (run / "ckpt_epoch_1.pth").unlink()
    second = run_main(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "ckpt_epoch_0.pth" in second.stdout
    resumed = torch.load(run / "ckpt_epoch_1.pth", weights_only=True)
    _assert_same_run(uninterrupted, resumed, "an fp16 resume")
    assert resumed["scaler"] == uninterrupted["scaler"]
    for part in ("model", "ema"):
        dtypes = {v.dtype for v in resumed[part].values() if v.is_floating_point()}
        assert dtypes == {torch.float32}, f"{part} holds {dtypes}"
    moments = {v.dtype for s in resumed["optimizer"]["state"].values() for k, v in s.items() if k != "step"}
    assert moments == {torch.float32}


# ------------------------------------------------------------------------ through main.py
DEIT3 = ["AUG.AUTO_AUGMENT", "3a", "AUG.COLOR_JITTER", "0.3", "AUG.TRAIN_CROP", "src", "AUG.CROP_PAD", "1",
         "TRAIN.LOSS.NAME", "bce", "MODEL.LABEL_SMOOTHING", "0.0", "TRAIN.LOSS.BCE_TARGET_THRESH", "0.0",
         "TRAIN.EMA.ENABLED", "True", "TRAIN.EMA.WARMUP", "True", "AUG.MIXUP_OFF_EPOCH", "2",
         "TRAIN.LR_SCHEDULER.NAME", "plateau", "TRAIN.LR_SCHEDULER.PATIENCE_EPOCHS", "0",
         "TRAIN.CLIP_MODE", "agc", "TRAIN.CLIP_GRAD", "0.05", "TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1",
         "SAVE_FREQ", "1", "PRINT_FREQ", "100", "DETERMINISTIC", "True"]


def test_deit3_recipe_keys_train_together_and_resume_exactly(tmp_path):
    """All the keys above in one digits run; deleting its last checkpoint and running the
    same command again resumes it to the same weights, EMA and plateau state."""
    out = tmp_path / "out"
    args = ["--cfg", QUICK, "--output", str(out), "--tag", "deit3", "--opts", *DEIT3]
    first = run_main(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    run = out / "vit_tiny_patch2_32" / "deit3"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["train_loss"]) for r in records)
    reference = torch.load(run / "ckpt_epoch_2.pth", weights_only=True)
    assert set(reference["lr_scheduler"]["plateau"]) >= {"best", "num_bad_epochs"}
    (run / "ckpt_epoch_2.pth").unlink()
    second = run_main(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "ckpt_epoch_1.pth" in second.stdout
    resumed = torch.load(run / "ckpt_epoch_2.pth", weights_only=True)
    for part in ("model", "ema"):
        for key, value in reference[part].items():
            assert torch.equal(value, resumed[part][key]), f"{part}.{key}"
    assert resumed["lr_scheduler"] == reference["lr_scheduler"]
