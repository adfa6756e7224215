"""The misalignment sweep's own summary (``sweep_summary`` of ``experiment=misalign``): purity and
zero-shot accuracy against Cs, one series per shuffling mode.

``python train.py -m experiment=misalign data.cs=0,0.1,0.3,0.5,0.8 data.misalign.mode=similarity,random``
ends with, at the sweep directory, ``misalign_summary.csv`` (one row per finished job: Cs, mode, the
final purity metrics of both projections, zero-shot accuracy when an evaluation dataset was
configured) and ``avg_abs_cos_sim_vs_cs.png`` (named as the reference's plot; a panel per
metric, similarity and random shuffling side by side when both ran).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from clipbench import plots

log = logging.getLogger(__name__)

PANELS = {
    "purity/image/avg_abs_cos": "image projection: mean |cos|",
    "purity/text/avg_abs_cos": "text projection: mean |cos|",
    "purity/image/max_abs_cos": "image projection: max |cos|",
    "purity/text/max_abs_cos": "text projection: max |cos|",
    "test/acc1": "zero-shot accuracy (test)",
}


def misalign_table(sweep_dir: Path, summary: pd.DataFrame) -> pd.DataFrame:
    """The finished jobs with their Cs and mode, read from each job's saved config (so the defaults of
    keys that were not swept count too)."""
    rows = []
    for _, job in summary[summary["status"] == "ok"].iterrows():
        config_file = Path(sweep_dir) / str(job["job"]) / "config.yaml"
        if not config_file.exists():
            continue
        config = OmegaConf.load(config_file)
        cs = OmegaConf.select(config, "data.cs", default=0.0)
        mode = OmegaConf.select(config, "data.misalign.mode", default="similarity")
        metrics = {k: job[k] for k in job.index if k.startswith(("purity/", "test/", "val/")) and pd.notna(job[k])}
        rows.append({"job": job["job"], "Cs": float(cs), "mode": mode, **metrics})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # Cs = 0 trains on the original captions whatever the mode: the starting point of every series,
    # the job run with that mode when a grid over modes ran one, else the first Cs = 0 job.
    baseline, shuffled = table[table["Cs"] == 0], table[table["Cs"] > 0]
    starts = []
    for mode in sorted(set(shuffled["mode"])) or sorted(set(baseline["mode"])):
        own = baseline[baseline["mode"] == mode]
        starts.append((own if len(own) else baseline.head(1)).assign(mode=mode))
    return pd.concat([*starts, shuffled], ignore_index=True).sort_values(["mode", "Cs"]).reset_index(drop=True)


def summarize(sweep_dir: Path, summary: pd.DataFrame) -> None:
    """``misalign_summary.csv`` and ``avg_abs_cos_sim_vs_cs.png`` at the sweep directory (module docstring)."""
    table = misalign_table(Path(sweep_dir), summary)
    if table.empty:
        return
    table.to_csv(Path(sweep_dir) / "misalign_summary.csv", index=False)
    panels = [column for column in PANELS if column in table and table[column].notna().any()]
    if len(table) > 1 and panels:
        named = table.rename(columns=PANELS)
        plots.metric_panels(
            named,
            "Cs",
            [PANELS[c] for c in panels],
            "mode",
            Path(sweep_dir) / "avg_abs_cos_sim_vs_cs.png",
            title="feature purity against caption misalignment Cs",
        )
        log.info("misalignment sweep: %s", Path(sweep_dir) / "avg_abs_cos_sim_vs_cs.png")
