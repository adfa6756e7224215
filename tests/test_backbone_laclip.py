"""LaCLIP backbone against a tiny re-implementation of LaCLIP's own ``models.CLIP``.

The reference follows the LaCLIP repository's module structure (its own q/k-norm ViT blocks swapped
into a timm ViT, a sequence-first text transformer), so loading its state dict strictly checks that
our timm/open_clip construction has exactly LaCLIP's keys, and its forward checks our embeddings.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from conftest import check_attention_recorder
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from timm.layers import Mlp
from torch import nn

from clipbench.models.laclip import IMAGENET_MEAN

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
EMBED, TEXT_WIDTH, HEADS, CONTEXT = 16, 32, 2, 77
TINY = dict(
    vision_model="vit_tiny_patch16_224",
    vision_kwargs={"depth": 2, "img_size": 32},
    embed_dim=EMBED,
    text_width=TEXT_WIDTH,
    text_heads=HEADS,
    text_layers=2,
)


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_norm, self.k_norm = nn.LayerNorm(dim // heads, eps=1e-6), nn.LayerNorm(dim // heads, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (self.q_norm(q) @ self.k_norm(k).transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefVisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.mlp = Mlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefTextBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mask: torch.Tensor) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)  # sequence-first, as in LaCLIP
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        layers = OrderedDict(c_fc=nn.Linear(dim, dim * 4), gelu=nn.Identity(), c_proj=nn.Linear(dim * 4, dim))
        self.mlp = nn.Sequential(layers)
        self.mask = mask

    def forward(self, x):
        x = x + self.attn(*[self.ln_1(x)] * 3, need_weights=False, attn_mask=self.mask)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))  # QuickGELU


class RefTransformer(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*blocks)


class RefLaCLIP(nn.Module):
    """LaCLIP's ``models.CLIP`` at a tiny size."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=32)
        self.visual.blocks = nn.Sequential(*[RefVisionBlock(192, 3) for _ in range(2)])
        mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu_(1)
        self.transformer = RefTransformer([RefTextBlock(TEXT_WIDTH, HEADS, mask) for _ in range(2)])
        self.token_embedding = nn.Embedding(49408, TEXT_WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, TEXT_WIDTH) * 0.01)
        self.ln_final = nn.LayerNorm(TEXT_WIDTH)
        self.image_projection = nn.Parameter(torch.randn(192, EMBED) * 192**-0.5)
        self.text_projection = nn.Parameter(torch.randn(TEXT_WIDTH, EMBED) * TEXT_WIDTH**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        for p in self.parameters():  # non-trivial norms and biases, so that a wrong wiring shows
            p.data.add_(torch.randn_like(p) * 0.02)

    def encode_image(self, image):
        return self.visual(image) @ self.image_projection

    def encode_text(self, text):
        x = (self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2)
        x = self.ln_final(self.transformer.resblocks(x).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


@pytest.fixture(scope="module")
def reference() -> RefLaCLIP:
    torch.manual_seed(0)
    return RefLaCLIP().eval()


def _save(tmp_path, state_dict: dict, prefix: str = "module.") -> str:
    path = str(tmp_path / "laclip.pt")
    torch.save({"state_dict": {prefix + key: value for key, value in state_dict.items()}, "epoch": 1}, path)
    return path


def _load(checkpoint: str):
    """The user's path: the model config's backbone node with the checkpoint and tiny sizes."""
    return instantiate(OmegaConf.load(CONF / "laclip.yaml").backbone, checkpoint=checkpoint, **TINY)


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_matches_laclip(prefix, reference, tmp_path):
    backbone = _load(_save(tmp_path, reference.state_dict(), prefix))
    spec = backbone.image_spec
    assert (spec.size, spec.mean, spec.interpolation) == (32, IMAGENET_MEAN, "bilinear")
    images = torch.randn(2, 3, 32, 32)
    tokens = backbone.tokenize(["a photo of a cat", "a dog"])
    assert tokens.shape == (2, CONTEXT)
    with torch.no_grad():
        image_emb, text_emb = backbone.encode_image(images), backbone.encode_text(tokens)
        assert image_emb.shape == text_emb.shape == (2, EMBED)
        torch.testing.assert_close(image_emb, reference.encode_image(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(text_emb, reference.encode_text(tokens), atol=1e-5, rtol=1e-4)
    assert backbone.projection_matrix("image").shape == (192, EMBED)
    assert backbone.projection_matrix("text").shape == (TEXT_WIDTH, EMBED)
    assert set(backbone.projection_parameters()) == {"image.image_projection", "text.text_projection"}
    assert backbone.logit_scale.item() == pytest.approx(reference.logit_scale.item())


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_loading_is_strict(change, reference, tmp_path):
    state_dict = dict(reference.state_dict())
    if change == "missing":
        del state_dict["visual.blocks.0.attn.q_norm.weight"]
    else:
        state_dict["visual.head.weight"] = torch.zeros(10, 192)
    with pytest.raises(InstantiationException, match="Missing key" if change == "missing" else "Unexpected key"):
        _load(_save(tmp_path, state_dict))


def test_attention_recorder(reference, tmp_path):
    records = check_attention_recorder(_load(_save(tmp_path, reference.state_dict())), layers=2)
    assert records[0].weights.shape == (2, 3, 5, 5)
