"""CLIP built from scratch: any image tower from :mod:`clipbench.models.towers` plus open_clip's
causal text Transformer (QuickGELU, final LayerNorm, end-of-text pooling, linear projection) and
CLIP's BPE tokenizer (its vocabulary ships with open_clip, so it works offline).

The text tower embeds CLIP's full vocabulary (``vocabulary=None``) or a compact one
(:mod:`clipbench.models.vocabulary`): a list of BPE ids, or ``"captions"``, which
:class:`~clipbench.modules.contrastive.CLIPTrainingModule` resolves from the training captions in its
``setup``. Until then the model has no text tower: it is built once its vocabulary size is known."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
from clipbench.models.vocabulary import CompactTokenizer, vocabulary_ids

# Where each tower keeps its final projection into the joint space.
_IMAGE_PROJECTION = {VisionTransformer: "proj", ModifiedResNet: "attnpool.c_proj", CifarResNet: "proj"}
_TEXT_PROJECTION = "text_projection"

CAPTIONS = "captions"  # vocabulary= value: the compact vocabulary of the training captions, resolved by the training module


class UnresolvedVocabulary(AttributeError):
    """The text tower or tokenizer of a model whose ``"captions"`` vocabulary is not resolved yet (an
    AttributeError, so ``hasattr`` still answers False)."""


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
        vocabulary: Sequence[int] | str | None = None,
    ) -> None:
        super().__init__()
        if type(image_tower) not in _IMAGE_PROJECTION:
            raise TypeError(f"unsupported image tower {type(image_tower).__name__}; known: {[t.__name__ for t in _IMAGE_PROJECTION]}")
        if isinstance(vocabulary, str) and vocabulary != CAPTIONS:
            raise ValueError(
                f"model.backbone.vocabulary must be null (CLIP's full vocabulary), {CAPTIONS!r} or a list of BPE ids; got {vocabulary!r}"
            )
        self.embed_dim = embed_dim
        self.image_spec = ImageSpec(size=image_size)
        self.context_length = context_length
        self.visual = image_tower
        self._text_options = {"width": text_width, "heads": text_heads, "layers": text_layers}
        self.vocabulary = vocabulary if vocabulary is None or vocabulary == CAPTIONS else [int(i) for i in vocabulary]
        if self.vocabulary != CAPTIONS:
            self._build_text_tower()  # before the logit scale: the parameter order of existing checkpoints' optimiser states
        else:
            # The tower's initialisation is drawn now, where a fixed vocabulary's would be, not from whatever the
            # global generator holds at resolution (DDP re-seeds each rank in between; one process does not).
            self._text_seed = int(torch.randint(2**62, ()))
        self._logit_scale = init_logit_scale(init_temperature)

    def _build_text_tower(self) -> None:
        """The tokenizer of ``self.vocabulary`` and a text tower embedding exactly its ids."""
        if self.vocabulary is None:
            self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        else:
            self._tokenizer = CompactTokenizer(self.vocabulary, self.context_length)
        self.text = TextTransformer(
            context_length=self.context_length,
            vocab_size=self._tokenizer.vocab_size,
            output_dim=self.embed_dim,
            act_layer=QuickGELU,
            **self._text_options,
        ).to(next(self.visual.parameters()).device)  # resolved after the model moved: where the rest is

    def resolve_vocabulary(self, texts: Sequence[str]) -> list[int]:
        """Builds the text tower of a ``"captions"`` model on the compact vocabulary of ``texts`` (the
        training captions) and returns its BPE ids, which rebuild the same model as ``vocabulary=``."""
        if self.vocabulary != CAPTIONS:
            raise RuntimeError(f"resolve_vocabulary: only a {CAPTIONS!r} vocabulary is resolved, once; this model's is set already")
        self.vocabulary = vocabulary_ids(texts)
        with torch.random.fork_rng(devices=[]):  # built on the CPU, then moved
            torch.manual_seed(self._text_seed)
            self._build_text_tower()
        return self.vocabulary

    def __getattr__(self, name: str):
        # Reached only for names not found the usual way (nn.Module keeps submodules out of __dict__).
        if name in ("text", "_tokenizer") and self.__dict__.get("vocabulary") == CAPTIONS:
            raise UnresolvedVocabulary(
                f"model.backbone.vocabulary={CAPTIONS!r}: the text tower is built when the training module resolves the vocabulary "
                "from the training captions (CLIPTrainingModule.setup, or resolve_vocabulary(texts)); use "
                "model.backbone.vocabulary=null (CLIP's full vocabulary) or a list of BPE ids for a model used without training"
            )
        return super().__getattr__(name)

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
