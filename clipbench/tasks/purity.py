"""``evaluate.py task=purity``: feature purity of the projections of one or several models.

The statistics are :func:`clipbench.purity.purity_metrics` of each model's image and/or text
projection (through the backbone interface, whatever library the model came from). Labels of the
form ``Cs30`` are read as the misalignment rate Cs = 0.30, so checkpoints fine-tuned on captions
shuffled at several rates plot as purity against Cs.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from clipbench import plots
from clipbench.config import ConfigError
from clipbench.models.backbone import CLIPBackbone
from clipbench.purity import METRICS, neuron_cosines, purity_metrics

log = logging.getLogger(__name__)

PROJECTIONS = {"image": ("image",), "text": ("text",), "both": ("image", "text")}
CS_LABEL = re.compile(r"cs(\d+(?:\.\d+)?)", re.IGNORECASE)


def label_cs(label: str) -> float:
    """The misalignment rate a label names: ``Cs30`` -> 0.30, ``cs12.5`` -> 0.125; NaN for other labels."""
    match = CS_LABEL.fullmatch(label)
    return float(match.group(1)) / 100 if match else math.nan


def chance_abs_cos(dim: int) -> float:
    """The mean absolute cosine between two independent random directions in ``dim`` dimensions,
    Γ(d/2) / (√π Γ((d+1)/2)) (about sqrt(2 / (π d))): ``avg_abs_cos`` of neurons drawn at random."""
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


def off_diagonal_cosines(projection: torch.Tensor) -> torch.Tensor:
    """Each pair of distinct neurons' cosine once (the upper triangle), for histograms."""
    cosines = neuron_cosines(projection)
    rows, cols = torch.triu_indices(len(cosines), len(cosines), offset=1)
    return cosines[rows, cols].float()


def run(cfg: DictConfig, models: Mapping[str, DictConfig], out: Path) -> dict[str, float]:
    task = cfg.task
    if task.projection not in PROJECTIONS:
        raise ConfigError(f"task.projection={task.projection!r} is invalid: expected one of {sorted(PROJECTIONS)}")
    if task.histogram_bins < 1:
        raise ConfigError(f"task.histogram_bins={task.histogram_bins} is invalid: expected a positive integer")
    rows, histograms = [], {}
    for label, model_cfg in models.items():
        log.info("purity: model %s", label)
        backbone: CLIPBackbone = instantiate(model_cfg.backbone)
        histograms[label] = {}
        for tower in PROJECTIONS[task.projection]:
            projection = backbone.projection_matrix(tower).detach().cpu()
            metrics = purity_metrics(projection, include_diagonal=task.include_diagonal)
            rows.append(
                {
                    "label": label,
                    "Cs": label_cs(label),
                    "projection": tower,
                    "in_features": projection.shape[0],
                    "embed_dim": projection.shape[1],
                    **metrics,
                    "chance_abs_cos": chance_abs_cos(projection.shape[0]),
                }
            )
            histograms[label][f"{tower} (mean |cos| {metrics['avg_abs_cos']:.3f})"] = off_diagonal_cosines(projection).numpy()
        del backbone
    table = pd.DataFrame(rows)
    table.to_csv(out / "purity.csv", index=False)
    log.info("purity (%s):\n%s", "diagonal included" if task.include_diagonal else "off-diagonal", table.to_string(index=False))
    x = "Cs" if table["Cs"].notna().all() else "label"
    diagonal = "zeros on the diagonal included" if task.include_diagonal else "off-diagonal"
    plots.metric_panels(table, x, METRICS, "projection", out / "purity_vs_label.png", title=f"feature purity ({diagonal})")
    plots.histogram_panels(histograms, out / "cosine_histograms.png", bins=task.histogram_bins, xlabel="cosine between neurons")
    prefix = (lambda label: f"{label}/") if len(models) > 1 else (lambda label: "")
    return {f"{prefix(row['label'])}{row['projection']}/{metric}": row[metric] for row in rows for metric in METRICS}
