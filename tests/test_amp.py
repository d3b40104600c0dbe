"""Mixed precision on the CPU runs the code a GPU runs: CPU autocast (bf16; fp16 with a
GradScaler), the dtype rule per device, and a dtype the machine lacks refused in one line."""
from __future__ import annotations

import copy
import logging

import main as main_module
import pytest
import torch

import amp
from amp import autocast_dtype, autocast_factory, describe, LossScaler
from config import ConfigError, load_config, source_of
from engine import train_one_epoch
from flags import config_from_args
from train_state import TrainState
from utils import DistEnv
from models.attention import ATTENTION_KINDS
from models.dat_attention import DAT_BLOCKS, StageArgs
from models.disentangled import RelativePositionTable

from tests.conftest import AVG_POOL, QUICK


CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _config(*opts: str):
    return load_config(QUICK, list(opts))


def test_the_dtype_rule_per_device(monkeypatch):
    """auto: float32 on the CPU, bf16 on a GPU that has it, else fp16 (logged why); a named
    dtype on any device; AMP false: float32. bf16 asked of a GPU without it: one line."""
    assert autocast_dtype(_config(), CPU) is None
    assert "AMP_DTYPE auto uses autocast on CUDA only; --amp bfloat16" in describe(_config(), CPU, None)
    assert autocast_dtype(_config("AMP_DTYPE", "bfloat16"), CPU) == torch.bfloat16
    assert autocast_dtype(_config("AMP_DTYPE", "float16"), CPU) == torch.float16
    assert autocast_dtype(_config("AMP_DTYPE", "off"), CPU) is None
    assert "loss-scaled" in describe(_config("AMP_DTYPE", "float16"), CPU, torch.float16)

    # a GPU, as amp.py sees one (the probes are what a CUDA machine would answer)
    monkeypatch.setattr(amp, "_autocast_works", lambda device, dtype: True)
    monkeypatch.setattr(amp, "_gpu_name", lambda device: "Tesla V100-SXM2-16GB (compute capability 7.0)")
    monkeypatch.setattr(amp, "_cuda_has_bf16", lambda device: True)
    assert autocast_dtype(_config(), CUDA) == torch.bfloat16
    monkeypatch.setattr(amp, "_cuda_has_bf16", lambda device: False)
    assert autocast_dtype(_config(), CUDA) == torch.float16
    assert "AMP_DTYPE auto: Tesla V100-SXM2-16GB (compute capability 7.0) has no bfloat16" in \
        describe(_config(), CUDA, torch.float16)
    with pytest.raises(ConfigError) as e:
        autocast_dtype(_config("AMP_DTYPE", "bfloat16"), CUDA)
    assert str(e.value) == ("--opts: AMP_DTYPE: bfloat16 is not supported by Tesla V100-SXM2-16GB (compute "
                            "capability 7.0); use AMP_DTYPE float16 (loss-scaled) or auto (bfloat16 where "
                            "supported, else float16)")


def test_amp_flags():
    def parse(*flags):
        return config_from_args(main_module.parse_args(["--cfg", QUICK, *flags]))

    assert parse().AMP_DTYPE == parse("--amp").AMP_DTYPE == "auto"
    cfg = parse("--amp", "bfloat16")
    assert (cfg.AMP_DTYPE, source_of(cfg, "AMP_DTYPE")) == ("bfloat16", "--amp")
    assert parse("--no-amp").AMP_DTYPE == "off"
    with pytest.raises(SystemExit) as e:
        main_module.parse_args(["--cfg", QUICK, "--amp", "bf16"])
    assert e.value.code == 2


def test_a_dtype_this_machine_lacks_is_one_line_before_anything_is_written(monkeypatch, capsys, out_dir):
    """fp16 on a CPU where torch has no fp16 autocast, or no GradScaler: exit 2, one line."""
    args = ["--cfg", QUICK, "--output", str(out_dir), "--amp", "float16"]
    monkeypatch.setattr(amp, "_autocast_works", lambda device, dtype: False)
    assert main_module.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: --amp: AMP_DTYPE: float16 autocast does not run on cpu in torch ")
    assert len(err.splitlines()) == 1 and not out_dir.exists()
    monkeypatch.setattr(amp, "_autocast_works", lambda device, dtype: True)
    monkeypatch.setattr(amp, "_grad_scaler_works", lambda device: False)
    assert main_module.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "AMP_DTYPE: float16 needs loss scaling, and torch" in err and "use AMP_DTYPE bfloat16" in err
    assert len(err.splitlines()) == 1 and not out_dir.exists()


def _model_and_batch():
    """The quickstart ViT (AVG_POOL) and one digits-sized batch, repeated as the epoch: with
    lr 0 every step sees the same weights and the same gradient, so norms compare exactly."""
    model = main_module.build_model(_config(*AVG_POOL))
    torch.manual_seed(0)
    return model, (torch.randn(16, 3, 8, 8), torch.arange(16) % 10)


def _train(model, loader, dtype, scaler: LossScaler):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    sched = type("Sched", (), {"step_update": lambda self, step: None})()
    state = TrainState(model=model, wrapped=model, criterion=torch.nn.CrossEntropyLoss(), optimizer=optimizer,
                       scheduler=sched, scaler=scaler, autocast=autocast_factory(dtype, CPU), max_bad_steps=100)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)
    stats, progress = train_one_epoch(state, loader, 0, env, logging.getLogger("quiet"), 1000)
    steps = optimizer.state[next(iter(model.parameters()))].get("step")
    return stats, progress, int(steps) if steps is not None else 0


def test_grad_norm_is_unscaled_and_overflowing_fp16_steps_are_skipped_lowering_the_scale(one_thread):
    """The norm logged under fp16 is the true one (not x65536), under bf16 too; a scale too
    large for fp16 overflows the gradients: those steps are skipped (no optimizer step) and
    each halves the scale until the steps are finite, then training goes on."""
    model, batch = _model_and_batch()
    loader = [batch] * 4
    ref, _, _ = _train(copy.deepcopy(model), loader, None, LossScaler(False, "cpu"))
    bf16, _, _ = _train(copy.deepcopy(model), loader, torch.bfloat16, LossScaler(False, "cpu"))
    scaler = LossScaler(True, "cpu")
    fp16, progress, _ = _train(copy.deepcopy(model), loader, torch.float16, scaler)
    assert progress.skipped == 0 and scaler.scale == 2.0 ** 16
    assert fp16["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-2)
    assert bf16["grad_norm"] == pytest.approx(ref["grad_norm"], rel=3e-2)

    loader = [batch] * 20
    scaler = LossScaler(True, "cpu", init_scale=2.0 ** 30)
    stats, progress, optimizer_steps = _train(copy.deepcopy(model), loader, torch.float16, scaler)
    skipped = progress.skipped
    assert 1 <= skipped < 20 and stats["skipped_steps"] == skipped
    assert scaler.scale == 2.0 ** (30 - skipped)  # halved once per skipped step, never grown
    assert optimizer_steps == 20 - skipped and progress.norm_count == 20 - skipped
    assert stats["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-2)


# ----------------------------------------------------- the numerically delicate paths in float32
DIM, HEADS, GRID = 128, 2, (8, 8)  # ViT-Ti's head width (64) on an 8 x 8 patch grid
# Every registered ViT attention kind (performer_lai past its window: the FAVOR+ far keys),
# every DAT block kind (the deformable one in each version and with the clamp of r < 0).
DAT_CASES = {**{f"dat-{k}": (k, 2, 2.0) for k in DAT_BLOCKS}, "dat-D-v1": ("D", 1, 2.0), "dat-D-clamp": ("D", 2, -1.0)}
LAYERS = [*ATTENTION_KINDS, *DAT_CASES]


def _large_qk_layer(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny layer and its unit-variance input, with q and k of standard deviation 3 (what
    trained weights give; fresh weights hide overflow) and random sampling offsets."""
    torch.manual_seed(0)
    if name in DAT_CASES:
        letter, version, r = DAT_CASES[name]
        layer = DAT_BLOCKS[letter].for_stage(StageArgs(
            q_size=GRID, dim=DIM, heads=HEADS, window_size=4, groups=1, use_pe=True, stride=2,
            offset_range_factor=r, no_off=False, ksize=3, nat_ksize=3, sr_ratio=2, deform_version=version,
            attn_drop=0.0, proj_drop=0.0, na_backend="auto"))
        qk = [getattr(layer, n).weight for n in ("proj_q", "proj_k", "q", "qkv") if hasattr(layer, n)]
        x = torch.randn(2, DIM, *GRID)
    else:
        args = {"schedule": [[0, None]]} if name == "performer_lai" else {}
        layer = ATTENTION_KINDS[name](DIM, HEADS, grid_size=GRID, num_prefix_tokens=1, **args)
        if hasattr(layer, "bind_table"):
            layer.bind_table(RelativePositionTable(layer.num_relations, DIM))
        qk = [layer.qkv.weight[:2 * DIM]] + [getattr(layer, n).weight for n in
                                              ("sampling_offsets", "attention_weights") if hasattr(layer, n)]
        x = torch.randn(2, 1 + GRID[0] * GRID[1], DIM)
    with torch.no_grad():
        for w in qk:
            w.normal_(0.0, 3 * DIM ** -0.5)
    return layer.eval(), x


def _under(dtype, fn, *args):
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        return fn(*args)


def _relative_error(dtype, layer, x) -> float:
    out, ref = (_under(d, layer, x) for d in (dtype, None))
    out, ref = (o[0] if isinstance(o, tuple) else o for o in (out, ref))
    assert torch.isfinite(out).all()
    return float((out.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", LAYERS)
def test_every_attention_kind_under_autocast_is_as_close_as_softmax(name, dtype, one_thread):
    """Under CPU autocast (what a GPU's bf16 / fp16 run computes) with q, k of std 3 each layer
    is finite and within twice the softmax layer's error: the FAVOR+ estimator, the disentangled
    position scores and the sampling positions run in float32: from the same inputs, they give
    exactly the float32 result. DAT's deformable block: within three times, as
    its positions follow q, which autocast rounds as every activation (2.1x under fp16 here;
    a float32 q would need a float32 proj_q, a matmul at a fraction of bf16's rate)."""
    softmax = _relative_error(dtype, *_large_qk_layer("softmax"))
    layer, x = _large_qk_layer(name)
    assert _relative_error(dtype, layer, x) <= (3 if name.startswith("dat-D") else 2) * softmax
    if name in ("dis", "dislai", "performer", "performer_lai", "performer_dis"):  # float32 from its inputs
        q, k, v = (t.detach().to(dtype) for t in layer.qkv_heads(x))
        out32 = _under(None, layer.attend, q.float(), k.float(), v.float())
        assert torch.equal(_under(dtype, layer.attend, q, k, v), out32.to(dtype))
    if name.startswith("dat-D"):
        q = layer.proj_q(x)
        (pos, ref), (pos32, ref32) = (_under(d, layer.sample_positions, q) for d in (dtype, None))
        assert pos.dtype == torch.float32 and torch.equal(pos, pos32) and torch.equal(ref, ref32)
    if name == "deform":
        locations = [_under(d, layer.sampling_locations, x[:, 1:]) for d in (dtype, None)]
        assert torch.equal(*locations)
