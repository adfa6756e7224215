"""Lightning callbacks that write a run's tables and figures into its output directory."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMAWeightAveraging
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from clipbench import plots


def log_figure(trainer: L.Trainer, key: str, path: Path) -> None:
    """Send a saved figure to every logger that accepts images (W&B); the CSV logger does not."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path)])


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` for resuming: every ``every_n_epochs`` epochs (0: none during training) or every
    ``every_n_train_steps`` steps, and always once more when training ends, so the file holds the
    final state whatever the interval.

    Lightning's own ``save_last`` writes at the end only when nothing was written before, and then only
    next to a top-k checkpoint; a fast recipe wants one write at the end and nothing per epoch.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_epochs: int = 1,
        every_n_train_steps: int | None = None,
        save_weights_only: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="last",
            enable_version_counter=False,
            save_top_k=1,  # one file, overwritten (no monitor: the newest is kept)
            save_weights_only=save_weights_only,
            every_n_epochs=None if every_n_train_steps else every_n_epochs,
            every_n_train_steps=every_n_train_steps,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # Skipped when the last interval already wrote this very step (or in a fast_dev_run).
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))


class EMAWeightAveraging(LightningEMAWeightAveraging):
    """Lightning's exponential moving average of the weights (``callbacks=ema``), its buffers included
    (``use_buffers``: BatchNorm's running statistics are averaged with the weights they belong to).
    As Lightning documents it: validation swaps the average in, a checkpoint's ``state_dict`` is the
    average (the raw weights beside it, for resuming), and the module holds the average when training
    ends, so the test sees it. Two changes for clipbench's training module:

    - The averaged copy is taken once the module is set up (when training starts, or when a resumed
      run loads its checkpoint), not in the callbacks' ``setup``, which Lightning runs before the
      module's: the module's ``setup`` adds to the model (caption tokens, a text tower sized to the
      compact vocabulary), and Lightning pairs the copy's tensors with the module's by position.
    - A checkpoint loaded outside fitting (``trainer.test(ckpt_path=<best>)``) is tested with its
      averaged weights; Lightning's callback, still holding an average after fitting, would load the
      raw weights over them.

    Lightning writes the average into a checkpoint from the callbacks' checkpoint hook, which it skips
    for weights-only files: a checkpoint callback with ``save_weights_only`` would keep the raw weights
    (refused at start-up, :mod:`clipbench.config`).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Nothing yet: the module is not set up (see :meth:`_copy_set_up_module`)."""

    def _copy_set_up_module(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is None:
            super().setup(trainer, pl_module, "fit")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._copy_set_up_module(trainer, pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # the checkpoint's state_dict, already loaded, is the average
        self._copy_set_up_module(trainer, pl_module)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)


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
