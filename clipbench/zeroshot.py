"""Zero-shot classifiers built from prompt templates (the CLIP / open_clip protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clipbench.data.templates import captions
from clipbench.models.backbone import CLIPBackbone


@torch.no_grad()
def class_embeddings(
    backbone: CLIPBackbone, class_names: Sequence[str], templates: Sequence[str], device: torch.device, batch_size: int = 256
) -> Tensor:
    """Per class: the mean of the L2-normalised embeddings of its templated captions, renormalised.

    Returns (num_classes, embed_dim) on ``device``.
    """
    texts = [caption for per_template in captions(templates, class_names) for caption in per_template]
    tokens = backbone.tokenize(texts)
    feats = torch.cat([backbone.encode_text(tokens[i : i + batch_size].to(device)).float() for i in range(0, len(tokens), batch_size)])
    feats = F.normalize(feats, dim=-1).view(len(templates), len(class_names), -1)
    return F.normalize(feats.mean(dim=0), dim=-1)


def zeroshot_logits(image_features: Tensor, classifier: Tensor) -> Tensor:
    """Cosine similarities between images and class embeddings, (B, num_classes)."""
    return F.normalize(image_features.float(), dim=-1) @ classifier.T
