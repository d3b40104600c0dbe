"""Bad input (issue 5, items 5 and 6): one line on stderr, exit code 2, no traceback and no
existing file overwritten; unreadable images skipped and counted when asked; checkpoints
that need unpickling refused, convertible once trusted, and exportable to safetensors.

Runs go through ``python main.py`` (and evaluate.sh) where the exit code, the missing
traceback or DataLoader worker processes are the point; the rest calls functions directly.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import ROOT, last_acc, run_cmd, run_main
from utils import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

QUICK = "configs/quickstart.yaml"
RUN = "vit_tiny_patch2_32"
ONE_EPOCH = ["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "100"]


def one_error_line(result) -> str:
    """The run failed the way bad input must: exit code 2, one line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def previous_run(out_dir, argv: list[str], tag: str = "quickstart"):
    """The folder of a finished run of the command ``argv``, as the same command repeated
    with bad input would find it."""
    import main
    from flags import config_from_args
    run = out_dir / RUN / tag
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config_from_args(main.parse_args(argv)).dump())
    (run / "ckpt_epoch_0.pth").write_bytes(b"weights of the earlier run")
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (run / "log_rank0.txt").write_text("earlier log\n")
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def assert_untouched(before: dict) -> None:
    """Every earlier file keeps its bytes; logs may only grow (a line about the failure)."""
    for path, data in before.items():
        now = path.read_bytes()
        if path.name.startswith("log_rank"):
            assert now.startswith(data), path
        else:
            assert now == data, f"{path.name} was overwritten"


def image_tree(root, classes=("cat", "dog", "eel"), per_class=(4, 2), size=8):
    """train/ and val/ ImageFolders of random JPEGs, small enough for the quickstart ViT."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return root


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def folder_args(root, *opts: str) -> list[str]:
    return ["--cfg", QUICK, "--data-path", str(root), "--opts", "DATA.DATASET", "folder",
            "MODEL.NUM_CLASSES", "3", "DATA.BATCH_SIZE", "4", *ONE_EPOCH, *opts]


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("case", ["unknown key", "wrong type", "BASE cycle"])
def test_bad_config_through_main(tmp_path, out_dir, case):
    """A typo, a value of the wrong type or a BASE cycle: one line naming the key (or the
    cycle) and the file, before the run folder is touched."""
    before = previous_run(out_dir, ["--cfg", QUICK, "--output", str(out_dir)])
    base = {"BASE": [str(ROOT / QUICK)]}
    if case == "unknown key":
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, "TRAIN": {"EPOCHZ": 3}}))
        needles = ["unknown config key TRAIN.EPOCHZ", "bad.yaml"]
    elif case == "wrong type":
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, "DATA": {"SKIP_BAD_IMAGES": "often"}}))
        needles = ["wrong type for DATA.SKIP_BAD_IMAGES", "bad.yaml"]
    else:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"BASE": ["other.yaml"]}))
        (tmp_path / "other.yaml").write_text(yaml.safe_dump({"BASE": ["bad.yaml"]}))
        needles = ["BASE cycle", "bad.yaml -> ", "other.yaml -> ", "bad.yaml"]
    line = one_error_line(run_main("--cfg", str(tmp_path / "bad.yaml"), "--output", str(out_dir)))
    assert line.startswith("config error: ")
    for needle in needles:
        assert needle in line, line
    assert_untouched(before)


# -------------------------------------------------------------------------------- data
def _no_val(root):
    shutil.rmtree(image_tree(root) / "val")


def _empty(root):
    root.mkdir()


def _no_images(root):
    image_tree(root)
    for path in (root / "train").rglob("*.jpg"):
        path.unlink()


def _classes_differ(root):
    image_tree(root)
    (root / "val" / "eel").rename(root / "val" / "emu")


@pytest.mark.parametrize("make, needles", [
    (_no_val, ["dataset folder not found", "val/ is missing"]),
    (_empty, ["dataset folder not found", "needs train/ and val/"]),
    (_no_images, ["train: Found no valid file for the classes cat, dog, eel"]),
    (_classes_differ, ["class folders of train/ and val/ differ: val lacks: eel; val has extra: emu"]),
], ids=["no val folder", "empty folder", "no images", "classes differ"])
def test_bad_dataset_folder(tmp_path, out_dir, capsys, make, needles):
    """main.main in this process (the same code path as the command, without paying for
    the imports again): exit code 2 and one line; the earlier run's files keep their bytes."""
    import main
    root = tmp_path / "data"
    make(root)
    argv = folder_args(root, "DATA.NUM_WORKERS", "0") + ["--output", str(out_dir)]
    before = previous_run(out_dir, argv)
    code = main.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert_untouched(before)


def test_unreadable_image_in_a_worker_is_one_line(tmp_path, out_dir):
    """DATA.SKIP_BAD_IMAGES off: the error raised inside a DataLoader worker process (which
    PyTorch re-raises with the worker's traceback in the message) still ends the run with
    one line naming the file."""
    root = image_tree(tmp_path / "data")
    (root / "train" / "dog" / "1.jpg").write_bytes(b"not a jpeg at all")
    result = run_main(*folder_args(root, "DATA.NUM_WORKERS", "2"), "--output", str(out_dir))
    line = one_error_line(result)
    assert "cannot read image" in line and "dog/1.jpg" in line and "DATA.SKIP_BAD_IMAGES" in line


def test_unreadable_images_are_skipped_and_counted_with_workers(tmp_path, out_dir):
    """DATA.SKIP_BAD_IMAGES on, two loader workers: the epoch completes, and the log names
    how many distinct files each split skipped and the first of them. Training replaces a
    bad image; validation drops it: the accuracy is over the 5 readable images of 6."""
    root = image_tree(tmp_path / "data")  # 12 training images = 3 full batches of 4
    (root / "train" / "cat" / "2.jpg").write_bytes(b"garbage")
    truncate(root / "train" / "eel" / "0.jpg")
    truncate(root / "val" / "dog" / "1.jpg")
    result = run_main(*folder_args(root, "DATA.NUM_WORKERS", "2", "DATA.SKIP_BAD_IMAGES", "True"),
                      "--output", str(out_dir), "--tag", "skip")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out_dir / RUN / "skip" / "log_rank0.txt").read_text()
    assert (f"Epoch 0: train: skipped 2 unreadable image(s) (replaced by the next readable image), "
            f"first: {root}/train/cat/2.jpg") in log
    assert f"Epoch 0: val: skipped 1 unreadable image(s) (not counted), first: {root}/val/dog/1.jpg" in log
    assert "on 5 images" in log and "on 6 images" not in log
    record = json.loads((out_dir / RUN / "skip" / "metrics.jsonl").read_text())
    assert 0 <= record["val_acc1"] <= 100 and (record["val_acc1"] * 5 / 100) % 1 < 1e-6  # k of 5 right
    # evaluated on two processes: the same 5 images, the one skipped file counted once
    ev = run_cmd(["bash", "evaluate.sh", "2", QUICK, str(out_dir / RUN / "skip" / "ckpt_epoch_0.pth"),
                  "--data-path", str(root), "--output", str(out_dir), "--opts", "DATA.DATASET", "folder",
                  "MODEL.NUM_CLASSES", "3", "DATA.BATCH_SIZE", "4", "DATA.SKIP_BAD_IMAGES", "True"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert last_acc(ev.stdout) == (pytest.approx(record["val_acc1"]), pytest.approx(100.0), 5)
    assert f"val: skipped 1 unreadable image(s) (not counted), first: {root}/val/dog/1.jpg" in ev.stdout


def test_skipping_keeps_batches_full_and_order_deterministic(tmp_path):
    """A bad file is replaced by the next readable one: full batches (equal step counts on
    every rank), the same batches for the same seed, a count reset by each report."""
    from config import load_config
    from data import build_loaders
    root = image_tree(tmp_path / "data")
    (root / "train" / "cat" / "0.jpg").write_bytes(b"")
    truncate(root / "train" / "cat" / "1.jpg")
    cfg = load_config(QUICK, ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(root), "MODEL.NUM_CLASSES", "3",
                              "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "2", "DATA.SKIP_BAD_IMAGES", "True"])
    epochs = []
    for _ in range(2):
        loaders = build_loaders(cfg, rank=0, world_size=1)
        loaders.generator.manual_seed(7)
        loaders.train.sampler.set_epoch(0)
        epochs.append([(x.clone(), y.clone()) for x, y in loaders.train])
        assert loaders.skipped_images(ENV) == [f"train: skipped 2 unreadable image(s) (replaced by the next "
                                               f"readable image), first: {root}/train/cat/0.jpg"]
        assert loaders.skipped_images(ENV) == []
    assert [y.numel() for _, y in epochs[0]] == [4, 4, 4]
    for (x0, y0), (x1, y1) in zip(*epochs):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    dataset = loaders.train.dataset  # the quickstart's training transform is not random
    assert dataset[0][1] == dataset[1][1] == 0 and torch.equal(dataset[0][0], dataset[2][0])  # cat/2 stands in


# ------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_model_at_eval_pretrained(tmp_path, out_dir):
    """--eval --pretrained with weights of a differently shaped ViT: one line summarising
    missing, unexpected and shape-mismatched keys."""
    from config import load_config
    from model_config import build_model
    other = build_model(load_config(QUICK, ["MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "5"]))
    state = other.state_dict()
    del state["norm.weight"]
    torch.save({"model": state}, tmp_path / "other.pth")
    argv = ["--cfg", QUICK, "--output", str(out_dir), "--tag", "eval", "--eval", "--pretrained",
            str(tmp_path / "other.pth")]
    before = previous_run(out_dir, argv, tag="eval")
    line = one_error_line(run_main(*argv))
    assert "other.pth does not match VisionTransformer" in line
    assert "1 missing: norm.weight" in line and "unexpected: blocks.4." in line
    assert "shape mismatches: cls_token (1, 1, 32) vs (1, 1, 64)" in line
    assert_untouched(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of the quickstart on digits: (run folder, logged val top-1)."""
    out = tmp_path_factory.mktemp("trained")
    result = run_main("--cfg", QUICK, "--output", str(out), "--tag", "t", "--opts", *ONE_EPOCH,
                      "TRAIN.EMA.ENABLED", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    run = out / RUN / "t"
    return run, json.loads((run / "metrics.jsonl").read_text())["val_acc1"]


def test_our_checkpoints_hold_only_plain_values(trained):
    """weights_only=True loads a real checkpoint, and walking it finds nothing but tensors
    and plain Python values (the config is YAML text)."""
    run, _ = trained
    ckpt = torch.load(run / "ckpt_epoch_0.pth", map_location="cpu", weights_only=True)
    seen = set()

    def walk(obj, where):
        seen.add(type(obj).__name__)
        assert isinstance(obj, (torch.Tensor, str, int, float, bool, type(None), list, tuple, dict)), \
            f"{where}: {type(obj)}"
        if isinstance(obj, dict):
            for key, value in obj.items():
                assert isinstance(key, (str, int)), f"{where}: key {key!r}"
                walk(value, f"{where}.{key}")
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{where}[{i}]")

    walk(ckpt, "checkpoint")
    assert {"Tensor", "dict", "str", "int", "float"} <= seen
    assert yaml.safe_load(ckpt["config"])["MODEL"]["NAME"] == RUN


def convert_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pickled_objects_refused_then_converted_with_trust(trained, tmp_path, out_dir, capsys):
    """A checkpoint laid out like the Swin/DAT repos' (weights + argparse.Namespace + a
    numpy scalar) is refused by main.py and by the tool without --trust, pointing at the
    tool; converted with --trust, it loads with weights_only=True and evaluates to the
    accuracy training logged."""
    run, logged = trained
    weights = torch.load(run / "ckpt_epoch_0.pth", weights_only=True)["model"]
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": weights, "args": argparse.Namespace(lr=1e-3, model="vit"),
                "max_accuracy": np.float64(logged)}, foreign)

    line = one_error_line(run_main("--cfg", QUICK, "--output", str(out_dir), "--eval", "--resume", str(foreign)))
    assert "refused for safety" in line and "argparse.Namespace" in line
    assert f"python tools/convert_checkpoint.py --trust {foreign} OUT.pth" in line

    tool, safe = convert_tool(), tmp_path / "safe.pth"
    line = one_error_line(run_cmd([sys.executable, "tools/convert_checkpoint.py", str(foreign), str(safe)]))
    assert line.startswith("error: ") and "python tools/convert_checkpoint.py --trust" in line
    assert not safe.exists()
    assert tool.main(["--trust", str(foreign), str(safe)]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint.args: argparse.Namespace -> dict" in printed and "numpy.float64" in printed
    converted = torch.load(safe, weights_only=True)
    assert converted["args"] == {"lr": 1e-3, "model": "vit"} and type(converted["max_accuracy"]) is float

    ev = run_main("--cfg", QUICK, "--output", str(out_dir), "--eval", "--pretrained", str(safe))
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert last_acc(ev.stdout)[0] == pytest.approx(logged, abs=1e-3)


def test_safetensors_export_evaluates_like_the_checkpoint(trained, tmp_path, out_dir):
    """--safetensors writes the model weights (EMA in *_ema.safetensors); evaluate.sh on
    the file gives the accuracy training logged for the .pth, and --pretrained reads it."""
    from config import load_config
    from model_config import build_model
    from models.weights import load_pretrained, read_weights
    run, logged = trained
    ckpt = torch.load(run / "ckpt_epoch_0.pth", weights_only=True)
    out = tmp_path / "w.safetensors"
    assert convert_tool().main([str(run / "ckpt_epoch_0.pth"), "--safetensors", str(out)]) == 0
    exported, ema = read_weights(str(out)), read_weights(str(tmp_path / "w_ema.safetensors"))
    assert exported.keys() == ckpt["model"].keys() and ema.keys() == ckpt["ema"].keys()
    assert all(torch.equal(exported[k], ckpt["model"][k]) for k in exported)
    assert all(torch.equal(ema[k], ckpt["ema"][k]) for k in ema)

    model = build_model(load_config(QUICK))
    load_pretrained(model, str(out))  # the --pretrained path
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())

    ev = run_cmd(["bash", "evaluate.sh", "1", QUICK, str(out), "--output", str(out_dir)])
    assert ev.returncode == 0, ev.stderr[-3000:]
    acc1, _, images = last_acc(ev.stdout)
    assert acc1 == pytest.approx(logged, abs=1e-3) and images == 360
