"""Webdataset shards (DATA.DATASET wds) on small generated JPEG sets: writing them, which
samples each rank and worker reads, evaluation equal to the folder's on 1 and 2 processes,
and bad shards (resuming on shards: test_resume.py)."""
from __future__ import annotations

import io
import json
import re
import shutil
import sys
import tarfile
import zlib

import pytest
import torch
from PIL import Image

from config import ConfigError, load_config
from data import build_loaders, DataError
from data.shardlist import expand_braces, find_shards
from data.shards import ShardDataset

from tests.conftest import QUICK, RUN, SHARD_CLASSES, last_acc, main_here, make_shards, run_cmd

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; forked loader workers of a 1-thread parent


def config(path, *opts, dataset="wds"):
    return load_config(QUICK, ["DATA.DATASET", dataset, "DATA.DATA_PATH", str(path), "MODEL.NUM_CLASSES", "3",
                               "DATA.IMG_SIZE", "16", "DATA.BATCH_SIZE", "4", *opts])


def pixel_id(image) -> torch.Tensor:
    """A transform that names the image by its pixels (random images: unique)."""
    return torch.tensor(zlib.crc32(image.tobytes()))


def folder_ids(folder, split="train") -> set:
    return {zlib.crc32(Image.open(p).convert("RGB").tobytes()) for p in (folder / split).glob("*/*.jpg")}


def test_make_shards_writes_webdataset_samples_and_an_index(shard_sets, tmp_path):
    folder, shards = shard_sets
    index = json.loads((shards / "index.json").read_text())
    assert index["classes"] == list(SHARD_CLASSES)
    assert index["counts"] == {**{f"train-00000{i}.tar": 7 for i in range(4)}, "train-000004.tar": 2,
                               "val-000000.tar": 7, "val-000001.tar": 7, "val-000002.tar": 1}
    with tarfile.open(shards / "val-000000.tar") as tar:
        names = tar.getnames()
        assert names[:4] == ["ant/ant_0.jpg", "ant/ant_0.cls", "ant/ant_1.jpg", "ant/ant_1.cls"]
        assert tar.extractfile("ant/ant_0.jpg").read() == (folder / "val/ant/ant.0.jpg").read_bytes()
        assert tar.extractfile("bee/bee_0.cls").read() == b"1"
        assert {m.mtime for m in tar.getmembers()} == {0}
    with tarfile.open(shards / "train-000000.tar") as tar:  # training samples are shuffled across shards
        assert len({n.split("/")[0] for n in tar.getnames()}) > 1
    again = make_shards(folder, tmp_path / "again")  # deterministic bytes
    assert (again / "train-000003.tar").read_bytes() == (shards / "train-000003.tar").read_bytes()
    refused = run_cmd([sys.executable, "tools/make_shards.py", str(folder), str(again)])
    assert refused.returncode == 2 and "already holds shards" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_data_path_folder_or_brace_pattern_and_its_checks(shard_sets, tmp_path):
    _, shards = shard_sets
    assert expand_braces("a-{0..2}.tar") == ["a-0.tar", "a-1.tar", "a-2.tar"]
    assert expand_braces("x{train-{08..10},val-0}") == ["xtrain-08", "xtrain-09", "xtrain-10", "xval-0"]
    pattern = str(shards / "{train-{000000..000004},val-{000000..000002}}.tar")
    assert find_shards(pattern) == find_shards(str(shards))
    assert len(find_shards(pattern)["train"]) == 5
    cfg = config(pattern, "DATA.NUM_WORKERS", "0")
    assert len(build_loaders(cfg, 0, 1).train.dataset) == 28  # 30 // 4 steps of 4
    bad = [(str(tmp_path), "no train shards in"),
           (str(shards / "train-{000000..000009}.tar"), "shard not found: .*train-000005.tar"),
           (str(shards / "{index.json,val-000000.tar}"), "shard .*index.json: its file name names neither split")]
    for path, message in bad:
        with pytest.raises(ConfigError, match=f"DATA.DATA_PATH: {message}"):
            config(path)
    with pytest.raises(ConfigError, match="DATA.REPEATED_AUG: not available with DATA.DATASET wds"):
        config(shards, "DATA.REPEATED_AUG", "True")
    with pytest.raises(ConfigError, match="DATA.SHUFFLE_BUFFER: must be > 0"):
        config(shards, "DATA.SHUFFLE_BUFFER", "0")


@pytest.mark.parametrize("total, world, batch, workers", [(30, 1, 4, 1), (30, 2, 4, 3), (1003, 3, 16, 4),
                                                          (40, 4, 5, 2), (12, 2, 4, 3)])
def test_every_rank_and_worker_reads_a_disjoint_part_of_whole_batches(total, world, batch, workers):
    counts = [7] * (total // 7) + ([total % 7] if total % 7 else [])
    shards = [f"s{i}" for i in range(len(counts))]
    for epoch in (0, 1):
        seen, per_rank = [], []
        for rank in range(world):
            ds = ShardDataset(shards, counts, None, None, True, rank, world, batch, seed=3)
            ds.set_epoch(epoch)
            taken = 0
            for worker in range(workers):
                pieces, _ = ds.ranges(worker, workers)
                n = sum(b - a for _, a, b in pieces)
                assert n % batch == 0
                taken += n
                seen += [ds.starts[s] + i for s, a, b in pieces for i in range(a, b)]
            per_rank.append(taken)
        steps = total // (world * batch)
        assert per_rank == [steps * batch] * world  # same steps on every rank
        assert len(seen) == len(set(seen)) == world * steps * batch  # no sample twice
        assert total - len(seen) < world * batch  # what waits is less than one global step
        if epoch == 0:
            first = set(seen)
    if total - world * (total // (world * batch)) * batch:
        assert set(seen) != first  # another shard order: other samples wait
    ev = [ShardDataset(shards, counts, None, None, False, r, world, batch) for r in range(world)]
    positions = [ev[r].starts[s] + i for r in range(world) for w in range(workers)
                 for s, a, b in ev[r].ranges(w, workers)[0] for i in range(a, b)]
    assert sorted(positions) == list(range(total))  # evaluation: every sample exactly once


def test_loaders_on_two_ranks_with_workers_read_each_image_at_most_once_per_epoch(shard_sets):
    folder, shards = shard_sets
    ids = folder_ids(folder)
    epochs = []
    for epoch in (0, 1):
        got = []
        for rank in (0, 1):
            loaders = build_loaders(config(shards, "DATA.NUM_WORKERS", "2"), rank, 2)
            loaders.train.dataset.transform = pixel_id
            batches = list(loaders.epoch(epoch, 0, rank))
            assert len(batches) == len(loaders.train) == 3  # 30 // (2 x 4)
            got += [int(i) for x, _ in batches for i in x]
        assert len(got) == len(set(got)) == 24 and set(got) <= ids
        epochs.append(got)
    assert epochs[0] != epochs[1]
    val = build_loaders(config(shards, "DATA.NUM_WORKERS", "2"), 0, 1).val
    val.dataset.transform = pixel_id
    assert sorted(int(i) for x, _ in val for i in x) == sorted(folder_ids(folder, "val"))


def test_predictions_name_each_sample_by_shard_and_key_on_any_number_of_processes(shard_sets):
    """predictions.csv's ``file`` for shards is <shard>:<key> of the very image the row was
    predicted for (in the order the loader and its workers give them), the same names on one
    process as on two."""
    from evaluation import Predictions, file_of
    _, shards = shard_sets
    truth = {}  # <shard>:<key> -> the image's pixels, read from the shards themselves
    for shard in sorted(shards.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    truth[f"{shard}:{member.name[:-4]}"] = int(pixel_id(image))
    for world, workers in ((1, 0), (2, 2)):
        named = {}
        for rank in range(world):
            val = build_loaders(config(shards, "DATA.NUM_WORKERS", str(workers)), rank, world, train=False).val
            val.dataset.transform = pixel_id
            ids = [int(i) for x, _ in val for i in x]
            names = [file_of(val.dataset, key) for key in Predictions(val, rank)._keys(len(ids))]
            named.update(zip(names, ids))
        assert named == truth, (world, workers)


def test_mid_epoch_skip_replays_the_rest_of_the_epoch(shard_sets):
    """What main.py does on resuming mid-epoch: Loaders.epoch(skip) and the checkpoint's RNG
    state. Without workers the rest is bit for bit; with two, the same images in order."""
    from checkpoint import rng_state, set_rng_state
    cpu = torch.device("cpu")

    _, shards = shard_sets
    loaders = build_loaders(config(shards, "DATA.NUM_WORKERS", "0", "AUG.HFLIP", "0.5"), 0, 1)
    full, state = [], None
    for i, (x, y) in enumerate(loaders.epoch(1, 0, 0)):
        full.append((x, y))
        if i == 2:
            state = rng_state(cpu)
    batches = loaders.epoch(1, 0, 0, skip=3)
    set_rng_state(state, cpu)  # after Loaders.epoch, as main.py restores a mid-epoch checkpoint's state
    rest = list(batches)
    assert len(rest) == len(full) - 3
    for (x, y), (fx, fy) in zip(rest, full[3:]):
        assert torch.equal(x, fx) and torch.equal(y, fy)

    loaders = build_loaders(config(shards, "DATA.NUM_WORKERS", "2"), 0, 1)
    loaders.train.dataset.transform = pixel_id
    whole = [x.tolist() for x, _ in loaders.epoch(0, 0, 0)]
    for skip in (1, 2, 5, 6):
        assert [x.tolist() for x, _ in loaders.epoch(0, 0, 0, skip=skip)] == whole[skip:]


def _rewrite(path, drop=None, garbage=None):
    """Rewrite a shard without member ``drop`` and with member ``garbage`` made unreadable."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == drop:
                continue
            data = b"\xff\xd8 not a jpeg" if m.name == garbage else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def _names(path):
    with tarfile.open(path) as tar:
        return tar.getnames()


@pytest.mark.parametrize("damage", ["truncated", "no .cls", "bad image"])
def test_bad_shards_are_one_line_errors_or_skipped_and_counted(shard_sets, tmp_path, damage):
    _, shards = shard_sets
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard = copy / "train-000001.tar"
    names = _names(shard)
    if damage == "truncated":  # cut inside the fifth sample's image
        with tarfile.open(shard) as tar:
            member = tar.getmember(names[8])
        shard.write_bytes(shard.read_bytes()[:member.offset_data + 100])
        key, expected = names[8].rsplit(".", 1)[0], "the shard ends inside this sample"
    elif damage == "no .cls":
        _rewrite(shard, drop=names[3])
        key, expected = names[3].rsplit(".", 1)[0], r"no \.cls \(class index\) in the sample"
    else:
        _rewrite(shard, garbage=names[4])
        key, expected = names[4].rsplit(".", 1)[0], "cannot read the image"

    # in this process (an error in a loader worker reaches main.py as this same line:
    # test_data.py; its workers then take PyTorch's 5 s join timeout to shut down)
    loaders = build_loaders(config(copy, "DATA.NUM_WORKERS", "0"), 0, 1)
    with pytest.raises(DataError) as info:
        list(loaders.epoch(0, 0, 0))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert f"bad sample {key} in shard {shard}" in message
    assert re.search(expected, message) and "DATA.SKIP_BAD_IMAGES True" in message

    loaders = build_loaders(config(copy, "DATA.NUM_WORKERS", "2", "DATA.SKIP_BAD_IMAGES", "True"), 0, 1)
    for epoch in (0, 1):  # the damaged sample is read every epoch (2 samples of the tail wait)
        assert sum(x.size(0) for x, _ in loaders.epoch(epoch, 0, 0)) == 28  # full batches, same steps
        count, first = loaders.train.dataset.take_skipped()
        assert count >= 1 and first == f"{shard} sample {key}"
    val = build_loaders(config(copy, "DATA.SKIP_BAD_IMAGES", "True"), 0, 1).val  # val shards are intact
    assert sum(x.size(0) for x, _ in val) == 15


@pytest.mark.slow
def test_evaluation_on_shards_equals_the_folder_on_one_and_two_processes(shard_sets, tmp_path, capsys):
    """The same checkpoint on the same images: ImageFolder (1 process) and shards on 1 process
    and through evaluate.sh on 2 (with a loader worker each) give the same accuracy on the same count, and shards the
    same predictions.csv; an unreadable image (in both) is dropped and counted, never replaced."""
    import models

    folder, _ = shard_sets
    bad = tmp_path / "folder"
    shutil.copytree(folder, bad)
    (bad / "val" / "bee" / "bee.2.jpg").write_bytes(b"\xff\xd8 broken")
    shards = make_shards(bad, tmp_path / "shards", shard_size=4)
    torch.manual_seed(0)
    model = models.create_model("vit_tiny_patch2_32", num_classes=3, img_size=16, embed_dim=64, num_heads=4, depth=4)
    ckpt = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    opts = ["--opts", "DATA.IMG_SIZE", "16", "MODEL.NUM_CLASSES", "3", "DATA.SKIP_BAD_IMAGES", "True",
            "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "1"]
    results = []
    ref = main_here(capsys, "--cfg", QUICK, "--eval", "--resume", str(ckpt), "--output", str(tmp_path / "out"),
                    "--data-path", str(bad), *opts, "DATA.DATASET", "imagenet", "DATA.NUM_WORKERS", "0")
    assert ref.returncode == 0, ref.stderr[-3000:]
    results.append(last_acc(ref.stdout))
    one = main_here(capsys, "--cfg", QUICK, "--eval", "--resume", str(ckpt), "--output", str(tmp_path / "out"),
                    "--tag", "wds", "--data-path", str(shards), *opts, "DATA.DATASET", "wds",
                    "DATA.NUM_WORKERS", "0")  # in this process: no forks of a process that compiled
    two = run_cmd(["bash", "evaluate.sh", "2", QUICK, str(ckpt), "--output", str(tmp_path / "out"),
                   "--data-path", str(shards), *opts, "DATA.DATASET", "wds"])
    for ev in (one, two):
        assert ev.returncode == 0, ev.stderr[-3000:]
        assert "val: skipped 1 unreadable image(s) (not counted)" in ev.stdout + ev.stderr
        results.append(last_acc(ev.stdout))
    assert results[0] == results[1] == results[2] and results[0][2] == 14
    runs = tmp_path / "out" / RUN
    predictions = [(runs / tag / "predictions.csv").read_text() for tag in ("wds", "eval-w-wds-16px-crop1")]
    assert predictions[0] == predictions[1] and f"{shards}/val-000000.tar:" in predictions[0]  # named alike
