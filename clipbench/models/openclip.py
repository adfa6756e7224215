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
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import Tensor, nn

from clipbench.models.backbone import CLIPBackbone, ImageSpec, download_blocker, projection_as_matrix, projection_params

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


class OpenCLIP(CLIPBackbone):
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

    def vision_attention_modules(self) -> list[nn.Module]:
        if not isinstance(self.model.visual, VisionTransformer):
            return super().vision_attention_modules()
        return [block.attn for block in self.model.visual.transformer.resblocks]
