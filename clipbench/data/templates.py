"""Prompt templates that turn class names into captions, and each dataset's own zero-shot prompts.

A dataset's zero-shot protocol (readable class names and templates, as CLIP_benchmark defines them)
ships as data: ``prompts/<data.name>.json`` holds ``templates`` and, where the dataset's own names are
not readable ("Faces_easy", "AnnualCrop"), ``classnames`` mapping each raw name to a readable one.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).parent / "prompts"
FALLBACK_PROMPTS = "imagenet"  # OpenAI's 80 ImageNet templates: CLIP_benchmark's default for other datasets

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
DATASET_TEMPLATES = "dataset"  # the named set meaning "the evaluated dataset's own templates"


def readable(class_name: str) -> str:
    """Folder-style names ("aquarium_fish") read better in a caption as "aquarium fish"."""
    return class_name.replace("_", " ")


@functools.cache
def dataset_prompts(dataset: str) -> dict:
    """The shipped zero-shot prompts of ``dataset`` (``templates``, optional ``classnames``), or the
    fallback templates for a dataset without its own file (``imagefolder``, ``synthetic``)."""
    path = PROMPTS_DIR / f"{dataset}.json"
    if not path.is_file():
        return {"templates": dataset_prompts(FALLBACK_PROMPTS)["templates"]}
    return json.loads(path.read_text())


def dataset_class_names(dataset: str, classes: Sequence[str]) -> list[str]:
    """Readable class names for captions: the dataset's shipped names, matched by raw name (so a copy
    whose classes come in another order still gets the right names), else the raw name made readable."""
    names = dataset_prompts(dataset).get("classnames", {})
    unknown = [c for c in classes if c not in names]
    if names and unknown:
        log.warning("%s: no shipped readable name for classes %s; using them as they are", dataset, unknown[:5])
    return [names.get(c, readable(c)) for c in classes]


def resolve_templates(spec: str | Sequence[str], dataset: str | None = None) -> tuple[str, ...]:
    """A named set (``dataset``: the shipped templates of ``dataset``), a path to a JSON file
    (``{"templates": [...]}`` or a list), or the list itself. CLIP_benchmark's ``{c}`` placeholder is
    accepted as well as ``{}``, so its template files work as they are."""
    if isinstance(spec, str):
        if spec == DATASET_TEMPLATES:
            if dataset is None:
                raise ValueError(f"templates: {DATASET_TEMPLATES!r} needs the name of the dataset")
            spec = dataset_prompts(dataset)["templates"]
        elif spec in TEMPLATE_SETS:
            return TEMPLATE_SETS[spec]
        else:
            path = Path(spec)
            if not path.is_file():
                names = sorted([*TEMPLATE_SETS, DATASET_TEMPLATES])
                raise ValueError(f"templates: {spec!r} is neither a known set {names} nor a JSON file")
            loaded = json.loads(path.read_text())
            spec = loaded["templates"] if isinstance(loaded, dict) else loaded
    templates = tuple(t.replace("{c}", "{}") for t in spec)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"templates: each template needs a '{{}}' placeholder for the class name; bad: {bad or 'empty list'}")
    return templates


def captions(templates: Sequence[str], class_names: Sequence[str]) -> list[list[str]]:
    """captions[t][c] = template t filled with class c."""
    return [[t.format(readable(c)) for c in class_names] for t in templates]
