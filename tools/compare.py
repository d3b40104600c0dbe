"""Train several configs with main.py and compare them: one table, one plot.

    python tools/compare.py configs/vit_variants/digits_{vit,lai,dis,dislai}.yaml \\
        --output output/compare_digits
    python tools/compare.py CFG... --output DIR --skip-train     # re-read finished runs

For each config, ``main.py --cfg CFG --output DIR --tag <config name> [--opts ...]`` writes
``DIR/<MODEL.NAME>/<tag>/metrics.jsonl`` (one JSON line per epoch: epoch, train_loss,
val_acc1, val_acc5, lr, epoch_time). This tool then writes ``DIR/compare.md`` (params,
GMACs per image, best and final val top-1, training time) and ``DIR/compare.png`` (val top-1
against epoch, one line per config).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cfgs", nargs="+", help="config files, one run each")
    parser.add_argument("--output", default="output/compare", help="root of the runs and the results")
    parser.add_argument("--opts", nargs="+", default=[], help="KEY VALUE overrides for every run")
    parser.add_argument("--skip-train", action="store_true", help="only read finished runs")
    parser.add_argument("--title", default="", help="plot title")
    args = parser.parse_args()
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
