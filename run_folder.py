"""The run folder OUTPUT/<MODEL.NAME>/<TAG>/: where it is (an evaluation's own without
--tag: ``eval_tag``); refusing one that holds another model's run before anything is
written there (or, with --overwrite, moving that run aside), one that cannot be written, or
(``claim_report``) an evaluation's folder holding a training run or another evaluation's
report; and the lock that keeps a second run out while one trains."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from typing import Optional

import yaml

from config import saved_config
from errors import UserError

# What makes a run folder's checkpoints another model's: these keys, the family section
# MODEL.<FAMILY> and the input size.
ARCH_KEYS = ("NAME", "NUM_CLASSES", "IN_CHANS")
RUN_FILES = ("config.yaml", "metrics.jsonl")
RUN_PREFIXES = ("ckpt_", "log_rank")


class RunFolderError(UserError):
    """The output folder cannot take this run; the message says how to proceed."""


def run_dir(config) -> str:
    return os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)


def eval_tag(config) -> str:
    """--eval without --tag: a folder of its own per evaluation, named by the weights (our
    ckpt_* files with their run folder's name), --use-ema, the dataset ('sets' for
    --eval-sets, whose table is another report), size and crop:
    eval-<run>-ckpt_best-digits-8px-crop1."""
    source = config.MODEL.RESUME if config.MODEL.RESUME != "auto" else config.MODEL.PRETRAINED
    if source.startswith(("timm:", "hf-hub:")):
        name = source
    else:
        path = os.path.abspath(source) if source else ""
        name = os.path.splitext(os.path.basename(path))[0]
        if name.startswith("ckpt_"):
            name = f"{os.path.basename(os.path.dirname(path))}-{name}"
    parts = ["eval", name, "ema" if config.TEST.USE_EMA else "",
             "sets" if config.TEST.EVAL_SETS else config.DATA.DATASET,
             f"{config.DATA.IMG_SIZE}px", f"crop{config.TEST.CROP_PCT:g}"]
    return re.sub(r"[^\w.-]+", "-", "-".join(p for p in parts if p))


def claim_report(out_dir: str, identity: dict, overwrite: bool, env) -> None:
    """Before an evaluation writes its report (rank 0 decides, every rank raises alike):
    refuse a folder that holds a training run, or the report of another evaluation
    (``identity``: what metrics.json says was evaluated) unless ``overwrite``."""
    failure = None
    if env.is_main:
        failure = _report_conflict(out_dir, identity, overwrite)
    if env.distributed:
        import torch.distributed as dist
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure:
        raise RunFolderError(failure)


def _report_conflict(out_dir: str, identity: dict, overwrite: bool) -> Optional[str]:
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    trained = sorted(n for n in names if n == "metrics.jsonl" or n.startswith("ckpt_"))
    if trained:
        return (f"{out_dir} holds a training run ({', '.join(trained[:2])}); an evaluation writes its report "
                f"to a folder of its own: leave out --tag (one folder per weights, size and crop) or choose another")
    try:
        with open(os.path.join(out_dir, "metrics.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None  # no report yet, or an unreadable one: nothing to keep
    diffs = [f"{key} {saved[key]!r} there, {value!r} now" for key, value in identity.items()
             if key in saved and saved[key] != value]  # a key it lacks: a report from before the key
    if not diffs or overwrite:
        return None
    return (f"{out_dir} holds the report of another evaluation ({'; '.join(diffs[:3])}); leave out --tag for "
            f"a folder per weights, size and crop, choose another --tag, or pass --overwrite to replace it")


def conflict(config, out_dir: str) -> Optional[str]:
    """How the run recorded in ``out_dir/config.yaml`` builds a different model, or None."""
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tree = saved_config(f.read())
    except UnicodeDecodeError:
        tree = None
    if tree is None:
        return f"{path} is not a config of this repo (not YAML, or no MODEL section)"
    saved, ours = yaml.safe_load(tree.dump()), yaml.safe_load(config.dump())
    pairs = [(f"MODEL.{k}", saved["MODEL"].get(k), ours["MODEL"][k]) for k in ARCH_KEYS]
    families = sorted({k for m in (saved["MODEL"], ours["MODEL"]) for k, v in m.items() if isinstance(v, dict)})
    pairs += [(f"MODEL.{name}", saved["MODEL"].get(name) or {}, ours["MODEL"].get(name) or {})
              for name in families]
    pairs.append(("DATA.IMG_SIZE", (saved.get("DATA") or {}).get("IMG_SIZE"), ours["DATA"]["IMG_SIZE"]))
    diffs = [f"{key} {old!r} here, {new!r} now" for key, old, new in pairs if old != new]
    return "; ".join(diffs[:3]) or None


def make(out_dir: str) -> None:
    """Create ``out_dir`` and prove it writable now, not at the first checkpoint."""
    probe = os.path.join(out_dir, f".write-test.{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise RunFolderError(f"cannot write the run folder {out_dir}: {e.strerror or e} "
                             f"(--output / OUTPUT {'is a file or holds one on the way' if isinstance(e, (FileExistsError, NotADirectoryError)) else 'must be a writable folder'})") from None


def prepare(config, out_dir: str) -> Optional[str]:
    """Refuse an output folder holding another model's run; with OVERWRITE (--overwrite),
    move that run's files aside instead (returns where to)."""
    found = conflict(config, out_dir)
    if found and not config.OVERWRITE:
        raise RunFolderError(f"{out_dir} holds another model's run ({found}); choose another "
                             f"--tag or --output, or pass --overwrite to move that run aside")
    if not (config.OVERWRITE and os.path.isdir(out_dir)):
        return None
    old = [n for n in os.listdir(out_dir) if n in RUN_FILES or n.startswith(RUN_PREFIXES)]
    if not old:
        return None
    moved = os.path.join(out_dir, time.strftime("replaced-%Y%m%d-%H%M%S"))
    os.makedirs(moved)
    for name in old:
        shutil.move(os.path.join(out_dir, name), moved)
    return moved


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process that may be ours (a Python process; after a crash
    its pid may since belong to something else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"python" in f.read().lower()
    except OSError:
        return True


class RunLock:
    """A training run's claim on its folder: ``.lock`` holds the owner's pid, host, boot
    and start time, made atomically (O_EXCL). A second run in the folder is refused in one
    line; a lock whose owner is gone (killed, crashed: same host, process not running or
    the machine rebooted since) is stale and replaced. Released on exit."""

    def __init__(self, out_dir: str) -> None:
        self.path = os.path.join(out_dir, ".lock")
        self.held = False

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a stale one was replaced."""
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or not self._stale(owner):
                    pid, host, _, since = owner or ("?", "?", "", "?")
                    raise RunFolderError(
                        f"{os.path.dirname(self.path)} is in use by another run (pid {pid} on {host}, "
                        f"since {since}); wait for it or stop it; if it is gone, delete {self.path}") from None
                os.remove(self.path)
                note = f"removed the stale lock of pid {owner[0]} (a run that ended without releasing it)"
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()} {_boot_id()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            self.held = True
            return note
        raise RunFolderError(f"cannot take the lock {self.path}")

    def _owner(self) -> Optional[tuple[str, str, str, str]]:
        try:
            with open(self.path) as f:
                fields = f.read().split()
        except OSError:
            return None
        return tuple(fields) if len(fields) == 4 else None

    @staticmethod
    def _stale(owner: tuple[str, str, str, str]) -> bool:
        pid, host, boot, _ = owner
        if host != socket.gethostname():
            return False  # cannot look at another machine's processes
        return boot != _boot_id() or not pid.isdigit() or not _running(int(pid))

    def release(self) -> None:
        if self.held and self._owner() is not None and self._owner()[0] == str(os.getpid()):
            os.remove(self.path)
        self.held = False


def claim(config, out_dir: str, env) -> tuple[RunLock, list[str]]:
    """Before training: rank 0 makes the folder, refuses or (--overwrite) moves aside
    another model's run and takes the lock; every rank learns whether it could (one
    broadcast) and raises the same RunFolderError if not. Returns the lock and what to log."""
    lock, notes, failure = RunLock(out_dir), [], None
    if env.is_main:
        try:
            make(out_dir)
            moved = prepare(config, out_dir)
            notes = [n for n in (lock.acquire(), moved and f"--overwrite: the previous run in "
                                 f"{out_dir} was moved to {moved}") if n]
        except UserError as e:
            failure = str(e)
    if env.distributed:
        import torch.distributed as dist
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure:
        lock.release()
        raise RunFolderError(failure)
    return lock, notes
