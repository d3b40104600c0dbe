"""The backbones as others use them: docs/BACKBONES.md's examples (features_only models
feeding torchvision's FPN; Mask R-CNN, Faster R-CNN and a segmentation head training on
drawn shapes), and what an 8-GPU run asks of every registered family and graph
option, checked on a tiny instance of each: every trainable parameter gets a gradient (DDP),
no tensor is made on the default device instead of the input's, DDP sends no derived buffers,
and a training step reads the device once."""
from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import DropPath
from timm.utils import ModelEmaV3
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import FeaturePyramidNetwork

import models
from amp import LossScaler, autocast_factory
from engine import evaluate, train_one_epoch
from tests.conftest import doc_block
from train_state import TrainState
from utils import DistEnv, data_parallel

CPU = torch.device("cpu")


def test_dat_features_feed_torchvisions_fpn_at_256x320():
    torch.set_num_threads(1)
    backbone = models.create_model("dat_pp_tiny", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert backbone.feature_info.channels() == [64, 128, 256, 512]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=256)
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 256, 320))
        pyramid = fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 64, 80), (1, 128, 32, 40), (1, 256, 16, 20), (1, 512, 8, 10)]
    assert [tuple(p.shape) for p in pyramid.values()] == [(1, 256, 64, 80), (1, 256, 32, 40), (1, 256, 16, 20),
                                                          (1, 256, 8, 10)]
    assert all(torch.isfinite(p).all() for p in pyramid.values())


def test_vit_blocks_as_maps_feed_the_same_fpn():
    backbone = models.create_model("vit_dis_tiny_patch4_32", depth=4, features_only=True, out_indices=(1, 3)).eval()
    assert backbone.feature_info.channels() == [192, 192] and backbone.feature_info.reduction() == [4, 4]
    fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=64)
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 32, 32))
        pyramid = fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
    assert [tuple(m.shape) for m in maps] == [(2, 192, 8, 8)] * 2
    assert [tuple(p.shape) for p in pyramid.values()] == [(2, 64, 8, 8)] * 2


# ------------------------------------- detection and segmentation with torchvision's models
def drawn_shapes(n: int, size: int = 64) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``n`` images of a filled rectangle (class 1) and disc (class 2) over noise, with the
    targets torchvision's detectors train on: boxes (x0, y0, x1, y1), labels, masks."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, size, size) * 0.3
        x0, y0 = torch.randint(0, size // 2, (2,))
        x1, y1 = torch.randint(14, size // 2, (2,)) + torch.stack([x0, y0])
        cx, cy = torch.randint(12, size - 12, (2,))
        r = torch.randint(6, 12, ())
        masks = torch.stack([(xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1),
                             (xs - cx) ** 2 + (ys - cy) ** 2 <= r ** 2])
        for mask in masks:
            image = torch.where(mask, torch.rand(3, 1, 1) * 0.5 + 0.5, image)
        boxes = [[xs[m].min(), ys[m].min(), xs[m].max() + 1, ys[m].max() + 1] for m in masks]
        images.append(image)
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor([1, 2]),
                            masks=masks.to(torch.uint8)))
    return images, targets


def pixel_labels(targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(B, H, W) class per pixel from the targets' masks (0: background)."""
    return torch.stack([(t["masks"] * t["labels"][:, None, None]).amax(0).long() for t in targets])


@pytest.mark.parametrize("block", ["# Mask R-CNN on DAT++", "# Faster R-CNN on a ViT",
                                   "# Semantic segmentation on DAT++"], ids=["mask_rcnn_dat_pp", "faster_rcnn_vit",
                                                                             "semantic_fpn_dat_pp"])
def test_docs_detectors_and_segmenter_train_on_drawn_shapes(block, one_thread):
    """docs/BACKBONES.md's blocks as printed, with torchvision's own detectors: six steps on
    one batch of drawn shapes, a finite loss that falls. What the blocks ask of the backbone
    holds: drop path in the blocks, gradient checkpointing on, layer-wise lr from the stem
    (lowest) to the heads (the full lr)."""
    images, targets = drawn_shapes(2)
    space: dict = {}
    exec(doc_block("docs/BACKBONES.md", block), space)
    inputs = (torch.stack(images), pixel_labels(targets)) if "segmenter" in space else (images, targets)
    losses = torch.stack([space["train_step"](*inputs) for _ in range(6)])
    assert torch.isfinite(losses).all(), losses
    assert losses[-1] < losses[0] and losses[-3:].mean() < losses[:3].mean(), losses
    model = space.get("detector") or space["segmenter"]
    inner = model.backbone.body.model
    if "detector" in space:
        assert any(isinstance(m, DropPath) and m.drop_prob > 0 for m in inner.modules())
        assert inner.grad_checkpointing
    lr_of = {id(p): group["lr"] for group in space["optimizer"].param_groups for p in group["params"]}
    stem = next(p for n, p in inner.named_parameters() if n.startswith(("patch_proj.", "patch_embed.")))
    head = next(p for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert lr_of[id(stem)] == min(lr_of.values()) < lr_of[id(head)] == max(lr_of.values()) == 1e-3
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


def test_readmes_mask_rcnn_on_dat_pp_is_coherent_at_full_size(one_thread):
    """README's block as printed (DAT-T++ and torchvision's defaults): the pyramid has a
    map for each of the anchor generator's sizes, 256 channels, the lr decays from the
    heads to the stem by 0.9 per group."""
    space: dict = {}
    exec(doc_block("README.md", "# torchvision's Mask R-CNN on DAT-T++"), space)
    detector = space["detector"]
    with torch.no_grad():
        maps = detector.backbone.eval()(torch.randn(1, 3, 64, 64))
    assert list(maps) == ["0", "1", "2", "3", "pool"] and detector.backbone.out_channels == 256
    assert len(detector.rpn.anchor_generator.sizes) == len(maps) and all(m.shape[1] == 256 for m in maps.values())
    lrs = sorted({group["lr"] for group in space["optimizer"].param_groups})
    assert lrs[-1] == 1e-4 and lrs[0] == pytest.approx(1e-4 * 0.9 ** (len(lrs) - 1))


# ----------------------------------------------- every family and graph option, tiny
VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
DAT_PP = dict(img_size=32, num_classes=10, dim_stem=16, dims=(16,) * 4, heads=(2,) * 4, groups=(1, 1, 2, 2),
              depths=(2,) * 4, stage_spec=(("N", "D"),) * 4)
DAT_V1 = dict(DAT_PP, window_sizes=(4,) * 4, stage_spec=(("L", "S"), ("L", "S"), ("L", "D"), ("L", "D")))
# case -> (registered name, overrides): each attention kind and DAT block kind, and each option
# that adds, drops or bypasses a branch (prefix tokens, LAI window on / off, the estimator's
# far keys, unshared relative projections, the distillation head, frozen offsets, pruning).
CASES = {
    "softmax": ("vit_tiny_patch4_32", {}),
    "softmax_avg_pool": ("vit_tiny_patch4_32", dict(class_token=False, global_pool="avg")),
    "lai": ("vit_lai_tiny_patch4_32", {}),
    "lai_1d_full": ("vit_lai_tiny_patch4_32", dict(attn_args=dict(window="1d", schedule=[[0, None]]))),
    "dis": ("vit_dis_tiny_patch4_32", dict(attn_args=dict(share=False, span=1, log_buckets=True))),
    "dis_avg_pool": ("vit_dis_tiny_patch4_32", dict(class_token=False, global_pool="avg")),
    "dislai": ("vit_dislai_tiny_patch4_32", {}),
    "performer": ("vit_performer_tiny_patch4_32", {}),
    "performer_lai": ("vit_tiny_patch4_32", dict(attn="performer_lai")),
    "performer_lai_far": ("vit_tiny_patch4_32", dict(attn="performer_lai", attn_args=dict(schedule=[[0, None]]))),
    "performer_dis": ("vit_tiny_patch4_32", dict(attn="performer_dis", attn_args=dict(span=1, share=False))),
    "deform": ("vit_deform_tiny_patch4_32", {}),
    "deform_avg_pool": ("vit_deform_tiny_patch4_32", dict(class_token=False, global_pool="avg")),
    "distilled": ("vit_tiny_distilled_patch2_32", {}),
    "dat_pp": ("dat_pp_tiny", DAT_PP),
    "dat_pp_no_offs": ("dat_pp_tiny", dict(DAT_PP, no_offs=(True,) * 4)),
    "dat_v1": ("dat_tiny", DAT_V1),
    "dat_v1_no_offs_no_pe": ("dat_tiny", dict(DAT_V1, no_offs=(True,) * 4, use_pes=(False,) * 4)),
    "dat_p_x": ("dat_pp_tiny", dict(DAT_PP, img_size=64, use_lpus=(False,) * 4, sr_ratios=(4, 2, 1, 1),
                                    stage_spec=(("P", "X"), ("X", "P"), ("P", "N"), ("X", "D")))),
    "dat_features_only": ("dat_pp_tiny", dict(DAT_PP, features_only=True, out_indices=(1, 2))),
}
# A training step of one model per attention kind and DAT version.
STEP_CASES = ["softmax", "lai", "dis", "dislai", "performer", "performer_lai", "performer_dis", "deform",
              "distilled", "dat_pp", "dat_v1"]


def tiny(case: str) -> tuple[nn.Module, torch.Tensor]:
    """The case's model in training mode and a batch of two images."""
    name, overrides = CASES[case]
    overrides = {**(VIT if name.startswith("vit_") else {}), **overrides}
    torch.manual_seed(0)
    model = models.create_model(name, **overrides).train()
    size = overrides["img_size"]
    return model, torch.randn(2, 3, size, size)


def total(out) -> torch.Tensor:
    """A scalar from a model's output: logits, a distilled pair or a features_only list."""
    return sum(o.float().sum() for o in out) if isinstance(out, (tuple, list)) else out.float().sum()


@pytest.mark.parametrize("case", CASES)
def test_every_trainable_parameter_gets_a_gradient_and_no_tensor_lands_on_the_default_device(case):
    """DDP's reducer stops at the second step when a trainable parameter got no gradient in
    the first (MODEL.DAT.NO_OFFS trained the offset network it bypasses): what cannot learn
    is frozen. With the default device set to meta, a tensor that forward or backward makes
    without naming its device lands there and fails against the CPU model (on a GPU it
    would be made on the CPU and copied every call)."""
    model, x = tiny(case)
    with torch.device("meta"):
        total(model(x)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    if case.endswith("no_offs") or "no_offs_" in case:
        assert not any(p.requires_grad for n, p in model.named_parameters() if "conv_offset" in n)


@pytest.fixture
def process_group():
    """A one-process gloo group in this process: DDP's reducer and options as on 8 GPUs."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)
    finally:
        dist.destroy_process_group()


def test_ddp_trains_every_kind_of_graph_and_broadcasts_only_updated_buffers(process_group):
    """Two DDP steps (the second is where unused parameters fail) with frozen offsets, and
    the buffers: derived ones (window masks, index tables, a Performer's features) stay on
    each rank; BatchNorm's running statistics are rank 0's on every rank."""
    for case in ("dat_pp_no_offs", "dat_v1", "performer_lai"):
        model, x = tiny(case)
        wrapped = data_parallel(model, process_group)
        assert wrapped.broadcast_buffers is False
        for _ in range(2):
            total(wrapped(x)).backward()
    batch_norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert data_parallel(batch_norm, process_group).broadcast_buffers is True


class HostSyncs(TorchDispatchMode):
    """Counts what waits for the device or copies Python data to it: reading a value
    (``.item()``, ``bool()``, ``float()``: ``_local_scalar_dense``; ``.tolist()``, patched in)
    and tensors made from Python data (``torch.tensor``, ``new_tensor``: ``lift_fresh``).
    ``ignored``: tensors that live on the CPU on a GPU too (the optimizer's step counts)."""

    def __init__(self, ignored: set[int]) -> None:
        super().__init__()
        self.ignored, self.calls = ignored, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default) \
                and id(args[0]) not in self.ignored:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", STEP_CASES)
def test_a_training_step_reads_the_device_once(case, monkeypatch):
    """engine's step with fp16 autocast and loss scaling, AdamW and EMA: one host sync per
    optimizer step, the agreed finite / stop flags read with the loss and gradient norm;
    no per-layer or per-step `.item()` or tensor from host data (each a CUDA sync). Evaluation
    reads its sums once, at the end: 3 batches cost what 1 does."""
    model, x = tiny(case)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(False)  # no teacher: the mean of both heads, as main does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = TrainState(model=model, wrapped=model, criterion=nn.CrossEntropyLoss(), optimizer=optimizer,
                       scheduler=type("Fixed", (), {"step_update": lambda self, step: None})(),
                       scaler=LossScaler(True, "cpu", init_scale=2.0 ** 10),  # finite: the steps are taken
                       autocast=autocast_factory(torch.float16, CPU),
                       ema=ModelEmaV3(model, decay=0.9, exclude_buffers=True))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)
    batch = [(x, torch.tensor([1, 2]))]
    quiet = logging.getLogger("quiet")
    train_one_epoch(state, batch, 0, env, quiet, 100)  # the first step creates the optimizer's state
    mode = HostSyncs({id(s["step"]) for s in optimizer.state.values()})
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: mode.calls.append("tolist") or tolist(t))
    with mode:
        _, progress = train_one_epoch(state, batch, 1, env, quiet, 100)
    assert progress.steps_done == 1 and progress.skipped == 0
    assert len(mode.calls) <= 1, mode.calls
    reads = []
    for batches in (batch, batch * 3):
        mode.calls = []
        with mode:
            evaluate(model, batches, env, state.autocast)
        reads.append(mode.calls)
    assert reads[0] == reads[1], reads
