"""Neuron pruning by feature purity (experiment 2 of Sun et al., NeurIPS 2025): which embedding
dimensions carry the accuracy?

Each embedding neuron is scored by how much it overlaps the others in the image projection plus in
the text projection (:func:`clipbench.purity.neuron_overlap`: summed absolute off-diagonal cosine;
low means pure). Keeping N neurons means zeroing every other dimension of the L2-normalised image
embeddings; the class (text) embeddings stay whole, as in the reference (``run_eval_sam_sweep.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from clipbench.purity import neuron_overlap
from clipbench.silhouette import cosine_silhouette

SELECTIONS = ("high", "low", "random")  # high purity: lowest overlap; low purity: highest; random: a control


def neuron_scores(image_projection: Tensor, text_projection: Tensor) -> Tensor:
    """(embed_dim,) overlap per neuron, image plus text projection (each (in_features, embed_dim))."""
    if image_projection.shape[1] != text_projection.shape[1]:
        raise ValueError(f"the image and text projections differ in width: {image_projection.shape[1]} vs {text_projection.shape[1]}")
    return neuron_overlap(image_projection) + neuron_overlap(text_projection)


def select_neurons(scores: Tensor, n: int, selection: str, seed: int = 0) -> Tensor:
    """Indices of the ``n`` neurons kept by ``selection`` (see :data:`SELECTIONS`).

    ``high`` and ``low`` are the two ends of one stable ordering, so they are disjoint whenever
    2n <= width. ``random`` with a given ``seed`` is a prefix of one permutation: the selections of a
    seed are nested as n grows, and the same on every call.
    """
    width = len(scores)
    if not 1 <= n <= width:
        raise ValueError(f"cannot keep {n} of {width} neurons")
    if selection == "random":
        return torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:n].to(scores.device)
    order = torch.argsort(scores, stable=True)
    if selection == "high":
        return order[:n]
    if selection == "low":
        return order[width - n :]
    raise ValueError(f"unknown selection {selection!r}; choose one of {SELECTIONS}")


@dataclass(frozen=True)
class PrunedResult:
    acc1: float
    silhouette: float


def evaluate_kept(normalized: Tensor, labels: Tensor, classifier: Tensor, kept: Tensor) -> PrunedResult:
    """Zero-shot top-1 accuracy against the whole class embeddings ``classifier`` (classes, D), and the
    cosine silhouette, of L2-normalised image embeddings ``normalized`` (N, D) with every dimension
    outside ``kept`` set to zero."""
    mask = torch.zeros(normalized.shape[1], dtype=normalized.dtype, device=normalized.device)
    mask[kept] = 1
    pruned = normalized * mask  # cheaper than gathering the kept columns, which are strided in memory
    predicted = (pruned @ classifier.to(pruned).T).argmax(dim=1)
    return PrunedResult(float((predicted == labels).float().mean()), cosine_silhouette(pruned, labels))
