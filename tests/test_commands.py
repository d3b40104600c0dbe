"""The commands a user types: train.sh, evaluate.sh, train_slurm.sh (stand-in srun/scontrol), the
README's launcher lines exactly as printed, exit codes, and the tools' one-line errors."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from errors import run_tool
from models.weights import WeightsError
from utils import _launcher_ranks, first_slurm_host

from tests.conftest import (FAKE_SRUN, FAST, QUICK, ROOT, RUN, assert_same_run, image_tree, last_acc, main_here,
                            quick, quiet_env, run_cmd, train_sh)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each



@pytest.fixture(scope="module")
def quickstart_checkpoint(tmp_path_factory) -> Path:
    """The quickstart ViT's weights (random) with its saved config, as main.py saves them."""
    from model_config import build_model
    cfg = quick()
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pth"
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg.dump()}, path)
    return path


def tool_here(capsys, tool: str, *args: str) -> tuple[int, str]:
    """tools/<tool>.py's main(args) in this process under errors.run_tool, as the command runs
    it: (exit code, stderr)."""
    module = importlib.import_module(f"tools.{tool}")
    with pytest.raises(SystemExit) as stop:
        run_tool(lambda: module.main(list(args)))
    return stop.value.code, capsys.readouterr().err


def test_the_tools_answer_bad_input_in_one_line(tmp_path, quickstart_checkpoint, capsys):
    not_json = tmp_path / "metrics.jsonl"
    not_json.write_text("{not json\n")
    ckpt = str(quickstart_checkpoint)
    plain = tmp_path / "weights.pth"  # the weights alone: no config says which model they are
    torch.save(torch.load(ckpt, weights_only=True)["model"], plain)
    small_dat = ["--opts", "MODEL.DAT.DIM_STEM", "16", "MODEL.DAT.DIMS", "[16, 32, 64, 128]"]
    for tool, *args, needle in (  # in this process: the tool's code and exit code without the imports
            ("convert_checkpoint", ckpt, "--safetensors", str(tmp_path / "none" / "w.safetensors"),
             f"error: --safetensors {tmp_path}/none/w.safetensors: the folder {tmp_path}/none does not exist"),
            ("convert_checkpoint", ckpt, "--hub", str(tmp_path / "hub"), "--model", "dat_pp_tiny",
             f"error: --model dat_pp_tiny: the config saved in {ckpt} says the weights are a {RUN}"),
            ("convert_checkpoint", str(plain), "--hub", str(tmp_path / "hub"), "--model", "dat_pp_tiny",
             f"error: --model dat_pp_tiny (registered defaults; a checkpoint without a saved config needs "
             f"--cfg FILE): {plain} does not match DAT: "),
            ("make_shards", str(image_tree(tmp_path / "images", per_class=(1, 1))), str(not_json),
             f"error: {not_json} is a file, not a folder: name a folder for the shards"),
            ("benchmark", RUN, "--batch-size", "0", "error: --batch-size must be >= 1, got 0"),
            ("compare", QUICK, "--opts", "TRAIN.EPOCHZ", "1", "config error: --opts: unknown config key"),
            ("compare", "--evals", str(tmp_path / "none"), f"error: --evals: {tmp_path / 'none'} not found"),
            ("compare", "--evals", str(tmp_path), f"error: --evals: {tmp_path} holds no sets.json or metrics.json: "
                                                  f"not an evaluation's folder"),
            ("compare", "--evals", str(not_json), f"error: --evals: {not_json} is not a readable JSON file"),
            ("compare", "--evals", ckpt, f"error: --evals: {ckpt} is not a readable JSON file"),
            ("compare", QUICK, "--evals", str(tmp_path), "error: --evals tabulates finished evaluations: config "
                                                         "files would train or plot runs"),
            ("visualize", "lai-mask", "--query", "9", "9", "--out", str(tmp_path / "m.png"),
             "error: --query 9 9 must lie in the 8x8 grid"),
            ("visualize", "lai-mask", "--schedule", "[[0, 1", "--out", str(tmp_path / "m.png"),
             "error: --schedule '[[0, 1': not YAML"),
            ("visualize", "lai-mask", "--schedule", "[[3, 1]]", "--out", str(tmp_path / "m.png"),
             "error: --schedule '[[3, 1]]': schedule: starts must increase from 0"),
            ("visualize", "attention-map", "--model", RUN, "--checkpoint", ckpt, "--query", "4", "0",
             "--out", str(tmp_path / "a.png"), "error: --query 4 0 must lie in the model's 4x4 grid"),
            ("visualize", "dat-points", "--cfg", "configs/dat/dat_pp_tiny_digits.yaml", *small_dat,
             "--query", "9", "9", "--out", str(tmp_path / "d.png"), "error: --query 9 9 must lie in stage 2's 2x2 grid"),
    ):
        code, err = tool_here(capsys, tool, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (tool, args, err[-2000:])
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "hub").exists()
    for args, needle in (  # commands of their own (these read sys.argv)
            (["tools/plot_curves.py", str(not_json)], f"error: {not_json}: line 1 is not JSON"),
            (["tools/plot_curves.py", str(tmp_path / "none.jsonl")], "not found"),
            (["tools/benchmark.py", "vit_smal_patch16_224"], "error: unknown model 'vit_smal_patch16_224'"),
    ):
        result = run_cmd([sys.executable, *args])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr[-2000:])


def test_visualize_builds_the_model_a_checkpoint_was_trained_as(quickstart_checkpoint, tmp_path):
    """attention-map with our checkpoint: its saved config builds the model (64 wide, 4 deep,
    8 px), not the registered defaults, as --eval does; --arg still overrides it."""
    from tools import visualize
    args = ["attention-map", "--model", RUN, "--checkpoint", str(quickstart_checkpoint), "--query", "1", "2"]
    visualize.main([*args, "--layer", "3", "--out", str(tmp_path / "a.png")])
    assert (tmp_path / "a.png").stat().st_size > 5_000
    with pytest.raises(WeightsError, match="does not match VisionTransformer"):
        visualize.main([*args, "--arg", "depth=2", "--out", str(tmp_path / "b.png")])


@pytest.mark.slow
def test_train_sh_trains_on_two_processes(two_processes, out_dir, capsys):
    """Two gloo processes train (the shared run), each with its log; the checkpoint evaluates
    (one process) to the accuracy training logged over all 360 images (evaluation on 1 and 2
    processes agree: test_evaluation.py)."""
    logged = json.loads((two_processes / "metrics.jsonl").read_text().splitlines()[-1])["val_acc1"]
    assert (two_processes / "log_rank0.txt").exists() and (two_processes / "log_rank1.txt").exists()
    assert "x 2 process(es)" in (two_processes / "log_rank1.txt").read_text()
    ev = main_here(capsys, "--cfg", QUICK, "--eval", "--resume", str(two_processes / "ckpt_epoch_1.pth"),
                   "--output", str(out_dir), "--tag", "eval")
    assert ev.returncode == 0, ev.stderr[-3000:]
    acc1, _, images = last_acc(ev.stdout)
    assert images == 360 and acc1 == pytest.approx(logged, abs=1e-3)


@pytest.mark.slow
def test_train_sh_runs_on_two_nodes_from_the_environment(two_processes, tmp_path):
    """Two "nodes" on this machine: train.sh twice, one process each, with NNODES, NODE_RANK,
    MASTER_ADDR and MASTER_PORT set, train the shared 2-process run's weights bit for bit;
    a node without NODE_RANK is the usage line and 2."""
    out = tmp_path / "out"
    with socket.socket() as s:  # a free port for node 0's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**quiet_env(), "PYTHON": sys.executable, "NNODES": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    bad = run_cmd(train_sh(1, out), env={"NNODES": "2"})
    assert bad.returncode == 2 and bad.stderr.startswith("usage: bash train.sh ") and "NODE_RANK" in bad.stderr
    nodes = [subprocess.Popen(train_sh(1, out), cwd=ROOT, env={**env, "NODE_RANK": str(rank)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    try:
        errors = [node.communicate(timeout=600)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], errors
    run = out / RUN / "ddp"
    assert "x 2 process(es)" in (run / "log_rank1.txt").read_text()
    assert_same_run(torch.load(two_processes / "ckpt_epoch_1.pth", weights_only=True),
                    torch.load(run / "ckpt_epoch_1.pth", weights_only=True), "two nodes")


@pytest.mark.parametrize("nodelist, host", [("gpu[03-05,9]", "gpu03"), ("node7", "node7"),
                                            ("a[1,4],b2", "a1"), ("localhost", "localhost")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_ranks_from_slurm_variables(monkeypatch):
    # _launcher_ranks exports MASTER_ADDR/RANK/...: give it a private copy of the environment
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[12-13]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert _launcher_ranks() == (5, 16, 1)
    assert os.environ["MASTER_ADDR"] == "gpu12" and os.environ["MASTER_PORT"] == str(20000 + 4242)


@pytest.mark.slow
def test_train_slurm_sh_runs_two_ranks_through_srun(tmp_path):
    """No slurm here: a stand-in srun starts two processes with SLURM_* variables, which
    main.py turns into a gloo process group (the same code path as on a cluster)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_LOG": str(tmp_path / "srun.txt"),
           "GPUS_PER_NODE": "2", "PARTITION": "debug"}
    result = run_cmd(["bash", "train_slurm.sh", "2", "configs/quickstart.yaml", "slurm_job",
                      "--output", str(out), "--device", "cpu", "--opts", *FAST, "TRAIN.EPOCHS", "1",
                      "TRAIN.WARMUP_EPOCHS", "0", "DATA.BATCH_SIZE", "16"], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    flags = (tmp_path / "srun.txt").read_text()
    assert "-p debug" in flags and "--ntasks=2" in flags and "--nodes=1" in flags
    run = out / "vit_tiny_patch2_32" / "slurm_job"
    assert "x 2 process(es)" in (run / "log_rank1.txt").read_text()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 0 and record["val_acc1"] > 0


FAKE_SCONTROL = """#!/usr/bin/env bash
# Stand-in for scontrol: records a requeue; other commands fail (main.py then parses node lists itself).
if [ "$1" = requeue ]; then echo "$@" >> "$SCONTROL_LOG"; exit 0; fi
exit 1
"""


@pytest.mark.slow
def test_train_slurm_sh_requeues_a_job_stopped_by_its_time_limit_signal(tmp_path):
    """No slurm here. Inside a batch job (SLURM_JOB_ID set) train_slurm.sh asks srun for
    --signal=USR1@SIGNAL_SECONDS; we play slurm and send SIGUSR1, to rank 1 only, so rank 0
    learns it through the per-step agreement. Both ranks stop at the same step, rank 0
    saves, the tasks exit 75 and the script runs `scontrol requeue <job id>`. Running the
    script again (what the requeued job does) resumes on both ranks from that step."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out, pids = tmp_path / "out", tmp_path / "pids.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_LOG": str(tmp_path / "srun.txt"),
           "SCONTROL_LOG": str(tmp_path / "scontrol.txt"), "SRUN_PIDS": str(pids), "GPUS_PER_NODE": "2",
           "SLURM_JOB_ID": "4242", "SIGNAL_SECONDS": "120", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = ["bash", "train_slurm.sh", "2", "configs/quickstart.yaml", "job", "--output", str(out),
               "--device", "cpu", "--opts", *FAST, "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0",
               "DATA.BATCH_SIZE", "16", "PRINT_FREQ", "5"]
    run = out / "vit_tiny_patch2_32" / "job"
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((run / "log_rank1.txt").exists() and "Train [0][5/44]" in (run / "log_rank1.txt").read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    rank1 = int(pids.read_text().split()[1])
    os.kill(rank1, signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    flags = (tmp_path / "srun.txt").read_text()
    assert "--signal=USR1@120" in flags and "--kill-on-bad-exit=1" in flags and "-p " not in flags
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    stops = [[l for l in (run / f"log_rank{r}.txt").read_text().splitlines() if "stopped at epoch 0 step" in l]
             for r in (0, 1)]
    assert "SIGUSR1" in stops[1][0] and "another rank" in stops[0][0]
    step = stops[0][0].split("step ")[1].split("/")[0]
    assert step == stops[1][0].split("step ")[1].split("/")[0]
    assert (run / f"ckpt_epoch_0_step_{step}.pth").exists()

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for r in (0, 1):
        assert f"ckpt_epoch_0_step_{step}.pth (epoch 0 after step {step}," in (run / f"log_rank{r}.txt").read_text()
    record = json.loads((run / "metrics.jsonl").read_text())
    assert record["epoch"] == 0 and record["val_acc1"] > 0


# ------------------------------------------------------------- train.sh and evaluate.sh
def repo_copy(tmp_path: Path) -> Path:
    """The repository's tracked files with its .venv linked in: what a user's clone holds
    after `make quickstart`, without this checkout's output/."""
    copy = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.split():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    venv = Path(sys.executable).parent.parent  # the venv that runs the tests (make test's .venv)
    (copy / ".venv").symlink_to(venv)
    return copy


def user_env() -> dict:
    """A user's shell: no PYTHON, no venv on PATH (`python` may lack torch), no launcher state."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHON", "VIRTUAL_ENV", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                        "MASTER_PORT", "VIT_LAUNCH_DIR")}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if p and p != venv_bin)
    return env


def readme_block(containing: str) -> list[str]:
    """The command lines of the README's fenced block that holds ``containing``."""
    text = (ROOT / "README.md").read_text()
    for block in text.split("```bash\n")[1:]:
        body = block.split("```")[0]
        if containing in body:
            return [line for line in body.splitlines() if line.strip() and not line.startswith("#")]
    raise AssertionError(f"no README block with {containing!r}")


def test_the_launchers_without_the_venv_say_to_make_it(tmp_path):
    """A clone where `make` has not run (no .venv) and `python` has no torch: train.sh,
    evaluate.sh and train_slurm.sh say what to do in one line, exit 2, instead of a
    ModuleNotFoundError traceback."""
    clone, bin_dir = tmp_path / "clone", tmp_path / "bin"
    (clone / "tools").mkdir(parents=True)
    bin_dir.mkdir()
    for name in ("train.sh", "evaluate.sh", "train_slurm.sh", "tools/launch_env.sh"):
        shutil.copy2(ROOT / name, clone / name)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # no site-packages: no torch
    (bin_dir / "python").chmod(0o755)
    env = {**user_env(), "PATH": f"{bin_dir}:{user_env()['PATH']}"}
    for script, args in (("train.sh", [QUICK]), ("evaluate.sh", [QUICK, "w.pth"]), ("train_slurm.sh", [QUICK, "j"])):
        result = subprocess.run(["bash", script, "1", *args], cwd=clone, env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and result.stderr == (
            f"{script}: python has no torch, timm, yacs: run `make venv` (or `make quickstart`) first, or set "
            f"PYTHON to a python with requirements.txt installed\n"), result.stderr[-2000:]


@pytest.mark.slow
def test_the_readme_launcher_lines_run_exactly_as_printed(tmp_path):
    """README's CPU lines for train.sh and evaluate.sh, typed into a fresh clone's shell
    with no PYTHON set: two gloo processes train, and evaluating their best checkpoint on
    two processes gives the accuracy training logged, on all 360 images."""
    copy, env = repo_copy(tmp_path), user_env()
    train, evaluate = readme_block("bash train.sh 2 configs/quickstart.yaml ddp")
    assert train.startswith("bash train.sh 2 ") and evaluate.startswith("bash evaluate.sh 2 ")
    result = subprocess.run(["bash", "-c", train], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = copy / "output" / "vit_tiny_patch2_32" / "ddp"
    best = max(json.loads(line)["val_acc1"] for line in (run / "metrics.jsonl").read_text().splitlines())
    result = subprocess.run(["bash", "-c", evaluate], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    acc1, _, images = last_acc(result.stdout)
    assert acc1 == pytest.approx(best, abs=1e-3) and images == 360


@pytest.mark.slow
def test_the_launchers_keep_main_pys_exit_codes(tmp_path):
    """Through train.sh / evaluate.sh (torchrun underneath): a user mistake is exit 2 with
    its one line printed once, a diverged run 3; a bad count is the usage line and 2. (75,
    stopped by SIGTERM or Ctrl-C to the process group, and resumed:
    test_resume.py::test_two_processes_stopped_mid_epoch_resume_to_the_uninterrupted_run.)"""
    env = {**user_env(), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"

    def launch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(2) as pool:  # independent launches, two at a time (CI's two cores)
        nan, heads, missing = pool.map(lambda args: launch(*args), (
            ("train.sh", "2", QUICK, "nan", "--output", str(out), "--opts", *FAST, "TRAIN.WARMUP_EPOCHS", "0",
             "TRAIN.BASE_LR", "1e9", "TRAIN.MAX_BAD_STEPS", "2"),
            ("train.sh", "2", QUICK, "x", "--output", str(out), "--opts", "MODEL.VIT.NUM_HEADS", "5"),
            ("evaluate.sh", "2", QUICK, str(tmp_path / "none.pth"), "--output", str(out))))
    assert heads.returncode == 2 and heads.stderr.strip() == (
        "config error: --opts: MODEL.VIT.NUM_HEADS: model 'vit_tiny_patch2_32': num_heads 5 does not "
        "divide the width 64")
    assert missing.returncode == 2 and missing.stderr.strip() == (
        f"config error: --resume: MODEL.RESUME: file not found: {tmp_path / 'none.pth'}")
    assert nan.returncode == 3 and "consecutive non-finite steps" in nan.stdout, nan.stderr[-2000:]
    for args in (["train.sh", "two", "c.yaml"], ["train.sh", "0", "c.yaml"], ["train_slurm.sh", "abc", "c.yaml", "j"]):
        result = launch(*args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith(f"usage: bash {args[0]} ") and f"got '{args[1]}'" in result.stderr
