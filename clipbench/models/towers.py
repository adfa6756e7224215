"""Image towers for CLIP trained from scratch at CIFAR resolution (32x32).

Each builder returns an ``nn.Module`` mapping (B, 3, 32, 32) to (B, embed_dim) and exposing its
final projection as ``projection`` (an (in_features, embed_dim) parameter view), so the backbone can
name it for projection-only fine-tuning and purity analysis.
"""

from __future__ import annotations

import itertools

from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import Tensor, nn


def modified_resnet(embed_dim: int, layers: tuple[int, ...] = (2, 2, 2, 2), width: int = 32, image_size: int = 32) -> nn.Module:
    """CLIP's ModifiedResNet: 3-conv stem, anti-aliased strided convs (avgpool), attention pooling."""
    heads = max(1, width * 32 // 64)
    return ModifiedResNet(layers=list(layers), output_dim=embed_dim, heads=heads, image_size=image_size, width=width)


def vit(
    embed_dim: int,
    image_size: int = 32,
    patch_size: int = 4,
    width: int = 192,
    layers: int = 6,
    heads: int = 3,
    mlp_ratio: float = 4.0,
) -> nn.Module:
    """A small ViT; patch 4 on 32x32 gives an 8x8 grid of patch tokens for attention maps."""
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        heads=heads,
        mlp_ratio=mlp_ratio,
        output_dim=embed_dim,
        act_layer=QuickGELU,
    )


class _ConvGroup(nn.Sequential):
    """conv -> maxpool/2 -> BN -> GELU -> conv -> BN -> GELU (the airbench block)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out),
            nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.GELU(),
        )


class CifarResNet(nn.Module):
    """A fast CIFAR network in the style of KellerJordan/cifar10-airbench, ending in a linear
    projection into the joint space instead of a classifier head."""

    def __init__(self, embed_dim: int, widths: tuple[int, int, int] = (64, 256, 256), stem_width: int = 24) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 2, bias=True), nn.GELU())
        chans = [stem_width, *widths]
        self.groups = nn.Sequential(*[_ConvGroup(a, b) for a, b in itertools.pairwise(chans)])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.proj = nn.Linear(widths[-1], embed_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(self.groups(self.stem(x))).flatten(1))


def cifar_resnet(embed_dim: int, widths: tuple[int, int, int] = (64, 256, 256)) -> nn.Module:
    return CifarResNet(embed_dim, tuple(widths))
