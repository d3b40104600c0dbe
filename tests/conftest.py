"""Shared helpers: run main.py and the shell scripts the way a user does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Small and fast: the quickstart ViT for 2 epochs on digits.
FAST = ["TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1", "PRINT_FREQ", "100"]


def run_cmd(args: list[str], timeout: int = 600, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)  # a launcher's variables must not leak into the runs we start
    return subprocess.run(args, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def run_main(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "main.py", *args], timeout=timeout, env=env)


def last_acc(output: str) -> tuple[float, float, int]:
    """(Acc@1, Acc@5, images) from the final '* Acc@1 x Acc@5 y ... on N images' line."""
    line = [l for l in output.splitlines() if "* Acc@1" in l][-1]
    words = line.split()
    i = words.index("Acc@1")
    return float(words[i + 1]), float(words[i + 3]), int(words[words.index("images") - 1])


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread and then do not fight other jobs for cores;
    a module takes it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state: no test depends on luck."""
    import random

    import numpy as np
    import torch
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
