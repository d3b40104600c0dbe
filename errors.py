"""The error contract: a user's mistake is one line and exit code 2, never a traceback.

Every error a user can fix by changing the command, the config or the files it names
derives from ``UserError``; ``main.py`` and the tools print its message and exit with
``EXIT_USER_ERROR``. Anything else is a bug and keeps its traceback. This module imports
nothing heavy, so that flags and configs can be checked before torch is loaded.
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_PREEMPTED = 2, 3, 75  # 75: EX_TEMPFAIL, "try again"


class UserError(Exception):
    """A mistake in the command, config, data or files; the message is one line saying
    what is wrong and, where it helps, how to fix it."""

    label = "error"  # what main.py prints before the message

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(error: BaseException | str, limit: int = 400) -> str:
    """A (library's) message folded onto one line and cut at ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report(error: UserError) -> int:
    """Print ``error`` as its one line on stderr; the exit code for it."""
    print(f"{error.label}: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


def run_tool(main: Callable[[], int | None]) -> None:
    """Run a tool's ``main`` under the contract of main.py: exit 2 with one line for a
    ``UserError``, the tool's own code otherwise."""
    try:
        code = main()
    except UserError as e:
        code = report(e)
    sys.exit(code or 0)
