"""The silhouette score under cosine distance, exact and in O(n·k·d) rather than O(n²·d).

For unit vectors the cosine distance is 1 - x·y, so a point's summed distance to a cluster C is
|C| - x·(Σ_{y in C} y): the k cluster sums stand in for the n x n distance matrix. The result is
scikit-learn's ``silhouette_score(features, labels, metric="cosine")`` on all samples (up to rounding:
scikit-learn clips each distance into [0, 2]), so a pruning sweep scores every selection of 10,000
images in milliseconds instead of seconds, and without subsampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_silhouette(features: Tensor, labels: Tensor) -> float:
    """Mean silhouette of ``features`` (N, D) under ``labels`` (N,) with cosine distance.

    Rows are L2-normalised first; an all-zero row (a pruned embedding with no kept neuron left) is
    at distance 1 from every other point, as in scikit-learn. Computed in float64 for float64 input,
    else float32. NaN when the score is undefined (fewer than two clusters, or one sample per cluster).
    """
    features = features if features.dtype == torch.float64 else features.float()
    norms = features.norm(dim=1, keepdim=True)
    x = features / norms.clamp_min(1e-12)
    _, y = labels.unique(return_inverse=True)
    num_clusters = int(y.max()) + 1 if len(y) else 0
    if not 2 <= num_clusters < len(y):
        return math.nan
    members = F.one_hot(y, num_clusters).to(x)  # (N, k)
    counts = members.sum(dim=0)
    summed = counts - x @ (members.T @ x).T  # (N, k) summed distances to every cluster
    own_count = counts[y]
    to_self = (norms.squeeze(1) == 0).to(x)  # a zero row is at distance 1 from itself too: not another point
    intra = ((summed * members).sum(dim=1) - to_self) / (own_count - 1)  # NaN for a singleton, set to 0 below
    inter = (summed / counts).masked_fill(members.bool(), math.inf).min(dim=1).values
    scores = (inter - intra) / torch.maximum(intra, inter)
    scores = torch.where(own_count > 1, scores.nan_to_num(0.0), torch.zeros_like(scores))
    return float(scores.mean(dtype=torch.float64))
