"""The error contract: a user's mistake is one line and exit code 2, never a traceback.

Every error a user can fix by changing the command, the config or the files it names
derives from ``UserError`` (or is one of ``user_errors()``); ``main.py`` and the tools print
its message and exit with ``EXIT_USER_ERROR``. Anything else is a bug and keeps its
traceback. This module imports nothing heavy, so that flags and configs can be checked
before torch is loaded.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_PREEMPTED = 2, 3, 75  # 75: EX_TEMPFAIL, "try again"
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a second Ctrl-C, stopped without saving
# tools/torchrun.py (train.sh, evaluate.sh) names a folder here where each process leaves its
# exit code and its error line, so that the launcher prints each distinct line once and
# exits with the processes' code instead of torchrun's own.
LAUNCH_DIR = "VIT_LAUNCH_DIR"


class UserError(Exception):
    """A mistake in the command, config, data or files; the message is one line saying
    what is wrong and, where it helps, how to fix it."""

    label = "error"  # what main.py prints before the message

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(error: BaseException | str, limit: int = 600) -> str:
    """A (library's) message folded onto one line and cut at ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def user_errors() -> tuple[type[BaseException], ...]:
    """What is reported as a user's mistake: ``UserError``, and weights that cannot be found,
    read or fitted (``models.weights.WeightsError``, which cannot derive from UserError:
    models/ import nothing outside models/). The latter is looked up only once loaded:
    nothing else raises it, and importing it here would load torch."""
    weights = sys.modules.get("models.weights")
    return (UserError,) if weights is None else (UserError, weights.WeightsError)


class TrainingDiverged(RuntimeError):
    """TRAIN.MAX_BAD_STEPS consecutive steps had a non-finite loss or gradient, or the
    weights themselves are no longer finite: nothing more worth saving will come
    (``EXIT_DIVERGED``)."""


def process_rank() -> int:
    """This process's rank from the launcher's variables (torchrun, srun); 0 when alone."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def _leave(name: str, text: str) -> bool:
    """Write ``text`` to the launcher's folder, if there is one."""
    folder = os.environ.get(LAUNCH_DIR)
    if not folder:
        return False
    with open(os.path.join(folder, f"{name}_rank{process_rank()}"), "w") as f:
        f.write(text)
    return True


def report(error: BaseException, shared: bool = True) -> int:
    """Print ``error`` (one of ``user_errors()``) as one line on stderr, or leave it for
    tools/torchrun.py; the exit code for it. With several processes, a ``shared`` error (met
    by every rank alike, e.g. the config's) is printed by rank 0 only; another carries its
    rank."""
    line = f"{getattr(error, 'label', 'error')}: {one_line(error)}"
    rank = process_rank()
    if not _leave("error", line + "\n") and (rank == 0 or not shared):
        print(line if rank == 0 else f"rank {rank}: {line}", file=sys.stderr)
    return EXIT_USER_ERROR


def exit_code(code: int) -> int:
    """Leave this process's exit code for tools/torchrun.py (if it started us); ``code``."""
    _leave("exit", str(code))
    return code


def run_tool(main: Callable[[], int | None]) -> None:
    """Run a tool's ``main`` under the contract of main.py: exit 2 with one line for a
    user's mistake (``user_errors()``), the tool's own code otherwise."""
    try:
        code = main()
    except user_errors() as e:
        code = report(e)
    sys.exit(code or 0)
