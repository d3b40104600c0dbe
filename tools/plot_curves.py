"""Plot a run's metrics.jsonl: loss, top-1 and learning rate against epoch.

    python tools/plot_curves.py output/vit_tiny_patch2_32/quickstart [-o curves.png]

A run folder stands for its metrics.jsonl. Several may be given to overlay runs: each run
has one colour in every panel (train solid, val dashed, EMA dotted) and is labelled by the
shortest end of its folder path that tells it from the others (``vit_a/default`` and
``vit_b/default``, not ``default`` twice), or by --labels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from errors import UserError, run_tool  # noqa: E402


NEEDED = ("epoch", "train_loss", "val_loss", "val_acc1", "lr")


def read_metrics(path: str) -> list[dict]:
    """A run's records, one per epoch (a resumed run may repeat an epoch: the last wins)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found (a run writes metrics.jsonl in its folder)")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}: line {number} is not JSON (is it a metrics.jsonl?)") from None
            missing = [k for k in NEEDED if not isinstance(record, dict) or k not in record]
            if missing:
                raise UserError(f"{path}: line {number} lacks {', '.join(missing)} (is it a metrics.jsonl?)")
            records.append(record)
    if not records:
        raise UserError(f"{path} holds no epochs yet")
    by_epoch = {r["epoch"]: r for r in records}
    return [by_epoch[e] for e in sorted(by_epoch)]


def run_labels(paths: list[str]) -> list[str]:
    """For each metrics file, the fewest trailing folder names that no other file shares
    (one file: its run folder's name)."""
    parts = [os.path.dirname(os.path.abspath(p)).split(os.sep) for p in paths]
    labels = []
    for i, own in enumerate(parts):
        depth = 1
        while depth < len(own) and any(own[-depth:] == other[-depth:] for j, other in enumerate(parts) if j != i):
            depth += 1
        labels.append("/".join(own[-depth:]))
    return labels


def plot(paths: list[str], out: str, labels: list[str] | None = None) -> list[str]:
    """Write the figure to ``out``; returns the run labels used."""
    labels = labels or run_labels(paths)
    if len(labels) != len(paths):
        raise UserError(f"--labels: {len(labels)} label(s) for {len(paths)} metrics file(s)")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (path, label) in enumerate(zip(paths, labels)):
        records = read_metrics(path)
        color = colors[i % len(colors)]
        epochs = [r["epoch"] + 1 for r in records]
        axes[0].plot(epochs, [r["train_loss"] for r in records], color=color, label=f"{label} train")
        axes[0].plot(epochs, [r["val_loss"] for r in records], "--", color=color, label=f"{label} val")
        axes[1].plot(epochs, [r["val_acc1"] for r in records], color=color, label=label)
        if records and "ema_acc1" in records[0]:
            axes[1].plot(epochs, [r["ema_acc1"] for r in records], ":", color=color, label=f"{label} EMA")
        axes[2].plot(epochs, [r["lr"] for r in records], color=color, label=label)
    for ax, title in zip(axes, ("loss", "val top-1 (%)", "learning rate (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics.jsonl file(s) or run folder(s)")
    p.add_argument("-o", "--output", help="PNG path (default: curves.png beside the first metrics.jsonl)")
    p.add_argument("--labels", nargs="+", metavar="NAME", help="one legend name per file (default: from the paths)")
    args = p.parse_args(argv)
    args.metrics = [os.path.join(m, "metrics.jsonl") if os.path.isdir(m) else m for m in args.metrics]
    out = args.output or os.path.join(os.path.dirname(args.metrics[0]), "curves.png")
    plot(args.metrics, out, args.labels)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_tool(main)
