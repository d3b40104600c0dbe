"""DAT / DAT++ through timm's model API: the checks of timm's tests/test_models.py, ported,
plus what a detection/segmentation backbone needs (any input size, intermediates, features_only).
test_model_backward, for every family and option, is tests/test_backbones.py's.

Small models keep the file fast: DAT-T++ and DAT-T (v1) with their heads and groups, a quarter
of DAT-T++'s widths (v1: a quarter of DAT-T's), two blocks per stage, 64-128 px (224, the
registered size, where timm's test compares ``pool_size``; 256x320 for features_only).
"""
from __future__ import annotations

import glob
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models.dat import DAT
from models.dat_attention import LocalAttention, ShiftedWindowAttention

# Representative small models: (registered name, constructor overrides).
PP = ("dat_pp_tiny", dict(dim_stem=16, dims=(16, 32, 64, 128), depths=(2, 2, 2, 2),
                          stage_spec=(("N", "D"), ("N", "D"), ("N", "D"), ("D", "D"))))
V1 = ("dat_tiny", dict(dim_stem=24, dims=(24, 48, 96, 192), depths=(2, 2, 2, 2),
                       stage_spec=(("L", "S"), ("L", "S"), ("L", "D"), ("L", "D"))))
SMALL = [PP, V1]
IDS = ["dat_pp", "dat_v1"]
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs", "dat")

# Why these checks of timm's test_models.py are skipped (docs/DAT.md, "fx, TorchScript, export").
FX_REASON = ("torch.fx cannot trace DAT: its forward branches in Python on the input's shape (neighborhood "
             "attention pads maps smaller than its kernel and tiles the map from H, W; Swin windows pad to "
             "multiples of the window and pick a mask by size; the deformable key grid has a branch for a "
             "1-wide axis), and fx shapes are Proxies; torch.export traces it instead")
JIT_REASON = ("TorchScript cannot compile DAT: einops.rearrange takes **axes_lengths, and the neighborhood "
              "attention's tiling (functools.lru_cache, NamedTuple) and custom op and the window-mask cache "
              "are Python TorchScript does not compile; torch.export traces it instead")


pytestmark = pytest.mark.usefixtures("one_thread")


def small(spec: tuple[str, dict], seed: int = 0, **overrides) -> DAT:
    torch.manual_seed(seed)
    name, kwargs = spec
    return models.create_model(name, **{**kwargs, **overrides})


# ------------------------------------------------------------------ timm's test_models.py

@pytest.mark.parametrize("spec", SMALL, ids=IDS)
def test_forward_and_grad_checkpointing_output(spec) -> None:
    """test_model_forward: a batch of one, no NaNs; set_grad_checkpointing keeps the output."""
    model = small(spec).eval()
    x = torch.randn(1, 3, 96, 96)
    out = model(x)
    assert out.shape == (1, 1000) and not torch.isnan(out).any()
    model.set_grad_checkpointing()
    assert torch.equal(model(x), out)


@pytest.mark.parametrize("spec", SMALL, ids=IDS)
def test_default_cfg_head_and_pooling(spec) -> None:
    """test_model_default_cfgs at the registered input size (224): forward_features matches
    pool_size and num_features, pre_logits head_hidden_size; reset_classifier(0) pools,
    (0, '') does not; num_classes=0, global_pool='' at construction; first_conv and
    classifier name weights of the state dict."""
    model = small(spec).eval()
    cfg = model.default_cfg
    assert model.num_classes == 1000 and model.num_features == model.head_hidden_size == spec[1]["dims"][-1]
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model(x)
        assert isinstance(feats, torch.Tensor) and feats.shape[2:] == cfg["pool_size"] == (7, 7)
        assert feats.shape[1] == model.num_features and pre.shape == (1, model.head_hidden_size)
        torch.testing.assert_close(model.get_classifier()(pre), logits, rtol=0, atol=0)

        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
        pooled = model(x)
        assert pooled.shape == pre.shape and torch.equal(pooled, pre)

        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.shape == (1, model.num_features, *cfg["pool_size"])
        torch.testing.assert_close(unpooled, model.cls_norm(feats), rtol=0, atol=0)  # the normalised map

        bare = small(spec, num_classes=0, global_pool="").eval()
        assert bare(x).shape == (1, model.num_features, *cfg["pool_size"])
        assert small(spec, num_classes=0).eval()(x).shape == (1, model.num_features)
    state = small(spec).state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state


@pytest.mark.parametrize("spec", SMALL, ids=IDS)
def test_forward_intermediates_as_timm(spec) -> None:
    """test_model_forward_intermediates: one map per feature_info entry with its channels and
    reduction; the final features are forward_features; with grad checkpointing the same."""
    model = small(spec).eval()
    info = model.feature_info
    assert [f["num_chs"] for f in info] == list(spec[1]["dims"])
    assert [f["reduction"] for f in info] == [4, 8, 16, 32] and [f["module"] for f in info] == \
        ["stages.0", "stages.1", "stages.2", "stages.3"]
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 4
        for f, o in zip(info, inter):
            assert o.shape == (1, f["num_chs"], 96 // f["reduction"], 96 // f["reduction"])
        assert torch.equal(final, model.forward_features(x))
    model.set_grad_checkpointing()  # with gradients enabled, so that the blocks are checkpointed
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


def test_forward_intermediates_indices_norm_and_stop_early() -> None:
    """timm's semantics: the stage outputs before downsampling (what each stage returns);
    indices int = the last n, a sequence = those stages (negative from the end); norm applies
    cls_norm to the last stage's map; stop_early ends at the last stage taken; bad indices and
    formats are ValueErrors naming the argument."""
    model = small(PP, img_size=64).eval()
    x = torch.randn(1, 3, 64, 96)
    outputs = {}
    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda m, inputs, out, i=i: outputs.__setitem__(i, out[0]))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert all(torch.equal(a, outputs[i]) for i, a in enumerate(inter))
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert isinstance(last2, list) and all(torch.equal(a, b) for a, b in zip(last2, inter[2:]))
        picked = model.forward_intermediates(x, indices=(0, -1), intermediates_only=True)
        assert torch.equal(picked[0], inter[0]) and torch.equal(picked[1], inter[3])
        normed = model.forward_intermediates(x, indices=(1, 3), norm=True, intermediates_only=True)
        assert torch.equal(normed[0], inter[1]) and torch.equal(normed[1], model.cls_norm(inter[3]))
        outputs.clear()
        early, taken = model.forward_intermediates(x, indices=(1,), stop_early=True)
        assert sorted(outputs) == [0, 1] and torch.equal(early, inter[1]) and torch.equal(taken[0], inter[1])
    for bad in (5, (4,), (0, -5)):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers() -> None:
    """Stages after the last index go (with their downsampling), the head always unless asked
    not to, cls_norm when asked or when the stage it normalises goes."""
    model = small(PP, img_size=64)
    assert model.prune_intermediate_layers((0, 1, 2, 3), prune_norm=False) == [0, 1, 2, 3]
    assert len(model.stages) == 4 and not isinstance(model.cls_norm, nn.Identity)
    assert isinstance(model.cls_head, nn.Identity) and model.global_pool == "" and model.num_classes == 0
    assert small(PP, img_size=64).prune_intermediate_layers(4, prune_norm=True) == [0, 1, 2, 3]
    model = small(PP, img_size=64)
    assert model.prune_intermediate_layers(1) == [3] and len(model.stages) == 4  # timm's default: the last
    model = small(PP, img_size=64)
    assert model.prune_intermediate_layers((0, -3)) == [0, 1]
    assert len(model.stages) == 2 and len(model.down_projs) == 1 and isinstance(model.cls_norm, nn.Identity)
    with torch.no_grad():
        final, inter = model.forward_intermediates(torch.randn(1, 3, 64, 64))
    assert final.shape == (1, 32, 8, 8) and len(inter) == 2
    with pytest.raises(ValueError, match="prune_head"):
        small(PP, img_size=64).prune_intermediate_layers((1,), prune_head=False)


@pytest.mark.parametrize("spec", SMALL, ids=IDS)
def test_features_only_at_256x320(spec) -> None:
    """test_model_forward_features: create_model(features_only=True, out_indices=(0, 1, 2, 3))
    gives four NCHW maps with the model's channels at strides 4, 8, 16, 32; a subset prunes the
    stages after it (and the head) and gives the same maps as the full model."""
    name, kwargs = spec
    torch.manual_seed(0)
    net = models.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), **kwargs).eval()
    assert net.feature_info.channels() == list(kwargs["dims"])
    assert net.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        maps = net(x)
    assert [tuple(m.shape) for m in maps] == [(1, c, 256 // r, 320 // r) for c, r in
                                              zip(kwargs["dims"], (4, 8, 16, 32))]
    assert all(torch.isfinite(m).all() for m in maps)

    torch.manual_seed(0)
    pruned = models.create_model(name, features_only=True, out_indices=(1, 2), **kwargs).eval()
    assert len(pruned.model.stages) == 3 and len(pruned.model.down_projs) == 2
    assert not any(k.startswith(("cls_head", "cls_norm", "stages.3")) for k in pruned.state_dict())
    assert pruned.feature_info.channels() == list(kwargs["dims"][1:3])
    with torch.no_grad():
        for a, b in zip(pruned(x), maps[1:3]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fx_and_torchscript_fail_for_the_documented_reasons() -> None:
    """timm's test_model_forward_fx / _torchscript cannot pass for DAT, for the reasons FX_REASON
    and JIT_REASON give (tracing stops at shape-dependent control flow, scripting at einops);
    this holds them to the facts: if either starts working, the documentation must change."""
    for spec in SMALL:
        model = small(spec).eval()
        with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
            torch.fx.symbolic_trace(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        with pytest.raises(torch.jit.frontend.NotSupportedError, match="variable number of arguments"):
            torch.jit.script(small(PP).eval())


@pytest.mark.parametrize("spec", SMALL, ids=IDS)
def test_torch_export_gives_the_same_output(spec) -> None:
    """torch.export at a size the model was not built for (64x96: padded windows, a computed
    shift mask for v1): the exported program computes what the model does, and exporting
    leaves no traced tensor in the model's caches (the eager model still runs)."""
    model = small(spec, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 96)
    program = torch.export.export(model, (x,))
    assert not any(isinstance(m, ShiftedWindowAttention) and m._masks for m in model.modules())
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)
    if spec is PP:
        assert "dat.neighborhood_attention" in str(program.graph)


# ------------------------------------------------------------------ pretrained_cfg and transforms

RELEASED = ["dat_pp_tiny", "dat_pp_small", "dat_pp_base", "dat_pp_base_384", "dat_tiny", "dat_small",
            "dat_base", "dat_base_384"]


@pytest.mark.parametrize("name", RELEASED)
def test_pretrained_cfg_fields(name: str) -> None:
    cfg = models.model_info(name).pretrained_cfg
    with torch.device("meta"):
        model = models.create_model(name)
    size = 384 if name.endswith("_384") else 224
    v1 = not name.startswith("dat_pp")
    expected = dict(architecture=name, hf_hub_id="", url="", num_classes=1000, input_size=(3, size, size),
                    pool_size=(size // 32,) * 2, crop_mode="squash",
                    crop_pct=1.0 if name == "dat_pp_base_384" else 0.875, interpolation="bicubic",
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="patch_proj.0",
                    classifier="cls_head", license="apache-2.0",
                    paper_ids="arXiv:2201.00520" if v1 else "arXiv:2309.01430", fixed_input_size=False)
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["paper_name"].startswith("Vision Transformer with Deformable" if v1 else "DAT++")
    assert model.pretrained_cfg == model.default_cfg == cfg
    assert model.output_stride == DAT.output_stride == 32
    with torch.device("meta"):
        assert models.create_model(name, output_stride=32).output_stride == 32
        with pytest.raises(models.ModelArgumentError, match="output_stride 16"):
            models.create_model(name, output_stride=16)


def _picture():
    """A non-square RGB picture with structure (a gradient and a checkerboard)."""
    from PIL import Image
    yy, xx = torch.meshgrid(torch.arange(300), torch.arange(460), indexing="ij")
    rgb = torch.stack([xx * 255 // 459, yy * 255 // 299, ((xx // 23 + yy // 17) % 2) * 255], -1)
    return Image.fromarray(rgb.to(torch.uint8).numpy())


@pytest.mark.parametrize("name", RELEASED)
def test_timm_eval_transform_is_the_configs(name: str) -> None:
    """timm.data.resolve_data_config(model=m) + create_transform gives the tensor the repo's
    eval transform (data/transforms.py, the model's config in configs/dat/) gives."""
    import timm.data
    from config import load_config
    from data.transforms import build_transform
    path = os.path.join(CONFIG_DIR, f"{name}.yaml")
    with torch.device("meta"):
        model = models.create_model(name)
    timm_tf = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    from data.device import Normalize
    config = load_config(path, opts=["DATA.DATASET", "fake"])
    ours = build_transform(config, train=False)  # uint8; the loader normalises on the device
    image = _picture()
    a, b = timm_tf(image), Normalize(config.DATA.MEAN, config.DATA.STD, "cpu")(ours(image)[None])[0]
    assert a.shape == b.shape == model.default_cfg["input_size"]
    # Same pixels: one grey level is 1/(255 std) ~ 0.017 after normalising, far above the
    # 1e-6 by which the device's normalisation may differ from torchvision's pair.
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_every_released_config_has_a_transform_check() -> None:
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "dat*.yaml"))}
    assert set(RELEASED) <= names and set(RELEASED) == set(models.list_models("dat*"))


# ------------------------------------------------------------------ classifier API

def test_reset_classifier_and_global_pool() -> None:
    """A fresh head of another size; '' keeps the map (with a classifier: logits per position,
    whose average is the pooled logits); anything else than 'avg' / '' is a ValueError."""
    model = small(PP, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier() is model.cls_head
    assert model.cls_head.weight.shape == (5, model.num_features) and model(x).shape == (2, 5)
    with torch.no_grad():
        pooled = model(x)
        head = model.cls_head.state_dict()
        model.reset_classifier(5, "")
        model.cls_head.load_state_dict(head)  # the same classifier, without pooling
        dense = model(x)
    assert dense.shape == (2, 5, 2, 2)
    torch.testing.assert_close(dense.mean(dim=(2, 3)), pooled)
    with pytest.raises(ValueError, match="global_pool must be 'avg' or ''"):
        model.reset_classifier(5, "max")
    with pytest.raises(ValueError, match="global_pool"):
        small(PP, img_size=64, global_pool="token")
    with pytest.raises(ValueError, match="num_classes"):
        small(PP, img_size=64, num_classes=-1)


def test_weight_decay_and_groups_cover_every_parameter() -> None:
    """no_weight_decay_keywords names the position tables; group_matcher puts every parameter
    in a group, the head alone in the last, with or without a classifier."""
    from timm.models import group_parameters
    for spec in SMALL:
        for num_classes in (10, 0):
            model = small(spec, img_size=64, num_classes=num_classes)
            names = [n for n, _ in model.named_parameters()]
            tables = [n for n in names if n.rsplit(".", 1)[-1] in model.no_weight_decay_keywords()]
            assert tables and all(n.endswith(("rpe_table", "rpb", "relative_position_bias_table"))
                                  for n in tables)
            for coarse in (False, True):
                groups = group_parameters(model, model.group_matcher(coarse=coarse))
                assert sorted(n for g in groups.values() for n in g) == sorted(names)
                if num_classes:
                    assert groups[max(groups)] == ["cls_head.weight", "cls_head.bias"]
                else:
                    assert not any(n.startswith("cls_head") for n in names)


# ------------------------------------------------------------------ grad checkpointing

@pytest.mark.parametrize("spec", SMALL, ids=IDS)
def test_grad_checkpointing_same_outputs_and_gradients(spec) -> None:
    """Training mode with drop path (checkpoint keeps the RNG state, so the recomputed blocks
    drop the same paths): identical outputs, gradients within float tolerance, and far fewer
    tensors kept for the backward pass."""
    x = torch.randn(2, 3, 64, 64)
    results = []
    for checkpointing in (False, True):
        model = small(spec, img_size=64, num_classes=10, drop_path_rate=0.3).train()
        model.set_grad_checkpointing(checkpointing)
        assert all(s.grad_checkpointing == checkpointing for s in model.stages)
        kept = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(1) or t, lambda t: t):
            out = model(x)
        out.logsumexp(-1).mean().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}, len(kept)))
    (out0, grads0, kept0), (out1, grads1, kept1) = results
    assert torch.equal(out0, out1)
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert kept1 < kept0 / 4, (kept0, kept1)


# ------------------------------------------------------------------ any input size

@pytest.mark.parametrize("spec", SMALL, ids=IDS)
@pytest.mark.parametrize("size", [(96, 160), (160, 96), (128, 128)])
def test_any_multiple_of_32(spec, size) -> None:
    """Built for 224, run at other sizes (v1: windows padded, masks per size): the final map is
    (B, C, H/32, W/32), finite; the state dict keeps its released layout and loads strictly."""
    model = small(spec).eval()
    layout = {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, *size))
    assert feats.shape == (2, model.num_features, size[0] // 32, size[1] // 32)
    assert torch.isfinite(feats).all()
    assert {k: v.shape for k, v in model.state_dict().items()} == layout
    model.load_state_dict(small(spec, seed=1).state_dict(), strict=True)


def _windows(t: torch.Tensor, ws: int) -> torch.Tensor:  # (B, H, W, C) -> (B * nW, ws, ws, C), Swin's
    B, H, W, C = t.shape
    return t.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)


def reference_swin_block_attention(attn: LocalAttention, x: torch.Tensor) -> torch.Tensor:
    """mmdet's ShiftWindowMSA written out (pad bottom/right, roll, mask of the padded size,
    window attention with Swin's bias, reverse, crop). x (B, C, H, W) -> (B, C, H, W)."""
    ws, s, nh = attn.window, attn.shift_size, attn.heads
    B, C, H, W = x.shape
    t = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
    Hp, Wp = t.shape[1:3]
    mask = None
    if s > 0:
        t = torch.roll(t, (-s, -s), (1, 2))
        img = torch.zeros(1, Hp, Wp, 1, dtype=x.dtype)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img[:, hs, wsl, :] = cnt
                cnt += 1
        m = _windows(img, ws).reshape(-1, ws * ws)
        mask = m.unsqueeze(1) - m.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    win = _windows(t, ws).reshape(-1, ws * ws, C)
    N = ws * ws
    q, k, v = attn.proj_qkv(win).reshape(-1, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    logits = (q * (C // nh) ** -0.5) @ k.transpose(-2, -1)
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + ws - 1
    index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]
    logits = logits + attn.relative_position_bias_table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)
    if mask is not None:
        nW = mask.shape[0]
        logits = (logits.view(-1, nW, nh, N, N) + mask[None, :, None]).view(-1, nh, N, N)
    out = attn.proj_out((logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, N, C))
    out = out.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if s > 0:
        out = torch.roll(out, (s, s), (1, 2))
    return out[:, :H, :W].permute(0, 3, 1, 2)


@pytest.mark.parametrize("kind", [LocalAttention, ShiftedWindowAttention])
@pytest.mark.parametrize("size", [(14, 14), (16, 20), (5, 9), (21, 8)])
def test_windows_pad_as_mmdet_swin(kind, size) -> None:
    """'L' / 'S' built for a 14x14 map (window 7, shift 4) on other maps: mmdet's padded Swin
    attention, values and gradients. The shift mask of another padded size is computed once
    and kept; at the built size it is the ``attn_mask`` buffer."""
    torch.manual_seed(0)
    attn = kind((14, 14), 16, 2, 7).double().eval()
    assert attn.window == 7 and attn.shift_size == (4 if kind is ShiftedWindowAttention else 0)
    x = torch.randn(2, 16, *size, dtype=torch.float64, requires_grad=True)
    out, _, _ = attn(x)
    ref = reference_swin_block_attention(attn, x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    params = (x, attn.relative_position_bias_table, attn.proj_qkv.weight)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)
    if kind is ShiftedWindowAttention:
        padded = tuple(-(-n // 7) * 7 for n in size)
        mask = attn._mask(*padded)
        assert mask is attn._mask(*padded)  # kept
        if padded == (14, 14):
            assert mask is attn.attn_mask
        elif min(padded) > 7:  # a module built for that size shifts too, and has that mask
            assert torch.equal(mask, ShiftedWindowAttention(padded, 16, 2, 7).attn_mask)


def test_shift_mask_cache_is_bounded() -> None:
    attn = ShiftedWindowAttention((14, 14), 8, 1, 7)
    for n in range(1, 12):
        attn._mask(7 * n, 7)
    assert len(attn._masks) == ShiftedWindowAttention.MASKS_KEPT
