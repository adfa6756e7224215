"""Text relevance: which words of a caption drive its similarity with an image (Grad-ECLIP, text side)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clipbench.explain.base import cosine
from clipbench.explain.image import OFFICIAL, check_variant, query_key_similarity
from clipbench.models.attention import SINGLE_HEAD, record_attention
from clipbench.models.backbone import CLIPBackbone


def word_span(backbone: CLIPBackbone, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per caption, the first word position and the pooled (end-of-text) position: the caption's real
    tokens are ``start <= position < end`` (the start-of-text token and the end token excluded)."""
    end = backbone.text_pool_positions(tokens)
    return torch.ones_like(end), end


def grad_eclip_text(backbone: CLIPBackbone, tokens: Tensor, image_embeddings: Tensor, *, layers: int = 8, variant: str = "ours") -> Tensor:
    """Grad-ECLIP's word relevance for captions ``tokens`` (B, L) against images (B, D).

    Per block of the last ``layers`` text blocks: the gradient of the image-text cosine with respect to
    the attention context at the end-of-text position (channel weights) times each token's value,
    weighted by the min-max normalised cosine between the end-of-text query and each token's key (over
    the positions it attends); summed over blocks, ReLU, kept on the real tokens and normalised to sum
    to 1 (B, L), zero elsewhere. ``official``: the chosen blocks recomputed as one head, as the official
    code does.
    """
    check_variant(variant)
    count = min(layers, len(backbone.text_attention_modules()))
    chosen = range(-count, 0)
    modes = {index: SINGLE_HEAD for index in chosen} if variant == OFFICIAL else None
    start, end = word_span(backbone, tokens)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    attended = positions.unsqueeze(0) <= end.unsqueeze(1)  # (B, L): what the end token sees (causal)
    with record_attention(backbone, tower="text", modes=modes) as records:
        score = cosine(backbone.encode_text(tokens), image_embeddings)
    picked = [records[index] for index in chosen]
    grads = torch.autograd.grad(score.sum(), [record.context for record in picked])
    rows = torch.arange(len(tokens), device=tokens.device)
    total = 0
    for record, grad in zip(picked, grads):
        similarity, values = query_key_similarity(record, end, variant)  # (B, heads, L)
        mask = attended.unsqueeze(1)
        low = similarity.masked_fill(~mask, float("inf")).amin(-1, keepdim=True)
        high = similarity.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
        spatial = ((similarity - low) / (high - low).clamp_min(1e-12)).masked_fill(~mask, 0)
        channel = grad[rows, :, end].unsqueeze(2)  # (B, heads, 1, d)
        total = total + ((channel * values).sum(-1) * spatial).sum(1)
    relevance = F.relu(total).detach()
    real = (positions.unsqueeze(0) >= start.unsqueeze(1)) & (positions.unsqueeze(0) < end.unsqueeze(1))
    relevance = relevance * real
    sums = relevance.sum(-1, keepdim=True)
    uniform = real.float() / real.sum(-1, keepdim=True).clamp_min(1)  # all-zero relevance: no word preferred
    return torch.where(sums > 0, relevance / sums.clamp_min(1e-12), uniform)
