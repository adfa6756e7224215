"""Sweep summaries: after each job of a Hydra multirun, one table and one plot at the sweep directory.

Written after every job rather than once at the end: Hydra re-raises a failed job's error before
its end-of-sweep hook, so a summary written only there would be lost with one bad job. A failed
job gets a row too, with its error, and the sweep's other jobs still count.

A task or experiment whose sweep deserves its own tables and plots (accuracy against lambda, purity
against Cs, ...) names a function in the config key ``sweep_summary`` (a dotted path; evaluate.py
takes it from ``task.sweep_summary``). It is called as ``fn(sweep_dir, summary)`` after the generic
summary, with the rows of every job so far, and writes its files into ``sweep_dir``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:  # pandas and the plots (matplotlib) load in a multirun only: Hydra builds this callback for every run
    import pandas as pd

log = logging.getLogger(__name__)
ERROR_FILE = "error.txt"


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per finished job: its command-line overrides, status, and final metrics or error."""
    import pandas as pd

    rows = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        metrics, error = job_dir / "metrics.json", job_dir / ERROR_FILE
        if not (metrics.exists() or error.exists()):
            continue  # not finished yet
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        params = {k: _number(v) for k, v in (o.split("=", 1) for o in overrides if "=" in o)}
        outcome = (
            {"status": "ok", **json.loads(metrics.read_text())} if metrics.exists() else {"status": "failed", "error": error.read_text()}
        )
        rows.append({"job": job_dir.name, **params, **outcome})
    return pd.DataFrame(rows)


def _number(text: str) -> Any:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def write_summary(sweep_dir: Path, task_summary: str | None = None) -> pd.DataFrame:
    """``summary.csv`` and, once two jobs succeeded, ``summary.png`` (test metrics vs the swept key);
    then the task's own summary function, if ``task_summary`` names one."""
    from clipbench import plots

    summary = collect(sweep_dir)
    if summary.empty:
        return summary
    summary.to_csv(sweep_dir / "summary.csv", index=False)
    done = summary[summary["status"] == "ok"]
    swept = [c for c in summary.columns if c not in ("job", "status", "error") and "/" not in c and summary[c].nunique() > 1]
    metrics = [c for c in done.columns if c.startswith("test/")] or [c for c in done.columns if "/" in c]
    if swept and metrics and len(done) > 1:
        plots.sweep_plot(done, swept[0], metrics, sweep_dir / "summary.png")
    if task_summary:
        get_method(task_summary)(sweep_dir, summary)
    return summary


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml): keeps ``summary.csv`` current during a multirun."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # noqa: B018 (a failed job's return_value re-raises its exception)
            except Exception as error:
                (Path(config.hydra.runtime.output_dir) / ERROR_FILE).write_text(f"{type(error).__name__}: {error}")
        summary = write_summary(Path(config.hydra.sweep.dir), OmegaConf.select(config, "sweep_summary", default=None))
        log.info("sweep summary (%d jobs so far): %s", len(summary), Path(config.hydra.sweep.dir) / "summary.csv")
