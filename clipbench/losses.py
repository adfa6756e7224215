"""Contrastive losses."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_loss(
    image_features: Tensor, text_features: Tensor, scale: Tensor, labels: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """Symmetric InfoNCE over L2-normalised features of one (global) batch.

    With ``labels=None`` this is CLIP's loss: pair i is the only positive of row i. With labels, the
    captions of a class-labelled dataset repeat inside a batch (several samples of one class share a
    caption, or differ only by template), and calling them negatives would push an image away from a
    correct description of it. So every pair with the same label is a positive, with the target mass
    spread uniformly over them (soft targets); with all labels distinct this equals CLIP's loss.

    ``label_smoothing`` mixes either kind of target with the uniform distribution over the batch,
    ``(1 - label_smoothing) * targets + label_smoothing / batch``, as ``F.cross_entropy`` does (it
    smooths class-probability targets the same way as class indices).
    """
    logits = scale * image_features @ text_features.T
    if labels is None:
        targets = torch.arange(len(logits), device=logits.device)
    else:
        same = (labels[:, None] == labels[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)  # symmetric: also the text-side targets
    cross_entropy = partial(F.cross_entropy, target=targets, label_smoothing=label_smoothing)
    return (cross_entropy(logits) + cross_entropy(logits.T)) / 2
