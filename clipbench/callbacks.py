"""Lightning callbacks that write a run's tables and figures into its output directory."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pandas as pd
from lightning.pytorch.utilities import rank_zero_only

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
        self.rows.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.rows).to_csv(self.output_dir / "epochs.csv", index=False)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rows:
            path = plots.training_curves(pd.DataFrame(self.rows), self.output_dir / "training_curves.png")
            log_figure(trainer, "training_curves", path)


class PredictionGrid(L.Callback):
    """Images of the first test batch titled with their true and zero-shot predicted class."""

    def __init__(self, output_dir: str, samples: int = 25) -> None:
        self.output_dir, self.samples = Path(output_dir), samples

    @rank_zero_only
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0:
            return
        images, labels = batch[0][: self.samples].float(), batch[1][: self.samples]
        spec = pl_module.backbone.image_spec
        names = pl_module.class_names
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = plots.prediction_grid(
            spec.denormalize_batch(images),
            [names[i] for i in labels.tolist()],
            [names[i] for i in outputs[: self.samples].tolist()],
            self.output_dir / "predictions.png",
        )
        log_figure(trainer, "predictions", path)
