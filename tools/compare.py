"""Compare several runs or evaluations: one table.

    python tools/compare.py configs/vit_variants/digits_{vit,lai,dis,dislai}.yaml \\
        --output output/compare_digits
    python tools/compare.py CFG... --output DIR --skip-train     # re-read finished runs
    python tools/compare.py --evals output/*/eval-* --output output/compare   # evaluations side by side

For each config, ``main.py --cfg CFG --output DIR --tag <config name> [--opts ...]`` writes
``DIR/<MODEL.NAME>/<tag>/metrics.jsonl`` (one JSON line per epoch: epoch, train_loss,
val_acc1, val_acc5, lr, epoch_time). This tool then writes ``DIR/compare.md`` (params,
GMACs per image, best and final val top-1, training time) and ``DIR/compare.png`` (val top-1
against epoch, one line per config).

``--evals`` trains nothing: it reads evaluation folders (or their ``sets.json`` /
``metrics.json``), as ``--eval --eval-sets`` and ``--eval`` write them, and writes
``DIR/compare_evals.md``, the table for a paper: a row per checkpoint (its weights, size and
crop; the evaluations of one checkpoint at one setting merge into its row), a column of
top-1 per set (the ImageNet family first) and ImageNet-C's mCE.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402
from evaluation import SET_FOLDERS  # noqa: E402
from model_config import build_model  # noqa: E402
from errors import UserError, run_tool  # noqa: E402
from utils import count_macs, count_params  # noqa: E402


@dataclass
class Run:
    name: str  # the config's file name without .yaml: also the run's tag
    model: str
    params_m: float
    gmacs: float
    metrics: list[dict]

    @property
    def best_acc1(self) -> float:
        return max((m["val_acc1"] for m in self.metrics), default=float("nan"))

    @property
    def final_acc1(self) -> float:
        return self.metrics[-1]["val_acc1"] if self.metrics else float("nan")

    @property
    def minutes(self) -> float:
        return sum(m.get("epoch_time", 0.0) for m in self.metrics) / 60


def model_cost(cfg) -> tuple[float, float]:
    """(parameters in millions, GMACs for one image at DATA.IMG_SIZE): the counts main.py logs."""
    model = build_model(cfg)
    return count_params(model) / 1e6, count_macs(model, cfg.DATA.IMG_SIZE, cfg.MODEL.IN_CHANS) / 1e9


def train(cfg_path: str, tag: str, output: str, opts: list[str]) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--cfg", cfg_path, "--output", output,
           "--tag", tag]
    if opts:
        cmd += ["--opts", *opts]
    print("+", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code:
        raise UserError(f"training {cfg_path} failed with exit code {code} (its error is above)")


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UserError(f"no metrics at {path} (did the run finish? drop --skip-train)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(runs: list[Run]) -> str:
    lines = ["| config | model | params (M) | GMACs | best top-1 | final top-1 | epochs | time (min) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.name} | {r.model} | {r.params_m:.2f} | {r.gmacs:.3f} | {r.best_acc1:.2f} | "
                     f"{r.final_acc1:.2f} | {len(r.metrics)} | {r.minutes:.1f} |")
    return "\n".join(lines)


def plot(runs: list[Run], path: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot([m["epoch"] for m in r.metrics], [m["val_acc1"] for m in r.metrics],
                marker=".", label=f"{r.name} ({r.best_acc1:.1f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EVAL_FILES = ("sets.json", "metrics.json")  # --eval --eval-sets writes the first, --eval the second
SETTING = ("model", "weights", "checkpoint", "img_size", "crop_pct", "resize")  # one row each


def evaluation_files(path: str) -> list[str]:
    """The EVAL_FILES of an evaluation folder, or the file itself."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--evals: {path} not found")
    files = [os.path.join(path, name) for name in EVAL_FILES if os.path.isfile(os.path.join(path, name))]
    if not files:
        raise UserError(f"--evals: {path} holds no {' or '.join(EVAL_FILES)}: not an evaluation's folder "
                        f"(--eval writes them, in output/<MODEL.NAME>/eval-...)")
    return files


def read_evaluation(path: str) -> tuple[tuple, list[dict]]:
    """(its setting, [{set, acc1, mce}]) from a sets.json or a metrics.json."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--evals: {path} is not a readable JSON file ({e})") from None
    need = [*SETTING, *(("sets",) if isinstance(data, dict) and "sets" in data else ("dataset", "acc1"))]
    missing = [k for k in need if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"--evals: {path} is not an evaluation's {' or '.join(EVAL_FILES)} "
                        f"(it lacks {', '.join(missing)})")
    sets = data["sets"] if "sets" in data else [{"set": data["dataset"], "acc1": data["acc1"]}]
    return tuple(data[k] for k in SETTING), [{"set": r["set"], "acc1": r["acc1"], "mce": r.get("mce")} for r in sets]


def evaluation_rows(paths: list[str]) -> list[dict]:
    """A row per setting (checkpoint, weights, size, crop) with its sets' results, in the order
    given; the same set of a setting in two files must agree."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        for file in evaluation_files(path):
            setting, results = read_evaluation(file)
            row = rows.setdefault(setting, {"setting": dict(zip(SETTING, setting)), "sets": {}, "files": {}})
            for r in results:
                old = row["sets"].get(r["set"])
                if old is not None and old != r:
                    raise UserError(f"--evals: {row['files'][r['set']]} and {file} both hold {r['set']} for "
                                    f"{setting[2]} at {setting[3]} px, crop {setting[4]:g}, and disagree (top-1 "
                                    f"{old['acc1']:.2f} and {r['acc1']:.2f}): give one of them")
                row["sets"][r["set"]], row["files"][r["set"]] = r, file
    return list(rows.values())


def evaluation_table(rows: list[dict]) -> str:
    """Markdown: model, checkpoint, size, crop, top-1 per set (the ImageNet family in
    SET_FOLDERS' order, then others as they come), mCE when any row has ImageNet-C's."""
    seen = list(dict.fromkeys(name for r in rows for name in r["sets"]))
    sets = [s for s in SET_FOLDERS if s in seen] + [s for s in seen if s not in SET_FOLDERS]
    mce = any(r["sets"].get(s, {}).get("mce") is not None for r in rows for s in sets)
    lines = ["| model | checkpoint | size | crop | " + " | ".join(sets) + (" | mCE |" if mce else " |"),
             "|---|---|---:|---:|" + "---:|" * (len(sets) + mce)]
    for r in rows:
        s = r["setting"]
        cells = [f"{r['sets'][name]['acc1']:.2f}" if name in r["sets"] else "" for name in sets]
        if mce:
            value = next((r["sets"][n]["mce"] for n in sets if r["sets"].get(n, {}).get("mce") is not None), None)
            cells.append(f"{value:.2f}" if value is not None else "")
        ema = " (EMA)" if s["weights"] == "EMA" else ""
        lines.append(f"| {s['model']} | {s['checkpoint']}{ema} | {s['img_size']} | {s['crop_pct']:g} | "
                     + " | ".join(cells) + " |")
    note = "top-1 (%) per set" + ("; mCE: ImageNet-C's mean corruption error, AlexNet = 100, lower is better"
                                  if mce else "")
    return "\n".join(lines + ["", note])


def compare_evaluations(paths: list[str], output: str) -> int:
    text = evaluation_table(evaluation_rows(paths))
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "compare_evals.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wrote {path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cfgs", nargs="*", help="config files, one run each")
    parser.add_argument("--evals", nargs="+", metavar="EVAL", default=[],
                        help="evaluation folders (or their sets.json / metrics.json) to tabulate instead")
    parser.add_argument("--output", default="output/compare", help="root of the runs and the results")
    parser.add_argument("--opts", nargs="+", default=[], help="KEY VALUE overrides for every run")
    parser.add_argument("--skip-train", action="store_true", help="only read finished runs")
    parser.add_argument("--title", default="", help="plot title")
    args = parser.parse_args(argv)
    if args.evals:
        extra = [flag for flag, given in (("config files", args.cfgs), ("--opts", args.opts),
                                          ("--skip-train", args.skip_train), ("--title", args.title)) if given]
        if extra:
            raise UserError(f"--evals tabulates finished evaluations: {', '.join(extra)} would train or "
                            f"plot runs; give them without --evals")
        return compare_evaluations(args.evals, args.output)
    if not args.cfgs:
        raise UserError("give config files to train and compare, or --evals FOLDER... to tabulate evaluations")
    runs = []
    for cfg_path in args.cfgs:
        name = os.path.splitext(os.path.basename(cfg_path))[0]
        overrides = {"OUTPUT": (args.output, "--output"), "TAG": (name, "compare.py")}
        cfg = load_config(cfg_path, opts=args.opts, overrides=overrides)
        if not args.skip_train:
            train(os.path.abspath(cfg_path), name, os.path.abspath(args.output), args.opts)
        params, gmacs = model_cost(cfg)
        metrics = read_metrics(os.path.join(os.path.abspath(args.output), cfg.MODEL.NAME, name,
                                            "metrics.jsonl"))
        runs.append(Run(name, cfg.MODEL.NAME, params, gmacs, metrics))
    os.makedirs(args.output, exist_ok=True)
    text = table(runs)
    with open(os.path.join(args.output, "compare.md"), "w") as f:
        f.write(text + "\n")
    plot(runs, os.path.join(args.output, "compare.png"), args.title or ", ".join(r.name for r in runs))
    print(text)
    print(f"wrote {os.path.join(args.output, 'compare.md')} and compare.png")
    return 0


if __name__ == "__main__":
    run_tool(main)
