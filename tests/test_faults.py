"""Faults injected for real: a file size limit, damaged checkpoints, NaN losses and gradients,
another model's files, a second run in the same folder, a rank that dies (signals and kill -9
followed by a resume are in test_resume.py).

There is no slurm here: the slurm side is simulated with the stand-in srun of
conftest.FAKE_SRUN (it starts the tasks with SLURM_* variables, as srun does)."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import main as main_module
import pytest
import torch

import checkpoint
import losses
from amp import LossScaler
from checkpoint import CheckpointError, newest_valid_checkpoint, save_atomic
from engine import train_one_epoch
from train_state import TrainState
from utils import DistEnv

from tests.conftest import (FAKE_SRUN, FAST, ONE_EPOCH, QUICK, ROOT, RUN, log_has, main_here, one_line_error,
                            quiet_env, records, run_cmd, wait_for)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each


# ------------------------------------------------------------------- 2. one run a folder
@pytest.mark.slow
def test_a_second_run_in_the_same_folder_is_refused_until_the_first_is_gone(out_dir, capsys):
    """While a run trains, the same command again is refused in one line; after the first
    run is killed (its lock left behind) the command runs, replacing the stale lock."""
    args = ["--cfg", QUICK, "--output", str(out_dir), "--tag", "busy", "--opts", *FAST, "PRINT_FREQ", "1",
            "SAVE_FREQ", "100"]
    run = out_dir / RUN / "busy"
    first = subprocess.Popen([sys.executable, "main.py", *args, "TRAIN.EPOCHS", "30"], cwd=ROOT,
                             env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(log_has(run / "log_rank0.txt", "Train [0][2/44]"), first, "the first run's training")
        second = main_here(capsys, *args)
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip()
        assert len(line.splitlines()) == 1 and f"is in use by another run (pid {first.pid}" in line
        assert first.poll() is None  # the first run goes on
        first.kill()  # a crash: its lock stays behind, stale
    finally:
        first.wait()
    assert (run / ".lock").exists()
    third = main_here(capsys, *args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"removed the stale lock of pid {first.pid}" in third.stdout
    assert [r["epoch"] for r in records(run)][-2:] == [0, 1] and not (run / ".lock").exists()


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    """ENOSPC injected into torch.save's writes: one-line CheckpointError, old file intact,
    no temporary left behind."""
    path = tmp_path / "ckpt_epoch_0.pth"
    save_atomic({"model": {"w": torch.ones(3)}}, str(path))
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointError) as info:
        save_atomic({"model": {"w": torch.zeros(3)}}, str(path))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    message = str(info.value)
    assert "No space left on device" in message and "\n" not in message
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ckpt_epoch_0.pth"]


@pytest.mark.slow
def test_file_size_limit_at_save_then_a_truncated_newest_checkpoint(out_dir, capsys):
    """A real failed write: under `ulimit -f` the kernel refuses the checkpoint's bytes
    (EFBIG, as a full disk refuses them with ENOSPC). The run stops with one line, exit 2,
    and ckpt_epoch_0.pth is untouched. Then a truncated newest checkpoint (what a
    non-atomic writer leaves after a crash) is reported in one line at auto-resume and the
    previous one is used."""
    args = ["main.py", "--cfg", QUICK, "--output", str(out_dir), "--tag", "disk", "--opts",
            *FAST, "SAVE_FREQ", "1", "TRAIN.EPOCHS", "1"]
    first = main_here(capsys, *args[1:])
    assert first.returncode == 0, first.stderr[-3000:]
    run = out_dir / RUN / "disk"
    before = (run / "ckpt_epoch_0.pth").read_bytes()
    assert len(before) > 2_000_000  # the limit below is well under one checkpoint
    args[-1] = "2"
    limited = run_cmd(["bash", "-c", 'trap "" XFSZ; ulimit -f 1024; exec "$0" "$@"',
                       sys.executable, *args])
    assert limited.returncode == 2, limited.stderr[-3000:]
    message = limited.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "ckpt_epoch_1.pth failed: File too large" in message and "untouched" in message
    assert (run / "ckpt_epoch_0.pth").read_bytes() == before
    assert sorted(p.name for p in run.glob("ckpt_*")) == ["ckpt_best.pth", "ckpt_epoch_0.pth"]

    (run / "ckpt_epoch_1.pth").write_bytes(before[: len(before) // 2])
    again = main_here(capsys, *args[1:])
    assert again.returncode == 0, again.stderr[-3000:]
    warnings = [l for l in again.stdout.splitlines() if "skipping damaged checkpoint" in l]
    assert len(warnings) == 1 and "ckpt_epoch_1.pth" in warnings[0]
    assert "resumed from" in again.stdout and "ckpt_epoch_0.pth (epoch 0" in again.stdout
    assert torch.load(run / "ckpt_epoch_1.pth", weights_only=True)["epoch"] == 1


def test_newest_valid_checkpoint_passes_over_each_kind_of_damage(tmp_path):
    def ckpt(epoch, weight):
        return {"model": {"w": weight}, "optimizer": {}, "lr_scheduler": {}, "epoch": epoch}

    save_atomic(ckpt(0, torch.ones(2)), str(tmp_path / "ckpt_epoch_0.pth"))
    save_atomic(ckpt(1, torch.ones(2)), str(tmp_path / "ckpt_epoch_1_step_5.pth"))
    save_atomic(ckpt(1, torch.tensor([1.0, float("nan")])), str(tmp_path / "ckpt_epoch_1_step_10.pth"))
    (tmp_path / "ckpt_epoch_1.pth").write_bytes(bytes(4096))  # zeros, as after a power loss
    save_atomic({"model": {"w": torch.ones(2)}}, str(tmp_path / "ckpt_epoch_2.pth"))  # weights only
    lines = []
    logger = logging.getLogger("faults.newest_valid")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    try:
        path, found = newest_valid_checkpoint(str(tmp_path), logger)
    finally:
        logger.removeHandler(handler)
    assert Path(path).name == "ckpt_epoch_1_step_5.pth" and found["epoch"] == 1
    damaged = ("ckpt_epoch_2.pth", "ckpt_epoch_1.pth", "ckpt_epoch_1_step_10.pth")  # newest first
    assert len(lines) == 3 and all("\n" not in l for l in lines)
    assert [f"{tmp_path / name}" in line for name, line in zip(damaged, lines)] == [True] * 3
    assert "not a training checkpoint" in lines[0] and "non-finite" in lines[2]


@pytest.mark.parametrize("damage, expected", [
    ("text", " is not a checkpoint: a text file (it begins 'epoch: 3')"),
    ("empty", " is not a checkpoint: empty file"),
    ("truncated", " is truncated at byte 2000 (its end is missing"),
    ("zeros", " is not a checkpoint: all 4096 bytes are zeros"),
    ("folder", " is a folder, not a checkpoint file (nor a hub-style weights folder: no model.safetensors)"),
], ids=["text", "empty", "truncated", "zeros", "folder"])
def test_a_damaged_resume_file_is_named_with_what_it_is_not(tmp_path, out_dir, capsys, damage, expected):
    """--resume with a file that is no checkpoint: one line naming it and saying what it is
    (not a KeyError, EOFError or a zip reader's error)."""
    path = tmp_path / "given" / "ckpt.pth"
    path.parent.mkdir()
    if damage == "text":
        path.write_text("epoch: 3\nmodel: vit\n")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        save_atomic({"model": {"w": torch.ones(1000)}, "epoch": 0}, str(path))
        path.write_bytes(path.read_bytes()[:2000])
    elif damage == "zeros":
        path.write_bytes(bytes(4096))
    else:
        path = path.parent
    line = one_line_error(capsys, "--cfg", QUICK, "--output", str(out_dir), "--resume", str(path), "--opts", *FAST)
    assert f"{path}{expected}" in line, line


def _nan_criterion(bad_calls):
    """CrossEntropy whose loss (odd bad calls) or gradients only (even bad calls) are NaN."""
    calls = {"n": 0}

    def criterion(output, target):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(output, target)
        if calls["n"] in bad_calls:
            if calls["n"] % 2:
                return loss * float("nan")
            return loss + (output.sum() * 0.0).abs().sqrt()  # finite value, NaN gradient
        return loss

    return criterion


def _in_process(monkeypatch, out_dir, tag, bad_calls, *opts):
    monkeypatch.setattr(losses, "build_criterion", lambda config, mixup: _nan_criterion(bad_calls))
    torch.set_num_threads(1)
    return main_module.main(["--cfg", QUICK, "--output", str(out_dir), "--tag", tag, "--opts",
                             *ONE_EPOCH, "PRINT_FREQ", "100", *opts])


def test_non_finite_steps_are_skipped_and_counted(monkeypatch, out_dir, capsys):
    """A NaN loss (call 3) and NaN gradients with a finite loss (call 6): both steps are
    skipped (no optimizer, scheduler or EMA update), counted, and training goes on."""
    assert _in_process(monkeypatch, out_dir, "nan1", {3, 6}, "TRAIN.EMA.ENABLED", "True") == 0
    out = capsys.readouterr().out
    assert out.count("skipped: loss") == 2 and "2 non-finite steps skipped" in out
    run = out_dir / RUN / "nan1"
    assert json.loads((run / "metrics.jsonl").read_text())["skipped_steps"] == 2
    ckpt = torch.load(run / "ckpt_epoch_0.pth", weights_only=True)
    assert ckpt["optimizer"]["state"][0]["step"] == 44 - 2
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in ckpt[part].values()
               if v.is_floating_point())


def test_consecutive_non_finite_steps_stop_the_run_naming_the_last_good_checkpoint(
        monkeypatch, out_dir, capsys):
    """From call 10 on every step is NaN: after TRAIN.MAX_BAD_STEPS (3) of them the run
    stops with exit code 3, naming the step and the last good (mid-epoch) checkpoint."""
    code = _in_process(monkeypatch, out_dir, "nan2", set(range(10, 100)), "TRAIN.MAX_BAD_STEPS", "3",
                       "TRAIN.SAVE_EVERY_STEPS", "4")
    assert code == 3
    out = capsys.readouterr().out
    run = out_dir / RUN / "nan2"
    line = [l for l in out.splitlines() if "consecutive non-finite steps" in l]
    assert len(line) == 1 and "epoch 0 step 11" in line[0]
    assert f"Last good checkpoint: {run / 'ckpt_epoch_0_step_8.pth'}" in line[0]
    assert sorted(p.name for p in run.glob("ckpt_*")) == ["ckpt_epoch_0_step_4.pth", "ckpt_epoch_0_step_8.pth"]


def test_grad_scaler_lowers_its_scale_on_a_skipped_step():
    """fp16 semantics (a CPU GradScaler stands in for CUDA's): the scaler still sees the
    inf/NaN step and halves its scale; the optimizer does not step and EMA does not move."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.arange(12) % 3)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updates = []
    ema = type("Ema", (), {"update": lambda self, m, step: updates.append(step), "module": model})()
    sched = type("Sched", (), {"step_update": lambda self, step: updates.append(-step)})()
    scaler = LossScaler(True, "cpu", init_scale=1024.0)
    state = TrainState(model=model, wrapped=model, criterion=_nan_criterion({2}), optimizer=optimizer,
                       scheduler=sched, scaler=scaler, autocast=contextlib.nullcontext, ema=ema)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    steps = []
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    stats, progress = train_one_epoch(state, loader, 0, env, logging.getLogger("quiet"), 100)
    assert (progress.steps_done, progress.skipped, progress.loss_count, progress.norm_count) == (3, 1, 12, 2)
    assert len(steps) == 2 and updates == [-1, 0, -3, 2]  # no step, schedule or EMA at step 1
    assert scaler.scale == 512.0 and stats["skipped_steps"] == 1


def test_another_models_checkpoint_or_run_folder_is_refused(monkeypatch, out_dir, capsys, tmp_path):
    """--resume/--pretrained with another architecture, and an output folder holding
    another architecture's run: one line on stderr, exit 2, nothing written. --overwrite
    moves the old run aside and trains."""
    monkeypatch.setattr(sys, "argv", ["main.py"])
    torch.set_num_threads(1)
    base = ["--cfg", QUICK, "--output", str(out_dir), "--opts", *ONE_EPOCH, "PRINT_FREQ", "100"]
    assert main_module.main([*base[:4], "--tag", "w", *base[4:]]) == 0
    run = out_dir / RUN / "w"
    ckpt = str(run / "ckpt_epoch_0.pth")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()

    def refused(*args) -> str:
        assert main_module.main(list(args)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        return err

    deeper = ["MODEL.VIT.DEPTH", "5"]
    err = refused(*base[:4], "--tag", "w", *base[4:], *deeper)
    assert "holds another model's run" in err and "MODEL.VIT" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written
    err = refused(*base[:4], "--tag", "r", "--resume", ckpt, *base[4:], *deeper)
    assert "does not match" in err and "missing" in err and "blocks.4" in err
    err = refused(*base[:4], "--tag", "p", "--pretrained", ckpt, *base[4:], "MODEL.VIT.EMBED_DIM", "32")
    assert "does not fit" in err and "shape mismatches" in err
    assert not (out_dir / RUN / "r" / "config.yaml").exists()

    assert main_module.main([*base[:4], "--tag", "w", "--overwrite", *base[4:], *deeper]) == 0
    moved = list(run.glob("replaced-*"))
    assert len(moved) == 1 and (moved[0] / "ckpt_epoch_0.pth").read_bytes() == before["ckpt_epoch_0.pth"]
    assert "DEPTH: 5" in (run / "config.yaml").read_text()


FAULT = """
import os
if os.environ.get("SLURM_PROCID") == "1":  # rank 1 only: its 5th training loss raises
    import timm.loss
    _calls = [0]
    def wrap(forward):
        def faulty(self, x, target):
            _calls[0] += 1
            if _calls[0] == 5:
                raise RuntimeError("injected fault on rank 1")
            return forward(self, x, target)
        return faulty
    for _loss in (timm.loss.LabelSmoothingCrossEntropy, timm.loss.SoftTargetCrossEntropy):
        _loss.forward = wrap(_loss.forward)
"""


@pytest.mark.slow
def test_when_one_rank_raises_every_rank_exits_promptly(tmp_path):
    """Two gloo ranks started by the stand-in srun (which, unlike srun --kill-on-bad-exit,
    never kills the survivor). Rank 1 raises at its 5th step (a test-only sitecustomize
    wraps the loss); rank 0 is then waiting in a collective. The failed rank aborts its
    process group, so rank 0 fails at once instead of waiting for DIST_TIMEOUT (600 s)."""
    bin_dir, hook = tmp_path / "bin", tmp_path / "hook"
    bin_dir.mkdir()
    hook.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    (hook / "sitecustomize.py").write_text(FAULT)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_LOG": str(tmp_path / "srun.txt"),
           "GPUS_PER_NODE": "2", "PYTHONPATH": str(hook)}
    start = time.time()
    result = run_cmd(["bash", "train_slurm.sh", "2", QUICK, "fault", "--output", str(tmp_path / "out"),
                      "--device", "cpu", "--opts", *ONE_EPOCH, "DATA.BATCH_SIZE", "16",
                      "DIST_TIMEOUT", "600"], env=env, timeout=300)
    elapsed = time.time() - start
    assert result.returncode not in (0, 75) and elapsed < 120, (result.returncode, elapsed)
    assert "injected fault on rank 1" in result.stderr
    assert "rank 1 failed (RuntimeError); aborting the process group" in result.stderr
    assert "rank 0 failed" in result.stderr  # the survivor noticed and stopped too
