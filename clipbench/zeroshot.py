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
    tokens = backbone.tokenize(caption_texts(class_names, templates))
    feats = torch.cat([backbone.encode_text(tokens[i : i + batch_size].to(device)).float() for i in range(0, len(tokens), batch_size)])
    return average_captions(feats, len(templates), len(class_names))


def caption_texts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class, template-major: text t * C + c is template t, class c."""
    return [caption for per_template in captions(templates, class_names) for caption in per_template]


def average_captions(caption_features: Tensor, num_templates: int, num_classes: int) -> Tensor:
    """Embeddings of :func:`caption_texts` -> per class the renormalised mean of its normalised captions."""
    feats = F.normalize(caption_features.float(), dim=-1).view(num_templates, num_classes, -1)
    return F.normalize(feats.mean(dim=0), dim=-1)


def zeroshot_logits(image_features: Tensor, classifier: Tensor) -> Tensor:
    """Cosine similarities between images and class embeddings, (B, num_classes)."""
    return F.normalize(image_features.float(), dim=-1) @ classifier.T
