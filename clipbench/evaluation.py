"""``evaluate.py``'s work: resolve which models to evaluate, run the task, write the run's metrics."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from clipbench import runs
from clipbench.config import ConfigError

# task.name -> the module whose run(cfg, models, out) does the task; imported only when chosen.
TASKS = {
    "zeroshot": "clipbench.tasks.zeroshot",
    "explain": "clipbench.tasks.explain",
    "explain_eval": "clipbench.tasks.explain_eval",
    "purity": "clipbench.tasks.purity",
    "compare": "clipbench.tasks.compare",
    "prune": "clipbench.tasks.prune",
    "score": "clipbench.tasks.score",
    "misalign": "clipbench.tasks.misalign",
    "sparse": "clipbench.tasks.sparse",
}
CLIPBENCH_CHECKPOINT = "clipbench.models.checkpoint.load_clipbench"


def checkpoint_models(checkpoints: Mapping) -> dict[str, DictConfig]:
    """``task.checkpoints`` as model configs: label -> a train.py checkpoint path, a backbone config
    (with ``_target_``), or a model config (with ``backbone``, e.g. ``+model@task.checkpoints.x=laclip``)."""
    entries = {}
    for label, spec in checkpoints.items():
        if isinstance(spec, DictConfig):
            spec = OmegaConf.to_container(spec, resolve=True)
        if isinstance(spec, str):
            spec = {"backbone": {"_target_": CLIPBENCH_CHECKPOINT, "path": spec}}
        elif isinstance(spec, Mapping) and "_target_" in spec:
            spec = {"backbone": spec}
        elif not (isinstance(spec, Mapping) and "backbone" in spec):
            raise ConfigError(
                f"task.checkpoints.{label}={spec!r} is invalid: expected a checkpoint path, a backbone config "
                "(with _target_) or a model config (with backbone)"
            )
        entries[str(label)] = OmegaConf.create(spec)
    return entries


def model_entries(cfg: DictConfig) -> dict[str, DictConfig]:
    """The models to evaluate, by name: ``task.checkpoints`` or ``task.models`` when the task has
    any, else the one ``model`` (named ``model_name``), where ``ckpt_path`` is shorthand for
    ``model.backbone.path``."""
    if cfg.task.get("checkpoints"):
        if cfg.ckpt_path:
            raise ConfigError("ckpt_path names the single `model`; with task.checkpoints, list every checkpoint there")
        entries = checkpoint_models(cfg.task.checkpoints)
    elif cfg.task.get("models"):
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
    # Before start(), so the saved config holds the checkpoint path; a task that reads no model
    # (uses_models: false) does not need one configured.
    models = model_entries(cfg) if cfg.task.get("uses_models", True) else {}
    out = runs.start(cfg)
    metrics = importlib.import_module(TASKS[cfg.task.name]).run(cfg, models, out)
    if rank_zero_only.rank == 0:  # a task run by DDP ranks (task=score) returns its metrics on rank 0
        runs.write_metrics(out, metrics)
    return metrics
