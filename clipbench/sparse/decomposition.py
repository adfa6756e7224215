"""SpLiCE's recipe around the solver, and what a sparse embedding costs to store.

Embeddings of both modalities are L2-normalised; with centring, each is moved by its modality's mean
and renormalised before the decomposition (CLIP's image and text embeddings occupy two offset cones;
without centring every image would need the same few concepts just to reach the image cone). The
reconstruction D^T w is normalised, the mean added back, and normalised again before classification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clipbench.sparse.solver import SparseCodes


def modality_mean(features: Tensor) -> Tensor:
    """The mean of L2-normalised embeddings (d,)."""
    return F.normalize(features.float(), dim=-1).mean(dim=0)


def centre(features: Tensor, mean: Tensor | None) -> Tensor:
    """normalise(normalise(x) - mean); without a mean, just normalise(x)."""
    x = F.normalize(features, dim=-1)
    return x if mean is None else F.normalize(x - mean, dim=-1)


def recompose(codes: SparseCodes, dictionary: Tensor, mean: Tensor | None) -> Tensor:
    """Embeddings rebuilt from their concepts (N, d), unit norm: normalise(normalise(D^T w) + mean).
    An all-zero code rebuilds to the normalised mean (the zero vector without centring)."""
    x = F.normalize(codes.reconstruct(dictionary), dim=-1)
    return x if mean is None else F.normalize(x + mean, dim=-1)


def index_bytes(num_concepts: int) -> int:
    """Bytes of the smallest unsigned integer that can index ``num_concepts`` concepts."""
    for size in (1, 2, 4):
        if num_concepts <= 1 << (8 * size):
            return size
    return 8


def storage_bytes(l0: Tensor, dim: int, num_concepts: int, value_bytes: int) -> tuple[float, Tensor]:
    """(bytes of one dense embedding, bytes of each sparse one) at ``value_bytes`` per number: the
    dense vector stores ``dim`` values; a sparse one stores, per non-zero, its concept index (the
    smallest integer type that indexes the dictionary) and its value."""
    return float(dim * value_bytes), l0.double() * (index_bytes(num_concepts) + value_bytes)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
