"""What several test files share: the quickstart run's constants, running main.py as a command
(run_main) or in this process (main_here), the error contract's checks, generated data, the
trained run that the resume, evaluation and weight-file tests read (trained, once per session),
and the two-process run that the launcher and resume tests compare with (two_processes)."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import main as main_module  # noqa: E402  (the repository root is on the path from here on)
from config import load_config  # noqa: E402
from utils import DistEnv  # noqa: E402

# -------------------------------------------------------------------- the quickstart run
QUICK = "configs/quickstart.yaml"
RUN = "vit_tiny_patch2_32"  # the quickstart model's run folder name
# Small and fast: the quickstart ViT for 2 epochs on digits.
FAST = ["TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1", "PRINT_FREQ", "100"]
# One epoch with no warmup, quiet logs: the cheapest full run.
ONE_EPOCH = ["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "100"]
# The quickstart ViT without its class token (16 tokens, average pooling): torch's CPU
# flash-attention backward in bf16/fp16 is ~10x slower at 17 tokens than at 16 (BENCHMARKS.md).
AVG_POOL = ["MODEL.VIT.CLASS_TOKEN", "False", "MODEL.VIT.GLOBAL_POOL", "avg"]
ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def quick(*opts: str):
    return load_config(QUICK, list(opts))


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread and then do not fight other jobs for cores;
    a module takes it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state: no test depends on luck."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield  # a run in this process (main_here) with DETERMINISTIC True must not leak it
    torch.use_deterministic_algorithms(deterministic)


# ------------------------------------------------- one tiny model of every family
# family -> (registered name, constructor overrides): depth 1, width 32, 32x32 input. What must
# hold for every family as others use it (the hub folder, export) is parametrised over these.
_VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10)
_DAT = dict(img_size=32, num_classes=10, dim_stem=16, dims=(32,) * 4, heads=(2,) * 4, groups=(1, 1, 2, 2),
            depths=(1,) * 4)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", _VIT),  # a name timm has too
    "lai": ("vit_lai_tiny_patch4_32", _VIT),
    "dis": ("vit_dis_tiny_patch4_32", _VIT),
    "dislai": ("vit_dislai_tiny_patch4_32", _VIT),
    "performer": ("vit_performer_tiny_patch4_32", _VIT),
    "deform": ("vit_deform_tiny_patch4_32", _VIT),
    "distilled": ("vit_tiny_distilled_patch2_32", _VIT),
    "dat_pp": ("dat_pp_tiny", dict(_DAT, stage_spec=(("D",),) * 4)),
    "dat": ("dat_tiny", dict(_DAT, window_sizes=(4,) * 4, stage_spec=(("L",), ("S",), ("D",), ("D",)))),
}


# ------------------------------------------------------------ running it as a user does
def quiet_env() -> dict:
    """This environment for the runs a test starts: one thread each, unbuffered output, no
    launcher variables leaking in."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
                "RDZV_ENDPOINT"):
        env.pop(key, None)
    return env


def run_cmd(args: list[str], timeout: int = 600, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**quiet_env(), "PYTHON": sys.executable, **(env or {})})


def run_main(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "main.py", *args], timeout=timeout, env=env)


def run_two_at_a_time(commands: list[list[str]], **kwargs) -> list[subprocess.CompletedProcess]:
    """run_cmd of each command, two processes at a time (CI has two cores), started in the
    order given; the results in that order. For independent commands of one thread each
    (quiet_env), whose results do not depend on what runs beside them."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda args: run_cmd(args, **kwargs), commands))


def main_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """main.py's ``main(args)`` in this process, as run_main runs the command: the same code path
    and exit code without paying for the imports again. run_main is for where the process
    itself is the point (signals, loader workers, launchers, what reaches a terminal)."""
    capsys.readouterr()
    code = main_module.main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["main.py", *args], code, captured.out, captured.err)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def log_has(path: Path, text: str):
    return lambda: path.exists() and text in path.read_text()


def last_acc(output: str) -> tuple[float, float, int]:
    """(Acc@1, Acc@5, images) from the final '* Acc@1 x Acc@5 y ... on N images' line."""
    line = [l for l in output.splitlines() if "* Acc@1" in l][-1]
    words = line.split()
    i = words.index("Acc@1")
    return float(words[i + 1]), float(words[i + 3]), int(words[words.index("images") - 1])


def final_line(output: str) -> str:
    return [l for l in output.strip().splitlines() if l.strip()][-1]


def doc_block(doc: str, first_line: str) -> str:
    """The python code block of ``doc`` (a path from the repository root) that starts with
    ``first_line``, as printed: a test runs the documented code itself."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line + "\n")]
    assert len(found) == 1, f"{doc}: {len(found)} python blocks start with {first_line!r}"
    return found[0]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------- the error contract
def one_error_line(result) -> str:
    """The run failed the way bad input must: exit code 2, one line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def one_line_error(capsys, *argv: str) -> str:
    """main.py's contract for a user mistake, run in this process: exit code 2, one line."""
    return one_error_line(main_here(capsys, *argv))


def previous_run(out_dir, argv: list[str], tag: str = "quickstart"):
    """The folder of a finished run of the command ``argv``, as the same command repeated
    with bad input would find it."""
    from flags import config_from_args
    run = out_dir / RUN / tag
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config_from_args(main_module.parse_args(argv)).dump())
    (run / "ckpt_epoch_0.pth").write_bytes(b"weights of the earlier run")
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (run / "log_rank0.txt").write_text("earlier log\n")
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def assert_untouched(before: dict) -> None:
    """Every earlier file keeps its bytes; logs may only grow (a line about the failure)."""
    for path, data in before.items():
        now = path.read_bytes()
        if path.name.startswith("log_rank"):
            assert now.startswith(data), path
        else:
            assert now == data, f"{path.name} was overwritten"


# -------------------------------------------------------------------------- generated data
def image_tree(root, classes=("cat", "dog", "eel"), per_class=(4, 2), size=8):
    """train/ and val/ ImageFolders of random JPEGs, small enough for the quickstart ViT."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return root


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def folder_args(root, *opts: str) -> list[str]:
    return ["--cfg", QUICK, "--data-path", str(root), "--opts", "DATA.DATASET", "folder",
            "MODEL.NUM_CLASSES", "3", "DATA.BATCH_SIZE", "4", *ONE_EPOCH, *opts]


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
echo "${pids[@]}" > "${SRUN_PIDS:-/dev/null}"
rc=0  # like srun: the highest exit code of the tasks
for p in "${pids[@]}"; do wait $p || { c=$?; [ $c -gt $rc ] && rc=$c; }; done
exit $rc
"""

# ------------------------------------------------------------------ webdataset shards
SHARD_CLASSES = ("ant", "bee", "cat")


def make_folder(root, train=10, val=5, size=(24, 20)):
    rng = np.random.default_rng(1)
    for split, count in (("train", train), ("val", val)):
        for name in SHARD_CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{name}.{i}.jpg", quality=95)
    return root


def make_shards(root, out, shard_size=7):
    result = run_cmd([sys.executable, "tools/make_shards.py", str(root), str(out), "--shard-size", str(shard_size)])
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def shard_sets(tmp_path_factory):
    """An ImageFolder (30 training images in 3 classes, 15 validation) and its shards of 7:
    train 7+7+7+7+2, val 7+7+1 (shards that do not divide evenly)."""
    base = tmp_path_factory.mktemp("sets")
    folder = make_folder(base / "folder")
    return folder, make_shards(folder, base / "shards")

# ---------------------------------------------------------------- the shared trained run
# The run most tests share, trained once per session: the quickstart ViT for 2 epochs on
# digits with EMA (warm-up), a checkpoint per epoch and deterministic kernels. Tests that
# change a run work on a copy (copy_run); the others read it or write under other tags.
TRAINED_OPTS = [*FAST, "SAVE_FREQ", "1", "DETERMINISTIC", "True", "TRAIN.EMA.ENABLED", "True",
                "TRAIN.EMA.WARMUP", "True"]


@dataclass
class Trained:
    out: Path  # the --output root
    tag: str = "trained"

    @property
    def run(self) -> Path:
        return self.out / RUN / self.tag

    def args(self, out: Path | None = None, tag: str | None = None) -> list[str]:
        """main.py's arguments for this run (or the same command under another output or tag)."""
        return ["--cfg", QUICK, "--output", str(out or self.out), "--tag", tag or self.tag, "--opts",
                *TRAINED_OPTS]

    def checkpoint(self, epoch: int) -> dict:
        return torch.load(self.run / f"ckpt_epoch_{epoch}.pth", weights_only=True)

    def records(self) -> list[dict]:
        return records(self.run)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    result = Trained(tmp_path_factory.mktemp("trained") / "out")
    done = run_main(*result.args())
    assert done.returncode == 0, done.stderr[-3000:]
    return result


def copy_run(trained: Trained, out: Path) -> Path:
    """A copy of the shared run under ``out`` (the same relative run folder), to change freely."""
    shutil.copytree(trained.run, out / RUN / trained.tag)
    return out / RUN / trained.tag


def assert_same_run(reference: dict, other: dict, what: str) -> None:
    """Two checkpoints of a run: weights, EMA, optimizer moments and steps, schedule (and
    loss scale) all equal."""
    for part in ("model", "ema"):
        if reference[part] is None:  # a run without EMA
            assert other[part] is None, what
            continue
        for key, value in reference[part].items():
            assert torch.equal(value, other[part][key]), f"{part}.{key} differs after {what}"
    for index, state in reference["optimizer"]["state"].items():
        assert other["optimizer"]["state"][index]["step"] == state["step"], what
        assert other["optimizer"]["state"][index]["exp_avg"].equal(state["exp_avg"]), what
    assert other["lr_scheduler"] == reference["lr_scheduler"], what
    assert other.get("scaler") == reference.get("scaler"), what
    assert other["max_accuracy"] == reference["max_accuracy"], what


# --------------------------------------------------------- the shared two-process run
# The quickstart ViT for 2 epochs on two gloo processes through train.sh, with mixup and drop
# path (each rank draws its own): what a 2-process run stopped and resumed, and a run on two
# "nodes", must equal bit for bit. Trained once per session.
TWO_PROCESS_OPTS = [*FAST, "DATA.BATCH_SIZE", "16", "MODEL.DROP_PATH_RATE", "0.1", "DETERMINISTIC", "True",
                    "PRINT_FREQ", "1"]


def train_sh(nproc: int, out: Path, tag: str = "ddp") -> list[str]:
    """train.sh's command for the shared two-process run's settings on ``nproc`` processes."""
    return ["bash", "train.sh", str(nproc), QUICK, tag, "--output", str(out), "--opts", *TWO_PROCESS_OPTS]


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory) -> Path:
    """The shared two-process run's folder."""
    out = tmp_path_factory.mktemp("two") / "out"
    result = run_cmd(train_sh(2, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / RUN / "ddp"
