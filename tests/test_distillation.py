"""DeiT's distillation: the distilled ViT is timm's deit_*_distilled (same state dict, same
logits), DeiT's loss, the teacher's running conditions, and distillation through main.py on
digits from a teacher trained in the test."""
from __future__ import annotations

import json
import logging
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import models
from amp import LossScaler
from distillation import DistillationLoss, build_teacher
from engine import train_one_epoch
from tests.conftest import ENV, QUICK, main_here, run_main
from train_state import TrainState

STUDENT = ["MODEL.NAME", "vit_tiny_distilled_patch2_32", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "2",
           "MODEL.VIT.NUM_HEADS", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- the model
def test_distilled_vit_is_timms_deit_distilled_key_for_key_and_logit_for_logit():
    """Random timm weights load strictly; eval outputs are identical; training returns the
    (class, distillation) pair as DeiT's model does, or the mean after set_distilled_training(False)."""
    torch.manual_seed(0)
    theirs = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    ours = models.create_model("vit_tiny_distilled_patch16_224").eval()
    mine, timms = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(timms) and all(mine[k].shape == timms[k].shape for k in mine)
    ours.load_state_dict(timms, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        ours.train()
        cls, dist = ours(x)
        theirs.set_distilled_training(True)
        theirs.train()
        ref_cls, ref_dist = theirs(x)
        torch.testing.assert_close((cls, dist), (ref_cls, ref_dist))
        ours.set_distilled_training(False)
        torch.testing.assert_close(ours(x), (cls + dist) / 2)
    assert models.model_info("vit_tiny_distilled_patch16_224").family == "vit"  # MODEL.VIT keys
    assert ours.pretrained_cfg["hf_hub_id"] == "timm/deit_tiny_distilled_patch16_224.fb_in1k"


@pytest.mark.parametrize("size", ["small", "base"])
def test_other_sizes_have_timms_state_dict_layout(size):
    with torch.device("meta"):
        mine = models.create_model(f"vit_{size}_distilled_patch16_224").state_dict()
        timms = timm.create_model(f"deit_{size}_distilled_patch16_224").state_dict()
    assert list(mine) == list(timms) and all(mine[k].shape == timms[k].shape for k in mine)


def test_attention_kinds_see_both_prefix_tokens():
    """A distilled ViT with another attention kind: the kind is told of 2 prefix tokens (a
    locality mask leaves both unmasked; deformable attention sizes its weights by them)."""
    for attn in ("lai", "deform", "dis"):
        model = models.create_model("vit_tiny_distilled_patch2_32", img_size=8, embed_dim=32, depth=1,
                                    num_heads=2, attn=attn).eval()
        assert model.blocks[0].attn.num_prefix_tokens == 2
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="class and distillation tokens"):
        models.create_model("vit_tiny_distilled_patch2_32", global_pool="avg")


def test_scripts_traces_and_moves_the_attention_grid_as_the_vit():
    """The ViT's _pos_embed around timm's distilled one: TorchScript and torch.fx give the
    eager logits, and with dynamic_img_size the attention layers follow the input's grid."""
    tiny = dict(img_size=8, embed_dim=32, depth=2, num_heads=2, attn="lai")
    with timm.set_scriptable(True):
        model = models.create_model("vit_tiny_distilled_patch2_32", **tiny).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))
    dynamic = models.create_model("vit_tiny_distilled_patch2_32", **tiny, dynamic_img_size=True).eval()
    assert dynamic(torch.randn(1, 3, 12, 12)).shape == (1, 10)
    assert all(block.attn.grid_size == (6, 6) for block in dynamic.blocks)


def test_fine_tuning_fits_both_heads(tmp_path):
    """Both classifiers the pretrained_cfg names: a head map selects rows of each, and heads
    of another class count are both dropped (fresh), the rest loaded."""
    from models.weights import load_pretrained
    tiny = dict(img_size=8, embed_dim=32, depth=1, num_heads=2)
    source = models.create_model("vit_tiny_distilled_patch2_32", num_classes=5, **tiny).state_dict()
    path, head_map = tmp_path / "src.pth", tmp_path / "map.txt"
    torch.save({"model": source}, path)
    head_map.write_text("4 0 2\n")
    mapped = models.create_model("vit_tiny_distilled_patch2_32", num_classes=3, **tiny)
    load_pretrained(mapped, str(path), head_map=str(head_map))
    for head in ("head", "head_dist"):
        assert torch.equal(mapped.get_submodule(head).weight, source[f"{head}.weight"][[4, 0, 2]])
    target = models.create_model("vit_tiny_distilled_patch2_32", num_classes=3, **tiny)
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("head")}
    load_pretrained(target, str(path))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in fresh.items())
    assert torch.equal(target.dist_token, source["dist_token"])


# -------------------------------------------------------------------------------- the loss
def test_deits_soft_and_hard_losses():
    torch.manual_seed(0)
    teacher = nn.Linear(6, 5).eval()
    images, targets = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    cls, dist = torch.randn(4, 5), torch.randn(4, 5)
    with torch.no_grad():
        t = teacher(images)
    base = nn.CrossEntropyLoss()
    soft = DistillationLoss(base, teacher, "soft", alpha=0.3, tau=2.0)(images, (cls, dist), targets)
    kl = F.kl_div(F.log_softmax(dist / 2, 1), F.log_softmax(t / 2, 1), reduction="sum", log_target=True) * 4 / 20
    torch.testing.assert_close(soft, 0.7 * base(cls, targets) + 0.3 * kl)
    hard = DistillationLoss(base, teacher, "hard", alpha=0.5, tau=1.0)(images, (cls, dist), targets)
    torch.testing.assert_close(hard, 0.5 * base(cls, targets) + 0.5 * F.cross_entropy(dist, t.argmax(1)))
    # a student with one head (plain ViT, variants, DAT): both losses train the same logits
    single = DistillationLoss(base, teacher, "hard", alpha=0.5, tau=1.0)(images, cls, targets)
    torch.testing.assert_close(single, 0.5 * base(cls, targets) + 0.5 * F.cross_entropy(cls, t.argmax(1)))


class _Witness(nn.Module):
    """A teacher that records how it is run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)
        self.seen: list[tuple[bool, bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        self.seen.append((self.training, torch.is_grad_enabled(), out.dtype))
        return out


class _NoSchedule:
    def step_update(self, step: int) -> None:
        pass


def test_teacher_runs_in_eval_mode_without_gradients_under_the_runs_autocast():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    teacher = _Witness().eval().requires_grad_(False)
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))), batch_size=4)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    autocast = partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16)
    state = TrainState(model=student, wrapped=student, criterion=nn.CrossEntropyLoss(), optimizer=optimizer,
                       scheduler=_NoSchedule(),
                       scaler=LossScaler(False, "cpu"), autocast=autocast,
                       distillation=DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0))
    before = [p.clone() for p in student.parameters()]
    train_one_epoch(state, loader, 0, ENV, logger=logging.getLogger("test"), print_freq=100)
    assert teacher.seen == [(False, False, torch.bfloat16)] * 2  # eval, no_grad, autocast: every step
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_a_timm_teacher_from_a_weights_file(tmp_path):
    """TEACHER names a timm model; its weights come from a file (strict)."""
    from config import load_config
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=10)
    torch.save(net.state_dict(), tmp_path / "teacher.pth")
    cfg = load_config(QUICK, ["TRAIN.DISTILL.TYPE", "hard", "TRAIN.DISTILL.TEACHER", "resnet10t",
                              "TRAIN.DISTILL.TEACHER_WEIGHTS", str(tmp_path / "teacher.pth")])
    teacher = build_teacher(cfg, torch.device("cpu"), logging.getLogger("test"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(teacher(x), net.eval()(x))


@pytest.mark.parametrize("teacher_data", [[], ["DATA.MEAN", "[0.485, 0.456, 0.406]", "DATA.STD", "[0.229, 0.224, 0.225]"]])
def test_a_teacher_sees_images_normalised_as_in_its_training(tmp_path, caplog, teacher_data):
    """A teacher checkpoint of this repo trained with other DATA.MEAN/STD than the student's
    data (ImageNet's, the student's quickstart 0.5 / 0.5) gets the student's images mapped to its
    own normalisation, with one log line; with the same normalisation, the images as they are."""
    from config import load_config
    from model_config import build_model
    tiny = ["MODEL.VIT.DEPTH", "1", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.NUM_HEADS", "2"]
    teacher_cfg = load_config(QUICK, [*tiny, *teacher_data])
    net = build_model(teacher_cfg).eval()
    torch.save({"model": net.state_dict(), "config": teacher_cfg.dump()}, tmp_path / "teacher.pth")
    cfg = load_config(QUICK, ["TRAIN.DISTILL.TYPE", "soft", "TRAIN.DISTILL.TEACHER_WEIGHTS", str(tmp_path / "teacher.pth")])
    with caplog.at_level(logging.INFO, logger="test"):
        teacher = build_teacher(cfg, torch.device("cpu"), logging.getLogger("test"))
    x = torch.randn(2, 3, 8, 8)
    pixels = x * 0.5 + 0.5  # the student's normalisation undone
    mean, std = (torch.tensor(teacher_cfg.DATA[k]).view(1, 3, 1, 1) for k in ("MEAN", "STD"))
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), net((pixels - mean) / std))
    assert ("the teacher's input is renormalised" in caplog.text) == bool(teacher_data)


@pytest.mark.parametrize("opts, message", [
    (["TRAIN.DISTILL.TYPE", "soft"], "TRAIN.DISTILL.TEACHER_WEIGHTS: distillation (soft) needs the teacher's"),
    (["TRAIN.DISTILL.TEACHER", "vit_tiny_patch2_32"], "TRAIN.DISTILL.TYPE is none"),
    (["TRAIN.DISTILL.TYPE", "hard", "TRAIN.DISTILL.TEACHER", "resnet_5O", "TRAIN.DISTILL.TEACHER_WEIGHTS",
      "configs/quickstart.yaml"], "neither a registered model"),
    (["TRAIN.DISTILL.TYPE", "sofft"], "is not one of none, soft, hard"),
    (["TRAIN.DISTILL.TYPE", "soft", "TRAIN.DISTILL.TEACHER_WEIGHTS", "no/such.pth"], "file not found"),
])
def test_distillation_mistakes_are_one_line_errors(opts, message):
    result = run_main("--cfg", QUICK, "--opts", *opts)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------- through main.py
def _val_logits(run_dir, images) -> tuple[torch.Tensor, torch.Tensor]:
    """(class head, distillation head) logits of a distilled student's final weights."""
    from models.weights import read_weights
    model = models.create_model("vit_tiny_distilled_patch2_32", img_size=8, embed_dim=32, depth=2, num_heads=2,
                                drop_path_rate=0.0)
    model.load_state_dict(read_weights(str(run_dir / "ckpt_epoch_7.pth"))["model"])
    model.train()  # both heads; no dropout or drop path in this model
    with torch.no_grad():
        return model(images)


@pytest.mark.slow
def test_distillation_through_main_follows_the_teacher_hard_and_soft(tmp_path, capsys):
    """Train the quickstart ViT for 12 epochs as the teacher, then shift its classifier by
    one class (it now predicts label + 1) and distil it, hard and soft, into a smaller
    distilled ViT with ALPHA 1 (the teacher alone) for 8 epochs: the student's distillation
    head must predict label + 1, which no label taught it."""
    out = tmp_path / "out"
    teacher_run = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--tag", "teacher",
                           "--opts", "TRAIN.EPOCHS", "12", "TRAIN.WARMUP_EPOCHS", "1", "PRINT_FREQ", "100")
    assert teacher_run.returncode == 0, teacher_run.stderr[-3000:]
    ckpt = torch.load(out / "vit_tiny_patch2_32" / "teacher" / "ckpt_best.pth", weights_only=True)
    for key in ("head.weight", "head.bias"):  # row c now scores class c + 1
        ckpt["model"][key] = ckpt["model"][key].roll(1, dims=0)
    shifted = tmp_path / "shifted_teacher.pth"
    torch.save(ckpt, shifted)

    from config import load_config
    from data import build_loaders
    cfg = load_config(QUICK)
    images, labels = map(torch.cat, zip(*build_loaders(cfg, 0, 1, train=False).val))
    for kind in ("hard", "soft"):
        result = main_here(capsys, "--cfg", QUICK, "--output", str(out), "--tag", kind, "--opts", *STUDENT,
                          "TRAIN.EPOCHS", "8", "TRAIN.WARMUP_EPOCHS", "1", "PRINT_FREQ", "100",
                          "TRAIN.DISTILL.TYPE", kind, "TRAIN.DISTILL.ALPHA", "1.0", "TRAIN.DISTILL.TAU", "1.0",
                          "TRAIN.DISTILL.TEACHER_WEIGHTS", str(shifted))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"distillation {kind}: teacher vit_tiny_patch2_32" in result.stdout
        _, dist = _val_logits(out / "vit_tiny_distilled_patch2_32" / kind, images)
        follows = (dist.argmax(1) == (labels + 1) % 10).float().mean().item()
        labelled = (dist.argmax(1) == labels).float().mean().item()
        # measured: hard 57% / 6%, soft 69% / 4% (chance: 10%)
        assert follows > 0.4 and follows > 4 * labelled, \
            f"{kind}: the distillation head predicts label + 1 on {follows:.0%}, the label on {labelled:.0%}"
        records = [json.loads(line) for line in
                   (out / "vit_tiny_distilled_patch2_32" / kind / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 8
