"""main.py's command line: one table (FLAGS) in which every flag is a shortcut for one config
key. argparse is made from it (a flag's help names its key; its choices are the key's), and
so is the source a value is named by in errors (``--resume: MODEL.RESUME: file not found``).
Flags that set the same key (``--eval`` / ``--throughput``, ``--amp`` / ``--no-amp``) exclude
each other. Importing this module loads no torch, so --help and flag mistakes answer at once.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional

from config import CHOICES, ConfigError, choices, load_config


@dataclass(frozen=True)
class Flag:
    """``name VALUE`` sets ``key`` to VALUE (read by ``type``); with ``const`` the value is
    optional and ``name`` alone sets ``const``; ``type`` None: a switch that sets ``const``."""

    name: str
    key: str
    help: str
    type: Optional[Callable[[str], Any]] = str
    const: Any = None
    metavar: Optional[str] = None

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")


FLAGS = (
    Flag("--batch-size", "DATA.BATCH_SIZE", "per-process batch size", int),
    Flag("--data-path", "DATA.DATA_PATH", "dataset root"),
    Flag("--output", "OUTPUT", "root of run folders"),
    Flag("--tag", "TAG", "run name"),
    Flag("--resume", "MODEL.RESUME", "training checkpoint to resume from (or to evaluate with --eval); by "
                                     "default the newest one in the run folder, if any", metavar="CKPT"),
    Flag("--pretrained", "MODEL.PRETRAINED", "weights to fine-tune from (or to evaluate with --eval)",
         metavar="CKPT"),
    Flag("--eval", "MODE", "evaluate the --resume or --pretrained weights and exit", None, "eval"),
    Flag("--throughput", "MODE", "measure images/s and exit", None, "throughput"),
    Flag("--use-ema", "TEST.USE_EMA", "with --eval: the checkpoint's EMA weights", None, True),
    Flag("--eval-sets", "TEST.EVAL_SETS", "with --eval: evaluate these ImageNet-family sets, found under "
         "--data-path ROOT, into one table", lambda text: [n.strip() for n in text.split(",") if n.strip()],
         metavar="SET,SET"),
    Flag("--test-crop-pct", "TEST.CROP_PCT", "evaluate center crops of this fraction, in (0, 1]", float, metavar="PCT"),
    Flag("--accumulation-steps", "TRAIN.ACCUMULATION_STEPS", "gradient accumulation steps", int),
    Flag("--seed", "SEED", "random seed", int),
    Flag("--device", "DEVICE", "auto | cpu | cuda | cuda:N"),
    Flag("--amp", "AMP_DTYPE", "mixed precision; DTYPE left out is auto; --amp bfloat16 turns CPU autocast on",
         str, "auto", "DTYPE"),
    Flag("--no-amp", "AMP_DTYPE", "float32 everywhere", None, "off"),
    Flag("--overwrite", "OVERWRITE", "train even if the output folder holds another model's run: that run's "
                                     "files are moved aside into a replaced-<time>/ subfolder", None, True),
)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """--cfg, --opts and one argument per row of FLAGS."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--cfg", required=True, metavar="FILE", help="YAML config")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="override config keys, e.g. --opts TRAIN.EPOCHS 30 DATA.BATCH_SIZE 64")
    for flag in FLAGS:
        allowed = choices(flag.key) if flag.key in CHOICES and flag.type is not None else None
        if flag.type is None:  # a switch: the value it sets
            help_text = f"{flag.help} ({flag.key} {'true' if flag.const is True else flag.const})"
        else:
            help_text = f"{flag.help} ({flag.key}" + (f": {' | '.join(allowed)})" if allowed else ")")
        if flag.type is None:
            p.add_argument(flag.name, dest=flag.dest, action="store_const", const=flag.const, help=help_text)
        elif flag.const is None:
            p.add_argument(flag.name, dest=flag.dest, type=flag.type, choices=allowed, metavar=flag.metavar,
                           help=help_text)
        else:
            p.add_argument(flag.name, dest=flag.dest, type=flag.type, choices=allowed, metavar=flag.metavar,
                           nargs="?", const=flag.const, help=help_text)
    return p


def config_from_args(args: argparse.Namespace):
    """The config of a command line: the YAML, then the flags given (each named as the source
    of its key's value), then --opts. Two flags for one key are a ConfigError."""
    overrides: dict[str, tuple[Any, str]] = {}
    for flag in FLAGS:
        value = getattr(args, flag.dest)
        if value is None:
            continue
        if flag.key in overrides:
            raise ConfigError(f"{overrides[flag.key][1]} and {flag.name} together: both set {flag.key}; "
                              f"pass one")
        overrides[flag.key] = (value, flag.name)
    return load_config(args.cfg, args.opts, overrides)
