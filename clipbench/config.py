"""Start-up checks of a composed config: an impossible value fails before any work, naming its key.

Unknown keys are already rejected by Hydra (the composed config is in struct mode), and unknown
group options (``model=nope``) by Hydra's config search; this module checks *values*.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict


class ConfigError(ValueError):
    """A config value is impossible; the message names the key."""


# (dotted key, predicate, what a valid value is). Keys absent from a config are skipped, so the
# same table serves train.py and evaluate.py.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("model.lr", lambda v: v > 0, "a positive learning rate"),
    ("model.weight_decay", lambda v: v >= 0, "non-negative"),
    ("model.warmup_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("model.trainable", lambda v: v in ("all", "projections"), "'all' or 'projections'"),
    ("model.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("callbacks.ema.decay", lambda v: 0 <= v < 1, "in [0, 1) (1 would never move the average)"),
    ("data.batch_size", lambda v: v > 0, "a positive integer"),
    ("data.eval_batch_size", lambda v: v > 0, "a positive integer"),
    ("data.num_workers", lambda v: v >= 0, "non-negative"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.crop_padding", lambda v: v >= 0, "non-negative"),
    ("data.cs", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ("data.misalign.mode", lambda v: v in ("similarity", "random"), "similarity or random"),
    ("data.misalign.top_k", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    ("model.warmup_epochs", lambda v: v >= 0, "non-negative"),
    ("trainer.max_epochs", lambda v: v == -1 or v > 0, "positive (or -1 for no limit)"),
    ("test_ckpt", lambda v: v in ("best", "last"), "'best' or 'last'"),
    ("task.device", lambda v: v == "auto" or v.split(":")[0] in ("cpu", "cuda", "mps", "xpu"), "auto, cpu, cuda or cuda:<index>"),
    ("task.silhouette_samples", lambda v: v > 1, "an integer above 1"),
]


def _check_combinations(cfg: DictConfig) -> None:
    """Values that are fine alone but impossible together, and paths that must exist."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).expanduser().is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file (train.py writes them under <run dir>/checkpoints/)")
    if OmegaConf.select(cfg, "data.val_fraction", default=None) == 0:
        # Validation then runs on the test split: selecting anything by it selects on the test set.
        if cfg.get("test_ckpt") == "best":
            raise ConfigError(
                "test_ckpt=best with data.val_fraction=0 would pick the tested checkpoint by its test accuracy "
                "(validation runs on the test split): set test_ckpt=last, or hold out data.val_fraction > 0"
            )
        if _optimizing_sweep() and str(cfg.get("optimized_metric") or "").startswith("val/"):
            raise ConfigError(
                f"optimized_metric={cfg.optimized_metric} with data.val_fraction=0 would tune hyper-parameters on the "
                "test split (validation runs on it): hold out data.val_fraction > 0"
            )
    if cfg.get("test_ckpt") == "best" and "callbacks" in cfg and not OmegaConf.select(cfg, "callbacks.model_checkpoint"):
        raise ConfigError("test_ckpt=best needs callbacks.model_checkpoint (it keeps the best weights): set test_ckpt=last")
    if OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False) and OmegaConf.select(cfg, "trainer.accelerator") == "cpu":
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs (SyncBatchNorm is CUDA-only); set trainer.sync_batchnorm=false for DDP on CPUs"
        )
    if OmegaConf.select(cfg, "callbacks.ema", default=None):
        for name in ("model_checkpoint", "last_checkpoint"):
            if OmegaConf.select(cfg, f"callbacks.{name}.save_weights_only", default=False):
                raise ConfigError(
                    f"callbacks.{name}.save_weights_only=true with callbacks.ema would save the raw weights, not the average "
                    "(Lightning writes it from a hook it skips for weights-only files): set it to false"
                )


def _optimizing_sweep() -> bool:
    """Whether this job belongs to a sweep that optimises a metric (Optuna, not a plain grid)."""
    if not HydraConfig.initialized():
        return False
    return "BasicSweeper" not in str(OmegaConf.select(HydraConfig.get(), "sweeper._target_", default=""))


def validate(cfg: DictConfig) -> None:
    _check_combinations(cfg)
    for key, ok, expected in RULES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def check_values(checks: Iterable[tuple[str, Any, bool, str]]) -> None:
    """A task's own value checks, ``(key, value, valid, what a valid value is)``, run at its start:
    the first invalid value fails naming its key."""
    for key, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def take_pairs_input(cfg: DictConfig, what: str) -> None:
    """``task.input`` is shorthand for ``data.input`` (the pairs data module's input); one of them must
    name ``what`` the task reads."""
    if cfg.task.input:
        with open_dict(cfg):
            cfg.data.input = cfg.task.input
    if OmegaConf.is_missing(cfg.data, "input"):
        raise ConfigError(f"task.input (or data.input) must name {what}")
