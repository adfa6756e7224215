"""CLIP built from scratch: any image tower from :mod:`clipbench.models.towers` plus open_clip's
causal text Transformer (QuickGELU, final LayerNorm, end-of-text pooling, linear projection) and
CLIP's BPE tokenizer (its vocabulary ships with open_clip, so it works offline)."""

from __future__ import annotations

from collections.abc import Sequence

from open_clip.modified_resnet import ModifiedResNet
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer, VisionTransformer
from torch import Tensor, nn

from clipbench.models.backbone import (
    CLIPBackbone,
    ImageSpec,
    init_logit_scale,
    projection_as_matrix,
    projection_params,
)
from clipbench.models.openclip import OpenCLIPVision, bpe_pieces, pool_positions
from clipbench.models.towers import CifarResNet

# Where each tower keeps its final projection into the joint space.
_IMAGE_PROJECTION = {VisionTransformer: "proj", ModifiedResNet: "attnpool.c_proj", CifarResNet: "proj"}
_TEXT_PROJECTION = "text_projection"


class ScratchCLIP(OpenCLIPVision, CLIPBackbone):
    def __init__(
        self,
        image_tower: nn.Module,
        embed_dim: int = 256,
        image_size: int = 32,
        context_length: int = 32,
        text_width: int = 256,
        text_heads: int = 4,
        text_layers: int = 4,
        init_temperature: float = 0.07,
    ) -> None:
        super().__init__()
        if type(image_tower) not in _IMAGE_PROJECTION:
            raise TypeError(f"unsupported image tower {type(image_tower).__name__}; known: {[t.__name__ for t in _IMAGE_PROJECTION]}")
        self.embed_dim = embed_dim
        self.image_spec = ImageSpec(size=image_size)
        self.context_length = context_length
        self.visual = image_tower
        self.text = TextTransformer(
            context_length=context_length,
            width=text_width,
            heads=text_heads,
            layers=text_layers,
            output_dim=embed_dim,
            act_layer=QuickGELU,
        )
        self._tokenizer = SimpleTokenizer(context_length=context_length)
        self._logit_scale = init_logit_scale(init_temperature)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.visual(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.text(tokens)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self._tokenizer(list(texts))

    @property
    def logit_scale(self) -> Tensor:
        return self._logit_scale

    def _projection_paths(self) -> dict[str, tuple[nn.Module, str]]:
        return {"image": (self.visual, _IMAGE_PROJECTION[type(self.visual)]), "text": (self.text, _TEXT_PROJECTION)}

    def projection_parameters(self) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for tower, (root, path) in self._projection_paths().items():
            params.update(projection_params(root, path, tower))
        return params

    def projection_matrix(self, tower: str) -> Tensor:
        root, path = self._projection_paths()[tower]
        return projection_as_matrix(root, path)

    def _image_tower(self) -> nn.Module:
        return self.visual

    def text_attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.text.transformer.resblocks]

    def text_pool_positions(self, tokens: Tensor) -> Tensor:
        return pool_positions(tokens, self.text.pool_type, self.text.eos_id)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return bpe_pieces(self._tokenizer, ids)
