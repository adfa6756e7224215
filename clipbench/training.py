"""``train.py``'s work: fit a CLIP (from scratch, or fine-tune any source), test it zero-shot, write the run's results."""

from __future__ import annotations

import time

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from clipbench import runs
from clipbench.data.pairs import PairsDataModule
from clipbench.data.with_eval import WithZeroShotEval
from clipbench.hydra_ddp import ddp_job
from clipbench.models.backbone import CLIPBackbone
from clipbench.modules.contrastive import CLIPTrainingModule


def build_module(model_cfg: DictConfig) -> CLIPTrainingModule:
    """The ``model`` config's keys are the module's arguments (a backbone config and optimisation).

    Plain containers, so checkpoints' hyper-parameters load without trusting omegaconf classes.
    """
    return CLIPTrainingModule(**OmegaConf.to_container(model_cfg, resolve=True))


def build_datamodule(cfg: DictConfig, backbone: CLIPBackbone) -> L.LightningDataModule:
    """``data`` for this backbone (image-caption pairs are tokenised by it); with ``eval_data`` (a
    labelled dataset), validation and test run zero-shot on that dataset."""
    options = {"image_spec": backbone.image_spec}
    if issubclass(get_class(cfg.data._target_), PairsDataModule):
        options["tokenize"] = backbone.tokenize
    datamodule = instantiate(cfg.data, _partial_=True)(**options)
    if cfg.get("eval_data"):
        datamodule = WithZeroShotEval(datamodule, instantiate(cfg.eval_data, _partial_=True)(image_spec=backbone.image_spec))
    return datamodule


def train(cfg: DictConfig) -> dict[str, float]:
    out = runs.start(cfg)
    model = build_module(cfg.model)
    datamodule = build_datamodule(cfg, model.backbone)
    datamodule.setup()  # a missing or malformed dataset fails here, before any training
    loggers = runs.instantiate_group(cfg.get("logger"))
    callbacks = runs.instantiate_group(cfg.callbacks)
    if not loggers:  # LearningRateMonitor refuses a trainer without loggers, and would log nowhere
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    with ddp_job(trainer):
        try:
            return _fit_and_test(cfg, out, model, datamodule, trainer)
        finally:
            runs.finish_loggers(trainer)


def _best_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that keeps the best weights by a metric (``callbacks.model_checkpoint``);
    ``trainer.checkpoint_callback`` would be the last-checkpoint callback when that one is switched off."""
    return next((c for c in trainer.checkpoint_callbacks if c.monitor is not None), None)


def _fit_and_test(cfg: DictConfig, out, model: CLIPTrainingModule, datamodule, trainer: L.Trainer) -> dict[str, float]:
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    train_time = time.perf_counter() - started
    # The last epoch's validation metrics, and the best validation score the checkpoint callback saw:
    # what a sweeper may optimise (optimized_metric), never the test split.
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "purity/"))}
    best = _best_checkpoint(trainer)
    if best is not None and best.best_model_score is not None:
        metrics[f"{best.monitor}_best"] = float(best.best_model_score)
    if getattr(datamodule, "class_names", None):  # image-caption pairs without eval_data: nothing to test zero-shot
        # Without a best checkpoint written (no validation ran), the last weights are tested.
        tested = best.best_model_path if cfg.test_ckpt == "best" and best is not None and best.best_model_path else None
        trainer.test(model, datamodule=datamodule, ckpt_path=tested)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    metrics.update(train_time_s=train_time, epochs=trainer.current_epoch, steps=trainer.global_step)
    if trainer.is_global_zero:
        runs.write_metrics(out, metrics)
    return metrics
