"""Stopping and resuming: a run stopped any way (deleted checkpoint, kill -9, SIGTERM, Ctrl-C, a bad
validation image), on one process or two, and run again ends with the weights of a run never interrupted, bit for bit,
whatever varies (precision, recipe, data format, compilation); a resumed run follows the new
command where it can and refuses in one line where it cannot."""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import main as main_module
import numpy as np
import pytest
import torch
import yaml

from config import load_config

from tests.conftest import (AVG_POOL, ONE_EPOCH, QUICK, ROOT, RUN, TRAINED_OPTS, assert_same_run, copy_run,
                            folder_args, image_tree, log_has, main_here, one_line_error, quiet_env, records,
                            run_main, train_sh, truncate, wait_for)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each


# ------------------------------------------------------------- 1. resume, changed command
def test_a_resumed_run_follows_the_new_epochs_and_learning_rate(trained, out_dir, capsys):
    """A finished 2-epoch run (a copy of the shared one) rerun with more epochs and another
    lr: every changed key is logged, epochs 2-3 train on the schedule of the new command (not
    the checkpoint's), and config.yaml holds the new values with the change recorded beneath them."""
    run = copy_run(trained, out_dir)
    changed = trained.args(out_dir) + ["TRAIN.EPOCHS", "4", "TRAIN.BASE_LR", "1.0e-4"]
    assert main_module.main(changed) == 0
    out = capsys.readouterr().out
    assert "resume: TRAIN.EPOCHS 2 in the checkpoint, 4 now" in out
    assert "resume: TRAIN.BASE_LR 0.002 in the checkpoint, 0.0001 now" in out
    got = records(run)
    assert [r["epoch"] for r in got] == [0, 1, 2, 3]
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    cfg = load_config(QUICK, [*TRAINED_OPTS, "TRAIN.EPOCHS", "4", "TRAIN.BASE_LR", "1.0e-4"])
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


def test_a_change_that_cannot_be_honoured_is_refused(out_dir, capsys):
    base = ["--cfg", QUICK, "--output", str(out_dir), "--tag", "opt", "--opts", *ONE_EPOCH]
    assert main_module.main(base) == 0
    capsys.readouterr()
    err = one_line_error(capsys, *base, "TRAIN.EPOCHS", "2", "TRAIN.OPTIMIZER.NAME", "sgd")
    assert "cannot resume" in err and "TRAIN.OPTIMIZER.NAME 'sgd' (it was 'adamw')" in err
    err = one_line_error(capsys, *base, "TRAIN.EPOCHS", "2", "TRAIN.LAYER_DECAY", "0.5")
    assert "optimizer state does not fit" in err and "--pretrained" in err


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
@pytest.mark.slow
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


def stopped_step(stdout: str, signal_name: str) -> int:
    line = [l for l in stdout.splitlines() if f"{signal_name}: stopped at epoch 0 step" in l]
    assert line, stdout[-2000:]
    return int(line[0].split("step ")[1].split("/")[0])


# How a run is stopped -> (extra options, what to wait for in the log before stopping it).
# SAVE_EVERY_STEPS 7 does not divide the 44 steps of an epoch (SAVE_FREQ 2: epoch 0's end is
# not saved, so kill -9 after its metrics line resumes from its step 42); Ctrl-C with a loader
# worker checks that the worker leaves the signal to the main process.
STOPS = {
    "kill -9": (["TRAIN.SAVE_EVERY_STEPS", "7", "SAVE_FREQ", "2"], None),
    "SIGTERM": (["PRINT_FREQ", "1"], "Train [0][5/44]"),
    "Ctrl-C": (["PRINT_FREQ", "1", "DATA.NUM_WORKERS", "1"], "Train [0][10/44]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(STOPS))
def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(how, trained, tmp_path, capsys):
    """The shared 2-epoch run is the reference. The same command under another tag is
    stopped: kill -9 as soon as epoch 0's metrics line is written (no handler, no cleanup;
    its newest checkpoint is epoch 0's step 42), or SIGTERM / Ctrl-C in epoch 0 (the step
    finishes, a mid-epoch checkpoint is saved, exit 75). Running the same command again
    resumes from the newest checkpoint and ends with the reference's weights, EMA, optimizer
    and schedule, bit for bit, and the same logged losses, one line per epoch (an epoch's
    average survives the stop; a resumed epoch's line replaces the one written before)."""
    extra, wait_text = STOPS[how]
    tag = how.replace(" ", "").replace("-", "")
    args = trained.args(tmp_path / "out", tag) + extra
    run = tmp_path / "out" / RUN / tag
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=quiet_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if wait_text is None:
            wait_for(lambda: (run / "metrics.jsonl").exists(), proc, "epoch 0's metrics line")
            assert proc.poll() is None, "the run ended within 20 ms of epoch 0's metrics line"
            proc.kill()
        else:
            wait_for(log_has(run / "log_rank0.txt", wait_text), proc, wait_text)
            proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if wait_text is None:
        assert proc.returncode == -9
    else:
        assert proc.returncode == 75 and "Traceback" not in stderr, stderr[-3000:]
        step = stopped_step(stdout, "SIGTERM" if how == "SIGTERM" else "SIGINT")
        assert 5 <= step < 44 and (run / f"ckpt_epoch_0_step_{step}.pth").exists()
        assert not (run / "ckpt_epoch_0.pth").exists() and not (run / "metrics.jsonl").exists()
    left = sorted(p.name for p in run.glob("ckpt_epoch_*.pth"))
    if how == "SIGTERM":  # the same stop resumed at another batch size, in a copy of the folder
        resumes_by_images_seen(capsys, args, run, tmp_path / "copy", step)
    again = main_here(capsys, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [l for l in again.stdout.splitlines() if "resumed from" in l]
    assert resumed, f"no resume after {how} (checkpoints {left})"
    if wait_text is not None:
        assert f"(epoch 0 after step {step}," in again.stdout
    else:  # epoch 0 runs its last 2 steps and validates again
        assert "(epoch 0 after step 42," in again.stdout, resumed
    for epoch in (0, 1) if wait_text is not None else (1,):  # SAVE_FREQ 2: no ckpt_epoch_0.pth
        assert_same_run(trained.checkpoint(epoch), torch.load(run / f"ckpt_epoch_{epoch}.pth", weights_only=True),
                        f"{how} ({resumed[0]})")
    for got, want in zip(records(run), trained.records(), strict=True):
        assert got["train_loss"] == want["train_loss"] and got["val_acc1"] == want["val_acc1"]


@pytest.mark.slow
def test_two_processes_stopped_mid_epoch_resume_to_the_uninterrupted_run(two_processes, tmp_path):
    """Two processes draw their own mixup and drop path. Stopped twice, each time after saving
    (exit 75, no traceback) with each rank's random state: SIGTERM to train.sh in epoch 0 (it
    passes it on), then Ctrl-C to the whole process group in epoch 1 (as a terminal sends it:
    the launcher passes it on too, and that second signal is not a second Ctrl-C). The same
    command again ends with the uninterrupted 2-process run's weights, optimizer and
    schedule, bit for bit (with rank 0's state restored on both ranks, the weights differ)."""
    command = train_sh(2, tmp_path / "out")
    run = tmp_path / "out" / RUN / "ddp"
    env = {**quiet_env(), "PYTHON": sys.executable}
    for epoch, stop, said in ((0, lambda proc: proc.send_signal(signal.SIGTERM), "SIGTERM: stopped at epoch 0 step"),
                              (1, lambda proc: os.killpg(proc.pid, signal.SIGINT), "SIGINT: stopped at epoch 1 step")):
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            wait_for(log_has(run / "log_rank0.txt", f"Train [{epoch}][5/"), proc, f"step 5 of epoch {epoch}")
            stop(proc)
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 75 and "Traceback" not in stderr, stderr[-3000:]
        assert said in stdout and (epoch == 0 or "(epoch 0 after step" in stdout), stdout[-2000:]
    assert len(list(run.glob("ckpt_epoch_1_step_*.pth"))) == 1
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(epoch 1 after step" in again.stdout and "reseeds" not in again.stdout
    assert_same_run(torch.load(two_processes / "ckpt_epoch_1.pth", weights_only=True),
                    torch.load(run / "ckpt_epoch_1.pth", weights_only=True), "a 2-process stop and resume")


def test_each_rank_restores_its_own_random_state_or_reseeds_on_another_process_count(caplog):
    """restore_rng gives rank r the state rank r saved (an older checkpoint's one dict: a
    1-process run's); on another process count each rank reseeds from (seed, rank, step),
    distinct per rank and repeatable, and one line says so."""
    from checkpoint import restore_rng, rng_state
    from utils import DistEnv
    cpu = torch.device("cpu")

    def draws() -> tuple:
        return torch.rand(2).tolist(), random.random(), float(np.random.rand())

    states, expected = [], []
    for rank in range(2):
        torch.manual_seed(rank), random.seed(rank), np.random.seed(rank)
        states.append(rng_state(cpu))
        expected.append(draws())
    logger = logging.getLogger("test.restore_rng")
    for rank in (1, 0):
        restore_rng(states, DistEnv(rank, 2, rank, cpu), 0, 50, logger)
        assert draws() == expected[rank]
    restore_rng(states[1], DistEnv(0, 1, 0, cpu), 0, 50, logger)
    assert draws() == expected[1] and not caplog.records
    with caplog.at_level(logging.INFO, "test.restore_rng"):
        reseeded = []
        for rank in (0, 1, 1):
            restore_rng(states, DistEnv(rank, 3, rank, cpu), 0, 50, logger)
            reseeded.append(draws())
    assert reseeded[1] == reseeded[2] and reseeded[0] != reseeded[1] and reseeded[0] not in expected
    assert [r.getMessage() for r in caplog.records][0] == (
        "resume: the checkpoint holds the random state of 2 process(es), this run has 3: each process "
        "reseeds from (SEED, its rank, step 50), so the rest of the epoch draws other random numbers than "
        "an uninterrupted run would")


def resumes_by_images_seen(capsys, args: list[str], run, copy, step: int) -> None:
    """Stopped at step ``step`` of 44 (batch 32), resumed with --batch-size 64 (22 steps):
    the run goes on after the images already seen, not after as many steps of the new
    size, and finishes the epoch's 22 steps."""
    moved = copy / RUN / run.name
    shutil.copytree(run, moved)
    again = main_here(capsys, "--batch-size", "64", *[str(copy) if a == str(run.parents[1]) else a for a in args],
                     "TRAIN.EPOCHS", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume: DATA.BATCH_SIZE 32 in the checkpoint, 64 now" in again.stdout
    assert (f"resume: {step * 32} images of epoch 0 were seen at another batch size or process count; "
            f"at 64 images per step that is step {step // 2} of 22") in again.stdout
    assert f"(epoch 0 after step {step // 2}," in again.stdout
    steps = [l for l in again.stdout.splitlines() if "Train [0][" in l]
    assert steps[0].split("Train [0][")[1].startswith(f"{step // 2 + 1}/22]") and "[22/22]" in steps[-1]


DEIT3 = ["AUG.AUTO_AUGMENT", "3a", "AUG.COLOR_JITTER", "0.3", "AUG.TRAIN_CROP", "src", "AUG.CROP_PAD", "1",
         "TRAIN.LOSS.NAME", "bce", "MODEL.LABEL_SMOOTHING", "0.0", "TRAIN.LOSS.BCE_TARGET_THRESH", "0.0",
         "TRAIN.EMA.ENABLED", "True", "TRAIN.EMA.WARMUP", "True", "AUG.MIXUP_OFF_EPOCH", "2",
         "TRAIN.LR_SCHEDULER.NAME", "plateau", "TRAIN.LR_SCHEDULER.PATIENCE_EPOCHS", "0",
         "TRAIN.CLIP_MODE", "agc", "TRAIN.CLIP_GRAD", "0.05", "TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1",
         "SAVE_FREQ", "1", "PRINT_FREQ", "100", "DETERMINISTIC", "True"]
SHARDS = ["DATA.DATASET", "wds", "DATA.IMG_SIZE", "16", "MODEL.NUM_CLASSES", "3", "DATA.BATCH_SIZE", "4",
          "DATA.NUM_WORKERS", "2", "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1", "SAVE_FREQ", "1",
          "DETERMINISTIC", "True", "AUG.HFLIP", "0.5"]
# What varies -> (main.py flags before --opts, options, the epochs the run trains)
RECIPES = {
    "fp32": None,  # the shared run
    "fp16 autocast, loss-scaled": (["--amp", "float16"], [*TRAINED_OPTS, *AVG_POOL], 2),
    "DeiT III recipe": ([], DEIT3, 3),  # 3-Augment, BCE, EMA warm-up, mixup off, plateau, AGC
    "webdataset shards, 2 workers": ([], SHARDS, 2),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_deleting_the_last_checkpoint_and_rerunning_reproduces_the_run(recipe, trained, shard_sets, tmp_path, capsys):
    """A finished run whose last checkpoint is deleted: the same command resumes after the
    epoch before and reproduces the deleted checkpoint bit for bit, for each precision,
    recipe and data format: weights, EMA, optimizer, schedule (plateau state included) and
    the loss scale with its growth counter (a scaler not restored would count only the last
    epoch's steps). Checkpoints hold float32 whatever the autocast."""
    out = tmp_path / "out"
    if RECIPES[recipe] is None:
        run, args, epochs = copy_run(trained, out), trained.args(out), 2
    else:
        flags, opts, epochs = RECIPES[recipe]
        data = ["--data-path", str(shard_sets[1])] if "shards" in recipe else []
        args = ["--cfg", QUICK, "--output", str(out), "--tag", "r", *data, *flags, "--opts", *opts]
        first = main_here(capsys, *args)
        assert first.returncode == 0, first.stderr[-3000:]
        run = out / RUN / "r"
    last = f"ckpt_epoch_{epochs - 1}.pth"
    reference = torch.load(run / last, weights_only=True)
    (run / last).unlink()
    second = main_here(capsys, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"ckpt_epoch_{epochs - 2}.pth" in second.stdout and "resumed from" in second.stdout
    resumed = torch.load(run / last, weights_only=True)
    assert_same_run(reference, resumed, recipe)
    for part in ("model", "ema"):
        dtypes = {v.dtype for v in (resumed[part] or resumed["model"]).values() if v.is_floating_point()}
        assert dtypes == {torch.float32}, f"{part} holds {dtypes}"
    assert all(math.isfinite(r["train_loss"]) for r in records(run))
    assert {r["epoch"] for r in records(run)} == set(range(epochs))
    if recipe.startswith("fp16"):
        steps = 1437 // 32
        assert "AMP: float16 autocast on cpu, loss-scaled" in second.stdout
        assert resumed["scaler"]["_growth_tracker"] == 2 * steps and resumed["scaler"]["scale"] == 2.0 ** 16
        moments = {v.dtype for s in resumed["optimizer"]["state"].values() for k, v in s.items() if k != "step"}
        assert moments == {torch.float32}
    if recipe.startswith("DeiT"):
        assert set(resumed["lr_scheduler"]["plateau"]) >= {"best", "num_bad_epochs"}
    if "shards" in recipe:
        assert "7 steps/epoch" in second.stdout and "2 of the 30 images each process draws" in second.stdout
