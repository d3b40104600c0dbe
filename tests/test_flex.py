"""The fast paths of issue "The CUDA path ... and the slow variants":

* disentangled attention (dis / DisLAI) computed from row-tile windows of the relative table
  (``models.disentangled.disentangled_attention``) against the gather implementation it
  replaced, kept as the reference ``DisentangledAttention.attend_by_gather`` (values and
  gradients, float64);
* FlexAttention as a backend of LAI's window (``ATTN_ARGS.BACKEND``) and of DAT's
  neighborhood attention (``MODEL.DAT.NA_BACKEND``) against the current paths, the
  automatic choice, the options' errors and the MAC count;
* DAT's deformable position bias and softmax attention, bit for bit the previous formulas.

FlexAttention has no backward on the CPU, so on the CPU its values are compared without
gradients; the gradient checks run where CUDA is available.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import models
import models.attention as attention
from models.attention import ATTENTION_KINDS
from models.dat_attention import (DeformableAttention, NeighborhoodAttention, _grid, _query_grid,
                                  _softmax_attention, neighborhood_attention)
from models.disentangled import (RelativePositionTable, disentangled_logits, relative_index,
                                 relative_windows)
from models.locality import FLEX_BUFFERS
from tests.conftest import main_here, one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUDA = torch.cuda.is_available()
FLEX = attention.flex_available()
needs_flex = pytest.mark.skipif(not FLEX, reason="this torch has no FlexAttention")


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------ disentangled: the reference
def disentangled_layer(kind="dis", grid=(4, 5), prefix=1, dim=16, heads=2, tile=None, **options):
    torch.manual_seed(0)
    attn = ATTENTION_KINDS[kind](dim, num_heads=heads, qkv_bias=True, grid_size=grid,
                                 num_prefix_tokens=prefix, **options).double()
    if tile is not None:  # another tiling of the same relations
        index, _ = relative_index(attn.grid_size, prefix, attn.positions, attn.span, attn.log_buckets,
                                  attn.max_distance)
        window, attn.rel_layout, attn.prefix_relations = relative_windows(
            index, attn.grid_size, prefix, attn.positions, tile=tile)
        attn.rel_window_index = window
    table = RelativePositionTable(attn.num_relations, dim).double()
    with torch.no_grad():
        table.weight.normal_()
    attn.bind_table(table)
    return attn, table


def assert_same_values_and_grads(attn, table, B=2, attn_mask=None, seed=1):
    N = attn.num_prefix_tokens + attn.grid_size[0] * attn.grid_size[1]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, attn.num_heads, N, attn.head_dim, generator=g, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    ours = attn.attend(q, k, v, attn_mask=attn_mask)
    ref = attn.attend_by_gather(q, k, v, attn_mask)
    torch.testing.assert_close(ours, ref)
    weights = [q, k, v, table.weight, table.norm.weight]
    weights += [attn.qkv.weight] if attn.share else [attn.pos_k_proj.weight, attn.pos_q_proj.weight]
    grad = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ours, weights, grad), torch.autograd.grad(ref, weights, grad)):
        torch.testing.assert_close(a, b)


CASES = {
    "default (span = grid)": dict(),
    "14x14 ViT-S grid": dict(grid=(14, 14)),
    "non-square, 2 prefix tokens": dict(grid=(3, 7), prefix=2),
    "no prefix token": dict(prefix=0),
    "span 1 (clipped)": dict(span=1),
    "log buckets": dict(grid=(6, 6), span=4, log_buckets=True),
    "1-D positions": dict(positions="1d"),
    "1-D positions, span 3": dict(positions="1d", span=3),
    "separate position projections": dict(share=False),
    "one column": dict(grid=(5, 1)),
    "one token": dict(grid=(1, 1)),
    "dislai window": dict(kind="dislai", grid=(5, 6), schedule=[[0, 1]]),
    "dislai 1-D band": dict(kind="dislai", window="1d", positions="1d", schedule=[[0, 3]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_disentangled_equals_the_gather_implementation(case):
    assert_same_values_and_grads(*disentangled_layer(**CASES[case]))


@pytest.mark.parametrize("tile", [1, 2, 3, 5])
def test_disentangled_any_tiling_gives_the_same(tile):
    """Tiles of 1 (no skew), 2 and 3 (a partial last tile) and 5 (the whole width)."""
    assert_same_values_and_grads(*disentangled_layer(grid=(4, 5), tile=tile))


def test_disentangled_heads_in_chunks(monkeypatch):
    """The CPU Function runs as many heads at a time as fit its chunk of logits (all of these
    small layers' heads); one head and two at a time give the same."""
    from models.disentangled import _DisentangledAttention
    for chunk_bytes in (1, 2 * 2 * 21 * 21 * 8):  # 1 head, 2 heads of a (2, 21, 21) float64 chunk
        monkeypatch.setattr(_DisentangledAttention, "CHUNK_BYTES", chunk_bytes)
        assert_same_values_and_grads(*disentangled_layer(dim=32, heads=4))


def test_disentangled_with_a_callers_mask_and_dropout_path():
    attn, table = disentangled_layer(grid=(3, 4))
    mask = torch.rand(2, 1, 13, 13, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    assert_same_values_and_grads(attn, table, attn_mask=mask)
    # attention dropout takes the whole-batch logits path; p too small to drop anything
    attn.attn_drop.p = 1e-12
    assert_same_values_and_grads(attn.train(), table)


def test_disentangled_bias_only_path_is_the_position_bias():
    """What non-CPU devices add to SDPA (``content=False``): (c2p + p2c) * scale + mask."""
    attn, _ = disentangled_layer(grid=(4, 4), kind="dislai", schedule=[[0, 1]])
    q, k = (torch.randn(2, 2, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kr, qr = attn.relative_projections()
    window = attn.window_bias(q.device, q.dtype)
    ours = disentangled_logits(q, k, kr, qr, attn.rel_window_index, attn.rel_layout,
                               attn.prefix_relations, attn.scale, content=False, mask=window)
    ref = attn.position_bias(q, k) + window
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ours).masked_fill(torch.isinf(window), 0)
    for a, b in zip(torch.autograd.grad(ours, (q, k), g), torch.autograd.grad(ref, (q, k), g)):
        torch.testing.assert_close(a, b)


def test_disentangled_model_equals_reference_at_construction_and_new_grid():
    """A whole model (forward, loss gradients of every parameter), then at another grid
    (offsets beyond the construction span clip, the windows are rebuilt by set_grid)."""
    torch.manual_seed(0)
    model = models.create_model("vit_dis_tiny_patch4_32", embed_dim=32, depth=2, num_heads=2,
                                num_classes=5, dynamic_img_size=True).double()
    ref = models.create_model("vit_dis_tiny_patch4_32", embed_dim=32, depth=2, num_heads=2,
                              num_classes=5, dynamic_img_size=True).double()
    ref.load_state_dict(model.state_dict())
    for block in ref.blocks:
        block.attn.attend = lambda q, k, v, attn_mask=None, is_causal=False, a=block.attn: \
            a.attend_by_gather(q, k, v, attn_mask)
    for size in ((32, 32), (40, 56)):
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        out, expected = model(x), ref(x)
        torch.testing.assert_close(out, expected)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        ref_grads = torch.autograd.grad(expected.square().sum(), list(ref.parameters()))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)


def test_relative_windows_hold_the_relation_of_each_offset():
    """Window entry (query row y, tile t, key row y', column c) = rel((y, x), (y', x')) for
    every query column x of the tile and key column x' = c - (tile - 1 - (x - t * tile))."""
    index, _ = relative_index((5, 7), 1, span=2)
    window, (P, H, W, T, tw), prefix = relative_windows(index, (5, 7), 1, tile=3)
    window = window.view(H, T, H, W + tw - 1)
    assert (P, H, W, T, tw) == (1, 5, 7, 3, 3) and prefix == (int(index[0, 0]), int(index[0, 1]), int(index[1, 0]))
    for y in range(H):
        for x in range(W):
            t, u = divmod(x, tw)
            for y2 in range(H):
                for x2 in range(W):
                    assert window[y, t, y2, tw - 1 - u + x2] == index[1 + y * W + x, 1 + y2 * W + x2]


# ------------------------------------------------------------------ LAI on FlexAttention
def lai_pair(grid=(8, 8), prefix=1, radius=1, window="2d", dim=32, heads=2):
    """The same LAI layer with the SDPA and the flex backend."""
    layers = []
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        layers.append(ATTENTION_KINDS["lai"](dim, num_heads=heads, grid_size=grid, num_prefix_tokens=prefix,
                                             schedule=[[0, radius], [10, None]], window=window,
                                             backend=backend))
    return layers


@needs_flex
@pytest.mark.parametrize("grid, prefix, radius, window", [((6, 9), 2, 2, "2d"), ((8, 8), 1, 8, "1d")])
def test_lai_flex_equals_sdpa_on_the_cpu(grid, prefix, radius, window):
    """Values (the CPU has no flex backward): the 2-D window with 2 prefix tokens on a
    non-square grid, and the 1-D band (each case compiles a kernel: seconds on a cold cache)."""
    sdpa, flex = lai_pair(grid, prefix, radius, window)
    N = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(2, 2, N, 16) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(flex.attend(q, k, v), sdpa.attend(q, k, v), rtol=1e-5, atol=1e-5)
        flex.set_progress(10, 0)  # window gone: both are plain SDPA, bit for bit
        sdpa.set_progress(10, 0)
        assert torch.equal(flex.attend(q, k, v), sdpa.attend(q, k, v))


@needs_flex
@pytest.mark.skipif(not CUDA, reason="FlexAttention's backward needs CUDA here")
def test_lai_flex_equals_sdpa_values_and_gradients_on_cuda():
    sdpa, flex = (layer.cuda() for layer in lai_pair((14, 14), 1, 2))
    x = torch.randn(4, 197, 32, device="cuda", requires_grad=True)
    a, b = flex(x), sdpa(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(a)
    for p, r in zip(torch.autograd.grad(a, [x, *flex.parameters()], g),
                    torch.autograd.grad(b, [x, *sdpa.parameters()], g)):
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-4)


@needs_flex
def test_lai_block_mask_buffers_keep_their_shapes_and_follow_the_grid():
    """The block mask lives in non-persistent buffers of fixed shapes through the schedule
    (timm's ModelEmaV3 copies buffers by position), rebuilt by set_progress / set_grid."""
    layer = ATTENTION_KINDS["lai"](32, num_heads=2, grid_size=(8, 8), schedule=[[0, 1], [2, 3], [4, None]],
                                   backend="flex")
    shapes = [tuple(getattr(layer, name).shape) for name in FLEX_BUFFERS]
    assert shapes == [(1, 1, 1), (1, 1, 1, 1)] * 2  # 65 tokens: one block of 128
    for epoch in (2, 4, 0):
        layer.set_progress(epoch, 0)
        assert [tuple(getattr(layer, name).shape) for name in FLEX_BUFFERS] == shapes
    assert not any(name in layer.state_dict() for name in FLEX_BUFFERS)
    layer.set_grid((12, 12))  # 145 tokens: two blocks
    assert [tuple(getattr(layer, name).shape) for name in FLEX_BUFFERS] == [(1, 1, 2), (1, 1, 2, 2)] * 2
    assert not hasattr(ATTENTION_KINDS["lai"](32, grid_size=(8, 8), backend="sdpa"), FLEX_BUFFERS[0])
    auto = ATTENTION_KINDS["lai"](32, grid_size=(8, 8))  # on the CPU auto is SDPA: no block mask built
    assert not auto.flex_window and not hasattr(auto, FLEX_BUFFERS[0])
    if CUDA:  # moved to CUDA, auto builds it there
        assert auto.cuda().flex_window and getattr(auto, FLEX_BUFFERS[1]).is_cuda


def test_lai_backend_option_and_automatic_choice(monkeypatch):
    auto = ATTENTION_KINDS["lai"](32, num_heads=2, grid_size=(4, 4))
    assert auto.backend == "auto"
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'sdpa', 'flex'"):
        ATTENTION_KINDS["lai"](32, grid_size=(4, 4), backend="triton")
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    if FLEX:  # explicit flex where it cannot work: a training step on the CPU
        flex = ATTENTION_KINDS["lai"](32, num_heads=2, grid_size=(4, 4), backend="flex")
        with pytest.raises(ValueError, match="backend='flex': FlexAttention has no backward on the cpu"):
            flex.attend(q, k, v)
    # a torch without FlexAttention: auto falls back silently, an explicit request is refused
    monkeypatch.setattr(attention, "_flex_attention", None)
    fallback = ATTENTION_KINDS["lai"](32, num_heads=2, grid_size=(4, 4))
    assert not fallback.flex_window and fallback.attend(q, k, v).shape == q.shape
    with pytest.raises(ValueError, match="backend='flex': this torch .* has no FlexAttention"):
        ATTENTION_KINDS["lai"](32, grid_size=(4, 4), backend="flex")
    with pytest.raises(ValueError, match="na_backend='flex': this torch .* has no FlexAttention"):
        NeighborhoodAttention(16, 2, backend="flex")


def test_backend_config_keys(tmp_path):
    """MODEL.VIT.ATTN_ARGS.BACKEND and MODEL.DAT.NA_BACKEND reach the constructors; a value
    they refuse is a config error naming the key."""
    from config import ConfigError, load_config
    from model_config import build_model
    lai = build_model(load_config(os.path.join(ROOT, "configs/vit_variants/digits_lai.yaml"),
                                  opts=["MODEL.VIT.ATTN_ARGS.BACKEND", "sdpa"]))
    assert all(block.attn.backend == "sdpa" for block in lai.blocks)
    with pytest.raises(ConfigError, match="MODEL.VIT.ATTN_ARGS.BACKEND"):
        build_model(load_config(os.path.join(ROOT, "configs/vit_variants/digits_lai.yaml"),
                                opts=["MODEL.VIT.ATTN_ARGS.BACKEND", "x"]))
    dat = build_model(load_config(os.path.join(ROOT, "configs/dat/dat_pp_tiny_digits.yaml"),
                                  opts=["MODEL.DAT.NA_BACKEND", "tiled"]))
    assert {m.backend for m in dat.modules() if isinstance(m, NeighborhoodAttention)} == {"tiled"}
    with pytest.raises(ConfigError, match="MODEL.DAT.NA_BACKEND"):
        build_model(load_config(os.path.join(ROOT, "configs/dat/dat_pp_tiny_digits.yaml"),
                                opts=["MODEL.DAT.NA_BACKEND", "natten"]))


# ------------------------------------------------- DAT's neighborhood attention on flex
@needs_flex
def test_neighborhood_flex_equals_tiled_on_the_cpu():
    """Values through the module on a 7x11 map (windows clipped at the borders, not a
    multiple of the tile) and on a 5x11 map, shorter than the kernel (padded to 7x11 before
    qkv): the same shapes and strides, so FlexAttention compiles one kernel (seconds on a
    cold cache)."""
    torch.manual_seed(0)
    tiled, flex = NeighborhoodAttention(16, 2, backend="tiled"), NeighborhoodAttention(16, 2, backend="flex")
    with torch.no_grad():
        tiled.rpb.normal_()  # a bias that matters
    flex.load_state_dict(tiled.state_dict())
    with torch.no_grad():
        for height in (7, 5):
            x = torch.randn(2, 16, height, 11)
            torch.testing.assert_close(flex(x)[0], tiled(x)[0], rtol=1e-5, atol=1e-5)


@needs_flex
@pytest.mark.skipif(not CUDA, reason="FlexAttention's backward needs CUDA here")
def test_neighborhood_flex_values_and_gradients_on_cuda():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 23, 30, 16, device="cuda", requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 13, 13, device="cuda", requires_grad=True)
    ours = neighborhood_attention(q, k, v, rpb, 7, backend="flex")
    ref = neighborhood_attention(q, k, v, rpb, 7)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v, rpb), g), torch.autograd.grad(ref, (q, k, v, rpb), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    model = models.create_model("dat_pp_tiny", num_classes=10, img_size=64).cuda()
    assert {m.backend for m in model.modules() if isinstance(m, NeighborhoodAttention)} == {"auto"}
    out = model(torch.randn(2, 3, 64, 64, device="cuda"))   # auto: flex on CUDA
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_neighborhood_backend_choice():
    layer = NeighborhoodAttention(16, 2)
    assert layer.backend == "auto"
    with pytest.raises(ValueError, match="na_backend must be one of 'auto', 'tiled', 'flex'"):
        NeighborhoodAttention(16, 2, backend="natten")
    x = torch.randn(1, 16, 7, 8, requires_grad=True)
    layer(x)[0].sum().backward()  # auto on the CPU: the tiled op, with gradients
    if FLEX:
        with pytest.raises(ValueError, match="na_backend='flex': FlexAttention has no backward on the cpu"):
            NeighborhoodAttention(16, 2, backend="flex")(x)


@needs_flex
def test_flex_backend_counts_the_published_macs():
    """Under torch.utils.flop_counter the neighborhood attention counts its window products
    whatever the backend (FlexAttention's own formula would count the dense products)."""
    ref = {"flex": None, "tiled": None}
    for backend in ref:
        model = models.create_model("dat_pp_tiny", na_backend=backend).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        ref[backend] = counter.get_total_flops() / 2e9
    assert ref["flex"] == ref["tiled"] and abs(ref["flex"] / 4.259 - 1) < 0.005


# ------------------------------------------------- FlexAttention in a run: compiles, toolchain
@pytest.fixture
def flex_state(monkeypatch):
    """FlexAttention's module state (the toolchain check and its answer, the compiled
    functions) starts unset and comes back after the test."""
    monkeypatch.setattr(attention, "_flex_check", None)
    monkeypatch.setattr(attention, "_flex_refused", None)
    monkeypatch.setattr(attention, "_compiled_flex", {})


@needs_flex
@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_flex_without_a_toolchain(capsys, monkeypatch, tmp_path, flex_state, backend):
    """A node without Triton (no GPU here: compiling's probe says so, and 'auto' picks flex on
    the CPU as on CUDA): 'auto' runs SDPA, forward and backward, and the log says why in one
    line; an explicit 'flex' is a one-line config error naming the key, before any file."""
    import compiling
    why = "inductor needs Triton for CUDA kernels and this environment has none (pip install triton)"
    monkeypatch.setattr(compiling, "toolchain_missing", lambda device: why)
    if backend == "auto":
        monkeypatch.setattr(attention, "AUTO_FLEX_DEVICES", ("cpu",))
    out = tmp_path / "out"
    args = ["--cfg", "configs/vit_variants/digits_lai.yaml", "--output", str(out), "--throughput",
            "--batch-size", "2", "--opts", "MODEL.VIT.ATTN_ARGS.BACKEND", backend]
    if backend == "flex":
        assert one_line_error(capsys, *args) == (
            "config error: --opts: MODEL.VIT.ATTN_ARGS.BACKEND: model 'vit_lai_tiny_patch2_32': backend='flex': "
            f"torch.compile cannot build FlexAttention's kernels here: {why}; use backend='auto'")
        assert not out.exists()
        return
    result = main_here(capsys, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split("] ")[-1] for line in result.stdout.splitlines() if "FlexAttention" in line] == [
        f"torch.compile cannot build FlexAttention's kernels here: {why}; backend 'auto' (MODEL.VIT.ATTN_ARGS."
        "BACKEND, MODEL.DAT.NA_BACKEND) runs SDPA / the tiled neighborhood op instead"]
    assert not attention._compiled_flex  # flex never ran (on the CPU it has no backward)


@needs_flex
def test_flex_in_a_run_stays_within_the_recompile_limit(monkeypatch, flex_state):
    """The shapes one run sends through FlexAttention, compiled with the eager backend (no
    kernels: only dynamo, whose guards decide the recompiles): training batches, evaluation,
    a partial last batch, every radius of an LAI schedule, a teacher of another family. torch
    stops compiling a function after 8 (recompile_limit) and ran FlexAttention unfused from
    then on; here that limit fails the test, and the compiles are one per signature (the
    shapes after the batch) and grad mode."""
    import torch._dynamo
    import torch.nn.attention.flex_attention as flex_module
    monkeypatch.setattr(attention, "AUTO_FLEX_DEVICES", ("cpu",))  # 'auto' takes flex, as on CUDA
    compiles = []
    monkeypatch.setitem(attention.FLEX_COMPILE, "backend", lambda gm, inputs: compiles.append(gm) or gm.forward)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)  # eager: a CPU backward
    torch.manual_seed(0)
    student = models.create_model("vit_lai_tiny_patch2_32", img_size=16, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=3, attn_args={"schedule": [[0, 1], [1, 2], [2, 3], [3, 5]]})
    teacher = models.create_model("dat_pp_tiny", img_size=32, num_classes=3, dim_stem=16, dims=(16, 32, 32, 32),
                                  heads=(1, 2, 2, 2), groups=(1, 1, 1, 1), depths=(2, 2, 2, 2),
                                  stage_spec=(("N", "D"),) * 3 + (("D", "D"),)).eval()
    for epoch in range(4):
        student.set_progress(epoch, 0)
        x = torch.randn(4, 3, 16, 16)
        with torch.no_grad():
            teacher(F.interpolate(x, size=32))
        student.train()(x).sum().backward()
        student.eval()
        with torch.no_grad():
            for batch in (4, 3):  # the last batch partial
                student(torch.randn(batch, 3, 16, 16))
    assert len(compiles) == 2 + 2  # the student's one signature x (train, eval); the teacher's two

# ----------------------------------------------------- DAT: the same values, bit for bit
def previous_position_bias(attn, pos, H, W):
    bg, hk, wk, _ = pos.shape
    B = bg // attn.groups
    q_grid = _grid(_query_grid(H, attn.version, pos.device, pos.dtype),
                   _query_grid(W, attn.version, pos.device, pos.dtype)).reshape(1, H * W, 1, 2)
    displacement = (q_grid - pos.reshape(bg, 1, hk * wk, 2)) * 0.5
    table = attn.rpe_table.unsqueeze(0).expand(B, -1, -1, -1)
    table = table.reshape(bg, attn.heads // attn.groups, *attn.rpe_table.shape[1:])
    bias = F.grid_sample(table.to(pos.dtype), displacement.flip(-1), mode="bilinear", align_corners=True)
    return bias.reshape(B, attn.heads, H * W, hk * wk)


@pytest.mark.parametrize("version", [1, 2])
def test_deformable_position_bias_is_bit_for_bit_the_previous_formula(version):
    torch.manual_seed(0)
    attn = DeformableAttention((14, 10), 32, 4, 2, 2, -1 if version == 2 else 2, 3, version=version)
    pos = (torch.rand(6, 7, 5, 2) * 2.2 - 1.1).requires_grad_()
    ours, before = attn.position_bias(pos, 14, 10), previous_position_bias(attn, pos, 14, 10)
    assert torch.equal(ours, before)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (pos, attn.rpe_table), g),
                    torch.autograd.grad(before, (pos, attn.rpe_table), g)):
        assert torch.equal(a, b)


def test_softmax_attention_is_bit_for_bit_the_previous_formula():
    q, k, v = (torch.randn(2, 3, 20, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 3, 20, 20, requires_grad=True)
    ours = _softmax_attention(q, k, v, bias, 0.0)
    logits = torch.matmul(q, k.transpose(-2, -1)) * 8 ** -0.5 + bias
    before = torch.matmul(logits.softmax(-1), v)
    assert torch.equal(ours, before)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v, bias), g), torch.autograd.grad(before, (q, k, v, bias), g)):
        assert torch.equal(a, b)
