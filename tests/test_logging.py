"""What a run records: TensorBoard and wandb under the same tags, wandb offline without a key, and
the curves plot."""
from __future__ import annotations

import json
import logging
import os
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from config import ConfigError, load_config
from logger import MetricsWriter

from tests.conftest import FAST, QUICK, RUN, main_here, records, run_cmd, run_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each



@pytest.mark.slow
def test_wandb_without_api_key_logs_offline_and_never_stops_the_run(out_dir):
    env = {"WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    result = run_main("--cfg", QUICK, "--output", str(out_dir), "--tag", "wb", "--opts",
                      "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "WANDB.ENABLED", "True", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb: logging offline" in result.stdout or "wandb disabled" in result.stdout
    assert (out_dir / RUN / "wb" / "metrics.jsonl").exists()


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_step_and_every_epoch(tmp_path, capsys):
    result = main_here(capsys, "--cfg", QUICK, "--output", str(tmp_path), "--tag", "tb", "--opts", *FAST,
                      "TENSORBOARD.ENABLED", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "vit_tiny_patch2_32" / "tb"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    found = scalars(run / "tensorboard")
    for tag in ("step/loss", "step/lr", "step/grad_norm"):
        assert [step for step, _ in found[tag]] == list(range(88)), tag  # 44 steps x 2 epochs
    assert found["step/lr"][0][1] == pytest.approx(1e-5)  # the warmup start lr, used by step 0
    for epoch, record in enumerate(records):
        norms = [v for s, v in found["step/grad_norm"] if epoch * 44 <= s < (epoch + 1) * 44]
        assert sum(norms) / len(norms) == pytest.approx(record["grad_norm"], rel=1e-5)
    for key in ("train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "grad_norm", "max_acc1"):
        assert [step for step, _ in found[f"epoch/{key}"]] == [0, 1]
        assert [v for _, v in found[f"epoch/{key}"]] == pytest.approx([r[key] for r in records], rel=1e-5)


class _FakeWandb:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, values: dict) -> None:
        self.logged.append(values)

    def finish(self) -> None:
        pass


def test_wandb_gets_the_tags_tensorboard_gets(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setattr(MetricsWriter, "_start_wandb", lambda self, config, output_dir: fake)
    config = load_config(QUICK, ["WANDB.ENABLED", "True", "TENSORBOARD.ENABLED", "True"])
    writer = MetricsWriter(config, str(tmp_path), logging.getLogger("test"), enabled=True)
    for step in range(3):
        writer.write_step(step, {"loss": 2.0 - step, "lr": 1e-3, "grad_norm": 0.5})
    writer.write({"epoch": 0, "train_loss": 1.5, "val_acc1": 42.0, "skipped_steps": 0})
    writer.close()
    tb = scalars(tmp_path / "tensorboard")
    wandb_tags = {key for values in fake.logged for key in values} - {"global_step", "epoch"}
    assert wandb_tags == set(tb) == {"step/loss", "step/lr", "step/grad_norm", "epoch/train_loss",
                                     "epoch/val_acc1", "epoch/skipped_steps"}
    assert fake.logged[1] == {"step/loss": 1.0, "step/lr": 1e-3, "step/grad_norm": 0.5, "global_step": 1}
    assert fake.logged[3]["epoch"] == 0 and fake.logged[3]["epoch/val_acc1"] == 42.0
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    silent = MetricsWriter(config, str(tmp_path / "rank1"), logging.getLogger("test"), enabled=False)
    silent.write_step(0, {"loss": 1.0})  # other ranks write nothing
    assert not (tmp_path / "rank1").exists()


def test_a_resumed_run_logs_no_step_or_epoch_twice(tmp_path, monkeypatch):
    """Killed (kill -9) in epoch 1 after epoch 0's line and steps up to 12 (10 a epoch) were
    logged, resumed from epoch 0's checkpoint at step 7: metrics.jsonl, TensorBoard and wandb
    (the folder's run resumed, holding what the killed process gave it) each hold every
    step and epoch once, the resumed run's values where both ran."""
    fake = _FakeWandb()
    monkeypatch.setattr(MetricsWriter, "_start_wandb", lambda self, config, output_dir: fake)
    config = load_config(QUICK, ["WANDB.ENABLED", "True", "TENSORBOARD.ENABLED", "True"])
    first = MetricsWriter(config, str(tmp_path), logging.getLogger("test"), enabled=True)
    for step in range(13):
        first.write_step(step, {"loss": 1.0})
        if step == 9:
            first.write({"epoch": 0, "val_acc1": 1.0})
    first.tensorboard.flush()  # kill -9: no close
    fake.resumed, fake.summary = True, {"global_step": 12, "epoch": 0}
    again = MetricsWriter(config, str(tmp_path), logging.getLogger("test"), enabled=True, resume_step=7)
    for step in range(7, 20):
        again.write_step(step, {"loss": 2.0})
        if step % 10 == 9:
            again.write({"epoch": step // 10, "val_acc1": 2.0})
    again.close()
    assert [(r["epoch"], r["val_acc1"]) for r in records(tmp_path)] == [(0, 2.0), (1, 2.0)]
    tb = scalars(tmp_path / "tensorboard")
    assert tb["step/loss"] == [(s, 1.0 if s < 7 else 2.0) for s in range(20)]
    assert [step for step, _ in tb["epoch/val_acc1"]] == [0, 1]
    logged = [(k, v[k]) for v in fake.logged for k in ("global_step", "epoch") if k in v]
    assert logged == [*(("global_step", s) for s in range(10)), ("epoch", 0), *(("global_step", s) for s in range(10, 20)),
                      ("epoch", 1)]


def test_tensorboard_without_its_package_is_a_config_error(monkeypatch):
    import config as config_module
    real = config_module.importlib.util.find_spec
    monkeypatch.setattr(config_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="TENSORBOARD.ENABLED: needs the tensorboard package"):
        load_config(QUICK, ["TENSORBOARD.ENABLED", "True"])


def _metrics(path, epochs: int, acc: float) -> str:
    path.parent.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "train_loss": 2.0 / (e + 1), "val_loss": 2.1 / (e + 1),
                         "val_acc1": acc + e, "lr": 1e-3}) for e in range(epochs)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_plot_curves_labels_overlaid_runs_by_what_tells_them_apart(tmp_path):
    """Runs with the same tag under different models are told apart by their model folder;
    a unique tag is enough on its own; --labels names them explicitly."""
    sys.path.insert(0, "tools")
    try:
        import plot_curves
    finally:
        sys.path.remove("tools")
    paths = [_metrics(tmp_path / "output" / "vit_a" / "default" / "metrics.jsonl", 3, 50.0),
             _metrics(tmp_path / "output" / "vit_b" / "default" / "metrics.jsonl", 4, 60.0),
             _metrics(tmp_path / "output" / "vit_b" / "long" / "metrics.jsonl", 5, 70.0)]
    assert plot_curves.run_labels(paths) == ["vit_a/default", "vit_b/default", "long"]
    assert plot_curves.run_labels(paths[:1]) == ["default"]
    out = tmp_path / "overlay.png"
    assert plot_curves.plot(paths, str(out)) == ["vit_a/default", "vit_b/default", "long"]
    assert out.stat().st_size > 10_000
    folders = [os.path.dirname(p) for p in paths]  # a run folder stands for its metrics.jsonl
    cli = run_cmd([sys.executable, "tools/plot_curves.py", *folders, "-o", str(tmp_path / "named.png"),
                   "--labels", "A", "B", "C"])
    assert cli.returncode == 0 and (tmp_path / "named.png").exists(), cli.stderr
    wrong = run_cmd([sys.executable, "tools/plot_curves.py", *paths, "--labels", "A"])
    assert wrong.returncode == 2 and "--labels: 1 label(s) for 3 metrics file(s)" in wrong.stderr
