"""``train.py``'s work: fit a CLIP from scratch, test it zero-shot, write the run's results."""

from __future__ import annotations

import time

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clipbench import runs
from clipbench.hydra_ddp import ddp_job
from clipbench.modules.contrastive import CLIPTrainingModule


def build_module(model_cfg: DictConfig) -> CLIPTrainingModule:
    """The ``model`` config's keys are the module's arguments (a backbone config and optimisation).

    Plain containers, so checkpoints' hyper-parameters load without trusting omegaconf classes.
    """
    return CLIPTrainingModule(**OmegaConf.to_container(model_cfg, resolve=True))


def train(cfg: DictConfig) -> dict[str, float]:
    out = runs.start(cfg)
    model = build_module(cfg.model)
    datamodule = instantiate(cfg.data, _partial_=True)(image_spec=model.backbone.image_spec)
    datamodule.setup()  # a missing or malformed dataset fails here, before any training
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=runs.instantiate_group(cfg.callbacks), logger=runs.instantiate_group(cfg.get("logger")) or False
    )
    with ddp_job(trainer):
        try:
            return _fit_and_test(cfg, out, model, datamodule, trainer)
        finally:
            runs.finish_loggers(trainer)


def _fit_and_test(cfg: DictConfig, out, model: CLIPTrainingModule, datamodule, trainer: L.Trainer) -> dict[str, float]:
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    train_time = time.perf_counter() - started
    has_best = trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path
    trainer.test(model, datamodule=datamodule, ckpt_path="best" if cfg.test_ckpt == "best" and has_best else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics.update(train_time_s=train_time, epochs=trainer.current_epoch, steps=trainer.global_step)
    if trainer.is_global_zero:
        runs.write_metrics(out, metrics)
    return metrics
