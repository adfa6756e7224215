"""End-to-end training through the real configs: accuracy, outputs, experiments, resume, sweeps."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import CIFAR10, ROOT, compose_config, run_script
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from clipbench.losses import clip_loss
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


# Every experiment is composed and instantiated by tests/test_configs.py; running one step of the CIFAR
# ones decodes all of CIFAR-10 first (minutes on 2 cores), so those runs are in the slow set.
EXPERIMENTS = [
    pytest.param(name, marks=pytest.mark.slow) if name.startswith("cifar") else name
    for name in sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_runs_a_fast_dev_run(experiment, tmp_path, cache_dir):
    overrides = [f"experiment={experiment}", "trainer.fast_dev_run=true", "trainer.accelerator=cpu", "trainer.precision=32-true", *FAST]
    cfg = compose_config("train", overrides, tmp_path, cache_dir)
    if OmegaConf.missing_keys(cfg):  # e.g. misalign: the user's pairs and model (tests/test_misalign.py runs it)
        pytest.skip(f"experiment={experiment} needs {sorted(OmegaConf.missing_keys(cfg))}")
    if cfg.data.name == "cifar10":
        if not CIFAR10.is_dir():
            pytest.skip(f"no CIFAR-10 copy at {CIFAR10}")
        cfg.data.root = str(CIFAR10)
    metrics = train(cfg)
    assert metrics["steps"] == 1
    # One test batch: the accuracy counts whole images of it (a metric averaged over batches or
    # ranks the wrong way would not).
    batch = min(cfg.data.eval_batch_size, 360 if cfg.data.name == "digits" else 10_000)
    assert metrics["test/acc1"] * batch == pytest.approx(round(metrics["test/acc1"] * batch), abs=1e-3)


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
    for _, row in summary.iterrows():  # each row is its job's metrics
        job = json.loads((sweep / str(row["job"]) / "metrics.json").read_text())
        assert row["test/acc1"] == pytest.approx(job["test/acc1"]) and row["val/acc1"] == pytest.approx(job["val/acc1"])
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


SMALL = [
    "experiment=quickstart",
    "model.backbone.embed_dim=64",
    "model.backbone.text_width=64",
    "model.backbone.text_layers=1",
    "model.backbone.image_tower.widths=[16,32,64]",
    "trainer.max_epochs=6",
    "~callbacks.prediction_grid",
    *FAST,
]


class LossProbe(Callback):
    """Recomputes the first training batch's loss both ways (same-class positives, or CLIP's one
    positive) with the weights and template draw the step uses, to compare with the loss it returned."""

    last: LossProbe | None = None  # train() builds its callbacks from the config: the test finds it here

    def __init__(self) -> None:
        LossProbe.last = self

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            images, labels = batch
            state = module._template_rng.get_state()  # the step's draw, then the generator put back
            template = torch.randint(len(module.train_templates), labels.shape, generator=module._template_rng)
            module._template_rng.set_state(state)
            with torch.no_grad():
                image = F.normalize(module.backbone.encode_image(images), dim=-1)
                text = F.normalize(module._caption_features(template * len(module.class_names) + labels), dim=-1)
                scale = module.backbone.similarity_scale()
                self.expected = {"same_class": clip_loss(image, text, scale, labels), "one_positive": clip_loss(image, text, scale)}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self.returned = outputs["loss"].detach()


@pytest.mark.parametrize(("positives", "loss"), [("true", "same_class"), ("false", "one_positive")])
def test_same_class_positives_choose_the_loss_training_uses(positives, loss, tmp_path, cache_dir):
    """model.same_class_positives reaches the training step: the loss it returns is the one the flag
    names (same-class captions as positives, or as negatives like CLIP's)."""
    # Several templates: with one, same-class captions are identical and both losses coincide exactly.
    overrides = [*SMALL, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", f"model.same_class_positives={positives}"]
    train(compose_config("train", [*overrides, f"+callbacks.loss_probe._target_={__name__}.LossProbe"], tmp_path, cache_dir))
    probe = LossProbe.last
    assert abs(probe.expected["same_class"] - probe.expected["one_positive"]) > 1e-3  # the batch tells them apart
    torch.testing.assert_close(probe.returned, probe.expected[loss], rtol=1e-5, atol=1e-5)


def test_dataloader_path_trains_like_the_on_device_path(tmp_path, cache_dir):
    """data.on_device=false: per-image transforms in a DataLoader (workers, as for datasets too large to
    hold on the device) instead of batches kept on the device."""
    metrics = train(compose_config("train", [*SMALL, "data.on_device=false", "data.num_workers=1"], tmp_path, cache_dir))
    assert metrics["test/acc1"] >= 0.6, metrics


@pytest.mark.slow  # torch.compile's first compilation of forward and backward takes minutes on 2 CPU cores
def test_compiled_training_step_learns(tmp_path, cache_dir):
    metrics = train(compose_config("train", [*SMALL, "model.compile=true"], tmp_path, cache_dir))
    assert metrics["test/acc1"] >= 0.6, metrics
