"""What every entry point does around its task: check the config, build loggers and callbacks, and
write the run's results into its output directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clipbench.config import validate

log = logging.getLogger(__name__)


def start(cfg: DictConfig) -> Path:
    """Check the config, seed everything, save the resolved config; returns the output directory."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return out


def instantiate_group(node: DictConfig | None) -> list[Any]:
    """Each ``_target_`` entry of a config group (callbacks, loggers) instantiated, in order."""
    if not node:
        return []
    return [instantiate(entry) for entry in node.values() if isinstance(entry, Mapping) and "_target_" in entry]


def write_metrics(out: Path, metrics: Mapping[str, Any]) -> Path:
    """``metrics.json``: flat keys (``test/acc1``), plain floats."""
    flat = {k: float(v) for k, v in metrics.items()}
    path = out / "metrics.json"
    path.write_text(json.dumps(flat, indent=2, sort_keys=True))
    log.info("metrics: %s", json.dumps(flat, sort_keys=True))
    return path


def finish_loggers(trainer: L.Trainer | None) -> None:
    """Close W&B runs so the next job of a multirun starts a new one."""
    if trainer is None:
        return
    for logger in trainer.loggers:
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()
