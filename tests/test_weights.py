"""Weight files: by name from a cache or a hub folder, another model's weights refused in one line,
our checkpoints plain (weights_only) values, pickled files refused then converted, safetensors."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import models
from models.weights import load_pretrained, read_weights, WeightsError

from tests.conftest import (FAMILIES, QUICK, ROOT, RUN, assert_untouched, last_acc, main_here, one_error_line,
                            previous_run, run_cmd)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each



# ------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_model_at_eval_pretrained(tmp_path, out_dir, capsys):
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
    line = one_error_line(main_here(capsys, *argv))
    assert "other.pth does not match VisionTransformer" in line
    assert "1 missing: norm.weight" in line and "unexpected: blocks.4." in line
    assert "shape mismatches: cls_token (1, 1, 32) vs (1, 1, 64)" in line
    assert_untouched(before)


def test_our_checkpoints_hold_only_plain_values(trained):
    """weights_only=True loads a real checkpoint, and walking it finds nothing but tensors
    and plain Python values (the config is YAML text)."""
    run = trained.run
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


def mapped_regions(path: Path) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of each mapping of ``path`` in this process (Linux)."""
    regions, target, current = [], str(path.resolve()), False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields[0].endswith(":"):  # a field of the current mapping
                if fields[0] == "Rss:" and current:
                    regions.append((start, end, int(fields[1]) * 1024))
            else:  # a mapping's header: range, perms, offset, device, inode[, path]
                current = len(fields) >= 6 and fields[5] == target
                if current:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
    return regions


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_checkpoint_is_mapped_and_evaluation_reads_only_its_weights(tmp_path, zipped):
    """Eight ranks reading one checkpoint share the page cache instead of a private copy each:
    its tensors point into a mapping of the file, and loading the model's weights (evaluation's
    read_weights -> state_dict_of -> load_weights) leaves the 8 MB of optimizer state unread.
    The legacy (pre-zip) format cannot be mapped: it is read as before."""
    from models.weights import load_weights, state_dict_of
    path = tmp_path / "ckpt.pth"
    torch.save({"model": torch.nn.Linear(64, 64).state_dict(),
                "optimizer": {"state": {0: {"exp_avg": torch.ones(2**21)}}}}, path,
               _use_new_zipfile_serialization=zipped)
    ckpt = read_weights(str(path))
    load_weights(torch.nn.Linear(64, 64), state_dict_of(ckpt, str(path)), str(path))
    regions = mapped_regions(path)
    moments = ckpt["optimizer"]["state"][0]["exp_avg"]
    if not zipped:
        assert not regions and bool(moments.eq(1).all())
        return
    for tensor in (ckpt["model"]["weight"], moments):
        assert any(start <= tensor.data_ptr() < end for start, end, _ in regions), regions
    assert sum(resident for _, _, resident in regions) < 2**20, regions


def convert_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_becomes_the_folder_timm_saves_and_loads_from_it_with_the_same_logits(family, tmp_path):
    """convert_checkpoint CKPT --hub DIR writes what timm's save_for_hf writes (config.json with
    the architecture, num_classes, model_args and pretrained_cfg; model.safetensors) for our
    checkpoint of a tiny model of each family, and both --pretrained local-dir:DIR and
    timm.create_model("local-dir:DIR", pretrained=True) load it with the checkpoint's logits."""
    from config import load_config
    from model_config import build_model
    name, kwargs = FAMILIES[family]
    plain = json.loads(json.dumps(kwargs))  # tuples as JSON has them: lists
    section = {k.upper(): v for k, v in plain.items() if k not in ("img_size", "num_classes")}
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "DATA": {"DATASET": "fake", "IMG_SIZE": 32, "MEAN": [0.5] * 3, "STD": [0.5] * 3},
        "MODEL": {"NAME": name, "NUM_CLASSES": 10, models.model_info(name).family.upper(): section},
        "TEST": {"CROP_PCT": 1.0, "RESIZE": "square"}}))
    cfg = load_config(str(cfg_file))
    model = build_model(cfg).eval()
    ckpt, folder = tmp_path / "ckpt.pth", tmp_path / "hub"
    torch.save({"model": model.state_dict(), "config": cfg.dump(), "model_name": name}, ckpt)
    assert convert_tool().main([str(ckpt), "--hub", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 10
    assert {k: config["model_args"].get(k) for k in plain} == plain and config["model_args"]["in_chans"] == 3
    assert {k: config["pretrained_cfg"].get(k) for k in ("input_size", "mean", "std", "crop_pct", "crop_mode",
                                                         "num_classes", "custom_load")} == \
        {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "squash",
         "num_classes": 10, "custom_load": False}  # custom_load: what save_for_hf states of every export

    x = torch.randn(2, 3, 32, 32)
    pretrained = load_config(str(cfg_file), ["MODEL.PRETRAINED", f"local-dir:{folder}"])
    ours = build_model(pretrained).eval()
    load_pretrained(ours, pretrained.MODEL.PRETRAINED)
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(theirs(x), expected)


def test_pickled_objects_refused_then_converted_with_trust(trained, tmp_path, out_dir, capsys):
    """A checkpoint laid out like the Swin/DAT repos' (weights + argparse.Namespace + a
    numpy scalar) is refused by main.py and by the tool without --trust, pointing at the
    tool; converted with --trust, it loads with weights_only=True and evaluates to the
    accuracy training logged."""
    run, logged = trained.run, trained.records()[0]["val_acc1"]
    weights = torch.load(run / "ckpt_epoch_0.pth", weights_only=True)["model"]
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": weights, "args": argparse.Namespace(lr=1e-3, model="vit"),
                "max_accuracy": np.float64(logged)}, foreign)

    line = one_error_line(main_here(capsys, "--cfg", QUICK, "--output", str(out_dir), "--eval", "--resume", str(foreign)))
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

    ev = main_here(capsys, "--cfg", QUICK, "--output", str(out_dir), "--eval", "--pretrained", str(safe))
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert last_acc(ev.stdout)[0] == pytest.approx(logged, abs=1e-3)


def test_safetensors_export_evaluates_like_the_checkpoint(trained, tmp_path, out_dir, capsys):
    """--safetensors writes the model weights (EMA in *_ema.safetensors); evaluate.sh on
    the file gives the accuracy training logged for the .pth, and --pretrained reads it;
    --use-ema on it evaluates the *_ema.safetensors beside it.
    --hub writes the run's own architecture and data config (the saved config's), not the
    registered model's defaults."""
    from config import load_config
    from model_config import build_model
    from models.weights import load_pretrained, read_weights
    run, logged = trained.run, trained.records()[0]["val_acc1"]
    ckpt = torch.load(run / "ckpt_epoch_0.pth", weights_only=True)
    out, hub_folder = tmp_path / "w.safetensors", tmp_path / "hub"
    assert convert_tool().main([str(run / "ckpt_epoch_0.pth"), "--safetensors", str(out), "--hub", str(hub_folder)]) == 0
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["architecture"] == RUN and config["num_classes"] == 10
    assert {k: config["model_args"][k] for k in ("embed_dim", "depth", "num_heads", "img_size")} == \
        {"embed_dim": 64, "depth": 4, "num_heads": 4, "img_size": 8}
    assert {k: config["pretrained_cfg"][k] for k in ("input_size", "mean", "std", "crop_pct", "crop_mode")} == \
        {"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "squash"}
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

    # --use-ema on the export reads the EMA weights beside it, or names the file it looked for
    ema_ev = main_here(capsys, "--cfg", QUICK, "--output", str(out_dir), "--eval", "--resume", str(out), "--use-ema")
    assert ema_ev.returncode == 0, ema_ev.stderr[-3000:]
    assert last_acc(ema_ev.stdout)[0] == pytest.approx(trained.records()[0]["ema_acc1"], abs=1e-3)
    (tmp_path / "w_ema.safetensors").unlink()
    line = one_error_line(main_here(capsys, "--cfg", QUICK, "--output", str(out_dir), "--eval", "--resume", str(out),
                                    "--use-ema"))
    assert f"{out} holds model weights only and no EMA export is beside it ({tmp_path / 'w_ema.safetensors'}" in line


TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def cache_repo(hf_home: Path, repo: str, files: dict[str, object]) -> Path:
    """Put ``files`` (name -> state dict for safetensors, or dict for JSON) into huggingface_hub's
    cache under HF_HOME as hf_hub_download leaves them (refs/main -> a snapshot)."""
    folder = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in content.items()}, str(snapshot / name))
        else:
            (snapshot / name).write_text(json.dumps(content))
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An offline Hugging Face home for this process (and the environment for subprocesses)."""
    import huggingface_hub.constants as constants
    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def hub_env(home: Path) -> dict:
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def timm_tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224").eval()


def test_a_timm_tag_loads_from_the_cache_strictly_with_the_same_logits(hub, timm_tiny, tmp_path):
    cache_repo(hub, f"timm/{TAG}", {"model.safetensors": timm_tiny.state_dict()})
    weights = read_weights(f"timm:{TAG}")
    assert weights.keys() == timm_tiny.state_dict().keys()
    ours = models.create_model("vit_tiny_patch16_224").eval()
    load_pretrained(ours, f"timm:{TAG}")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_tiny(x), rtol=0, atol=0)

    # the same name through evaluate.sh, as a user types it (fake data: 4 images)
    result = run_cmd(["bash", "evaluate.sh", "1", "configs/vit/vit_tiny_patch16_224.yaml", f"timm:{TAG}",
                      "--output", str(tmp_path / "out"), "--opts", "DATA.DATASET", "fake", "DATA.FAKE_SIZE", "16",
                      "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0"], env=hub_env(hub))
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_acc(result.stdout)[2] == 4


def test_weights_that_are_nowhere_are_one_line_saying_where_to_put_them(tmp_path):
    result = run_cmd([sys.executable, "main.py", "--cfg", "configs/vit/vit_small_patch16_224.yaml",
                      "--output", str(tmp_path / "out"), "--pretrained", "timm:vit_small_patch16_224.augreg_in21k_ft_in1k",
                      "--opts", "DATA.DATASET", "fake"], env=hub_env(tmp_path / "empty"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert ("model.safetensors of timm/vit_small_patch16_224.augreg_in21k_ft_in1k is not in the Hugging Face "
            f"cache ({tmp_path / 'empty' / 'hub'}/models--timm--vit_small_patch16_224.augreg_in21k_ft_in1k)") in lines[0]
    assert "run `hf download timm/vit_small_patch16_224.augreg_in21k_ft_in1k model.safetensors`" in lines[0]
    with pytest.raises(WeightsError, match="timm has no pretrained weights named 'vit_tiny_patch16_224.nope'"):
        read_weights("timm:vit_tiny_patch16_224.nope")


@pytest.mark.parametrize("setting", ["offline", "no network", "HF_HOME a file"])
def test_a_name_not_in_the_cache_is_one_line_at_once_with_the_installed_cli(hub, monkeypatch, setting):
    """Without HF_HUB_OFFLINE and without network the answer comes at once (no ~30 s of the
    hub's retries); a file as HF_HOME is said to be one; each recommends the `hf` command
    the installed huggingface_hub ships (.venv/bin/hf), not `huggingface-cli`."""
    import time

    import huggingface_hub.constants as constants
    assert (Path(sys.executable).parent / "hf").exists()
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    if setting != "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers
    if setting == "HF_HOME a file":
        hub.write_text("not a folder")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub / "hub"))
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        read_weights(f"timm:{TAG}")
    message = str(info.value)
    assert time.monotonic() - start < 5 and "\n" not in message
    if setting == "HF_HOME a file":
        assert f"the Hugging Face cache {hub / 'hub'} cannot exist, {hub} is a file: HF_HOME" in message
        return
    assert {"offline": "and HF_HUB_OFFLINE is set;",
            "no network": "and no network answers (127.0.0.1:9 did not answer within 2 s;"}[setting] in message
    assert f"run `hf download timm/{TAG} model.safetensors` where there is network" in message


def test_a_released_dat_checkpoint_becomes_a_hub_folder_that_loads_by_path_and_by_name(hub, tmp_path):
    """A released-style DAT file (weights beside a pickled argparse.Namespace) converted
    once with --trust into model.safetensors + config.json, its architecture and data config
    from --cfg (the file holds no config of ours): the folder and the same files as
    hf-hub:<repo> in the cache load the same weights; the model evaluates alike."""
    small = dict(dims=(16, 32, 64, 128), dim_stem=16, heads=(1, 2, 4, 8), groups=(1, 1, 2, 4),
                 depths=(2, 2, 2, 2), stage_spec=(("N", "D"),) * 3 + (("D", "D"),), img_size=64)
    torch.manual_seed(0)
    dat = models.create_model("dat_pp_tiny", **small).eval()
    released = tmp_path / "dat_pp_tiny_in1k_224.pth"
    torch.save({"model": dat.state_dict(), "args": argparse.Namespace(cfg="dat_pp_tiny.yaml")}, released)
    cfg = tmp_path / "small.yaml"
    cfg.write_text(f"BASE: [{ROOT / 'configs/dat/dat_pp_tiny.yaml'}]\n"
                   "DATA: {IMG_SIZE: 64, MEAN: [0.5, 0.5, 0.5], STD: [0.5, 0.5, 0.5]}\n"
                   "MODEL: {DAT: {DIMS: [16, 32, 64, 128], DIM_STEM: 16, HEADS: [1, 2, 4, 8], GROUPS: [1, 1, 2, 4],\n"
                   "  DEPTHS: [2, 2, 2, 2], STAGE_SPEC: [[N, D], [N, D], [N, D], [D, D]]}}\n")
    folder = tmp_path / "dat_pp_tiny_hub"
    result = run_cmd([sys.executable, "tools/convert_checkpoint.py", "--trust", str(released), "--hub", str(folder),
                      "--model", "dat_pp_tiny", "--cfg", str(cfg)])
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "dat_pp_tiny" and config["num_classes"] == 1000
    assert config["model_args"]["dims"] == [16, 32, 64, 128] and config["model_args"]["img_size"] == 64
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64] and config["pretrained_cfg"]["mean"] == [0.5] * 3
    assert config["pretrained_cfg"]["classifier"] == "cls_head"
    from_folder = read_weights(str(folder))
    assert all(torch.equal(from_folder[k], v) for k, v in dat.state_dict().items())

    weights = {k: v for k, v in from_folder.items()}
    cache_repo(hub, "someone/dat-pp-tiny-small", {"model.safetensors": weights, "config.json": config})
    from models import weights as hub_weights
    found = hub_weights.resolve("hf-hub:someone/dat-pp-tiny-small")
    assert found.config["architecture"] == "dat_pp_tiny"
    other = models.create_model("dat_pp_tiny", **small).eval()
    load_pretrained(other, "hf-hub:someone/dat-pp-tiny-small")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), dat(x), rtol=0, atol=0)


def test_create_model_pretrained_as_timm_means_it(hub, tmp_path):
    """pretrained=True takes the entry's registered weights from the cache; another
    num_classes drops the classifier, in_chans=1 sums the first convolution over RGB;
    pretrained_cfg_overlay={'file': ...} names other weights."""
    cfg = models.model_info("vit_tiny_patch16_224").pretrained_cfg
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=cfg["num_classes"]).state_dict()
    cache_repo(hub, cfg["hf_hub_id"], {"model.safetensors": source})
    model = models.create_model("vit_tiny_patch16_224", pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())
    assert model.pretrained_cfg["hf_hub_id"] == cfg["hf_hub_id"] and model.default_cfg is model.pretrained_cfg
    gray = models.create_model("vit_tiny_patch16_224", pretrained=True, in_chans=1, num_classes=10)
    torch.testing.assert_close(gray.patch_embed.proj.weight[:, 0], source["patch_embed.proj.weight"].sum(1))
    assert gray.head.weight.shape == (10, 192)
    file = tmp_path / "w.safetensors"
    save_file(source, str(file))
    again = models.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(file)})
    assert torch.equal(again.pos_embed, source["pos_embed"])
    with pytest.raises(models.ModelArgumentError, match="no weights are registered for 'vit_tiny_patch4_32'"):
        models.create_model("vit_tiny_patch4_32", pretrained=True)


# ---------------------------------------------------------------------- named head maps
def test_named_head_map_fine_tunes_a_22k_head_into_1k_classes(tmp_path, caplog):
    """MODEL.HEAD_MAP imagenet-22k-to-imagenet-1k: the map is built from timm's synset lists
    (no file to download), row i is ImageNet class i's row in the 22k head; the one class
    ImageNet-22k lacks (850, n04399382 teddy bear) keeps the model's row. A head of another
    size or an unknown list is one line."""
    import logging

    from config import ConfigError, load_config
    from model_config import build_model
    from models.weights import named_head_map, synset_head_map
    index, size = synset_head_map(*named_head_map("imagenet-22k-to-imagenet-1k"))
    assert (size, len(index)) == (21841, 1000)
    # tench (class 0), goldfish (1), toilet tissue (999): their rows in 22k; Google's 21k list,
    # two classes longer, puts toilet tissue at 21817, as Swin's published map22kto1k.txt does
    assert index[[0, 1, 999]].tolist() == [359, 368, 21815] and index[850] == -1
    assert synset_head_map("imagenet-21k-goog", "imagenet-1k")[0][999] == 21817
    assert synset_head_map("imagenet-22k-ms", "imagenet-1k")[0].equal(torch.arange(1000))  # 1k first

    small = ["MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "1", "MODEL.VIT.NUM_HEADS", "2"]
    source = build_model(load_config(QUICK, [*small, "MODEL.NUM_CLASSES", "21841"]))
    torch.save({"model": source.state_dict()}, tmp_path / "in22k.pth")
    cfg = load_config(QUICK, [*small, "MODEL.NUM_CLASSES", "1000", "MODEL.PRETRAINED", str(tmp_path / "in22k.pth"),
                              "MODEL.HEAD_MAP", "imagenet-22k-to-imagenet-1k"])
    model = build_model(cfg)
    fresh = model.head.weight.detach().clone()
    logger = logging.getLogger("test.head_map")
    with caplog.at_level(logging.INFO, logger="test.head_map"):
        load_pretrained(model, cfg.MODEL.PRETRAINED, cfg.MODEL.HEAD_MAP, logger)
    kept = torch.arange(1000) != 850
    assert model.head.weight[kept].equal(source.head.weight[index[kept]])
    assert model.head.bias[kept].equal(source.head.bias[index[kept]])
    assert model.head.weight[850].equal(fresh[850]) and "classes [850]" in caplog.text
    assert model.blocks[0].attn.qkv.weight.equal(source.blocks[0].attn.qkv.weight)

    with pytest.raises(WeightsError, match=r"maps a 21843-class imagenet-21k-goog classifier, the pretrained one "
                                           r"has 21841 classes \(as imagenet-22k has: use imagenet-22k-to-"):
        load_pretrained(model, cfg.MODEL.PRETRAINED, "imagenet-21k-goog-to-imagenet-1k")
    with pytest.raises(ConfigError, match=r"^--opts: MODEL.HEAD_MAP: head_map imagenet-23k-to-imagenet-1k: "
                                          r"'imagenet-23k' is not one of timm's class lists \(imagenet-1k, "):
        load_config(QUICK, ["MODEL.HEAD_MAP", "imagenet-23k-to-imagenet-1k"])
