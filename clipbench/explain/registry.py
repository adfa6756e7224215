"""The explanation methods by name, what each needs from a backbone, and the one call that runs them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from clipbench.explain import image
from clipbench.explain.base import Targets
from clipbench.models.backbone import CLIPBackbone

ANY, VIT, CLASS_TOKEN = "any backbone", "a vision transformer", "a vision transformer pooled at a class token"


@dataclass(frozen=True)
class Method:
    fn: Callable[..., Tensor]
    needs: str  # ANY, VIT or CLASS_TOKEN
    uses_text: bool = True  # False: the map is the same whatever the text (raw attention, rollout)


METHODS: dict[str, Method] = {
    "grad_eclip": Method(image.grad_eclip, CLASS_TOKEN),
    "grad_attn": Method(image.grad_attn, CLASS_TOKEN),
    "gradcam": Method(image.gradcam, VIT),
    "raw_attention": Method(image.raw_attention, CLASS_TOKEN, uses_text=False),
    "rollout": Method(image.rollout, CLASS_TOKEN, uses_text=False),
    "game": Method(image.game, CLASS_TOKEN),
    "maskclip": Method(image.maskclip, CLASS_TOKEN),
    "surgery": Method(image.surgery, CLASS_TOKEN),
    "m2ib": Method(image.m2ib, VIT),
    "rise": Method(image.rise, ANY),
    "random": Method(image.random_map, ANY, uses_text=False),
}


class UnsupportedMethod(ValueError):
    """A method asked of a backbone that lacks what it needs; the message names the methods that work."""


def _capability(backbone: CLIPBackbone) -> str:
    try:
        backbone.vision_blocks()
    except NotImplementedError:
        return ANY
    return CLASS_TOKEN if backbone.pools_class_token else VIT


def supported_methods(backbone: CLIPBackbone) -> list[str]:
    """The names of the methods that work for ``backbone``."""
    have = _capability(backbone)
    levels = {ANY: {ANY}, VIT: {ANY, VIT}, CLASS_TOKEN: {ANY, VIT, CLASS_TOKEN}}[have]
    return [name for name, method in METHODS.items() if method.needs in levels]


_DESCRIBE = {
    ANY: "is not a vision transformer",
    VIT: "is a vision transformer without a class token",
    CLASS_TOKEN: "is a vision transformer pooled at a class token",
}


def check_methods(names: list[str], backbone: CLIPBackbone) -> None:
    """Fail before any work if a name is unknown or a method cannot run on ``backbone``."""
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown explanation methods {unknown}; known: {sorted(METHODS)}")
    works = supported_methods(backbone)
    refused = [name for name in names if name not in works]
    if refused:
        needs = " / ".join(sorted({METHODS[name].needs for name in refused}))
        raise UnsupportedMethod(
            f"{', '.join(refused)} need{'s' if len(refused) == 1 else ''} {needs}; the image tower of "
            f"{type(backbone).__name__} {_DESCRIBE[_capability(backbone)]}. Methods that work for it: {', '.join(works)}"
        )


def explain(name: str, backbone: CLIPBackbone, images: Tensor, targets: Targets, **options) -> Tensor:
    """Maps (B, h, w) of method ``name`` for ``images`` against ``targets`` (see :mod:`clipbench.explain.base`)."""
    check_methods([name], backbone)
    return METHODS[name].fn(backbone, images, targets, **options)
