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
