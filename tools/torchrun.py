"""torchrun with main.py's exit-code contract: what train.sh and evaluate.sh start.

    python tools/torchrun.py --standalone --nproc_per_node 2 main.py --cfg CFG ...

It takes torchrun's arguments and runs torchrun's own launcher (torch.distributed.run) in
this process. What it adds: the processes leave their exit code and their one-line error
in a private folder (errors.LAUNCH_DIR); when they are done this prints each distinct error
line once and exits with their code: 2 for a user mistake, 3 when training diverged, 75
when a signal stopped them after saving (also when torchrun itself got the signal), else
the first failure's code. torchrun's own report of a failed process (a ChildFailedError
traceback of 30-40 lines) is not printed: the processes' output above says what happened.
As torchrun does, each process uses one OpenMP thread unless OMP_NUM_THREADS says otherwise.
"""
from __future__ import annotations

import glob
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from errors import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USER_ERROR, LAUNCH_DIR  # noqa: E402

PRIORITY = (EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_PREEMPTED)  # what explains a failure best


def _read(folder: str, name: str) -> dict[int, str]:
    out = {}
    for path in glob.glob(os.path.join(folder, f"{name}_rank*")):
        with open(path) as f:
            out[int(path.rsplit("rank", 1)[1])] = f.read().strip()
    return out


def exit_code_of(codes: dict[int, int]) -> int:
    """One exit code for the processes' codes (rank -> code; a signal as 128 + its number)."""
    failed = [c for _, c in sorted(codes.items()) if c]
    for code in PRIORITY:
        if code in failed:
            return code
    return failed[0] if failed else 0


def main(argv: list[str]) -> int:
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torchrun's own log lines: we report instead
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # torchrun's default (one thread per process), without its four-line banner about it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="vit-launch-") as folder:
        os.environ[LAUNCH_DIR] = folder
        codes: dict[int, int] = {}
        try:
            run(args)
        except ChildFailedError as e:  # local rank -> failure, for processes that left no code
            codes = {rank: (f.exitcode if f.exitcode >= 0 else 128 - f.exitcode)
                     for rank, f in e.failures.items()}
        except SignalException:  # torchrun was signalled and passed it on: the codes tell
            codes = {0: EXIT_PREEMPTED}
        left = {rank: int(code) for rank, code in _read(folder, "exit").items()}
        codes = {**codes, **left}  # a code a process left is the exact one
        for line in dict.fromkeys(text for _, text in sorted(_read(folder, "error").items())):
            print(line, file=sys.stderr)
        return exit_code_of(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
