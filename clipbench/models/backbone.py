"""The one interface every task talks to, whatever library a CLIP model came from.

A task (training, zero-shot, sparse concepts, purity, explainability, scoring) only ever calls the
methods of :class:`CLIPBackbone`. Each source (from-scratch towers, Hugging Face, open_clip, LaCLIP,
clipbench checkpoints) provides one subclass in its own module.
"""

from __future__ import annotations

import abc
import functools
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlparse
from urllib.request import getproxies

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = 100.0


@functools.lru_cache(maxsize=64)
def _channel_values(values: tuple[float, ...], device: torch.device) -> Tensor:
    """Per-channel constants as a (1, C, 1, 1) tensor on ``device``, built once rather than copied
    to the device with every batch."""
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its pixels: square resolution, resampling and per-channel normalisation.

    Every image path resizes with :meth:`fit` (the per-image transform of data loaders, the decode
    cache, and batches kept on the accelerator), so they all preprocess identically: the model's own
    interpolation, antialiased (PIL-like) as in the model's own preprocessing, short side to the
    target size, then a centre crop.
    """

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"

    def fit(self, images: Tensor, size: int | None = None) -> Tensor:
        """uint8 or float (..., C, H, W) on any device -> short side ``size`` (default: the model's),
        centre-cropped square. Untouched when already that size. Float results of bicubic overshoot
        are clamped back to [0, 1] (uint8 saturates by itself)."""
        size = size or self.size
        if min(images.shape[-2:]) != size:
            interpolation = v2.InterpolationMode(self.interpolation)
            images = v2.functional.resize(images, size, interpolation=interpolation, antialias=True)
            if images.is_floating_point():
                images = images.clamp(0, 1)
        if images.shape[-2:] != (size, size):
            images = v2.functional.center_crop(images, size)
        return images

    def pil_transform(self, augment: Sequence | None = None) -> v2.Compose:
        """A PIL image (or uint8 tensor) -> the model's input: :meth:`fit`, optional augmentation
        transforms, scale to [0, 1], normalise."""
        return v2.Compose(
            [v2.ToImage(), self.fit, *(augment or ()), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        )

    def resize_batch(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) on any device -> float in [0, 1] at ``size`` (resized only if needed)."""
        return self.fit(images.float().div_(255.0))

    def normalize_batch(self, x: Tensor) -> Tensor:
        return (x - _channel_values(self.mean, x.device)) / _channel_values(self.std, x.device)

    def denormalize_batch(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`normalize_batch`, back to [0, 1] pixels (for figures)."""
        return x * _channel_values(self.std, x.device) + _channel_values(self.mean, x.device)

    def batch_transform(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> the model's input, batched on the images' device."""
        return self.normalize_batch(self.resize_batch(images))


class CLIPBackbone(nn.Module, abc.ABC):
    """A dual encoder with a shared embedding space.

    Subclasses set ``embed_dim`` and ``image_spec`` and implement the abstract methods. Embeddings
    are returned *unnormalised*: tasks normalise where their method says so.
    """

    embed_dim: int
    image_spec: ImageSpec

    @abc.abstractmethod
    def encode_image(self, images: Tensor) -> Tensor:
        """Preprocessed images (B, 3, S, S) -> image embeddings (B, embed_dim)."""

    @abc.abstractmethod
    def encode_text(self, tokens: Tensor) -> Tensor:
        """Token ids from :meth:`tokenize` (N, L) -> text embeddings (N, embed_dim)."""

    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Strings -> a LongTensor of token ids (N, context_length) on the CPU."""

    def truncates(self, texts: Sequence[str]) -> list[bool]:
        """Whether :meth:`tokenize` cuts each text short: it needs more positions (special tokens
        included) than the context holds. Serves every source whose ``_tokenizer`` is open_clip's
        SimpleTokenizer or a Hugging Face tokenizer (or open_clip's wrapper of one)."""
        context = self.tokenize([""]).shape[-1]
        return [length > context for length in untruncated_lengths(self._tokenizer, texts)]

    def tokenize_flagged(self, texts: Sequence[str]) -> tuple[Tensor, list[bool]]:
        """:meth:`tokenize` and :meth:`truncates` of the same texts. Sources whose tokenizer reports
        truncation while it encodes override this with one pass (scoring tokenises and flags every caption)."""
        return self.tokenize(texts), self.truncates(texts)

    @abc.abstractmethod
    def projection_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters of the image and text projections, by name, for projection-only training.

        Keys are ``image.<name>`` and ``text.<name>`` so a caller can tell the towers apart.
        """

    @abc.abstractmethod
    def projection_matrix(self, tower: str) -> Tensor:
        """The projection of ``tower`` ("image" or "text") as an (in_features, embed_dim) matrix."""

    @property
    @abc.abstractmethod
    def logit_scale(self) -> Tensor:
        """The learned log inverse temperature (a scalar tensor, before ``exp``)."""

    def logit_bias(self) -> Tensor | None:
        """SigLIP-style models add a learned bias to the scaled similarity; CLIP has none."""
        return None

    def similarity_scale(self) -> Tensor:
        """``exp(logit_scale)``: the factor on cosine similarities in the contrastive loss."""
        return self.logit_scale.exp()

    def clamp_logit_scale_(self) -> None:
        """Keep the learned scale in CLIP's range (at most 100) by clamping the parameter itself, after
        each optimizer step as open_clip does. Clamping ``exp()`` in the forward instead would give the
        parameter zero gradient above the cap, so once there it could never come back down."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    def vision_attention_modules(self) -> list[nn.Module]:
        """The self-attention modules of the vision tower, first to last (ViTs only).

        :mod:`clipbench.models.attention` records queries, keys, values, attention weights and the
        attention output of these modules with the autograd graph intact.
        """
        raise NotImplementedError(f"{type(self).__name__} has no vision transformer attention blocks")

    # --- dense vision: what explanation methods need beyond the embedding (ViTs only) -------------
    def vision_blocks(self) -> list[nn.Module]:
        """The vision transformer's blocks, first to last; each maps batch-first tokens (B, N, width)
        to tokens, the residual stream."""
        raise NotImplementedError(f"{type(self).__name__} has no vision transformer blocks")

    @property
    def patch_size(self) -> int:
        """The side of a (square) patch in pixels: a (B, 3, H, W) image has an (H/p, W/p) grid of patches."""
        raise NotImplementedError(f"{type(self).__name__} has no patch grid")

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch grid in the vision transformer's sequence (class token, registers)."""
        raise NotImplementedError(f"{type(self).__name__} has no patch grid")

    @property
    def pools_class_token(self) -> bool:
        """Whether the image embedding is read from a class token at position 0 (CLIP), rather than
        pooled otherwise (SigLIP's attention pooling, average pooling)."""
        return False

    def encode_image_dense(self, images: Tensor) -> Tensor:
        """Images of any size whose sides are multiples of :attr:`patch_size` (B, 3, H, W) -> image
        embeddings, the positional embedding bicubically interpolated to the (H/p, W/p) grid
        (:func:`interpolate_positions`; the identity at the training resolution). Models without a patch
        grid take only their own resolution."""
        if images.shape[-2:] != (self.image_spec.size, self.image_spec.size):
            raise NotImplementedError(f"{type(self).__name__} encodes only {self.image_spec.size}x{self.image_spec.size} images")
        return self.encode_image(images)

    def vision_token_embeddings(self, tokens: Tensor) -> Tensor:
        """Tokens leaving the last vision block (B, N, width) -> each token through the tower's final
        norm and projection (B, N, embed_dim): the class token's row is the image embedding."""
        raise NotImplementedError(f"{type(self).__name__} has no per-token image head")

    # --- the text tower's internals: what text explanations need ------------------------------
    def text_attention_modules(self) -> list[nn.Module]:
        """The self-attention modules of the text tower, first to last (recorded like the vision ones)."""
        raise NotImplementedError(f"{type(self).__name__} exposes no text attention modules")

    def text_pool_positions(self, tokens: Tensor) -> Tensor:
        """Token ids (N, L) -> the position (N,) whose final state becomes the text embedding (CLIP: the
        end-of-text token, the largest id)."""
        return tokens.argmax(dim=-1)

    def trim_text_padding(self, tokens: Tensor) -> Tensor:
        """Token ids (N, L) -> (N, L' <= L) that :meth:`encode_text` embeds exactly as before: the columns
        after the batch's last pooled position dropped, where the tower is causal (nothing after a row's
        pooled position reaches its embedding) and accepts short rows. Short captions then cost the text
        tower a fraction of the full context (scoring). By default nothing is dropped."""
        return tokens

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Token ids -> their tokenizer pieces (CLIP's BPE: a piece ending a word ends with ``</w>``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot name its tokens")

    @property
    def image_transform(self) -> v2.Compose:
        """The model's own eval preprocessing for PIL images."""
        return self.image_spec.pil_transform()


def interpolate_positions(positions: Tensor, grid: tuple[int, int], new_grid: tuple[int, int], prefix: int) -> Tensor:
    """A ViT's positional embedding ((prefix + gh*gw, width), optionally with a leading batch dim of 1)
    for a new patch grid: the grid part resized bicubically (``align_corners=False``), the prefix
    (class token) rows kept. The identity when the grid is unchanged."""
    if tuple(grid) == tuple(new_grid):
        return positions
    head, body = positions[..., :prefix, :], positions[..., prefix:, :]
    width = body.shape[-1]
    body = body.reshape(1, *grid, width).permute(0, 3, 1, 2)
    body = F.interpolate(body.float(), size=tuple(new_grid), mode="bicubic", align_corners=False).to(positions.dtype)
    body = body.permute(0, 2, 3, 1).reshape(*positions.shape[:-2], new_grid[0] * new_grid[1], width)
    return torch.cat([head, body], dim=-2)


def patch_grid(images: Tensor, patch_size: int) -> tuple[int, int]:
    """The patch grid of (B, 3, H, W) images; the sides must be multiples of the patch size."""
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    return h // patch_size, w // patch_size


def untruncated_lengths(tokenizer: object, texts: Sequence[str]) -> list[int]:
    """Token positions each text takes before any truncation, special tokens included."""
    # open_clip is imported only when it made the tokenizer, or a subclass of one of its tokenizers did
    # (clipbench.models.vocabulary.CompactTokenizer).
    if any(cls.__module__.startswith("open_clip") for cls in type(tokenizer).__mro__):
        from open_clip.tokenizer import SimpleTokenizer

        if isinstance(tokenizer, SimpleTokenizer):  # start + BPE tokens (after its own cleaning) + end
            return [len(tokenizer.encode(text)) + 2 for text in texts]
        # open_clip's HFTokenizer / SigLipTokenizer wrap a Hugging Face tokenizer (the first cleans text)
        clean = getattr(tokenizer, "clean_fn", None)
        texts, tokenizer = [clean(text) for text in texts] if clean else texts, tokenizer.tokenizer
    return [len(ids) for ids in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]


def init_logit_scale(temperature: float = 0.07) -> nn.Parameter:
    """CLIP's initial learnable log inverse temperature."""
    return nn.Parameter(torch.tensor(math.log(1.0 / temperature)))


def resolve_projection(root: nn.Module, path: str) -> nn.Linear | nn.Parameter:
    """The projection at dotted ``path`` under ``root``: an ``nn.Linear`` or an (in, out) parameter."""
    *parents, leaf = path.split(".")
    owner = root.get_submodule(".".join(parents)) if parents else root
    return getattr(owner, leaf)


def projection_params(root: nn.Module, path: str, prefix: str) -> dict[str, nn.Parameter]:
    """Named parameters of the projection at ``path`` (weight and bias of a Linear, or the matrix)."""
    proj = resolve_projection(root, path)
    if isinstance(proj, nn.Linear):
        return {f"{prefix}.{path}.{name}": p for name, p in proj.named_parameters()}
    return {f"{prefix}.{path}": proj}


def projection_as_matrix(root: nn.Module, path: str) -> Tensor:
    """The projection at ``path`` as (in_features, embed_dim), whatever its storage layout."""
    proj = resolve_projection(root, path)
    return proj.weight.T if isinstance(proj, nn.Linear) else proj


def download_blocker(url: str) -> str | None:
    """Why a download from ``url`` cannot work right now, or None if it may.

    Hub clients retry an unreachable host for tens of seconds before giving up; a pretrained source
    checks this first so that a machine without network fails at once with a useful message.
    Behind a proxy a direct probe proves nothing, so the download is left to try.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if getproxies():
        return None
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=3).close()
    except OSError as err:
        return f"{parsed.hostname} is unreachable ({err})"
    return None
