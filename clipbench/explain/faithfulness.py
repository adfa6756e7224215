"""Faithfulness of a heatmap: deletion and insertion curves (Petsiuk et al., RISE, 2018).

Pixels are ranked by the heatmap (upsampled to the image). Deletion replaces the top-ranked pixels,
a growing fraction at each step, with a substrate (a blurred copy of the image, or noise) and follows
the model's score: a faithful map makes it fall fast (low area under the curve). Insertion starts
from the substrate (a blurred or blank image) and reveals the top-ranked pixels: a faithful map makes
the score rise fast (high area). All images and all steps go through the model in shared batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

DELETION_FILLS = ("blur", "noise")
INSERTION_BASES = ("blur", "blank")


def substrate(images: Tensor, kind: str, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """What removed pixels become (``blur``, ``noise``) or what insertion starts from (``blur``,
    ``blank``), for normalised images: blank is 0 (the mean colour), noise is N(0, 1) per value."""
    if kind == "blur":
        kernel = 2 * int(2 * sigma + 0.5) + 1
        return TF.gaussian_blur(images, [kernel, kernel], [sigma, sigma])
    if kind == "blank":
        return torch.zeros_like(images)
    if kind == "noise":
        return torch.randn(images.shape, generator=generator).to(images)
    raise ValueError(f"unknown substrate {kind!r}; choose from {sorted({*DELETION_FILLS, *INSERTION_BASES})}")


def pixel_ranks(maps: Tensor, size: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """Each pixel's rank (0 = most relevant) under ``maps`` (B, h, w) bilinearly upsampled to ``size``,
    as (B, H*W). Ties (flat regions, ReLU zeros) are broken at random rather than in raster order."""
    scores = F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).flatten(1)
    shuffle = torch.randperm(scores.shape[1], generator=generator).to(scores.device)
    order = shuffle[torch.argsort(scores[:, shuffle], dim=1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def curves(
    score: Callable[[Tensor, Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    maps: Tensor,
    *,
    steps: int = 16,
    deletion: str = "blur",
    insertion: str = "blur",
    sigma: float = 5.0,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Deletion and insertion curves (B, steps + 1) of ``score(images, labels) -> (n,)`` at the
    fractions 0, 1/steps, ..., 1 of the pixels, most relevant first under ``maps``."""
    b, _, h, w = images.shape
    ranks = pixel_ranks(maps, (h, w), generator).view(b, 1, h, w)
    fractions = torch.linspace(0, 1, steps + 1, device=images.device)
    fills = {"deletion": substrate(images, deletion, sigma, generator), "insertion": substrate(images, insertion, sigma, generator)}
    result = {}
    for curve, fill in fills.items():
        values = []
        # One pass per group of steps, each with every image of the batch.
        per_pass = max(1, batch_size // b)
        for start in range(0, steps + 1, per_pass):
            counts = (fractions[start : start + per_pass] * h * w).round()  # (s,) pixels changed at each step
            chosen = (ranks.unsqueeze(0) < counts.view(-1, 1, 1, 1, 1)).to(images.dtype)  # (s, B, 1, H, W)
            first, second = (fill, images) if curve == "deletion" else (images, fill)
            mixed = chosen * first + (1 - chosen) * second
            values.append(score(mixed.flatten(0, 1), labels.repeat(len(counts))).view(len(counts), b).T)
        result[curve] = torch.cat(values, dim=1)
    return result


def area(curve: Tensor) -> Tensor:
    """Area under curves (B, steps + 1) sampled evenly on [0, 1] (trapezoid rule)."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[-1] - 1), dim=-1)
