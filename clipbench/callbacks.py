"""Lightning callbacks that write a run's tables and figures into its output directory."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from clipbench import plots


def log_figure(trainer: L.Trainer, key: str, path: Path) -> None:
    """Send a saved figure to every logger that accepts images (W&B); the CSV logger does not."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path)])


class EpochHistory(L.Callback):
    """One row per epoch of the epoch-level metrics (``epochs.csv``, rewritten each epoch so a killed
    run keeps what it had) and the training-curve figure at the end of fitting."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.rows: list[dict] = []

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logged = trainer.callback_metrics
        # A metric logged per step and per epoch appears as k, k_step and k_epoch: keep k_epoch.
        metrics = {k: float(v) for k, v in logged.items() if not k.endswith("_step") and f"{k}_epoch" not in logged}
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        self.rows.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics, "train/lr": lr})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.rows).to_csv(self.output_dir / "epochs.csv", index=False)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rows:
            path = plots.training_curves(pd.DataFrame(self.rows), self.output_dir / "training_curves.png")
            log_figure(trainer, "training_curves", path)


class PredictionGrid(L.Callback):
    """Test images titled with their true and zero-shot predicted class, spread across the classes.

    Test batches come in dataset order, and a class-sorted folder tree's first batch is all one
    class, so up to ``ceil(samples / classes)`` images of each class are kept from whichever batches
    hold them (a few images on the CPU, never the whole split) and drawn at the end of the test.
    """

    def __init__(self, output_dir: str, samples: int = 25) -> None:
        self.output_dir, self.samples = Path(output_dir), samples
        self.kept: dict[int, list[tuple[Tensor, int, int]]] = {}  # class -> (image, label, predicted)

    @rank_zero_only
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.kept = {}

    @rank_zero_only
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        per_class = math.ceil(self.samples / max(1, len(pl_module.class_names)))
        images, labels = batch
        for label in labels.unique().tolist():
            room = per_class - len(self.kept.setdefault(label, []))
            rows = (labels == label).nonzero().flatten()[: max(room, 0)]
            self.kept[label] += [(images[i].float().cpu(), label, int(outputs[i])) for i in rows.tolist()]

    @rank_zero_only
    def on_test_end(self, trainer, pl_module) -> None:
        # Round-robin over the classes, so the grid shows as many classes as it has cells.
        rounds = itertools.zip_longest(*self.kept.values())
        chosen = [sample for samples in rounds for sample in samples if sample is not None][: self.samples]
        if not chosen:
            return
        images, labels, predicted = zip(*chosen, strict=True)
        names = pl_module.class_names
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = plots.prediction_grid(
            pl_module.backbone.image_spec.denormalize_batch(torch.stack(images)),
            [names[i] for i in labels],
            [names[i] for i in predicted],
            self.output_dir / "predictions.png",
        )
        log_figure(trainer, "predictions", path)
