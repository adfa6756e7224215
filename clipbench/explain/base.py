"""What every explanation method shares: the target it explains, and small tensor helpers.

A method explains why an image (a batch of them) matches a text: ``method(backbone, images, targets,
**options) -> maps``, with ``images`` preprocessed for the backbone (any size that is a multiple of the
patch size for ViTs, see :meth:`~clipbench.models.backbone.CLIPBackbone.encode_image_dense`) and maps
(B, h, w) on the patch grid or the pixel grid, larger = more relevant.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipbench.models.backbone import CLIPBackbone, patch_grid


@dataclass
class Targets:
    """What each image of a batch is explained against.

    text: (B, D) the text embedding image b is compared with (any scale: methods normalise it).
    prompts: (T, D) the whole prompt set, for methods that contrast a text with its alternatives
    (CLIP Surgery); index: (B,) the row of ``prompts`` that ``text`` is.
    """

    text: Tensor
    prompts: Tensor | None = None
    index: Tensor | None = None

    def to(self, device: torch.device | str) -> Targets:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Targets(move(self.text), move(self.prompts), move(self.index))


def cosine(embeddings: Tensor, text: Tensor) -> Tensor:
    """Row-wise cosine of (B, D) image embeddings with (B, D) text embeddings: the score explained."""
    return F.cosine_similarity(embeddings.float(), text.float().detach(), dim=-1)


def grid_of(backbone: CLIPBackbone, images: Tensor) -> tuple[int, int]:
    return patch_grid(images, backbone.patch_size)


def on_grid(values: Tensor, grid: tuple[int, int]) -> Tensor:
    """Per-patch values (B, h*w) -> maps (B, h, w), detached and in float32."""
    return values.detach().float().reshape(values.shape[0], *grid)


def minmax(x: Tensor, dim: int = -1) -> Tensor:
    """Scaled to [0, 1] along ``dim`` (a constant slice becomes 0)."""
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-12)


def with_graph(images: Tensor) -> Tensor:
    """The images as a leaf that requires grad, so every activation is on an autograd graph even when
    the model's parameters are frozen; gradients are then taken with ``autograd.grad`` only, which
    leaves the parameters' ``.grad`` untouched."""
    return images.detach().requires_grad_(True)


@contextmanager
def tap(module: nn.Module, where: str = "output", replace=None) -> Iterator[dict]:
    """Capture the tensor entering (``where="input"``) or leaving a module during a forward pass, as
    ``captured["x"]``; ``replace`` (output only) maps the captured output to what the module returns."""
    captured: dict = {}
    if where == "input":

        def pre_hook(_module, args):
            captured["x"] = args[0]

        handle = module.register_forward_pre_hook(pre_hook)
    else:

        def hook(_module, _args, output):
            captured["x"] = output
            return replace(output) if replace is not None else None

        handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def grad_from(module: nn.Module) -> Iterator[None]:
    """Run a forward pass without autograd up to ``module`` and with it from there on: the tokens
    entering ``module`` become a leaf that requires grad. A method that differentiates only the last
    blocks then neither stores nor tracks the earlier ones."""

    def pre_hook(_module, args, kwargs):
        torch.set_grad_enabled(True)  # the enclosing no_grad() restores the mode on exit
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        key = next(k for k, v in kwargs.items() if isinstance(v, Tensor))
        return args, {**kwargs, key: kwargs[key].detach().requires_grad_(True)}

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            yield
    finally:
        handle.remove()
