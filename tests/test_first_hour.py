"""What a new user's first hour used to break (issue 11), each reproduced as the user met it:
resuming with a changed command, two runs in one folder, Ctrl-C, one-line errors instead
of tracebacks, bad data found only after an epoch, skipped images in evaluation, types,
start-up time. The launchers' exit codes are in test_launchers.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import main as main_module
from config import load_config
from tests.conftest import FAST, ROOT, run_cmd, run_main
from tests.test_bad_input import folder_args, image_tree, truncate
from tests.test_faults import log_has, wait_for
from tests.test_train import quiet_env

QUICK = "configs/quickstart.yaml"
RUN = "vit_tiny_patch2_32"
ONE_EPOCH = ["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "100"]


pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys, *argv: str) -> str:
    """main.py's contract for a user mistake, in-process: exit code 2, one line, no traceback."""
    code = main_module.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


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


# ------------------------------------------------------------------- 2. one run a folder
def test_a_second_run_in_the_same_folder_is_refused_until_the_first_is_gone(out_dir):
    """While a run trains, the same command again is refused in one line; after the first
    run is killed (its lock left behind) the command runs, replacing the stale lock."""
    args = ["--cfg", QUICK, "--output", str(out_dir), "--tag", "busy", "--opts", *FAST, "PRINT_FREQ", "1",
            "SAVE_FREQ", "100"]
    run = out_dir / RUN / "busy"
    first = subprocess.Popen([sys.executable, "main.py", *args, "TRAIN.EPOCHS", "30"], cwd=ROOT,
                             env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(log_has(run / "log_rank0.txt", "Train [0][2/44]"), first, "the first run's training")
        second = run_main(*args)
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip()
        assert len(line.splitlines()) == 1 and f"is in use by another run (pid {first.pid}" in line
        assert first.poll() is None  # the first run goes on
        first.kill()  # a crash: its lock stays behind, stale
    finally:
        first.wait()
    assert (run / ".lock").exists()
    third = run_main(*args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"removed the stale lock of pid {first.pid}" in third.stdout
    assert [r["epoch"] for r in records(run)][-2:] == [0, 1] and not (run / ".lock").exists()


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


# -------------------------------------------------------------- 4, 9. one line, not silent
@pytest.mark.parametrize("opts, message", [
    (["MODEL.VIT.NUM_HEADS", "5"],
     "config error: --opts: MODEL.VIT.NUM_HEADS: model 'vit_tiny_patch2_32': num_heads 5 does not divide the width 64"),
    (["DATA.IMG_SIZE", "9"],
     "config error: --opts: DATA.IMG_SIZE: model 'vit_tiny_patch2_32': img_size 9 is not a multiple of patch_size 2"),
    (["MODEL.VIT.DEPTH", "0"], "config error: --opts: MODEL.VIT.DEPTH: model 'vit_tiny_patch2_32': depth must be >= 1, got 0"),
    (["MODEL.NAME", "None"], "config error: --opts: wrong type for MODEL.NAME: expected a string, got None"),
    (["TAG", "None"], "config error: --opts: wrong type for TAG: expected a string, got None"),
    (["OUTPUT", "None"], "config error: --opts: wrong type for OUTPUT: expected a string, got None"),
    (["DATA.IMG_SIZE", "None"], "config error: --opts: wrong type for DATA.IMG_SIZE: expected an integer, got None"),
    (["DATA.STD", "[0, 0, 0]"], "config error: --opts: DATA.STD: every value must be > 0 (inputs are divided by it), got [0.0, 0.0, 0.0]"),
    (["TRAIN.EPOCHS", "'1'"], "config error: --opts: wrong type for TRAIN.EPOCHS: expected an integer, got '1'"),
    (["TAG", "../../x"], "config error: --opts: TAG: '../../x' is not a run name: use a non-empty name without path separators"),
    (["TAG", "''"], "config error: --opts: TAG: '' is not a run name: use a non-empty name without path separators"),
    (["DEVICE", "cuda"], "error: --device cuda: this machine has no CUDA device (torch.cuda.is_available() is False); use --device cpu or auto"),
])
def test_values_the_model_or_the_framework_refuse_are_one_line(opts, message, capsys, out_dir):
    if "cuda" in opts and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert one_line_error(capsys, "--cfg", QUICK, "--output", str(out_dir), "--opts", *opts) == message


def test_bad_files_flags_and_combinations_are_one_line(tmp_path, capsys, out_dir):
    def config(text: str | bytes) -> str:
        path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    base = f"BASE: [{ROOT / QUICK}]\n"
    assert one_line_error(capsys, "--cfg", config(base + "MODEL:\n  NAME:\n")) == \
        f"config error: {os.path.relpath(tmp_path)}/c0.yaml: wrong type for MODEL.NAME: expected a string, got None"
    assert "wrong type for TRAIN.EPOCHS: expected an integer, got '1'" in \
        one_line_error(capsys, "--cfg", config(base + 'TRAIN: {EPOCHS: "1"}\n'))
    assert "not UTF-8 text" in one_line_error(capsys, "--cfg", config(base.encode() + b"TAG: caf\xe9\n"))
    assert "the config file is empty" in one_line_error(capsys, "--cfg", config(""))
    assert load_config(config(f"BASE: {ROOT / QUICK}\n")).MODEL.NAME == RUN  # a BASE string is one file
    assert load_config(QUICK, ["TRAIN.WEIGHT_DECAY", "0"]).TRAIN.WEIGHT_DECAY == 0.0  # an int widens
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = one_line_error(capsys, "--cfg", QUICK, "--output", str(a_file))
    assert err.startswith(f"error: cannot write the run folder {a_file}/") and "Not a directory" in err
    err = one_line_error(capsys, "--cfg", QUICK, "--output", "/proc/no_such_output")
    assert err.startswith("error: cannot write the run folder /proc/no_such_output/")
    (out_dir / RUN / "logdir" / "log_rank0.txt").mkdir(parents=True)  # the log file cannot be opened
    assert "cannot write the log file" in one_line_error(capsys, "--cfg", QUICK, "--output", str(out_dir),
                                                         "--tag", "logdir")
    ckpt = tmp_path / "w.pth"
    torch.save({"model": {}}, ckpt)
    assert "--eval and --throughput together" in one_line_error(capsys, "--cfg", QUICK, "--eval", "--throughput",
                                                                "--resume", str(ckpt))
    assert "pass the one to evaluate" in one_line_error(capsys, "--cfg", QUICK, "--eval", "--resume", str(ckpt),
                                                        "--pretrained", str(ckpt))


def test_what_used_to_happen_silently_is_logged(out_dir, capsys):
    """Pretrained weights loaded (and position embeddings resampled), pretrained weights
    passed over on resume, --amp on the CPU, and images a large batch leaves out."""
    base = ["--cfg", QUICK, "--output", str(out_dir), "--opts", *ONE_EPOCH]
    assert main_module.main(["--tag", "src", *base]) == 0
    ckpt = out_dir / RUN / "src" / "ckpt_epoch_0.pth"
    capsys.readouterr()
    assert main_module.main(["--tag", "ft", "--pretrained", str(ckpt), *base, "DATA.IMG_SIZE", "16"]) == 0
    out = capsys.readouterr().out
    assert "pretrained: resampled pos_embed (1, 17, 64) -> (1, 65, 64)" in out
    assert f"pretrained: loaded 56 of the model's 56 tensors from {ckpt}" in out
    assert main_module.main(["--tag", "ft", "--pretrained", str(ckpt), "--amp", "--batch-size", "1000", *base,
                             "DATA.IMG_SIZE", "16", "TRAIN.EPOCHS", "2"]) == 0
    out = capsys.readouterr().out
    assert f"MODEL.PRETRAINED {ckpt} is not loaded: the run resumes from its checkpoint" in out
    assert "AMP: float32 on cpu: AMP_DTYPE auto uses autocast on CUDA only" in out
    assert "1 steps/epoch, 2 epochs; 437 of the 1437 images each process draws per epoch do not fill a step" in out


def test_compile_says_what_it_is_doing_and_how_long_it_took(out_dir, capsys):
    assert main_module.main(["--cfg", QUICK, "--output", str(out_dir), "--opts", *ONE_EPOCH,
                             "TRAIN.COMPILE", "True", "MODEL.VIT.DEPTH", "1"]) == 0
    out = capsys.readouterr().out
    assert "TRAIN.COMPILE: torch.compile compiles the model in the first step" in out
    took = [l for l in out.splitlines() if "torch.compile: the first step, compiling included, took" in l]
    assert len(took) == 1 and float(took[0].split("took ")[1].split(" s")[0]) > 0


def test_the_tools_answer_bad_input_in_one_line(tmp_path):
    not_json = tmp_path / "metrics.jsonl"
    not_json.write_text("{not json\n")
    for args, needle in (
            (["tools/plot_curves.py", str(not_json)], f"error: {not_json}: line 1 is not JSON"),
            (["tools/plot_curves.py", str(tmp_path / "none.jsonl")], "not found"),
            (["tools/benchmark.py", "vit_smal_patch16_224"], "error: unknown model 'vit_smal_patch16_224'"),
            (["tools/compare.py", QUICK, "--opts", "TRAIN.EPOCHZ", "1"], "config error: --opts: unknown config key"),
    ):
        result = run_cmd([sys.executable, *args])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr[-2000:])


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


# --------------------------------------------------------------------- 10. start-up time
def test_help_and_config_mistakes_answer_before_torch_loads():
    for args in (["--help"], ["--cfg", QUICK, "--opts", "TRAIN.EPOCHZ", "1"]):
        start = time.perf_counter()
        result = run_main(*args)
        took = time.perf_counter() - start
        assert result.returncode in (0, 2) and took < 2.0, (args, took)
    assert "import torch" not in open(ROOT / "config.py").read()

