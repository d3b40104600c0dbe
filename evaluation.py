"""The files --eval writes beside its '* Acc@1' line, in the run folder:

    per_class_accuracy.csv  class, name, images, top-1 / top-5 accuracy, the class most often predicted instead
    confusion_matrix.png    the confusion matrix (rows: true class, normalised) and the top confusions by name
    predictions.csv         every image once: file (its path where the dataset has one, <shard>:<key> for
                            webdataset shards, else its index), label, top-5 classes with their probabilities
    metrics.json            top-1, top-5, loss, mean per-class top-1, images, weights, eval transform

``engine.evaluate`` hands each batch's logits to ``Predictions.add`` (its optional collector);
``Predictions.gather`` brings every rank's rows to rank 0. The sharded eval sampler gives
each image to one rank, so the gathered rows hold each image exactly once, whatever the
number of processes (checked: a duplicate is an error, not a silent double count).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset

from config import dump_config, resume_file
from errors import UserError
from utils import DistEnv

FILES = ("per_class_accuracy.csv", "confusion_matrix.png", "predictions.csv", "metrics.json")


@dataclass
class Rows:
    """All evaluated images on rank 0, ordered by dataset index (``keys``)."""
    keys: list  # dataset index (wds: the sample's position in the split)
    targets: np.ndarray  # (N,) class index
    top: np.ndarray  # (N, k) predicted classes, most probable first
    probs: np.ndarray  # (N, k) their softmax probabilities


class Predictions:
    """One rank's top-k predictions, batch by batch, in the loader's order."""

    def __init__(self, loader, rank: int = 0, k: int = 5) -> None:
        self.loader, self.rank, self.k = loader, rank, k
        self.targets: list[torch.Tensor] = []
        self.top: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``targets`` (B,), or (B, L) multi-label (ImageNet-ReaL): its first class is the row's label."""
        if targets.dim() == 2:
            targets = targets[:, 0]
        probs, top = logits.float().softmax(dim=1).topk(min(self.k, logits.size(1)), dim=1)
        self.targets.append(targets.cpu())
        self.top.append(top.cpu())
        self.probs.append(probs.cpu())

    def _keys(self, count: int) -> list:
        """The dataset index of each collected row: the sampler's order without the images
        that were unreadable and dropped (DATA.SKIP_BAD_IMAGES marks them in ``bad``; call
        this before Loaders.skipped_images resets the marks)."""
        dataset = self.loader.dataset
        if isinstance(dataset, IterableDataset):  # wds: positions in the split, in the order the loader gives them
            keys = dataset.eval_order(self.loader.batch_size, self.loader.num_workers)
        else:
            keys = list(iter(self.loader.sampler))
        bad = getattr(dataset, "bad", None)
        if bad is not None:
            keys = [i for i in keys if not bad[i]]
        if len(keys) != count:
            raise RuntimeError(f"evaluation report: {count} predictions for {len(keys)} sampled images")
        return keys

    def gather(self, env: DistEnv) -> Optional[Rows]:
        """Every rank's rows on rank 0 (None elsewhere); every rank must call it."""
        targets = torch.cat(self.targets).numpy() if self.targets else np.zeros(0, np.int64)
        top = torch.cat(self.top).numpy() if self.top else np.zeros((0, self.k), np.int64)
        probs = torch.cat(self.probs).numpy() if self.probs else np.zeros((0, self.k), np.float32)
        local = (self._keys(len(targets)), targets, top, probs)
        parts = [local]
        if env.distributed:
            parts = [None] * env.world_size if env.is_main else None
            dist.gather_object(local, parts, dst=0)
        if not env.is_main:
            return None
        keys = [key for part in parts for key in part[0]]
        if len(set(keys)) != len(keys):
            raise RuntimeError("evaluation report: an image was evaluated on more than one process")
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        cat = [np.concatenate([part[j] for part in parts]) for j in (1, 2, 3)]
        return Rows([keys[i] for i in order], *(a[order] for a in cat))


def class_names(dataset, num_classes: int) -> list[str]:
    """The model's class names from the dataset's class list (data.classes: ImageNet's lemmas,
    DATA.CLASS_MAP's names), else its class folder names (ImageFolder, CIFAR, digits:
    ``dataset.classes``), else indices."""
    names = getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)
    return [str(n) for n in names] if names is not None and len(names) == num_classes \
        else [str(i) for i in range(num_classes)]


def file_of(dataset, key) -> str:
    """The image's path where the dataset has one (ImageFolder), <shard>:<key> for shards
    (wds), else its index."""
    if hasattr(dataset, "sample_name"):
        return dataset.sample_name(key)
    samples = getattr(dataset, "samples", None)
    return str(samples[key][0]) if samples is not None else str(key)


def confusion(rows: Rows, num_classes: int) -> np.ndarray:
    """(true, predicted top-1) counts."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (rows.targets, rows.top[:, 0]), 1)
    return matrix


def top_confusions(matrix: np.ndarray, names: list[str], limit: int = 10) -> list[tuple[str, str, int, float]]:
    """(true name, predicted name, count, share of the true class) of the most frequent errors."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:limit]
    found = []
    for true, pred in zip(*np.unravel_index(flat, off.shape)):
        if off[true, pred] > 0:
            found.append((names[true], names[pred], int(off[true, pred]),
                          100.0 * off[true, pred] / max(1, matrix[true].sum())))
    return found


def per_class(rows: Rows, matrix: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    hits5 = (rows.top == rows.targets[:, None]).any(axis=1)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    table = []
    for c, name in enumerate(names):
        images = int(matrix[c].sum())
        worst = int(off[c].argmax()) if off[c].any() else None
        table.append({"class": c, "name": name, "images": images,
                      "acc1": 100.0 * matrix[c, c] / images if images else float("nan"),
                      "acc5": 100.0 * hits5[rows.targets == c].sum() / images if images else float("nan"),
                      "most_confused_with": names[worst] if worst is not None else ""})
    return table


def plot_confusion(matrix: np.ndarray, names: list[str], title: str, path: str) -> None:
    """The row-normalised matrix (class names on the axes up to 30 classes, counts up to 15)
    and, beside it, the ten most frequent confusions named by class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    rates = matrix / np.maximum(1, matrix.sum(axis=1, keepdims=True))
    fig, (ax, side) = plt.subplots(1, 2, figsize=(10, 5.6), gridspec_kw={"width_ratios": [3, 1.5]})
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= 15:
        for t in range(n):
            for p in range(n):
                if matrix[t, p]:  # errors in red: a few among hundreds are pale on the colour scale
                    ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=8,
                            color="white" if rates[t, p] > 0.5 else "black" if t == p else "red",
                            fontweight="normal" if t == p else "bold")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    side.axis("off")
    lines = [f"{true} -> {pred}: {count} ({share:.1f}% of {true})"
             for true, pred, count, share in top_confusions(matrix, names)] or ["no confusions"]
    side.text(0.0, 1.0, "most frequent confusions\n(true -> predicted)\n\n" + "\n".join(lines),
              va="top", ha="left", family="monospace", fontsize=9, transform=side.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: Optional[Rows], stats: dict[str, Any], config, out_dir: str, loader,
                 weights: str) -> list[str]:
    """Write FILES into ``out_dir`` (rank 0, which holds ``rows``); the paths written."""
    if rows is None:
        return []
    dataset = loader.dataset
    names = class_names(dataset, config.MODEL.NUM_CLASSES)
    matrix = confusion(rows, len(names))
    table = per_class(rows, matrix, names)
    paths = [os.path.join(out_dir, name) for name in FILES]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows({**r, "acc1": f"{r['acc1']:.3f}", "acc5": f"{r['acc5']:.3f}"} for r in table)
    plot_confusion(matrix, names, f"{config.MODEL.NAME} ({weights}): top-1 {stats['acc1']:.2f}% on "
                                  f"{stats['images']} images", paths[1])
    k = rows.top.shape[1]
    with open(paths[2], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"] + [f"{w}{i}" for i in range(1, k + 1) for w in ("top", "prob")])
        for key, target, top, probs in zip(rows.keys, rows.targets, rows.top, rows.probs):
            writer.writerow([file_of(dataset, key), names[target]]
                            + [v for c, p in zip(top, probs) for v in (names[c], f"{p:.5f}")])
    seen = [r["acc1"] for r in table if r["images"]]
    metrics = {"acc1": stats["acc1"], "acc5": stats["acc5"], "loss": stats["loss"], "images": stats["images"],
               "mean_class_acc1": float(np.mean(seen)) if seen else float("nan"), **identity(config, weights),
               "top_confusions": [{"true": t, "predicted": p, "count": c} for t, p, c, _ in
                                  top_confusions(matrix, names)]}
    with open(paths[3], "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    return paths


def identity(config, weights: str) -> dict[str, Any]:
    """What an evaluation evaluated, as metrics.json says it: two reports that differ here
    are two evaluations (run_folder.claim_report keeps one from replacing the other)."""
    return {"model": config.MODEL.NAME, "weights": weights, "checkpoint": resume_file(config) or config.MODEL.PRETRAINED,
            "dataset": config.DATA.DATASET, "data_path": config.DATA.DATA_PATH, "img_size": config.DATA.IMG_SIZE,
            "crop_pct": config.TEST.CROP_PCT, "resize": config.TEST.RESIZE, "interpolation": config.DATA.INTERPOLATION}


def evaluate_weights(config, model, env, autocast, logger, out_dir: str) -> int:
    """--eval: the given weights (the model's, or with TEST.USE_EMA the EMA's) on the
    validation set; the one '* Acc@1' line and, on rank 0, the FILES beside it."""
    from data import build_loaders
    from engine import evaluate, set_progress
    from models.weights import (EMA_KEYS, adapt_weights, ema_export, ema_state_dict_of, load_weights,
                                read_weights, state_dict_of)
    from run_folder import claim_report

    path = resume_file(config) or config.MODEL.PRETRAINED
    if not path:
        raise UserError("--eval needs weights: pass --resume CKPT or --pretrained CKPT")
    weights = "EMA" if config.TEST.USE_EMA else "model"
    source = path
    if config.TEST.USE_EMA and path.endswith(".safetensors"):  # model weights only: the EMA's are beside it
        source = ema_export(path)
        if not os.path.isfile(source):
            raise UserError(f"--use-ema: {path} holds model weights only and no EMA export is beside it "
                            f"({source}, as tools/convert_checkpoint.py --safetensors writes it for a "
                            f"checkpoint with EMA weights); export it, or evaluate without --use-ema")
        state = state_dict_of(read_weights(source), source)
    else:
        ckpt = read_weights(path)
        state = ema_state_dict_of(ckpt, path) if config.TEST.USE_EMA else state_dict_of(ckpt, path)
    if state is None:
        raise UserError(f"{path} holds no EMA weights (looked under {', '.join(EMA_KEYS)}): it was trained "
                        f"without TRAIN.EMA.ENABLED; evaluate its model weights without --use-ema")
    if config.MODEL.PRETRAINED and not resume_file(config):
        state = adapt_weights(model, state, config.MODEL.HEAD_MAP, drop_head=False, logger=logger)
    load_weights(model, state, source)
    logger.info(f"loaded {weights} weights from {source}")
    claim_report(out_dir, identity(config, weights), config.OVERWRITE, env)  # before anything of it is written
    if env.is_main:
        dump_config(config, os.path.join(out_dir, "config.yaml"))  # this evaluation's, as metrics.json
    if config.TEST.EVAL_SETS or config.DATA.DATASET == "imagenet-c":
        return evaluate_sets(config, model, env, autocast, logger, out_dir, weights)
    loaders = build_loaders(config, env.rank, env.world_size, train=False, device=env.device)
    model.eval()  # before the hook: in training mode it may redraw random features
    set_progress(model, config.TRAIN.EPOCHS, 2**62)  # a finished run's schedule point
    predictions = Predictions(loaders.val, env.rank)
    stats = evaluate(model, loaders.val, env, autocast, config.TRAIN.CHANNELS_LAST, collector=predictions,
                     classes=getattr(loaders.val.dataset, "class_subset", None))
    written = write_report(predictions.gather(env), stats, config, out_dir, loaders.val, weights)  # rank 0
    if written:
        logger.info(f"evaluation report: {', '.join(os.path.basename(p) for p in written)} in {out_dir}")
    for line in loaders.skipped_images(env):  # DATA.SKIP_BAD_IMAGES
        logger.warning(line)
    logger.info(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} "
                f"loss {stats['loss']:.4f} on {stats['images']} images")
    return 0


# ------------------------------------------------------------------ the ImageNet family
# Where each set of TEST.EVAL_SETS is looked for under DATA.DATA_PATH (ROOT), first match
# taken: our names, then the names the sets unpack to. ImageNet and ReaL read ROOT/val or
# ROOT/imagenet/val.
SET_FOLDERS = {"imagenet": (".", "imagenet"), "imagenet-real": (".", "imagenet"),
               "imagenet-v2": ("imagenet-v2", "imagenetv2-matched-frequency-format-val"),
               "imagenet-a": ("imagenet-a",), "imagenet-r": ("imagenet-r",),
               "imagenet-sketch": ("imagenet-sketch", "sketch"), "imagenet-c": ("imagenet-c",)}
SET_FILES = ("sets.md", "sets.json", "sets.png")


def find_sets(root: str, names) -> tuple[list[tuple[str, str]], list[str]]:
    """([(set, its folder)] found under ``root``, [the names not found])."""
    found, missing = [], []
    for name in names:
        for rel in SET_FOLDERS[name]:
            folder = os.path.normpath(os.path.join(root, rel))
            if os.path.isdir(os.path.join(folder, "val") if name in ("imagenet", "imagenet-real") else folder):
                found.append((name, folder))
                break
        else:
            missing.append(name)
    return found, missing


def corruption_error(groups: list[dict]) -> dict[str, Any]:
    """ImageNet-C's summary from per (corruption, severity) top-1: per corruption the mean
    top-1 over its severities and its corruption error CE (mean error / AlexNet's,
    Hendrycks & Dietterich), and the mCE over the corruptions that AlexNet's errors cover."""
    from data.datasets import ALEXNET_ERRORS

    table: dict[str, Any] = {}
    for name in dict.fromkeys(g["corruption"] for g in groups):
        mine = [g for g in groups if g["corruption"] == name]
        error = float(np.mean([100.0 - g["acc1"] for g in mine])) / 100.0
        table[name] = {"acc1": 100.0 * (1 - error), "severities": {str(g["severity"]): g["acc1"] for g in mine},
                       "ce": 100.0 * error / ALEXNET_ERRORS[name] if name in ALEXNET_ERRORS else None}
    ces = [c["ce"] for c in table.values() if c["ce"] is not None]
    return {"corruptions": table, "mce": float(np.mean(ces)) if ces else None, "mce_over": len(ces)}


def _evaluate_set(config, name: str, folder: str, model, env, autocast, logger) -> dict[str, Any]:
    """One set's row of the table (config.DATA.DATASET ``name`` read from ``folder``)."""
    from data import Loaders, eval_loader
    from data.datasets import build_dataset, corruption_sets
    from data.transforms import build_transform
    from engine import evaluate

    sub = config.clone()
    sub.defrost()
    sub.DATA.DATASET, sub.DATA.DATA_PATH, sub.TEST.EVAL_SETS = name, folder, []
    sub.freeze()
    transform = build_transform(sub, train=False)
    if name == "imagenet-c":
        groups = []
        for corruption, severity, dataset in corruption_sets(sub, transform):
            loader = eval_loader(sub, dataset, env.rank, env.world_size, env.device)
            stats = evaluate(model, loader, env, autocast, config.TRAIN.CHANNELS_LAST)
            groups.append({"corruption": corruption, "severity": severity, **stats})
        summary = corruption_error(groups)
        return {"set": name, "folder": folder, "acc1": float(np.mean([g["acc1"] for g in groups])),
                "acc5": float(np.mean([g["acc5"] for g in groups])), "images": sum(g["images"] for g in groups),
                **summary}
    dataset = build_dataset(sub, train=False, transform=transform)
    loader = eval_loader(sub, dataset, env.rank, env.world_size, env.device)
    stats = evaluate(model, loader, env, autocast, config.TRAIN.CHANNELS_LAST,
                     classes=getattr(dataset, "class_subset", None))
    for line in Loaders(None, loader, None, torch.Generator()).skipped_images(env):
        logger.warning(f"{name}: {line}")
    row = {"set": name, "folder": folder, "acc1": stats["acc1"], "acc5": stats["acc5"], "images": stats["images"]}
    if getattr(dataset, "class_subset", None) is not None:
        row["classes"] = len(dataset.class_subset)  # the logits it was restricted to
    if hasattr(dataset, "unlabelled"):
        row["unlabelled"] = dataset.unlabelled  # ReaL: images without a label, not counted
    return row


def _note(row: dict[str, Any]) -> str:
    if "classes" in row:
        return f"predictions among its {row['classes']} classes"
    if "unlabelled" in row:
        return f"{row['unlabelled']:,} images without a ReaL label not counted"
    if "mce" in row:
        return f"mean over {len(row['corruptions'])} corruptions x their severities; mCE over {row['mce_over']}"
    return ""


def write_sets(summary: dict[str, Any], out_dir: str) -> list[str]:
    """sets.md (the table to paste), sets.json (the same, and -C per corruption) and sets.png."""
    rows = summary["sets"]
    paths = [os.path.join(out_dir, name) for name in SET_FILES]
    lines = [f"# {summary['model']}: {summary['weights']} weights of {summary['checkpoint']}", "",
             f"{summary['img_size']} px, crop {summary['crop_pct']}, sets under {summary['root']}", "",
             "| set | top-1 | top-5 | images | mCE | |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        mce = f"{r['mce']:.2f}" if r.get("mce") is not None else ""
        lines.append(f"| {r['set']} | {r['acc1']:.2f} | {r['acc5']:.2f} | {r['images']:,} | {mce} | {_note(r)} |")
    for r in rows:
        if "corruptions" in r:
            severities = sorted({s for c in r["corruptions"].values() for s in c["severities"]})
            lines += ["", f"{r['set']} top-1 by corruption and severity, corruption error (CE; AlexNet = 100):", "",
                      "| corruption | " + " | ".join(severities) + " | mean | CE |",
                      "|---|" + "---:|" * (len(severities) + 2)]
            for name, c in r["corruptions"].items():
                cells = [f"{c['severities'][s]:.2f}" if s in c["severities"] else "" for s in severities]
                ce = f"{c['ce']:.2f}" if c["ce"] is not None else "(not in the mCE)"
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {c['acc1']:.2f} | {ce} |")
    if summary["not_found"]:
        lines += ["", f"Not found under {summary['root']}: {', '.join(summary['not_found'])} (docs/DATA.md)"]
    with open(paths[0], "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(paths[1], "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    plot_sets(rows, f"{summary['model']} ({summary['weights']})", paths[2])
    return paths


def plot_sets(rows: list[dict[str, Any]], title: str, path: str) -> None:
    """Top-1 and top-5 of each set as bars, the set evaluated first (ImageNet) at the top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(rows)))
    y = np.arange(len(rows))[::-1]
    ax.barh(y + 0.2, [r["acc5"] for r in rows], height=0.4, color="#c6dbef", label="top-5")
    ax.barh(y - 0.2, [r["acc1"] for r in rows], height=0.4, color="#2171b5", label="top-1")
    for yi, r in zip(y, rows):
        ax.text(r["acc1"] + 1, yi - 0.2, f"{r['acc1']:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, [r["set"] + (f" (mCE {r['mce']:.1f})" if r.get("mce") is not None else "") for r in rows])
    ax.set_xlim(0, 105)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_sets(config, model, env, autocast, logger, out_dir: str, weights: str) -> int:
    """--eval --eval-sets (or DATA.DATASET imagenet-c): each set found under DATA.DATA_PATH
    once, every image on one rank; a '* Acc@1' line per set and, on rank 0, SET_FILES."""
    from engine import set_progress

    names = list(config.TEST.EVAL_SETS)
    found, missing = find_sets(config.DATA.DATA_PATH, names) if names else \
        ([("imagenet-c", config.DATA.DATA_PATH)], [])
    if missing:
        logger.warning(f"not found under {config.DATA.DATA_PATH}: {', '.join(missing)} (looked for "
                       + "; ".join(f"{n}: {', '.join(SET_FOLDERS[n])}" for n in missing) + ")")
    if not found:
        raise UserError(f"--eval-sets: none of {', '.join(names)} found under {config.DATA.DATA_PATH} "
                        f"(docs/DATA.md has each set's folder)")
    model.eval()
    set_progress(model, config.TRAIN.EPOCHS, 2**62)  # a finished run's schedule point
    rows = []
    for name, folder in found:
        row = _evaluate_set(config, name, folder, model, env, autocast, logger)
        rows.append(row)
        mce = f" mCE {row['mce']:.2f}" if row.get("mce") is not None else ""
        logger.info(f"* Acc@1 {row['acc1']:.3f} Acc@5 {row['acc5']:.3f}{mce} on {row['images']} images ({name})")
    summary = {"model": config.MODEL.NAME, "weights": weights,
               "checkpoint": resume_file(config) or config.MODEL.PRETRAINED, "img_size": config.DATA.IMG_SIZE,
               "crop_pct": config.TEST.CROP_PCT, "resize": config.TEST.RESIZE, "root": config.DATA.DATA_PATH,
               "sets": rows, "not_found": missing}
    if env.is_main:
        written = write_sets(summary, out_dir)
        logger.info(f"evaluation table: {', '.join(os.path.basename(p) for p in written)} in {out_dir}")
    return 0
