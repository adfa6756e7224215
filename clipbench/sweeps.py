"""Sweep summaries: after a Hydra multirun, one table and one plot at the sweep directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from clipbench import plots

log = logging.getLogger(__name__)


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per job: its command-line overrides and its final metrics (``metrics.json``)."""
    rows = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        job_dir = metrics_file.parent
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        params = dict(o.split("=", 1) for o in overrides if "=" in o)
        rows.append({"job": job_dir.name, **{k: _number(v) for k, v in params.items()}, **json.loads(metrics_file.read_text())})
    return pd.DataFrame(rows)


def _number(text: str) -> Any:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


class SweepSummary(Callback):
    """Hydra callback: writes ``summary.csv`` and ``summary.png`` when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = collect(sweep_dir)
        if summary.empty:
            log.warning("no job of the sweep at %s wrote metrics.json; no summary", sweep_dir)
            return
        summary.to_csv(sweep_dir / "summary.csv", index=False)
        swept = [c for c in summary.columns if c != "job" and "/" not in c and summary[c].nunique() > 1]
        metrics = [c for c in summary.columns if c.startswith("test/")] or [c for c in summary.columns if "/" in c]
        if swept and metrics:
            plots.sweep_plot(summary, swept[0], metrics, sweep_dir / "summary.png")
        log.info("sweep summary: %s\n%s", sweep_dir / "summary.csv", summary.to_string(index=False))
