"""--eval and --throughput: the '* Acc@1' line, the report files (per-class, confusion matrix,
predictions, metrics.json) equal on 1 and 2 processes, weight-file layouts, EMA weights, crops."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from config import load_config
from tests.conftest import QUICK, RUN, last_acc, main_here, one_line_error, run_cmd

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each


def test_eval_accepts_weight_file_layouts_and_rejects_another_model(trained, out_dir, tmp_path, capsys):
    """Weights under 'state_dict', bare, or as a DDP-wrapped 'model_ema' evaluate alike; weights
    of another depth are refused in one line naming what is missing."""
    weights = trained.checkpoint(1)["model"]
    layouts = {"state_dict": {"state_dict": weights}, "bare": weights,
               "ema_ddp": {"model_ema": {f"module.{k}": v for k, v in weights.items()}}}
    results = set()
    for name, obj in layouts.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        ev = main_here(capsys, "--cfg", QUICK, "--output", str(out_dir), "--eval", "--resume", str(path))
        assert ev.returncode == 0, ev.stderr[-3000:]
        results.add(last_acc(ev.stdout))
    assert len(results) == 1

    ev = main_here(capsys, "--cfg", QUICK, "--output", str(out_dir), "--eval", "--resume", str(tmp_path / "bare.pth"),
                  "--opts", "MODEL.VIT.DEPTH", "5")
    assert ev.returncode == 2
    message = ev.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "does not match" in message and "missing" in message and "blocks.4" in message


def test_throughput_mode(out_dir, capsys):
    result = main_here(capsys, "--cfg", QUICK, "--output", str(out_dir), "--throughput", "--batch-size", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval" in result.stdout and "train step" in result.stdout and "img/s" in result.stdout


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files_and_distributed_evaluation_gathers_each_image_once(trained, tmp_path, capsys):
    out, ckpt, record = trained.out, trained.run / "ckpt_epoch_1.pth", trained.records()[-1]
    one = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--tag", "eval1", "--eval", "--resume", str(ckpt))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cmd(["bash", "evaluate.sh", "2", QUICK, str(ckpt), "--output", str(out)])  # a folder of its own
    assert two.returncode == 0, two.stderr[-3000:]
    assert "* Acc@1" in two.stdout.strip().splitlines()[-1]
    acc1, acc5, images = last_acc(one.stdout)
    assert last_acc(two.stdout) == (acc1, acc5, images) and images == 360
    assert acc1 == pytest.approx(record["val_acc1"], abs=1e-3)
    folder1, folder2 = out / RUN / "eval1", out / RUN / "eval-trained-ckpt_epoch_1-digits-8px-crop1"
    for name in ("per_class_accuracy.csv", "predictions.csv"):
        assert (folder1 / name).read_bytes() == (folder2 / name).read_bytes(), f"{name}: 1 vs 2 processes"
    single, double = (json.loads((f / "metrics.json").read_text()) for f in (folder1, folder2))
    assert single.pop("loss") == pytest.approx(double.pop("loss"), rel=1e-6)  # other batches: float32 rounding
    assert single == double
    predictions = read_csv(folder1 / "predictions.csv")
    assert [row["file"] for row in predictions] == [str(i) for i in range(360)]  # digits: each index once
    assert list(predictions[0]) == ["file", "label"] + [f"{w}{i}" for i in range(1, 6) for w in ("top", "prob")]
    for row in predictions:
        probs = [float(row[f"prob{i}"]) for i in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    hits = sum(row["top1"] == row["label"] for row in predictions)
    assert 100 * hits / 360 == pytest.approx(acc1, abs=1e-3)
    per_class = read_csv(folder1 / "per_class_accuracy.csv")
    assert [row["name"] for row in per_class] == [str(c) for c in range(10)]
    assert sum(int(row["images"]) for row in per_class) == 360
    correct = sum(float(row["acc1"]) * int(row["images"]) / 100 for row in per_class)
    assert correct == pytest.approx(hits, abs=0.01)
    metrics = json.loads((folder1 / "metrics.json").read_text())
    assert metrics["acc1"] == pytest.approx(acc1, abs=1e-3) and metrics["images"] == 360
    assert metrics["weights"] == "model" and metrics["checkpoint"] == str(ckpt)
    confusions = metrics["top_confusions"]
    assert confusions and all({"true", "predicted", "count"} == set(c) for c in confusions)
    assert (folder1 / "confusion_matrix.png").stat().st_size > 10_000
    assert "evaluation report: per_class_accuracy.csv, confusion_matrix.png" in one.stdout


def test_each_evaluation_writes_its_own_folder_and_never_replaces_anothers(trained, tmp_path, capsys):
    """Without --tag, a folder per weights, size and crop, whose config.yaml is the one of its
    metrics.json; a named folder holding another evaluation's report is refused (one line,
    nothing written) unless --overwrite, and one holding a training run always."""
    from tests.conftest import assert_untouched, one_error_line, previous_run
    out, run = tmp_path / "out", trained.run
    base = ["--cfg", QUICK, "--output", str(out), "--eval"]
    for ckpt, crop in (("ckpt_epoch_0.pth", "1.0"), ("ckpt_epoch_1.pth", "0.5")):
        result = main_here(capsys, *base, "--resume", str(run / ckpt), "--test-crop-pct", crop)
        assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p.name for p in (out / RUN).iterdir())
    assert folders == ["eval-trained-ckpt_epoch_0-digits-8px-crop1", "eval-trained-ckpt_epoch_1-digits-8px-crop0.5"]
    sets = load_config(QUICK, overrides={"MODE": ("eval", "--eval"), "MODEL.RESUME": (str(run / "ckpt_epoch_0.pth"), "--resume"),
                                         "TEST.EVAL_SETS": (["imagenet-v2"], "--eval-sets"),
                                         "DATA.DATA_PATH": (str(tmp_path), "--data-path")})
    assert sets.TAG == "eval-trained-ckpt_epoch_0-sets-8px-crop1"  # --eval-sets' table: not the plain report's folder
    for name in folders:
        saved = yaml.safe_load((out / RUN / name / "config.yaml").read_text())
        metrics = json.loads((out / RUN / name / "metrics.json").read_text())
        assert (saved["MODEL"]["RESUME"], saved["TEST"]["CROP_PCT"], saved["TAG"]) == \
            (metrics["checkpoint"], metrics["crop_pct"], name)

    other = ["--tag", folders[0], "--resume", str(run / "ckpt_epoch_1.pth")]
    before = {p: p.read_bytes() for p in (out / RUN / folders[0]).iterdir() if not p.name.startswith("log_")}
    line = one_error_line(main_here(capsys, *base, *other))
    assert f"{folders[0]} holds the report of another evaluation (checkpoint '{run / 'ckpt_epoch_0.pth'}' " \
           f"there, '{run / 'ckpt_epoch_1.pth'}' now)" in line and "--overwrite" in line
    assert_untouched(before)
    replaced = main_here(capsys, *base, *other, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    saved = yaml.safe_load((out / RUN / folders[0] / "config.yaml").read_text())
    metrics = json.loads((out / RUN / folders[0] / "metrics.json").read_text())
    assert saved["MODEL"]["RESUME"] == metrics["checkpoint"] == str(run / "ckpt_epoch_1.pth")

    training = previous_run(out, [*trained.args(out, "mine")], tag="mine")
    line = one_error_line(main_here(capsys, *base, "--tag", "mine", "--resume", str(run / "ckpt_epoch_1.pth"),
                                    "--overwrite"))
    assert "holds a training run (ckpt_epoch_0.pth, metrics.jsonl)" in line
    assert_untouched(training)


def test_use_ema_evaluates_the_ema_weights(trained, tmp_path, capsys):
    out, ckpt, record = trained.out, trained.run / "ckpt_epoch_1.pth", trained.records()[-1]
    result = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--tag", "ema", "--eval", "--resume", str(ckpt),
                      "--use-ema")
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_acc(result.stdout)[0] == pytest.approx(record["ema_acc1"], abs=1e-3)
    assert json.loads((out / RUN / "ema" / "metrics.json").read_text())["weights"] == "EMA"
    plain = tmp_path / "plain.pth"
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, plain)
    refused = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--eval", "--resume", str(plain), "--use-ema")
    assert refused.returncode == 2 and "holds no EMA weights" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_test_crop_pct_overrides_the_crop(trained, capsys):
    out, ckpt = trained.out, trained.run / "ckpt_epoch_1.pth"
    result = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--tag", "crop", "--eval", "--resume", str(ckpt),
                      "--test-crop-pct", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / RUN / "crop" / "metrics.json").read_text())
    assert metrics["crop_pct"] == 0.5  # quickstart itself does not crop
    bad = main_here(capsys, "--cfg", QUICK, "--eval", "--resume", str(ckpt), "--test-crop-pct", "0")
    assert bad.returncode == 2 and "TEST.CROP_PCT: must be in (0, 1]" in bad.stderr


def test_image_folders_name_files_and_leave_out_unreadable_images(tmp_path, capsys):
    """'file' is the image path where the dataset has one; an unreadable image skipped with
    DATA.SKIP_BAD_IMAGES is not in the report, and no image is there twice."""
    from config import load_config
    from model_config import build_model
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    readable = []
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = data / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                path = folder / f"{i}.png"
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
                if split == "val":
                    readable.append(str(path))
    (data / "val" / "dog" / "broken.png").write_bytes(b"not an image")
    opts = ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(data), "MODEL.NUM_CLASSES", "2",
            "DATA.SKIP_BAD_IMAGES", "True"]
    weights = tmp_path / "w.pth"
    torch.save({"model": build_model(load_config(QUICK, opts)).state_dict()}, weights)
    out = tmp_path / "out"
    result = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--tag", "eval", "--eval", "--pretrained", str(weights),
                      "--opts", *opts)
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_acc(result.stdout)[2] == 6
    rows = read_csv(out / RUN / "eval" / "predictions.csv")
    assert sorted(row["file"] for row in rows) == sorted(readable)
    assert {row["label"] for row in rows} == {"cat", "dog"}
    assert [row["name"] for row in read_csv(out / RUN / "eval" / "per_class_accuracy.csv")] == ["cat", "dog"]


# --------------------------------------------- the ImageNet family, by a model of known logits
STEP = 25  # pixel values between neighbouring class colours


def colour(j: int) -> np.ndarray:
    """Class j's colour: its decimal digits on the R, G, B axes."""
    return np.array([10 + STEP * (j % 10), 10 + STEP * (j // 10 % 10), 10 + STEP * (j // 100)], np.float64)


class ColourProbe(torch.nn.Module):
    """A nearest-colour classifier of ImageNet's 1,000 classes: logit j is minus the squared
    distance of the image's mean colour to class j's (plus a constant per image). A constant
    image keeps its colour through any resize and crop, so its logits are known by hand."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, num_classes)
        v = (torch.tensor(np.stack([colour(j) for j in range(num_classes)])) / 255 - 0.5) / 0.5  # quickstart's
        with torch.no_grad():  # MEAN and STD
            self.head.weight.copy_(2 * v)
            self.head.bias.copy_(-(v ** 2).sum(1))

    def forward(self, x):
        return self.head(x.mean(dim=(2, 3)))


def paint(path, label: int, kind: str = "right", toward: int = 0) -> None:
    """A constant 8x8 PNG: ``right`` in its class's colour (top-1), ``second`` 0.6 of the way
    to class ``toward``'s (which is then top-1 and the label second: a top-5 hit only), ``far``
    in class ``toward``'s colour (neither)."""
    rgb = {"right": colour(label), "second": colour(label) + 0.6 * (colour(toward) - colour(label)),
           "far": colour(toward)}[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), np.round(rgb), np.uint8)).save(path)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Stand-ins of each set's layout under one ROOT (imagenet-sketch left out: 'not found')."""
    from data.classes import imagenet_synsets, subset_synsets
    root = tmp_path_factory.mktemp("family")
    syn = imagenet_synsets(1000)
    val = root / "imagenet" / "val"
    # ImageNet val, named as ReaL numbers them: 2 right, 1 second, 3 far (ReaL: 2 of them right)
    images = [(3, "right", 0), (3, "far", 5), (4, "second", 5), (4, "far", 700), (7, "right", 0), (7, "far", 9)]
    for n, (label, kind, toward) in enumerate(images, 1):
        paint(val / syn[label] / f"ILSVRC2012_val_{n:08d}.png", label, kind, toward)
    real = [[3], [3, 5], [4], [], [7, 8], [300]]  # image 4 unlabelled; 2 and 5 right by ReaL, 6 not in its top 5
    (root / "imagenet" / "real.json").write_text(json.dumps(real))
    for j in range(1000):  # ImageNet-V2: folders 0..999; folder 10 far, folder 11 second
        kind, toward = {10: ("far", 600), 11: ("second", 12)}.get(j, ("right", 0))
        paint(root / "imagenet-v2" / str(j) / "0.png", j, kind, toward)
    for name, (t1, t2) in (("imagenet-a", (6, 11)), ("imagenet-r", (2, 4))):
        subset = subset_synsets(name)
        assert syn[t1] in subset and syn[t2] in subset and syn[t1 + 1] not in subset
        paint(root / name / syn[t1] / "0.png", t1)
        paint(root / name / syn[t1] / "1.png", t1, "second", t1 + 1)  # right only among the 200
        paint(root / name / syn[t2] / "0.png", t2, "far", t1)
    groups = {("gaussian_noise", 1): ["right", "right"], ("gaussian_noise", 2): ["right", "far"],
              ("fog", 1): ["far", "right"], ("fog", 2): ["far", "far"]}
    for (corruption, severity), kinds in groups.items():
        for i, kind in enumerate(kinds):
            paint(root / "imagenet-c" / corruption / str(severity) / syn[20] / f"{i}.png", 20, kind, 900)
    return root


SETS = "imagenet,imagenet-real,imagenet-v2,imagenet-a,imagenet-r,imagenet-sketch,imagenet-c"


def family_args(family, probe, out, tag: str) -> list[str]:
    """main.py's arguments for --eval-sets over the stand-ins with the probe's weights."""
    return ["--cfg", QUICK, "--output", str(out), "--tag", tag, "--eval", "--resume", str(probe), "--data-path",
            str(family), "--eval-sets", SETS, "--opts", "MODEL.NUM_CLASSES", "1000", "DATA.BATCH_SIZE", "64"]


def check_family_table(table: dict) -> None:
    """sets.json of the stand-ins as counted by hand (V2's labels are the folder's integer, not
    its place in string order; A/R choose among their 200 classes; ReaL counts a prediction
    among an image's labels, without the unlabelled; -C per corruption and severity, CE and
    mCE by AlexNet's errors); the set not found listed."""
    from data.datasets import ALEXNET_ERRORS
    got = {r["set"]: (r["acc1"], r["acc5"], r["images"]) for r in table["sets"]}
    assert got == {"imagenet": (pytest.approx(100 * 2 / 6), pytest.approx(100 * 3 / 6), 6),
                   "imagenet-real": (pytest.approx(100 * 3 / 5), pytest.approx(100 * 4 / 5), 5),
                   "imagenet-v2": (pytest.approx(99.8), pytest.approx(99.9), 1000),
                   "imagenet-a": (pytest.approx(100 * 2 / 3), pytest.approx(100 * 2 / 3), 3),
                   "imagenet-r": (pytest.approx(100 * 2 / 3), pytest.approx(100 * 2 / 3), 3),
                   "imagenet-c": (pytest.approx(50.0), pytest.approx(50.0), 8)}
    assert table["not_found"] == ["imagenet-sketch"]
    rows = {r["set"]: r for r in table["sets"]}
    assert rows["imagenet-real"]["unlabelled"] == 1 and rows["imagenet-a"]["classes"] == 200
    c = rows["imagenet-c"]
    ce = {"gaussian_noise": 100 * 0.25 / ALEXNET_ERRORS["gaussian_noise"], "fog": 100 * 0.75 / ALEXNET_ERRORS["fog"]}
    assert {k: v["ce"] for k, v in c["corruptions"].items()} == pytest.approx(ce)
    assert c["corruptions"]["fog"]["severities"] == {"1": 50.0, "2": 0.0}
    assert c["mce"] == pytest.approx(sum(ce.values()) / 2) and c["mce_over"] == 2


def probe_builds(monkeypatch) -> None:
    """main.py builds the ColourProbe (with the config's class count) instead of the config's model."""
    import main as main_module
    monkeypatch.setattr(main_module, "build_model", lambda config: ColourProbe(config.MODEL.NUM_CLASSES))


@pytest.fixture(scope="module")
def family_eval(family, tmp_path_factory):
    """The probe's weights and its --eval-sets over the stand-ins on 1 process (tag 'sets'):
    (the weights file, --output)."""
    import main as main_module
    tmp = tmp_path_factory.mktemp("family_eval")
    probe, out = tmp / "probe.pth", tmp / "out"
    torch.save({"model": ColourProbe().state_dict()}, probe)
    with pytest.MonkeyPatch.context() as monkeypatch:
        probe_builds(monkeypatch)
        assert main_module.main(family_args(family, probe, out, "sets")) == 0
    return probe, out


def test_imagenet_family_sets_evaluate_in_one_command_as_computed_by_hand(family_eval):
    """--eval-sets: each set's top-1/top-5 equals the hand count (check_family_table); the
    table to paste, the picture, a '* Acc@1' line per set; a set not found is listed, not fatal."""
    folder = family_eval[1] / RUN / "sets"
    check_family_table(json.loads((folder / "sets.json").read_text()))
    md = (folder / "sets.md").read_text()
    assert "| set | top-1 | top-5 | images | mCE | |" in md and "| imagenet-v2 | 99.80 | 99.90 | 1,000 |" in md
    assert "Not found under" in md and "imagenet-sketch" in md
    assert (folder / "sets.png").stat().st_size > 5_000
    log = (folder / "log_rank0.txt").read_text()
    assert "* Acc@1 99.800 Acc@5 99.900 on 1000 images (imagenet-v2)" in log and "not found under" in log


def _family_rank(rank: int, world: int, init_file: str, args: list[str]) -> None:
    """One rank of a --eval-sets run: as torchrun starts it, the process group already up."""
    import torch.distributed as dist

    import main as main_module
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    code = main_module.main(args)
    assert code == 0, f"rank {rank} exited with {code}"


def test_imagenet_family_sets_count_each_image_once_on_two_processes(family, family_eval, tmp_path, monkeypatch):
    """--eval-sets on 2 gloo processes (forked: no second torch import) writes 1 process's
    sets.json: each set's images split between the ranks and each counted once, -C's groups
    and ReaL's multi-label targets included."""
    import torch.multiprocessing as mp
    probe, out = family_eval
    probe_builds(monkeypatch)
    mp.start_processes(_family_rank, args=(2, str(tmp_path / "init"), family_args(family, probe, out, "sets2")),
                       nprocs=2, join=True, start_method="fork")
    one, two = (json.loads((out / RUN / tag / "sets.json").read_text()) for tag in ("sets", "sets2"))
    check_family_table(two)
    assert two == one
    assert "on cpu x 2 process(es)" in (out / RUN / "sets2" / "log_rank0.txt").read_text()


def test_an_imagenet_family_folder_of_another_layout_is_one_line(family, family_eval, tmp_path, capsys,
                                                                  monkeypatch):
    """A set's DATA.DATASET on a folder that does not look like it: one line naming the folder,
    the set's layout and the first stray entry (exit 2), before any image is evaluated."""
    from data.classes import imagenet_synsets
    probe = family_eval[0]
    probe_builds(monkeypatch)
    misnamed = tmp_path / "real"  # a ReaL image not named ILSVRC2012_val_NNNNNNNN
    paint(misnamed / "val" / imagenet_synsets(1000)[3] / "photo.png", 3)
    (misnamed / "real.json").write_text(json.dumps([[3]]))
    for dataset, root, needle in (
            ("imagenet-a", family / "imagenet-v2", "class folders are 200 synsets of timm's"),
            ("imagenet-v2", family / "imagenet" / "val", "class folders are 0..999, found n0"),
            ("imagenet-sketch", family / "imagenet-v2", "class folders are ImageNet synsets (n01440764 ...), found 0"),
            ("imagenet-c", family / "imagenet-a", "/ is not one of its corruptions"),
            ("imagenet-real", misnamed, "photo.png is not one of the 1 ILSVRC2012_val_NNNNNNNN images that ReaL labels")):
        line = one_line_error(capsys, "--cfg", QUICK, "--output", str(tmp_path / "out"), "--eval", "--resume",
                              str(probe), "--data-path", str(root), "--opts", "MODEL.NUM_CLASSES", "1000",
                              "DATA.DATASET", dataset)
        assert line.startswith(f"error: {root} is not {dataset}'s layout (DATA.DATASET {dataset}, docs/DATA.md): ")
        assert needle in line, line


def test_compare_tabulates_evaluations_side_by_side(family, family_eval, tmp_path, capsys, monkeypatch):
    """tools/compare.py --evals: a row per checkpoint and setting, top-1 per set in the family's
    order and the mCE, from sets.json and metrics.json alike (a plain --eval of the same
    weights joins their row; other weights are a row of their own); two files that disagree
    on one set of one checkpoint are one line."""
    import shutil

    from errors import UserError
    from tools import compare
    probe, out = family_eval
    probe_builds(monkeypatch)
    other = tmp_path / "other.pth"
    shutil.copy(probe, other)
    for weights, dataset, path in ((probe, "imagenet-sketch", family / "imagenet" / "val"),  # synset folders
                                   (other, "imagenet-a", family / "imagenet-a")):
        result = main_here(capsys, "--cfg", QUICK, "--output", str(tmp_path), "--tag", dataset, "--eval", "--resume",
                           str(weights), "--data-path", str(path), "--opts", "MODEL.NUM_CLASSES", "1000",
                           "DATA.DATASET", dataset)
        assert result.returncode == 0, result.stderr[-3000:]
    sets = out / RUN / "sets"
    evals = [str(sets), str(tmp_path / RUN / "imagenet-sketch"), str(tmp_path / RUN / "imagenet-a" / "metrics.json")]
    assert compare.main(["--evals", *evals, "--output", str(tmp_path / "cmp")]) == 0
    lines = (tmp_path / "cmp" / "compare_evals.md").read_text().splitlines()
    mce = json.loads((sets / "sets.json").read_text())["sets"][-1]["mce"]
    assert lines[0] == ("| model | checkpoint | size | crop | imagenet | imagenet-real | imagenet-v2 | imagenet-a | "
                        "imagenet-r | imagenet-sketch | imagenet-c | mCE |")
    assert lines[2:4] == [f"| {RUN} | {probe} | 8 | 1 | 33.33 | 60.00 | 99.80 | 66.67 | 66.67 | 33.33 | 50.00 | "
                          f"{mce:.2f} |", f"| {RUN} | {other} | 8 | 1 |  |  |  | 66.67 |  |  |  |  |"]
    assert "mCE: ImageNet-C's mean corruption error" in lines[-1] and "| imagenet-v2 |" in capsys.readouterr().out
    table = json.loads((sets / "sets.json").read_text())
    table["sets"][0]["acc1"] = 40.0
    changed = tmp_path / "sets.json"
    changed.write_text(json.dumps(table))
    with pytest.raises(UserError, match=rf"^--evals: {sets / 'sets.json'} and {changed} both hold imagenet for "
                                        rf"{probe} at 8 px, crop 1, and disagree \(top-1 33.33 and 40.00\)"):
        compare.main(["--evals", str(sets), str(changed), "--output", str(tmp_path / "cmp")])


def test_eval_sweep_tabulates_sizes_and_crops(trained, tmp_path, capsys):
    """tools/eval_sweep.py in this process: the trained weights at 2 sizes x 2 crops, each
    evaluated as --eval does (its report in a folder of its own; the position embedding
    resampled for the other size), in one table (sweep.md, sweep.json). The config's own
    setting is the run's last validation; a bad list is one line."""
    import importlib

    from errors import UserError
    sweep = importlib.import_module("tools.eval_sweep")
    out = tmp_path / "out"
    argv = ["--cfg", QUICK, "--output", str(out), "--resume", str(trained.run / "ckpt_epoch_1.pth")]
    assert sweep.main([*argv, "--img-sizes", "8,12", "--crop-pcts", "1,0.75"]) == 0
    folder = out / RUN / "sweep"
    table = json.loads((folder / "sweep.json").read_text())
    rows = table["settings"]
    assert [(r["img_size"], r["crop_pct"], r["images"], r["report"]) for r in rows] == \
        [(8, 1.0, 360, "8px_crop1"), (8, 0.75, 360, "8px_crop0.75"), (12, 1.0, 360, "12px_crop1"),
         (12, 0.75, 360, "12px_crop0.75")]
    assert rows[0]["acc1"] == trained.records()[-1]["val_acc1"]
    assert len({r["loss"] for r in rows}) == 4  # each setting's own transform and model
    for r in rows:
        metrics = json.loads((folder / r["report"] / "metrics.json").read_text())
        assert (metrics["img_size"], metrics["crop_pct"], metrics["acc1"]) == (r["img_size"], r["crop_pct"], r["acc1"])
    assert "resampled pos_embed (1, 17, 64) -> (1, 37, 64)" in (folder / "12px_crop1" / "log_rank0.txt").read_text()
    markdown = (folder / "sweep.md").read_text()
    assert f"| 8* | 1 | {rows[0]['acc1']:.3f} |" in markdown and "| 12 | 0.75 |" in markdown
    with pytest.raises(UserError, match=r"^--crop-pcts: 'abc' is not a fraction in \(0, 1\] "):
        sweep.main([*argv, "--crop-pcts", "0.9,abc"])
