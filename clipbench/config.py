"""Start-up checks of a composed config: an impossible value fails before any work, naming its key.

Unknown keys are already rejected by Hydra (the composed config is in struct mode), and unknown
group options (``model=nope``) by Hydra's config search; this module checks *values*.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


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
    ("data.batch_size", lambda v: v > 0, "a positive integer"),
    ("data.eval_batch_size", lambda v: v > 0, "a positive integer"),
    ("data.num_workers", lambda v: v >= 0, "non-negative"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.crop_padding", lambda v: v >= 0, "non-negative"),
    ("trainer.max_epochs", lambda v: v == -1 or v > 0, "positive (or -1 for no limit)"),
    ("test_ckpt", lambda v: v in ("best", "last"), "'best' or 'last'"),
    ("task.precision", lambda v: v in ("auto", "bf16", "fp16", "fp32"), "auto, bf16, fp16 or fp32"),
    ("task.device", lambda v: v == "auto" or v.split(":")[0] in ("cpu", "cuda", "mps", "xpu"), "auto, cpu, cuda or cuda:<index>"),
    ("task.silhouette_samples", lambda v: v > 1, "an integer above 1"),
]


def _check_combinations(cfg: DictConfig) -> None:
    """Values that are fine alone but impossible together, and paths that must exist."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).expanduser().is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file (train.py writes them under <run dir>/checkpoints/)")
    if OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False) and OmegaConf.select(cfg, "trainer.accelerator") == "cpu":
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs (SyncBatchNorm is CUDA-only); set trainer.sync_batchnorm=false for DDP on CPUs"
        )


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
