"""``evaluate.py``'s work: resolve which models to evaluate, run the task, write the run's metrics."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig, OmegaConf

from clipbench import runs
from clipbench.config import ConfigError

# task.name -> the module whose run(cfg, models, out) does the task; imported only when chosen.
TASKS = {"zeroshot": "clipbench.tasks.zeroshot"}
CLIPBENCH_CHECKPOINT = "clipbench.models.checkpoint.load_clipbench"


def model_entries(cfg: DictConfig) -> dict[str, DictConfig]:
    """The models to evaluate, by name: ``task.models`` when it has any, else the one ``model``
    (named ``model_name``), where ``ckpt_path`` is shorthand for ``model.backbone.path``."""
    if cfg.task.get("models"):
        if cfg.ckpt_path:
            raise ConfigError("ckpt_path names the single `model`; with task.models, set task.models.<name>.backbone.path instead")
        entries = dict(cfg.task.models)
    else:
        if cfg.ckpt_path:
            if cfg.model.backbone.get("_target_") != CLIPBENCH_CHECKPOINT:
                raise ConfigError(f"ckpt_path={cfg.ckpt_path} is shorthand for model=clipbench, but model={cfg.model_name}")
            cfg.model.backbone.path = cfg.ckpt_path
        entries = {cfg.model_name: cfg.model}
    missing = sorted(key for model in entries.values() for key in OmegaConf.missing_keys(model))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set (for a train.py checkpoint: ckpt_path=<path to .ckpt>)")
    return entries


def evaluate(cfg: DictConfig) -> dict[str, float]:
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is unknown; choose one of {sorted(TASKS)}")
    models = model_entries(cfg)  # before start(), so the saved config holds the checkpoint path
    out = runs.start(cfg)
    metrics = importlib.import_module(TASKS[cfg.task.name]).run(cfg, models, out)
    runs.write_metrics(out, metrics)
    return metrics
