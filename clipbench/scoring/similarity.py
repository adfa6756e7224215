"""How well a caption matches its image: plain functions of embeddings and cosines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pair_cosine(image: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity of each image embedding with its own caption's, (N, D) x (N, D) -> (N,), float32."""
    return (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(dim=-1)


def clip_score(cosine: Tensor) -> Tensor:
    """CLIPScore (Hessel et al., 2021) with w = 100: ``100 * max(cosine, 0)``."""
    return 100.0 * cosine.clamp(min=0)


def sigmoid_probability(cosine: Tensor, scale: float, bias: float) -> Tensor:
    """SigLIP's probability that a pair matches: ``sigmoid(scale * cosine + bias)``, with the model's
    learned scale (``exp(logit_scale)``, unclamped) and bias."""
    return torch.sigmoid(scale * cosine + bias)
