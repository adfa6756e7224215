"""Feature purity of a projection layer (Sun et al., NeurIPS 2025): how close to orthogonal its neurons are.

A projection into the joint space is an (in_features, embed_dim) matrix; the rows of its transpose
are the embed_dim output neurons. Purer features are more nearly orthogonal neurons, so the
statistics are those of the absolute pairwise cosines between the L2-normalised neurons.

Our statistics exclude the diagonal (a neuron's cosine with itself). The reference script
(``analyze_purity.py`` of feature-purity-clip) averages over the full n x n matrix with zeros on the
diagonal: its mean is ours times (n - 1) / n and its median is pulled towards zero by the n zeros.
``include_diagonal=True`` computes the reference's numbers for exact comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("avg_abs_cos", "max_abs_cos", "median_abs_cos", "std_abs_cos", "avg_cos", "purity_mean", "purity_std")


def neuron_cosines(projection: Tensor) -> Tensor:
    """(embed_dim, embed_dim) cosines between the neurons of an (in_features, embed_dim) projection."""
    neurons = F.normalize(projection.detach().double().T, dim=-1)
    return neurons @ neurons.T


def _entries(cosines: Tensor, include_diagonal: bool) -> Tensor:
    """(n, n - 1) off-diagonal cosines per neuron, or (n, n) with the diagonal zeroed (the reference's)."""
    n = len(cosines)
    if include_diagonal:
        return cosines.masked_fill(torch.eye(n, dtype=torch.bool, device=cosines.device), 0.0)
    return cosines.masked_select(~torch.eye(n, dtype=torch.bool, device=cosines.device)).view(n, n - 1)


def purity_metrics(projection: Tensor, include_diagonal: bool = False) -> dict[str, float]:
    """The purity statistics of one projection (see :data:`METRICS`).

    ``avg/max/median/std_abs_cos``: of the absolute pairwise cosines; ``avg_cos``: their signed mean;
    ``purity_mean/std``: of the per-neuron purity, 1 / (the neuron's mean absolute cosine to the others).
    """
    if projection.ndim != 2 or projection.shape[1] < 2:
        raise ValueError(f"a projection must be an (in_features, embed_dim >= 2) matrix, got shape {tuple(projection.shape)}")
    entries = _entries(neuron_cosines(projection), include_diagonal)
    absolute = entries.abs()
    purity = 1.0 / absolute.mean(dim=1)
    return {
        "avg_abs_cos": absolute.mean().item(),
        "max_abs_cos": absolute.max().item(),
        # torch.median takes the lower middle value; numpy's (and the reference's) averages the two.
        "median_abs_cos": absolute.flatten().quantile(0.5).item(),
        "std_abs_cos": absolute.std(unbiased=False).item(),
        "avg_cos": entries.mean().item(),
        "purity_mean": purity.mean().item(),
        "purity_std": purity.std(unbiased=False).item(),
    }


def neuron_overlap(projection: Tensor) -> Tensor:
    """Per neuron, the summed absolute cosine to every other neuron (embed_dim,): low means pure."""
    return _entries(neuron_cosines(projection), include_diagonal=False).abs().sum(dim=1).float()
