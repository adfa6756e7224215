"""What every entry point does around its task: check the config, build loggers and callbacks, and
write the run's results into its output directory."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from clipbench.config import ConfigError, validate

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def compose_config(name: str, overrides: list[str], output_dir: str | Path, cache_dir: str | Path, keep_hydra: bool = False) -> DictConfig:
    """The config ``<name>.py`` would run with these overrides, outside a Hydra run (tests,
    benchmarks, notebooks), writing into ``output_dir``. The ``paths`` keys that read Hydra's
    runtime are pinned; Hydra's own node is registered (``${hydra:...}`` keys resolve) and removed,
    unless ``keep_hydra`` (to inspect the launcher or sweeper a run would use).
    """
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO_ROOT)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
        if not keep_hydra:
            del cfg["hydra"]
    return cfg


def start(cfg: DictConfig) -> Path:
    """Check the config, seed everything, save the resolved config; returns the output directory."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    log.info("%s run (seed %s) writing to %s", cfg.task_name, cfg.seed, out)
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


def optimized_metric(cfg: DictConfig, metrics: Mapping[str, float]) -> float | None:
    """The value a Hydra sweeper optimises (``optimized_metric``; None when unset). A key the run did
    not produce fails a sweep's job, naming it and the keys it did produce; a single run only warns."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if key not in metrics:
        message = f"optimized_metric={key!r} is not among this run's metrics: {sorted(metrics)}"
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise ConfigError(message)
        log.warning(message)
        return None
    return float(metrics[key])


def finish_loggers(trainer: L.Trainer | None) -> None:
    """Close the W&B run so the next job of a multirun starts a new one (lightning-hydra-template's
    ``wandb.finish()`` after each job)."""
    if trainer is not None and any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()
