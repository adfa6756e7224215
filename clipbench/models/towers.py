"""Image towers for CLIP trained from scratch at CIFAR resolution (32x32).

Each builder returns an ``nn.Module`` mapping (B, 3, 32, 32) to (B, embed_dim) and exposing its
final projection as ``projection`` (an (in_features, embed_dim) parameter view), so the backbone can
name it for projection-only fine-tuning and purity analysis.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# open_clip is imported by the two builders that use it: importing it loads timm, and timm wandb
# (about 1 s on 2 cores), and the training module imports this file for CifarResNet alone.

WHITENING_EPS = 5e-4  # airbench's: added to the eigenvalues, so near-constant directions are not blown up


def modified_resnet(embed_dim: int, layers: tuple[int, ...] = (2, 2, 2, 2), width: int = 32, image_size: int = 32) -> nn.Module:
    """CLIP's ModifiedResNet: 3-conv stem, anti-aliased strided convs (avgpool), attention pooling."""
    from open_clip.modified_resnet import ModifiedResNet

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
    from open_clip.transformer import QuickGELU, VisionTransformer

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


def patch_whitening(images: Tensor, kernel_size: tuple[int, int], eps: float = WHITENING_EPS) -> tuple[Tensor, Tensor]:
    """Weight (K, C, kh, kw) and bias (K,) of a convolution (stride 1, no padding) whose K = C * kh * kw
    outputs on ``images`` are their patches in the eigenbasis of the patches' covariance, each scaled by
    1 / sqrt(eigenvalue + eps) and centred: zero mean and (up to eps) identity covariance. Largest
    eigenvalue first. airbench uses the uncentred second moment and learns the bias; centring gives
    exact whitening at the start for images that are not zero-mean."""
    channels, (kh, kw) = images.shape[1], kernel_size
    patches = F.unfold(images.float(), (kh, kw)).transpose(1, 2).reshape(-1, channels * kh * kw)  # conv weight order
    mean = patches.mean(dim=0)
    centred = patches - mean
    covariance = (centred.T @ centred / len(patches)).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    weight = (eigenvectors / (eigenvalues + eps).sqrt()).T.flip(0).float()  # row k: the k-th largest direction
    return weight.reshape(-1, channels, kh, kw), -(weight @ mean)


class CifarResNet(nn.Module):
    """A fast CIFAR network in the style of KellerJordan/cifar10-airbench, ending in a linear
    projection into the joint space instead of a classifier head.

    ``whiten=True``: the 2x2 stem convolution is to be initialised from training images by
    :meth:`init_whitening` (the training module does it when fitting starts). Its 24 channels are the
    12 whitened directions of 3-channel 2x2 patches and their negatives, so the GELU after it keeps
    both signs of each. A ``whitened`` flag is saved with the weights: a resumed run, or fine-tuning
    of a trained model, does not whiten again.
    """

    def __init__(self, embed_dim: int, widths: tuple[int, int, int] = (64, 256, 256), stem_width: int = 24, whiten: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 2, bias=True), nn.GELU())
        chans = [stem_width, *widths]
        self.groups = nn.Sequential(*[_ConvGroup(a, b) for a, b in itertools.pairwise(chans)])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.proj = nn.Linear(widths[-1], embed_dim, bias=False)
        self.whiten = whiten
        if whiten:
            directions = self.stem[0].weight[0].numel()  # 3 channels x 2 x 2
            if stem_width != 2 * directions:
                raise ValueError(
                    f"image_tower.whiten needs stem_width = 2 x {directions} (each whitened direction and its negative), got {stem_width}"
                )
            self.register_buffer("whitened", torch.tensor(False))

    @property
    def whitening_pending(self) -> bool:
        return self.whiten and not bool(self.whitened)

    @torch.no_grad()
    def init_whitening(self, images: Tensor, eps: float = WHITENING_EPS) -> None:
        """Whiten the stem on ``images`` (a sample of training images as the model sees them):
        :func:`patch_whitening`'s convolution and its negative."""
        conv = self.stem[0]
        weight, bias = patch_whitening(images.to(conv.weight.device), conv.kernel_size, eps)
        conv.weight.copy_(torch.cat([weight, -weight]))
        conv.bias.copy_(torch.cat([bias, -bias]))
        self.whitened.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(self.groups(self.stem(x))).flatten(1))


def cifar_resnet(embed_dim: int, widths: tuple[int, int, int] = (64, 256, 256), whiten: bool = False) -> nn.Module:
    return CifarResNet(embed_dim, tuple(widths), whiten=whiten)
