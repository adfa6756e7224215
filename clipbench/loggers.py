"""Logger factories that need more than a class name in the config."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger


def _logged_in() -> bool:
    """True when W&B credentials exist (env var or ~/.netrc), so runs can go online."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(project: str, save_dir: str, name: str | None = None, group: str | None = None, tags: list | None = None) -> WandbLogger:
    """W&B logger: offline unless logged in (or WANDB_MODE says otherwise); multirun jobs share a
    group named after the sweep directory so the dashboard shows a sweep together."""
    if group is None and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = Path(HydraConfig.get().sweep.dir).name
    offline = os.environ.get("WANDB_MODE", "offline" if not _logged_in() else "online") == "offline"
    return WandbLogger(
        project=project, save_dir=save_dir, name=name or None, group=group, tags=list(tags or []), offline=offline, log_model=False
    )
