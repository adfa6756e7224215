"""End-to-end training through the real configs: accuracy, outputs, experiments, resume, sweeps."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import CIFAR10, ROOT, compose_config, run_script

from clipbench.training import train

FAST = ["logger=none", "trainer.enable_progress_bar=false"]


def test_quickstart_digits_reaches_zero_shot_accuracy(tmp_path, cache_dir):
    cfg = compose_config("train", ["experiment=quickstart", "trainer.max_epochs=8", *FAST], tmp_path, cache_dir)
    metrics = train(cfg)
    assert metrics["test/acc1"] >= 0.90, metrics
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test/acc1"] == pytest.approx(metrics["test/acc1"])
    assert {"test/acc1", "test/acc5", "train_time_s"} <= written.keys()
    epochs = pd.read_csv(tmp_path / "epochs.csv")
    assert list(epochs["epoch"]) == list(range(8))
    assert epochs["val/acc1"].iloc[-1] > epochs["val/acc1"].iloc[0]
    for figure in ("training_curves.png", "predictions.png"):
        assert (tmp_path / figure).stat().st_size > 10_000
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == metrics["steps"]  # refreshed every epoch, not only on a new best
    assert any(p.name.startswith("best-") for p in (tmp_path / "checkpoints").iterdir())
    assert (tmp_path / "config.yaml").is_file()


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_runs_a_fast_dev_run(experiment, tmp_path, cache_dir):
    overrides = [f"experiment={experiment}", "trainer.fast_dev_run=true", "trainer.accelerator=cpu", "trainer.precision=32-true", *FAST]
    cfg = compose_config("train", overrides, tmp_path, cache_dir)
    if cfg.data.name == "cifar10":
        if not CIFAR10.is_dir():
            pytest.skip(f"no CIFAR-10 copy at {CIFAR10}")
        cfg.data.root = str(CIFAR10)
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc1"] <= 1.0
    assert metrics["steps"] == 1


def test_resume_continues_the_step_count(tmp_path, cache_dir):
    base = ["experiment=quickstart", "data=synthetic", *FAST]
    first = train(compose_config("train", [*base, "trainer.max_epochs=1"], tmp_path / "a", cache_dir))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    second = train(compose_config("train", [*base, "trainer.max_epochs=2", f"ckpt_path={ckpt}"], tmp_path / "b", cache_dir))
    assert first["steps"] > 0
    assert second["steps"] == 2 * first["steps"]
    assert list(pd.read_csv(tmp_path / "b" / "epochs.csv")["epoch"]) == [1]  # only the new epoch ran
    restored = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert restored["global_step"] == second["steps"]


def test_multirun_sweep_writes_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py",
        "-m",
        "experiment=quickstart",
        "data=synthetic",
        "trainer.fast_dev_run=true",
        "logger=none",
        "model.lr=1e-3,2e-3",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["model.lr"]) == [1e-3, 2e-3]
    assert summary["test/acc1"].between(0, 1).all()
    assert (sweep / "summary.png").is_file()


def test_wandb_logger_runs_offline_and_logs_figures(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config(
        "train",
        ["experiment=quickstart", "data=synthetic", "trainer.max_epochs=1", "logger=wandb", "logger.wandb.name=test"],
        tmp_path,
        cache_dir,
    )
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = [p.name for p in runs[0].rglob("*.png")]
    assert any(name.startswith("training_curves") for name in media), media
    assert any(name.startswith("predictions") for name in media), media
