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


def metric_panels(table: pd.DataFrame, x: str, metrics: Sequence[str], hue: str, path: Path, title: str = "") -> Path:
    """A panel per metric against ``x`` (numeric: a line; otherwise points at the categories, in table
    order), a series per value of ``hue``."""
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    numeric = pd.api.types.is_numeric_dtype(table[x])
    categories = list(dict.fromkeys(table[x]))
    for ax, metric in zip(axes.flat, metrics):
        for name, series in table.groupby(hue, sort=False):
            series = series.sort_values(x) if numeric else series
            positions = series[x] if numeric else [categories.index(v) for v in series[x]]
            ax.plot(positions, series[metric], marker="o", linestyle="-" if numeric else "none", label=str(name))
        if not numeric:
            ax.set_xticks(range(len(categories)), [str(c) for c in categories], rotation=30)
        ax.set(title=metric, xlabel=x)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(title=hue)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def histogram_panels(groups: dict[str, dict[str, Sequence[float]]], path: Path, bins: int, xlabel: str) -> Path:
    """A panel per group, its series as overlaid histograms, with a dashed line at 0."""
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (group, series) in zip(axes.flat, groups.items()):
        for name, values in series.items():
            ax.hist(values, bins=bins, alpha=0.55, label=name)
        ax.axvline(0, color="black", linestyle="--", linewidth=1)
        ax.set(title=group, xlabel=xlabel, ylabel="pairs")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    return _save(fig, path)


def neuron_curves(table: pd.DataFrame, path: Path, ylabel: str, title: str = "") -> Path:
    """Pruning curves: ``high`` and ``low`` against ``neurons`` kept, ``random`` as its mean and a
    band of one ``random_std``, and ``full`` (all neurons) as a horizontal line."""
    data = table.sort_values("neurons")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(data["full"].mean(), color="black", linestyle="--", label="full")
    ax.plot(data["neurons"], data["high"], marker="o", color="tab:blue", label="high purity")
    ax.plot(data["neurons"], data["low"], marker="s", color="tab:red", label="low purity")
    ax.plot(data["neurons"], data["random"], marker="^", color="tab:gray", label="random")
    spread = data["random_std"].fillna(0)
    ax.fill_between(data["neurons"], data["random"] - spread, data["random"] + spread, color="tab:gray", alpha=0.25, label="random ± std")
    ax.set(xlabel="neurons kept", ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def score_histograms(histograms: dict[str, tuple], markers: dict[str, dict[str, float]], path: Path) -> Path:
    """One panel per score: pre-binned counts ``(counts, edges)`` and vertical lines at ``markers``
    (name -> {label: value}, e.g. mean and median)."""
    fig, axes = plt.subplots(1, len(histograms), figsize=(4.8 * len(histograms), 3.6), squeeze=False)
    for ax, (name, (counts, edges)) in zip(axes.flat, histograms.items()):
        ax.stairs(counts, edges, fill=True, alpha=0.6)
        for (label, value), style in zip(markers.get(name, {}).items(), ("-", "--", ":")):
            ax.axvline(value, color="black", linestyle=style, linewidth=1, label=f"{label} {value:.4g}")
        ax.set(title=name, xlabel=name, ylabel="pairs")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def pair_grid(groups: dict[str, list[tuple]], path: Path, wrap: int = 28) -> Path:
    """One row per group (e.g. highest and lowest scored) of (image or None, caption, label) cells:
    the image, its label and its caption wrapped below; a missing image is a grey square."""
    import textwrap

    cols = max(len(cells) for cells in groups.values())
    fig, axes = plt.subplots(len(groups), cols, figsize=(2.3 * cols, 3.3 * len(groups)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (group, cells) in zip(axes, groups.items()):
        for ax, (image, caption, label) in zip(row, cells):
            ax.imshow(image if image is not None else [[0.8]], cmap=None if image is not None else "gray", vmin=0, vmax=1)
            text = textwrap.shorten(str(caption), wrap * 3, placeholder="…")
            ax.set_title(f"{group}: {label}", fontsize=8)
            ax.text(0.5, -0.04, textwrap.fill(text, wrap), transform=ax.transAxes, ha="center", va="top", fontsize=7)
    return _save(fig, path)


def l0_histogram(l0: Sequence[int], path: Path, title: str = "") -> Path:
    """How many concepts each embedding uses: one bar per count, mean and median marked."""
    values = pd.Series(l0)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.hist(values, bins=range(int(values.max()) + 2), align="left", rwidth=0.9)
    ax.axvline(values.mean(), color="black", linestyle="-", linewidth=1, label=f"mean {values.mean():.1f}")
    ax.axvline(values.median(), color="black", linestyle="--", linewidth=1, label=f"median {values.median():.0f}")
    ax.set(xlabel="non-zero concepts (L0)", ylabel="images", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def concept_examples(
    images: Tensor, titles: Sequence[str], bars: Sequence[tuple[Sequence[str], Sequence[float]]], correct: Sequence[bool], path: Path
) -> Path:
    """Images (float (N, 3, H, W) in [0, 1]), each titled (red when ``correct`` is false) beside a
    horizontal bar chart of its concepts and weights, two examples per row."""
    cols = 2
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(11, 2.3 * rows), squeeze=False, gridspec_kw={"width_ratios": [1, 1.6] * cols})
    for ax in axes.flat:
        ax.axis("off")
    for k, (image, title, (names, weights), ok) in enumerate(zip(images, titles, bars, correct)):
        picture, chart = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
        picture.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        picture.set_title(title, fontsize=8, color="black" if ok else "red")
        chart.axis("on")
        chart.barh(range(len(weights)), weights, color="tab:blue")
        chart.set_yticks(range(len(weights)), [_shorten(n) for n in names], fontsize=7)
        chart.invert_yaxis()
        chart.tick_params(axis="x", labelsize=7)
        chart.set_xlabel("weight", fontsize=7)
        if not weights:
            chart.text(0.5, 0.5, "no concept", ha="center", va="center", transform=chart.transAxes)
    return _save(fig, path)


def _shorten(text: str, width: int = 22) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def sparsity_tradeoff(table: pd.DataFrame, path: Path, group: str | None = None) -> Path:
    """A lambda sweep: sparse top-1 accuracy against the mean number of concepts (each point labelled
    with its lambda), dense accuracy as a horizontal line, memory saving on a second axis; one line
    per value of ``group`` when given, its three series in one colour."""
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    saving = ax.twinx()
    groups = table.groupby(group) if group else [(None, table)]
    for (name, data), colour in zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3):
        data = data.sort_values("sparse/l0_mean")
        label = "" if name is None else f" ({name})"
        ax.plot(data["sparse/l0_mean"], data["test/sparse_acc1"], marker="o", color=colour, label=f"sparse acc@1{label}")
        for _, row in data.iterrows():
            ax.annotate(
                f"λ={row['sparse/lam']:g}",
                (row["sparse/l0_mean"], row["test/sparse_acc1"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.axhline(data["test/dense_acc1"].iloc[0], linestyle="--", linewidth=1, color=colour, label=f"dense acc@1{label}")
        saving.plot(
            data["sparse/l0_mean"],
            data["sparse/memory_saving"],
            marker="s",
            markersize=4,
            linestyle=":",
            color=colour,
            label=f"memory saving{label}",
        )
    ax.set(xlabel="mean non-zero concepts per image (L0)", ylabel="zero-shot accuracy", title="sparsity / accuracy trade-off")
    saving.set_ylabel("memory saving (dense / sparse bytes, dotted)")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = saving.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)
