"""LaCLIP checkpoints (Fan et al., "Improving CLIP Training with Language Rewrites") as :class:`CLIPBackbone`.

A LaCLIP ``.pt`` holds ``{"state_dict": ...}`` (keys possibly prefixed ``module.`` by
DistributedDataParallel) of the SLIP-style ``CLIP`` module of the LaCLIP repository:

* ``visual.*``: a timm ViT without classifier whose blocks use q/k LayerNorm; the released
  ``CLIP_VITS16`` / ``CLIP_VITB16`` / ``CLIP_VITL16`` use timm's ``vit_small_patch16_224`` /
  ``vit_base_patch16_224`` / ``vit_large_patch16_224``. timm built with ``qk_norm=True`` has exactly
  these keys.
* ``transformer.resblocks.N.*``, ``token_embedding``, ``positional_embedding``, ``ln_final``: CLIP's
  causal text transformer (QuickGELU), pooled at the end-of-text token (the largest id).
* ``image_projection`` (vision width x embed), ``text_projection`` (text width x embed), ``logit_scale``.

The weights are loaded strictly: a checkpoint that does not match the architecture is an error.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import timm
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from timm.layers import Attention
from torch import Tensor, nn

from clipbench.models.attention import AttentionParts, register_attention
from clipbench.models.backbone import CLIPBackbone, ImageSpec, interpolate_positions, patch_grid, projection_as_matrix, projection_params

# LaCLIP trained and evaluated with torchvision's ImageNet normalisation and default (bilinear)
# resizing (train.py / eval_zeroshot_imagenet.py of the LaCLIP repository), not CLIP's.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _LaCLIPNet(nn.Module):
    """The parameter layout of LaCLIP's ``models.CLIP``, so that its state dict loads as is."""

    def __init__(
        self,
        vision_model: str,
        vision_kwargs: dict,
        embed_dim: int,
        context_length: int,
        vocab_size: int,
        width: int,
        heads: int,
        layers: int,
    ) -> None:
        super().__init__()
        self.visual = timm.create_model(vision_model, pretrained=False, num_classes=0, qk_norm=True, **vision_kwargs)
        self.transformer = Transformer(width, layers, heads, act_layer=QuickGELU)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.ln_final = LayerNorm(width)
        self.image_projection = nn.Parameter(torch.zeros(self.visual.num_features, embed_dim))
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        causal = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", causal, persistent=False)

    def encode_text(self, tokens: Tensor) -> Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


def _load_state_dict(path: str) -> dict[str, Tensor]:
    # Training checkpoints also pickle the argparse namespace; allow exactly that besides tensors.
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}


class LaCLIP(CLIPBackbone):
    def __init__(
        self,
        checkpoint: str,
        vision_model: str = "vit_base_patch16_224",
        vision_kwargs: dict | None = None,
        embed_dim: int = 512,
        context_length: int = 77,
        vocab_size: int = 49408,
        text_width: int = 512,
        text_heads: int = 8,
        text_layers: int = 12,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        self.model = _LaCLIPNet(
            vision_model,
            dict(vision_kwargs or {}),
            embed_dim,
            context_length=context_length,
            vocab_size=vocab_size,
            width=text_width,
            heads=text_heads,
            layers=text_layers,
        )
        self.model.load_state_dict(_load_state_dict(checkpoint), strict=True)
        self.model.eval()
        # Dense encoding feeds other sizes (the positional embedding interpolated by encode_image_dense).
        self.model.visual.patch_embed.strict_img_size = False
        self.embed_dim = embed_dim
        size = self.model.visual.patch_embed.img_size[0]
        self.image_spec = ImageSpec(size=size, mean=tuple(mean), std=tuple(std), interpolation=interpolation)
        self._tokenizer = SimpleTokenizer(context_length=context_length)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.visual(images) @ self.model.image_projection

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self._tokenizer(list(texts))

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def projection_parameters(self) -> dict[str, nn.Parameter]:
        return {
            **projection_params(self.model, "image_projection", "image"),
            **projection_params(self.model, "text_projection", "text"),
        }

    def projection_matrix(self, tower: str) -> Tensor:
        return projection_as_matrix(self.model, f"{tower}_projection")

    def vision_attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.model.visual.blocks]

    def vision_blocks(self) -> list[nn.Module]:
        return list(self.model.visual.blocks)

    @property
    def patch_size(self) -> int:
        return self.model.visual.patch_embed.patch_size[0]

    @property
    def prefix_tokens(self) -> int:
        return self.model.visual.num_prefix_tokens

    @property
    def pools_class_token(self) -> bool:
        return self.model.visual.global_pool == "token"

    def encode_image_dense(self, images: Tensor) -> Tensor:
        visual = self.model.visual
        grid = patch_grid(images, self.patch_size)
        prefix = 0 if visual.no_embed_class else visual.num_prefix_tokens
        positions = interpolate_positions(visual.pos_embed, visual.patch_embed.grid_size, grid, prefix)
        features = torch.func.functional_call(visual, {"pos_embed": positions}, (images,), strict=False)
        return features @ self.model.image_projection

    def vision_token_embeddings(self, tokens: Tensor) -> Tensor:
        visual = self.model.visual  # timm: norm, then (token pooling,) fc_norm and an identity head
        return visual.fc_norm(visual.norm(tokens)) @ self.model.image_projection

    def text_attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.model.transformer.resblocks]

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self._tokenizer.decoder[int(i)] for i in ids]


def _timm_attention(module: Attention, args: tuple, kwargs: dict) -> AttentionParts:
    """timm's ``Attention``: fused qkv Linear, optional q/k norm, optional output norm and gate.

    ViTs call it without a mask and non-causally, which is all this recomputes.
    """
    x = args[0] if args else kwargs["x"]
    b, n, _ = x.shape
    q, k, v = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)

    def project(context: Tensor) -> Tensor:
        hidden = module.norm(context)
        if getattr(module, "gate", None) is not None:
            hidden = hidden * module.gate(x).sigmoid()
        return module.proj(hidden)

    return AttentionParts(q, k, v, None, project)


register_attention(Attention, _timm_attention)
