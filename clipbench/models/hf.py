"""Hugging Face transformers CLIP and SigLIP as :class:`CLIPBackbone`.

Both families are loaded with ``from_pretrained`` from a hub id or a local directory written by
``save_pretrained`` (model, tokenizer and image processor saved side by side). Embeddings come from
the model's own ``get_image_features`` / ``get_text_features``, so they are exactly what
transformers computes.

What each family exposes as its projections (used for projection-only training):

* CLIP: ``visual_projection`` and ``text_projection``, bias-free Linears into the joint space.
* SigLIP has no separate projection. Text: ``text_model.head``, the Linear applied to the pooled
  last token, a true projection. Image: ``vision_model.head.mlp.fc2``, the last Linear of the
  attention-pooling head; the embedding is ``pooled + fc2(...)`` (a residual), so its matrix is
  the trainable map into the joint space but not the whole map.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

import huggingface_hub
import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel
from transformers.image_utils import PILImageResampling
from transformers.models.clip.modeling_clip import CLIPAttention
from transformers.models.siglip.modeling_siglip import SiglipAttention

from clipbench.models.attention import AttentionParts, causal_mask, register_attention, split_heads
from clipbench.models.backbone import CLIPBackbone, ImageSpec, download_blocker, patch_grid, projection_as_matrix, projection_params


def _load_kwargs(name_or_path: str) -> dict:
    """``from_pretrained`` keyword arguments that make a missing network fail at once.

    A local directory needs nothing; a hub id already in the cache is read from the cache only; any
    other hub id needs a download, which we refuse up front when the hub cannot be reached (the
    hub client would otherwise retry for about half a minute).
    """
    if os.path.isdir(name_or_path):
        return {}
    if isinstance(huggingface_hub.try_to_load_from_cache(name_or_path, "config.json"), str):
        return {"local_files_only": True}
    blocker = download_blocker(huggingface_hub.constants.ENDPOINT)
    if blocker:
        raise OSError(
            f"cannot download Hugging Face model '{name_or_path}': {blocker}, and it is not a local directory "
            "nor in the local cache. On a machine with network run "
            f"`AutoModel.from_pretrained('{name_or_path}').save_pretrained(DIR)` (and the same for AutoTokenizer "
            "and AutoImageProcessor), copy DIR here and pass model.backbone.name_or_path=DIR."
        )
    return {}


def _rust_encoder(tokenizer, length: int) -> Tokenizer | None:
    """A copy of a fast tokenizer's Rust backend that truncates and pads to ``length`` exactly as the
    tokenizer's own call with ``padding="max_length", truncation=True`` does, for a whole batch in one
    call without the Python wrapper (which takes three times as long as the encoding on short captions:
    scoring tokenises every caption). None for a slow (Python) tokenizer or one without a pad token."""
    if not getattr(tokenizer, "is_fast", False) or tokenizer.pad_token_id is None:
        return None
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: the wrapper reconfigures its own per call
    encoder.enable_truncation(length, direction=tokenizer.truncation_side)
    encoder.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, length=length)
    return encoder


class _HFBackbone(CLIPBackbone):
    """Shared by CLIP and SigLIP: both have ``vision_model``/``text_model`` with the same layout."""

    model_class: type
    projection_paths: ClassVar[dict[str, str]]

    def __init__(self, name_or_path: str) -> None:
        super().__init__()
        kwargs = _load_kwargs(name_or_path)
        self.model = self.model_class.from_pretrained(name_or_path, **kwargs).eval()
        self._tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
        config = self.model.config
        self.embed_dim = self.projection_matrix("image").shape[1]
        # The model's native resolution; the processor's mean/std/resampling are how it was trained.
        self.image_spec = ImageSpec(
            size=config.vision_config.image_size,
            mean=tuple(processor.image_mean),
            std=tuple(processor.image_std),
            interpolation=PILImageResampling(processor.resample).name.lower(),
        )
        # Text is padded to the full position table: SigLIP pools the last position and was trained
        # that way; CLIP pools the end-of-text token, which padding after it cannot change (causal).
        self.context_length = config.text_config.max_position_embeddings
        self._encoder = _rust_encoder(self._tokenizer, self.context_length)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.get_image_features(pixel_values=images).pooler_output

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.get_text_features(input_ids=tokens).pooler_output

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        if self._encoder is not None:
            return self.tokenize_flagged(texts)[0]
        return self._tokenizer(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        ).input_ids

    def tokenize_flagged(self, texts: Sequence[str]) -> tuple[Tensor, list[bool]]:
        if self._encoder is None:
            return super().tokenize_flagged(texts)
        encodings = self._encoder.encode_batch_fast(list(texts))  # a truncated text keeps its overflow
        ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64).reshape(len(encodings), self.context_length)
        return torch.from_numpy(ids), [bool(encoding.overflowing) for encoding in encodings]

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.reshape(())  # SigLIP stores it with shape (1,)

    def projection_parameters(self) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for tower, path in self.projection_paths.items():
            params.update(projection_params(self.model, path, tower))
        return params

    def projection_matrix(self, tower: str) -> Tensor:
        return projection_as_matrix(self.model, self.projection_paths[tower])

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.vision_model.encoder.layers]

    def vision_blocks(self) -> list[nn.Module]:
        return list(self.model.vision_model.encoder.layers)

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    def encode_image_dense(self, images: Tensor) -> Tensor:
        # transformers' own interpolation is the bicubic, align_corners=False resize of the patch grid.
        patch_grid(images, self.patch_size)
        return self.model.get_image_features(pixel_values=images, interpolate_pos_encoding=True).pooler_output

    def text_attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.text_model.encoder.layers]

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return self._tokenizer.convert_ids_to_tokens([int(i) for i in ids])


class HFCLIP(_HFBackbone):
    """``transformers.CLIPModel``, e.g. ``openai/clip-vit-base-patch32``."""

    model_class = CLIPModel
    projection_paths: ClassVar[dict[str, str]] = {"image": "visual_projection", "text": "text_projection"}
    prefix_tokens = 1
    pools_class_token = True

    def vision_token_embeddings(self, tokens: Tensor) -> Tensor:
        return self.model.visual_projection(self.model.vision_model.post_layernorm(tokens))

    def text_pool_positions(self, tokens: Tensor) -> Tensor:
        # CLIPTextTransformer's rule: old configs (eos id 2) pool the largest id, newer the first eos.
        eos = self.model.config.text_config.eos_token_id
        return tokens.argmax(dim=-1) if eos == 2 else (tokens == eos).int().argmax(dim=-1)

    def trim_text_padding(self, tokens: Tensor) -> Tensor:
        # CLIPTextTransformer: causal attention, position ids and mask cut to the input's length.
        return tokens[:, : int(self.text_pool_positions(tokens).max()) + 1]


class HFSigLIP(_HFBackbone):
    """``transformers.SiglipModel``, e.g. ``google/siglip-base-patch16-224``.

    Its hub tokenizer is SentencePiece-based and needs the ``sentencepiece`` package; a directory
    whose tokenizer was saved as ``tokenizer.json`` loads without it.
    """

    model_class = SiglipModel
    projection_paths: ClassVar[dict[str, str]] = {"image": "vision_model.head.mlp.fc2", "text": "text_model.head"}
    prefix_tokens = 0  # no class token: the embedding comes from an attention-pooling head

    def text_pool_positions(self, tokens: Tensor) -> Tensor:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)  # SigLIP pools the last position

    def logit_bias(self) -> Tensor:
        return self.model.logit_bias.reshape(())

    def clamp_logit_scale_(self) -> None:
        """SigLIP never clamps its scale: the learned bias is calibrated against the raw exp(scale)."""


def _hf_attention(module: CLIPAttention | SiglipAttention, args: tuple, kwargs: dict) -> AttentionParts:
    """CLIPAttention / SiglipAttention: separate q/k/v/out Linears; returns (output, weights).

    The text towers are causal: transformers passes either a mask or, for fused kernels, ``is_causal``."""
    x = args[0] if args else kwargs["hidden_states"]
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    if mask is not None and mask.dtype == torch.bool:
        mask = ~mask  # transformers' boolean masks mark what may be attended; explicit_attention the opposite
    if mask is None and kwargs.get("is_causal", getattr(module, "is_causal", False)):
        mask = causal_mask(x.shape[1], x.device)
    q, k, v = (split_heads(proj(x), module.num_heads) for proj in (module.q_proj, module.k_proj, module.v_proj))
    return AttentionParts(q, k, v, mask, module.out_proj, returns=lambda out: (out, None))


register_attention(CLIPAttention, _hf_attention)
register_attention(SiglipAttention, _hf_attention)
