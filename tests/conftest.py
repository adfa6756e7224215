"""Shared test helpers: compose the real Hydra configs outside a Hydra run, with explicit paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decode cache for the whole session (CIFAR-10 is decoded at most once)."""
    return tmp_path_factory.mktemp("cache")


def compose_config(name: str, overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """The config ``<name>.py`` would run with these overrides, writing into ``output_dir``."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
        del cfg["hydra"]
    return cfg


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run an entry point as a user would (fresh interpreter), capturing its output."""
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)
