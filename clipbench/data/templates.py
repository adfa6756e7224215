"""Prompt templates that turn class names into captions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

# Several phrasings per class; training picks one at random per sample.
TRAIN_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {} photo.",
    "a {} picture.",
)

SINGLE_TEMPLATE = ("a photo of a {}.",)

# The 18 templates OpenAI used for zero-shot CIFAR-10/100.
OPENAI_CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

TEMPLATE_SETS = {"train": TRAIN_TEMPLATES, "single": SINGLE_TEMPLATE, "openai_cifar": OPENAI_CIFAR_TEMPLATES}


def readable(class_name: str) -> str:
    """Folder-style names ("aquarium_fish") read better in a caption as "aquarium fish"."""
    return class_name.replace("_", " ")


def resolve_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A named set, a path to a JSON file (``{"templates": [...]}`` or a list), or the list itself."""
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return TEMPLATE_SETS[spec]
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"templates: {spec!r} is neither a known set {sorted(TEMPLATE_SETS)} nor a JSON file")
        loaded = json.loads(path.read_text())
        spec = loaded["templates"] if isinstance(loaded, dict) else loaded
    templates = tuple(spec)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"templates: each template needs a '{{}}' placeholder for the class name; bad: {bad or 'empty list'}")
    return templates


def captions(templates: Sequence[str], class_names: Sequence[str]) -> list[list[str]]:
    """captions[t][c] = template t filled with class c."""
    return [[t.format(readable(c)) for c in class_names] for t in templates]
