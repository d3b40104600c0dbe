"""Launch paths: slurm variables and train_slurm.sh (with a stand-in srun)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from tests.conftest import FAST, run_cmd
from utils import _launcher_ranks, first_slurm_host


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


FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: records its flags, then starts --ntasks copies of the command with
# the variables slurm sets, on this machine.
echo "$@" > "$SRUN_LOG"
ntasks=1
while [ $# -gt 0 ]; do
  case "$1" in
    --ntasks=*) ntasks=${1#--ntasks=}; shift;;
    -p) shift 2;;
    --*) shift;;
    *) break;;
  esac
done
job_id=$((RANDOM % 1000 + 7000))  # one job id for all tasks: it sets the shared port
pids=()
for ((r=0; r<ntasks; r++)); do
  SLURM_PROCID=$r SLURM_NTASKS=$ntasks SLURM_LOCALID=$r SLURM_JOB_NODELIST=localhost \\
  SLURM_JOB_ID=$job_id "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait $p || rc=$?; done
exit $rc
"""


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
