"""Two CPU processes (gloo) on half-batches give the loss and gradients of one process on the
whole global batch: features are gathered across ranks with their gradients."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from conftest import compose_config, run_script

from clipbench.data.datamodule import CLIPDataModule
from clipbench.training import build_module

GLOBAL_BATCH = 32


class FirstStepRecorder(L.Callback):
    """Saves, per rank, the first step's loss and the gradients as the optimiser will see them."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        loss = trainer.callback_metrics["train/loss_step"].item()
        torch.save({"loss": loss, "grads": grads}, self.out / f"rank{trainer.global_rank}.pt")


@pytest.fixture
def restored_environ():
    """DDP launchers export MASTER_PORT and friends into this (pytest's) process: undo that, so
    later tests and the processes they start do not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _first_step(cfg, devices: int, out: Path) -> list[dict]:
    out.mkdir(parents=True)
    L.seed_everything(0)
    model = build_module(cfg.model)
    datamodule = CLIPDataModule(
        "synthetic",
        model.backbone.image_spec,
        batch_size=GLOBAL_BATCH // devices,
        val_fraction=0.0,
        crop_padding=0,
        hflip=False,
        synthetic_samples=64,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1,
        log_every_n_steps=1,  # the step loss is logged on the loggers' steps only
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FirstStepRecorder(out)],
    )
    trainer.fit(model, datamodule=datamodule)
    return [torch.load(out / f"rank{r}.pt") for r in range(devices)]


def test_two_process_ddp_equals_one_process_on_the_global_batch(tmp_path, cache_dir, restored_environ):
    # LayerNorm-only ViT (BatchNorm statistics are per rank unless trainer.sync_batchnorm), one
    # template so that captions follow from labels, no augmentation: the data are the same.
    cfg = compose_config(
        "train",
        [
            "model=clip_vit",
            "model.train_templates=single",
            "model.backbone.embed_dim=32",
            "model.backbone.text_width=32",
            "model.backbone.text_layers=1",
            "model.backbone.text_heads=2",
            "model.backbone.image_tower.width=32",
            "model.backbone.image_tower.layers=1",
            "model.backbone.image_tower.heads=2",
            # This model's numbers as measured before the compact vocabulary: that one agrees as well (same loss), but its
            # random text tower has one gradient element 0.2% past atol, from float32 cancellation (tests/test_vocabulary.py
            # checks that the tower it builds at set-up does not depend on the generator's state then, as DDP needs).
            "model.backbone.vocabulary=null",
        ],
        tmp_path,
        cache_dir,
    )
    (single,) = _first_step(cfg, 1, tmp_path / "single")
    ranks = _first_step(cfg, 2, tmp_path / "ddp")
    for rank in ranks:
        assert abs(rank["loss"] - single["loss"]) < 1e-5
        assert rank["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="job 0 fails on purpose: SyncBatchNorm needs GPUs")
def test_ddp_inside_a_multirun_runs_every_job_once_and_survives_a_failed_job(tmp_path):
    """Each job's extra rank runs that job only, in that job's directory; a job that fails after its
    ranks started stops them, and the next job's DDP starts afresh (Lightning's launcher would
    otherwise restart the sweep in every rank, hang, or be killed by its own watchdog)."""
    sweep = tmp_path / "sweep"
    # The sweep's primary config comes from -cd/-cn: each job's extra rank must compose it too.
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "ddp_check.yaml").write_text("defaults:\n  - train\n  - _self_\ntask_name: ddp_cn_check\n")
    result = run_script(
        "train.py",
        "-m",
        "-cd",
        str(tmp_path / "extra"),
        "-cn",
        "ddp_check",
        "experiment=quickstart",
        "data=synthetic",
        "trainer=ddp",
        "trainer.accelerator=auto",
        "trainer.max_epochs=1",
        "logger=none",
        "trainer.sync_batchnorm=true,false",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert result.returncode != 0  # Hydra reports the failed job at the end of the sweep
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]  # no stray sweep of a child
    assert (sweep / "1" / "metrics.json").is_file()
    rank1_log = (sweep / "1" / "train_ddp_process_1.log").read_text()  # rank 1 ran inside the job's directory
    assert "ddp_cn_check run" in rank1_log  # with the job's primary config
    summary = pd.read_csv(sweep / "summary.csv")
    assert list(summary["status"]) == ["failed", "ok"]
    assert "SyncBatchNorm" in summary["error"].iloc[0]
    assert summary["test/acc1"].iloc[1] == pytest.approx(json.loads((sweep / "1" / "metrics.json").read_text())["test/acc1"])
    assert not (tmp_path / "outputs").exists()
