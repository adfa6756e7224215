"""Figures of explanations: heatmap overlays, captions shaded by word relevance, faithfulness curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clipbench.plots import _save, plt

WORD_END = "</w>"


def heatmap_grid(
    images: Sequence[np.ndarray], rows: Sequence[tuple[int, str]], maps: Mapping[str, Sequence[np.ndarray]], path: Path
) -> Path:
    """Rows (image index, caption) x columns (the image, then one overlay per method). ``images`` are
    (H, W, 3) uint8 at their original resolution and each map (H, W) at the same resolution; each
    overlay is shaded by its map scaled to [0, 1] and has its own colour bar."""
    methods = list(maps)
    fig, axes = plt.subplots(len(rows), 1 + len(methods), figsize=(2.4 * (1 + len(methods)), 2.3 * len(rows)), squeeze=False)
    for r, (image_index, caption) in enumerate(rows):
        image = images[image_index]
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(caption, fontsize=8)
        for c, method in enumerate(methods, start=1):
            heat = maps[method][r]
            heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
            axes[r, c].imshow(image)
            shown = axes[r, c].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            colorbar = fig.colorbar(shown, ax=axes[r, c], fraction=0.046, pad=0.02)
            colorbar.ax.tick_params(labelsize=6)
            if r == 0:
                axes[r, c].set_title(method, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def words(pieces: Sequence[str], relevance: Sequence[float]) -> list[tuple[str, float]]:
    """BPE pieces and their relevance -> words and theirs (summed over a word's pieces)."""
    merged: list[tuple[str, float]] = []
    current, mass = "", 0.0
    for piece, value in zip(pieces, relevance):
        current, mass = current + piece.removesuffix(WORD_END), mass + float(value)
        if piece.endswith(WORD_END):
            merged.append((current, mass))
            current, mass = "", 0.0
    if current:
        merged.append((current, mass))
    return merged


def text_heatmaps(captions: Sequence[tuple[str, list[tuple[str, float]]]], path: Path) -> Path:
    """One line per (label, words with relevance): each word's background shaded by its relevance
    (white = none, dark red = the caption's most relevant word), its share of the total after it."""
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(captions) + 0.6))
    ax.set_axis_off()
    renderer = fig.canvas.get_renderer()
    cmap = plt.get_cmap("Reds")
    for row, (label, weighted) in enumerate(captions):
        y = 1 - (row + 0.5) / len(captions)
        ax.text(0.0, y, label, fontsize=8, color="0.35", va="center", transform=ax.transAxes)
        x = 0.28
        top = max((value for _, value in weighted), default=0) or 1.0
        for word, value in weighted:
            text = ax.text(
                x, y, f"{word} {value:.2f}", fontsize=9, va="center", transform=ax.transAxes,
                bbox={"facecolor": cmap(0.85 * value / top), "edgecolor": "none", "pad": 2},
                color="white" if value / top > 0.6 else "black",
            )  # fmt: skip
            extent = text.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
            x = extent.x1 + 0.012
    return _save(fig, path)


def faithfulness_curves(fractions: np.ndarray, curves: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> Path:
    """Mean deletion and insertion curves per method (``curves[method][kind]``), one panel each."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        for method, by_kind in curves.items():
            style = {"color": "black", "linestyle": "--"} if method == "random" else {}
            ax.plot(fractions, by_kind[kind], label=method, **style)
        ax.set(title=f"{kind} (AUC: {better} is better)", xlabel="fraction of pixels", ylabel="p(true class)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return _save(fig, path)
