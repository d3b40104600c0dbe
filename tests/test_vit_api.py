"""Every ViT kind as a timm user sees timm's ViT: pretrained_cfg, input size (dynamic and
set_input_size) with the attention following the token grid, group_matcher, gradient
checkpointing, and timm's own model checks (tests/test_models.py of timm: forward,
default_cfg, forward_intermediates / features_only, torch.fx, TorchScript; backward, for
every family and option, is tests/test_backbones.py's), ported to one tiny model per
attention kind (width 64, depth 2, 2 heads, 32x32 input)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import (NodePathTracer, create_feature_extractor,
                                                   get_graph_node_names)

import models
from models.disentangled import relative_index
from models.locality import locality_mask


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(embed_dim=64, depth=2, num_heads=2)
# One representative per attention kind: its registered name where it has one.
KIND_MODELS = {
    "softmax": ("vit_tiny_patch4_32", {}),
    "lai": ("vit_lai_tiny_patch4_32", {}),
    "dis": ("vit_dis_tiny_patch4_32", {}),
    "dislai": ("vit_dislai_tiny_patch4_32", {}),
    "performer": ("vit_performer_tiny_patch4_32", {}),
    "performer_lai": ("vit_tiny_patch4_32", {"attn": "performer_lai"}),
    "performer_dis": ("vit_tiny_patch4_32", {"attn": "performer_dis"}),
    "deform": ("vit_deform_tiny_patch4_32", {}),
}
KINDS = list(KIND_MODELS)

# Kinds TorchScript cannot compile: why, and what its compiler names first (torch.export
# and torch.fx work for every kind).
NO_TORCHSCRIPT = {
    "dis": ("the shared relative-position table is bound into every layer as a plain Python "
            "reference (a tuple, so its parameters are registered once, on the model): TorchScript "
            "cannot type a tuple holding a module", "_table"),
    "dislai": ("same as dis: the shared relative-position table is a Python tuple in every layer",
               "_table"),
    "performer_dis": ("same as dis (the shared table), and the local-exact estimator's tile "
                      "bookkeeping is Python (TileLayout objects, lambdas)", "Lambda"),
    "performer_lai": ("the tile layout of each schedule stage is a Python TileLayout object and "
                      "its near-key mask a buffer picked by name at run time; TorchScript can "
                      "type neither", "tile_layouts"),
}


def create(kind: str, **kwargs) -> torch.nn.Module:
    name, fixed = KIND_MODELS[kind]
    torch.manual_seed(0)
    return models.create_model(name, **TINY, **fixed, **kwargs)


def inputs(batch: int = 1, height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------- pretrained_cfg
CIFAR = dict(hf_hub_id="", input_size=(3, 32, 32), crop_pct=1.0, num_classes=10,
             mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
AUGREG = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9, num_classes=1000)
EXPECTED_CFGS = {  # the 224 names are timm's: timm's default weights and transform
    "vit_tiny_patch16_224": dict(AUGREG, hf_hub_id="timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
    "vit_small_patch16_224": dict(AUGREG, hf_hub_id="timm/vit_small_patch16_224.augreg_in21k_ft_in1k"),
    "vit_base_patch16_224": dict(AUGREG, hf_hub_id="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    "vit_large_patch16_224": dict(AUGREG, hf_hub_id="timm/vit_large_patch16_224.augreg_in21k_ft_in1k"),
    "vit_huge_patch14_224": dict(hf_hub_id="timm/vit_huge_patch14_224.orig_in21k", num_classes=0,
                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9),
    **{name: CIFAR for name in ("vit_tiny_patch4_32", "vit_small_patch4_32", "vit_base_patch4_32",
                                "vit_tiny_patch2_32", "vit_small_patch2_32")},
}


def test_every_vit_entry_has_its_pretrained_cfg_and_variants_take_the_plain_one():
    names = [n for n in models.list_models("vit_*") if "_distilled_" not in n]  # DeiT's: test_distillation.py
    plain = [n for n in names if n in EXPECTED_CFGS]
    assert sorted(plain) == sorted(EXPECTED_CFGS)
    for name in names:
        cfg = models.model_info(name).pretrained_cfg
        assert cfg["architecture"] == name
        assert cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head", name
        base = name if name in EXPECTED_CFGS else "vit_" + name.split("_", 2)[2]
        assert base in EXPECTED_CFGS, name  # every variant is vit_<kind>_<plain size>
        for key, value in EXPECTED_CFGS[base].items():
            assert cfg[key] == pytest.approx(value) if isinstance(value, tuple) else cfg[key] == value, (name, key)
        plain_cfg = models.model_info(base).pretrained_cfg
        own = ("architecture", "tag")  # the variant's name; timm's tag of the plain weights
        assert {k: v for k, v in cfg.items() if k not in own} == \
            {k: v for k, v in plain_cfg.items() if k not in own}, name


def test_created_model_carries_its_cfg_with_the_built_input_size():
    model = models.create_model("vit_dislai_tiny_patch4_32", depth=1, img_size=64)
    assert model.pretrained_cfg is model.default_cfg
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert model.pretrained_cfg["hf_hub_id"] == "" and model.pretrained_cfg["mean"] == CIFAR["mean"]


@pytest.mark.parametrize("config, name", [
    ("configs/vit/vit_tiny_patch16_224.yaml", "vit_tiny_patch16_224"),
    ("configs/vit/vit_small_patch16_224.yaml", "vit_small_patch16_224"),
    ("configs/vit/vit_base_patch16_224.yaml", "vit_base_patch16_224"),
    ("configs/vit/vit_large_patch16_224.yaml", "vit_large_patch16_224"),
    ("configs/vit/vit_huge_patch14_224.yaml", "vit_huge_patch14_224"),
    ("configs/vit/vit_tiny_patch4_32_cifar10.yaml", "vit_tiny_patch4_32"),
])
def test_configs_normalise_and_crop_as_the_weights_expect(config, name, tmp_path):
    """A config's eval transform is its model's pretrained_cfg (fine-tuning from those weights)."""
    from config import load_config
    cfg = load_config(config, opts=["DATA.DATA_PATH", str(tmp_path)])
    assert cfg.MODEL.NAME == name
    pretrained = models.model_info(name).pretrained_cfg
    assert tuple(cfg.DATA.MEAN) == pytest.approx(pretrained["mean"])
    assert tuple(cfg.DATA.STD) == pytest.approx(pretrained["std"])
    assert cfg.TEST.CROP_PCT == pytest.approx(pretrained["crop_pct"])


# --------------------------------------------------------------- timm's model checks
@pytest.mark.parametrize("kind", KINDS)
def test_forward(kind):
    model = create(kind).eval()
    out = model(inputs(2))
    assert out.shape == (2, 10) and not out.isnan().any()


@pytest.mark.parametrize("kind", KINDS)
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(kind):
    model = create(kind).train()  # no dropout in these models: train mode is deterministic
    x = inputs(2)
    reference = model(x)
    reference.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    out = model(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    final, _ = model.eval().forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_default_cfg_and_classifier_resets(kind):
    """timm's test_model_default_cfgs_non_std (vit_* are 'non-std': token outputs)."""
    model = create(kind).eval()
    assert model.num_classes == 10 and model.num_features == 64 and model.head_hidden_size == 64
    state = model.state_dict()
    cfg = model.default_cfg
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    x = inputs()
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape == (1, 1 + 8 * 8, model.num_features)
    assert pre_logits.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0
    assert model(x).shape == pre_logits.shape
    torch.testing.assert_close(model(x), pre_logits)
    model.reset_classifier(0, "")  # no pooling either: the tokens
    assert model(x).shape == features.shape
    headless = create(kind, num_classes=0).eval()
    assert headless(x).shape == (1, headless.num_features)
    unpooled = create(kind, num_classes=0, global_pool="").eval()
    assert unpooled(x).shape == features.shape


@pytest.mark.parametrize("kind", KINDS)
def test_forward_intermediates_and_features_only(kind):
    """timm's test_model_forward_intermediates and _features (FeatureGetterNet)."""
    model = create(kind).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = inputs()
    final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(intermediates) == len(info.channels()) == 2
    for channels, reduction, feature in zip(info.channels(), info.reduction(), intermediates):
        assert feature.shape == (1, channels, math.ceil(32 / reduction), math.ceil(32 / reduction))
        assert not feature.isnan().any()
    torch.testing.assert_close(final, model.forward_features(x))
    prefix = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True, output_fmt="NLC",
                                         intermediates_only=True)
    assert prefix[0][0].shape == (1, 64, 64) and prefix[0][1].shape == (1, 1, 64)
    name, fixed = KIND_MODELS[kind]
    torch.manual_seed(0)
    features = models.create_model(name, features_only=True, **TINY, **fixed).eval()
    outputs = features(x)
    assert features.feature_info.channels() == [64, 64] and len(outputs) == 2  # last 3 blocks: both
    for out, feature in zip(outputs, intermediates):
        torch.testing.assert_close(out, feature)
    deeper = models.create_model(name, features_only=True, embed_dim=64, depth=4, num_heads=2, **fixed)
    assert len(deeper(x)) == 3  # timm's ViT default: the last 3 blocks


def fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's tests/test_models.py::_create_fx_model, as there."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        tracer = NodePathTracer(**tracer_kwargs)
        graph = tracer.trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        output_node_indices = [-graph_node_names.index(node_name) for node_name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in output_node_indices]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                    eval_return_nodes=eval_return_nodes, tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_fx_forward_and_backward(kind):
    """timm's test_model_forward_fx and test_model_backward_fx. The graph holds the attention
    state the model has when traced (LAI's current window, the current grid)."""
    model = create(kind).eval()
    x = inputs()
    with torch.inference_mode():
        expected = model(x)
        traced = tuple(fx_model(model)(x).values())[0]
    assert torch.equal(traced, expected)
    model = create(kind, num_classes=42).train()
    traced = fx_model(model, train=True)
    out = torch.cat(tuple(traced(inputs(2)).values()))
    out.mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing and out.shape[-1] == 42
    assert sum(p.numel() for p in traced.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_torchscript(kind):
    """timm's test_model_forward_torchscript (timm requires it of every vit_*)."""
    with timm.set_scriptable(True):
        model = create(kind).eval()
    if kind in NO_TORCHSCRIPT:
        why, named = NO_TORCHSCRIPT[kind]
        with pytest.raises(Exception, match=named):  # still so: else update the table in VARIANTS.md
            torch.jit.script(model)
        pytest.skip(f"{kind}: not scriptable: {why} (test_torch_export covers it)")
    scripted = torch.jit.script(model)
    x = inputs()
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("kind", KINDS)
def test_torch_export(kind):
    model = create(kind).eval()
    x = inputs()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


# ------------------------------------------------------------ input size and token grid
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_follows_another_input_size(kind):
    """Built at 32 (8x8 patches): dynamic_img_size runs 48x64 (12x16 patches), and
    set_input_size(img_size=48) moves a fixed-size model to 12x12. Back at the construction
    size the model gives exactly what it gave before."""
    model = create(kind, dynamic_img_size=True).eval()
    x32 = inputs()
    before = model(x32)
    out = model(inputs(2, 48, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert all(block.attn.grid_size == (12, 16) for block in model.blocks)
    check_grid_state(kind, model, (12, 16))
    maps = model.forward_intermediates(inputs(1, 48, 64), intermediates_only=True)
    assert [m.shape for m in maps] == [(1, 64, 12, 16)] * 2
    assert torch.equal(model(x32), before)

    padded = create(kind, dynamic_img_size=True, dynamic_img_pad=True).eval()
    out = padded(inputs(1, 30, 42))  # padded to 32 x 44: 8 x 11 patches
    assert torch.isfinite(out).all() and padded.blocks[0].attn.grid_size == (8, 11)

    fixed = create(kind).eval()
    fixed.set_input_size(img_size=48)
    assert fixed.patch_embed.grid_size == (12, 12) and fixed.pos_embed.shape == (1, 1 + 144, 64)
    out = fixed(inputs(2, 48, 48))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    check_grid_state(kind, fixed, (12, 12), span=11)


@pytest.mark.parametrize("kind", KINDS)
def test_rebuilt_state_is_on_the_models_device(kind):
    """Windows, indices and layouts rebuilt after a move go where the model is (here: meta)."""
    model = create(kind).eval().to("meta")  # eval: a Performer redraws (reads its count) only in training
    model.set_progress(100, 0)  # LAI kinds: the window is gone
    model.set_input_size(img_size=48)
    assert all(buffer.device.type == "meta" for buffer in model.buffers())


def check_grid_state(kind: str, model: torch.nn.Module, grid: tuple[int, int], span: int = 7) -> None:
    """The grid-dependent state of every layer is the one of ``grid``; relations up to
    ``span`` (a dynamic size keeps the construction one, 8x8 grid: 7; set_input_size takes
    the new grid's, as a model built at that size)."""
    H, W = grid
    N = 1 + H * W
    for block in model.blocks:
        attn = block.attn
        if kind in ("lai", "dislai"):  # the same radius on the new grid
            expected = locality_mask(grid, 1, attn.lai.radius)
            assert attn.window_active and torch.equal(attn.window_mask == 0, expected)
        if kind in ("dis", "dislai"):  # the table holds relations up to span
            index, count = relative_index(grid, 1, span=span)
            rows = torch.arange(N) * count
            assert count == attn.num_relations == model.rel_pos.weight.shape[0]
            assert torch.equal(attn.c2p_index, (rows[:, None] + index).flatten())
            assert torch.equal(attn.p2c_index, (rows[None, :] + index.T).flatten())
        if kind == "deform":
            y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
            assert torch.equal(attn.reference, torch.stack([x, y], -1).reshape(-1, 2).float())
        if kind == "performer_lai":
            layout = attn.tile_layouts[attn.stage]
            assert layout.grid == grid and attn.get_buffer(f"near_mask_{attn.stage}").shape[:2] == \
                (math.ceil(H / 4), math.ceil(W / 4))
        if kind == "performer_dis":
            assert attn.layout.grid == grid and attn.prefix_rel.shape == (N,)


def test_performer_lai_at_a_new_grid_is_exact_local_attention():
    """While the window is active the local-exact estimator is exact: on a new grid
    performer_lai equals LAI attention (same weights, same window)."""
    schedule = dict(schedule=[[0, 2], [10, None]])
    lai = models.create_model("vit_tiny_patch4_32", attn="lai", attn_args=schedule, **TINY).eval()
    performer = models.create_model("vit_tiny_patch4_32", attn="performer_lai", attn_args=schedule,
                                    **TINY).eval()
    performer.load_state_dict(lai.state_dict(), strict=False)
    for model in (lai, performer):
        model.set_input_size(img_size=(40, 56))
    x = inputs(2, 40, 56)
    torch.testing.assert_close(performer(x), lai(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args", [dict(positions="1d"), dict(span=3, log_buckets=True)])
def test_disentangled_other_modes_keep_the_construction_offsets(args):
    """1-D positions and log buckets at a larger dynamic size: the construction layout of
    relations (table size, bucket ends), longer offsets clipped to the span."""
    model = models.create_model("vit_dis_tiny_patch4_32", attn_args=args, dynamic_img_size=True, **TINY)
    count = model.rel_pos.weight.shape[0]
    far = 64 if args.get("positions") == "1d" else 7  # the 8x8 grid's largest offset
    model._set_attention_grid((12, 10))  # what a 48x40 input does first
    index, expected_count = relative_index((12, 10), 1, **args, max_distance=far)
    assert expected_count == count
    rows = torch.arange(index.shape[0]) * count
    assert torch.equal(model.blocks[0].attn.c2p_index, (rows[:, None] + index).flatten())
    assert model(inputs(1, 48, 40)).isfinite().all()


@pytest.mark.parametrize("kind", ["lai", "dislai", "performer_lai"])
def test_schedule_keeps_buffers_so_model_ema_can_copy_them(kind):
    """A radius change rebuilds no buffer shape (timm's ModelEmaV3 copies buffers by position)."""
    from timm.utils import ModelEmaV3
    schedule = [[0, 1], [1, 6], [2, None]]  # performer_lai: tiles of 4, then 6 patches
    model = models.create_model("vit_tiny_patch4_32", attn=kind, attn_args=dict(schedule=schedule),
                                img_size=64, **TINY)
    ema = ModelEmaV3(model, decay=0.5, exclude_buffers=True)
    shapes = [(n, b.shape) for n, b in model.named_buffers()]
    for epoch in (1, 2, 0):
        model.set_progress(epoch, 0)
        assert [(n, b.shape) for n, b in model.named_buffers()] == shapes
        ema.update(model)
    x = inputs(1, 64, 64)
    assert torch.isfinite(ema.module(x)).all()


# ------------------------------------------------------------------ layer-wise lr decay
def test_layer_decay_scales_the_relative_table_with_the_stem():
    """LAYER_DECAY d on a 4-block dis ViT: the shared rel_pos table is stem (d^5, as
    pos_embed), the per-layer position projections are their block's."""
    from config import load_config
    from optimizer import build_optimizer
    model = models.create_model("vit_dis_tiny_patch2_32", depth=4, attn_args=dict(share=False))
    opt = build_optimizer(load_config("configs/quickstart.yaml", ["TRAIN.LAYER_DECAY", "0.5"]), model, 1e-3)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}

    def expected(name: str) -> float:
        if name.startswith(("cls_token", "pos_embed", "patch_embed.", "rel_pos.")):
            return 0.5 ** 5
        if name.startswith("blocks."):
            return 0.5 ** (4 - int(name.split(".")[1]))
        return {"norm": 0.5, "head": 1.0}[name.split(".")[0]]

    named = dict(model.named_parameters())
    assert {"rel_pos.weight", "rel_pos.norm.weight", "blocks.0.attn.pos_k_proj.weight"} <= set(named)
    assert len(scale) == len(named)
    for name, param in named.items():
        assert scale[id(param)] == pytest.approx(expected(name)), name


def test_train_grad_checkpoint_key_trains_the_same_weights(out_dir):
    """TRAIN.GRAD_CHECKPOINT turns checkpointing on in the model main.py trains, and an epoch
    with it ends at the weights an epoch without it reaches (recomputation changes nothing)."""
    import main as main_module
    from config import load_config
    from model_config import build_model
    from models.weights import read_weights

    one_epoch = ["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "100"]
    model = build_model(load_config("configs/quickstart.yaml", [*one_epoch, "TRAIN.GRAD_CHECKPOINT", "True"]))
    assert model.grad_checkpointing
    assert not build_model(load_config("configs/quickstart.yaml", one_epoch)).grad_checkpointing
    weights = {}
    for tag, on in (("plain", "False"), ("ckpt", "True")):
        torch.manual_seed(0)
        assert main_module.main(["--cfg", "configs/quickstart.yaml", "--output", str(out_dir), "--tag", tag,
                                 "--opts", *one_epoch, "TRAIN.GRAD_CHECKPOINT", on]) == 0
        weights[tag] = read_weights(str(out_dir / "vit_tiny_patch2_32" / tag / "ckpt_epoch_0.pth"))["model"]
    assert weights["plain"].keys() == weights["ckpt"].keys()
    for name, value in weights["plain"].items():
        torch.testing.assert_close(weights["ckpt"][name], value, rtol=1e-4, atol=1e-5, msg=name)
