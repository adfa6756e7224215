"""open_clip models as :class:`CLIPBackbone`: any ``model_name`` open_clip knows, with weights from a
pretrained tag (downloaded by open_clip), a local weights file, or none (random initialisation)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import open_clip
import torch
from huggingface_hub import constants, try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.modified_resnet import ModifiedResNet
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import Tensor, nn

from clipbench.models.backbone import (
    CLIPBackbone,
    ImageSpec,
    download_blocker,
    interpolate_positions,
    patch_grid,
    projection_as_matrix,
    projection_params,
)


def vit_or_fail(visual: nn.Module, owner: str) -> VisionTransformer:
    """The tower as an open_clip ViT, or the error every dense-vision method of a ResNet tower raises."""
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(f"{owner} has a {type(visual).__name__} image tower, not a vision transformer")
    return visual


def vit_encode_dense(visual: VisionTransformer, images: Tensor) -> Tensor:
    """An open_clip ViT's embedding of images of any patch-multiple size: its own forward with the
    positional embedding replaced, for this call only, by the one interpolated to the images' grid."""
    positions = interpolate_positions(visual.positional_embedding, visual.grid_size, patch_grid(images, visual.conv1.kernel_size[0]), 1)
    return torch.func.functional_call(visual, {"positional_embedding": positions}, (images,), strict=False)


def vit_token_embeddings(visual: VisionTransformer, tokens: Tensor) -> Tensor:
    """Every token through an open_clip ViT's final LayerNorm and projection."""
    if visual.attn_pool is not None:
        raise NotImplementedError("an attention-pooled open_clip ViT has no per-token image head")
    tokens = visual.ln_post(tokens)
    return tokens @ visual.proj if visual.proj is not None else tokens


def pool_positions(tokens: Tensor, pool_type: str, eos_token_id: int | None = None) -> Tensor:
    """Where open_clip's ``text_global_pool`` reads the text embedding, per sequence."""
    if pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if pool_type == "eos":
        return (tokens == eos_token_id).int().argmax(dim=-1)
    if pool_type in ("first", "last"):
        return torch.full((tokens.shape[0],), 0 if pool_type == "first" else tokens.shape[1] - 1, device=tokens.device)
    raise NotImplementedError(f"text pooling {pool_type!r} reads no single token")


def bpe_pieces(tokenizer: object, ids: Sequence[int]) -> list[str]:
    """Token ids -> BPE pieces for open_clip's own tokenizer or a Hugging Face one it wraps."""
    if isinstance(tokenizer, SimpleTokenizer):
        return [tokenizer.decoder[int(i)] for i in ids]
    return list(getattr(tokenizer, "tokenizer", tokenizer).convert_ids_to_tokens([int(i) for i in ids]))


# Where each image tower keeps its projection into the joint space, relative to the model.
_IMAGE_PROJECTION = {VisionTransformer: "visual.proj", ModifiedResNet: "visual.attnpool.c_proj"}


def _text_projection(model: nn.Module) -> str | None:
    """open_clip's CLIP keeps the text tower's parts on the model itself; other models in ``text``."""
    if isinstance(model, open_clip.CLIP):
        return "text_projection"
    return "text.text_projection" if isinstance(getattr(model, "text", None), TextTransformer) else None


def _tag_is_cached(cfg: dict) -> bool:
    """Whether open_clip finds a tag's weights without downloading (it prefers the HF hub copy)."""
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        # open_clip first looks for a safetensors twin of the named file.
        twin = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else os.path.splitext(filename)[0] + ".safetensors"
        return any(isinstance(try_to_load_from_cache(repo, name), str) for name in (twin, filename))
    return os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"])))


def _check_weights_reachable(model_name: str, pretrained: str) -> None:
    """Fail at once, with the offline alternative, when a tag's weights need an impossible download
    (the hub client would otherwise retry for about half a minute)."""
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg or _tag_is_cached(cfg):
        return  # a file path, or an unknown tag that open_clip itself reports
    blocker = download_blocker(constants.ENDPOINT if cfg.get("hf_hub") else cfg["url"])
    if blocker:
        raise OSError(
            f"cannot download open_clip weights '{pretrained}' for {model_name}: {blocker}. Download the weights "
            "file on a machine with network, copy it here and pass its path instead: "
            "model.backbone.pretrained=/path/to/weights.pt (or .bin/.safetensors)."
        )


class OpenCLIPVision:
    """The dense-vision part of the backbone interface for an open_clip image tower (``_image_tower``),
    shared by open_clip models and clipbench's from-scratch models; a ResNet tower raises
    NotImplementedError, as the interface asks. Put it before :class:`CLIPBackbone` in the bases."""

    def _image_tower(self) -> nn.Module:
        raise NotImplementedError

    def _vit(self) -> VisionTransformer:
        return vit_or_fail(self._image_tower(), type(self).__name__)

    def vision_attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.vision_blocks()]

    def vision_blocks(self) -> list[nn.Module]:
        return list(self._vit().transformer.resblocks)

    @property
    def patch_size(self) -> int:
        return self._vit().conv1.kernel_size[0]

    @property
    def prefix_tokens(self) -> int:
        return 1 if self._vit().class_embedding is not None else 0

    @property
    def pools_class_token(self) -> bool:
        visual = self._image_tower()
        return isinstance(visual, VisionTransformer) and visual.attn_pool is None and visual.pool_type == "tok"

    def encode_image_dense(self, images: Tensor) -> Tensor:
        if not isinstance(self._image_tower(), VisionTransformer):
            return super().encode_image_dense(images)  # a ResNet: its own resolution only
        return vit_encode_dense(self._vit(), images)

    def vision_token_embeddings(self, tokens: Tensor) -> Tensor:
        return vit_token_embeddings(self._vit(), tokens)


class OpenCLIP(OpenCLIPVision, CLIPBackbone):
    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None) -> None:
        super().__init__()
        if pretrained and not os.path.isfile(pretrained):
            _check_weights_reachable(model_name, pretrained)
        self.model = open_clip.create_model(model_name, pretrained=pretrained).eval()
        self._tokenizer = open_clip.get_tokenizer(model_name)
        cfg = self.model.visual.preprocess_cfg
        size = cfg["size"]
        self.image_spec = ImageSpec(
            size=size if isinstance(size, int) else size[0],
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg["interpolation"],
        )
        # open_clip keeps the joint width on no attribute common to all towers; measure it.
        with torch.no_grad():
            self.embed_dim = self.encode_text(self.tokenize([""])).shape[-1]

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self._tokenizer(list(texts))

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.reshape(())

    def logit_bias(self) -> Tensor | None:
        bias = getattr(self.model, "logit_bias", None)  # SigLIP-trained open_clip models only
        return None if bias is None else bias.reshape(())

    def _projection_paths(self) -> dict[str, str]:
        """Resolved on demand so that towers without a known projection still encode."""
        image, text = _IMAGE_PROJECTION.get(type(self.model.visual)), _text_projection(self.model)
        if image is None or text is None:
            towers = f"{type(self.model).__name__} with {type(self.model.visual).__name__}"
            raise TypeError(f"no known projection layout for {towers}")
        return {"image": image, "text": text}

    def projection_parameters(self) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for tower, path in self._projection_paths().items():
            params.update(projection_params(self.model, path, tower))
        return params

    def projection_matrix(self, tower: str) -> Tensor:
        return projection_as_matrix(self.model, self._projection_paths()[tower])

    def _image_tower(self) -> nn.Module:
        return self.model.visual

    def _text_transformer(self) -> nn.Module:
        # open_clip's CLIP keeps the text tower's parts on the model itself, CustomTextCLIP in `text`.
        return self.model.transformer if isinstance(self.model, open_clip.CLIP) else self.model.text.transformer

    def text_attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self._text_transformer().resblocks]

    def text_pool_positions(self, tokens: Tensor) -> Tensor:
        owner = self.model if isinstance(self.model, open_clip.CLIP) else self.model.text
        pool_type = getattr(owner, "text_pool_type", getattr(owner, "pool_type", "argmax"))
        return pool_positions(tokens, pool_type, getattr(owner, "text_eos_id", getattr(owner, "eos_id", None)))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return bpe_pieces(self._tokenizer, ids)
