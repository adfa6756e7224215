"""Figures a researcher would rather look at than read."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files
import matplotlib.pyplot as plt
import pandas as pd
from torch import Tensor


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def training_curves(history: pd.DataFrame, path: Path) -> Path:
    """Loss, zero-shot accuracy and temperature per epoch, one panel each."""
    panels = [
        ("loss", [c for c in ("train/loss_epoch",) if c in history]),
        ("zero-shot accuracy", [c for c in ("val/acc1", "val/acc5") if c in history]),
        ("temperature", [c for c in ("train/temperature",) if c in history]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, columns) in zip(axes, panels):
        for column in columns:
            ax.plot(history["epoch"] + 1, history[column], marker="o", label=column)
        ax.set(title=title, xlabel="epoch")
        if columns:
            ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, path)


def prediction_grid(images: Tensor, true: Sequence[str], predicted: Sequence[str], path: Path) -> Path:
    """A grid of images (float (N, 3, H, W) in [0, 1]) titled true/predicted, wrong ones in red."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p in zip(axes.flat, images, true, predicted):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
        ax.set_title(f"{t}\n→ {p}", fontsize=8, color="black" if t == p else "red")
    return _save(fig, path)


def bar_chart(table: pd.DataFrame, x: str, ys: Sequence[str], path: Path, title: str = "") -> Path:
    """Grouped bars of columns ``ys`` per row label ``x`` (e.g. models side by side)."""
    ax = table.set_index(x)[list(ys)].plot.bar(figsize=(max(5, 1.2 * len(table) + 3), 4), rot=20)
    ax.set(title=title, ylabel="value")
    ax.grid(axis="y", alpha=0.3)
    return _save(ax.figure, path)


def sweep_plot(summary: pd.DataFrame, param: str, metrics: Sequence[str], path: Path) -> Path:
    """Each metric against the swept parameter (numeric -> line, otherwise bars)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    data = summary.sort_values(param)
    numeric = pd.api.types.is_numeric_dtype(data[param])
    for metric in metrics:
        if numeric:
            ax.plot(data[param], data[metric], marker="o", label=metric)
        else:
            ax.bar(data[param].astype(str), data[metric], label=metric, alpha=0.7)
    ax.set(xlabel=param, title=f"sweep over {param}")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)
