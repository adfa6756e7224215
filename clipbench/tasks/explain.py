"""``evaluate.py task=explain``: image heatmaps of every method and Grad-ECLIP's word relevance for
image-caption pairs, as a figure grid, text heatmaps and a per-method timing table.

Images are encoded densely at their own size and aspect ratio (resized to a multiple of the patch size,
at most ``task.max_side``; the positional embedding interpolated), so a heatmap covers the whole
photograph; towers without a patch grid get the image squashed to their resolution. Pairs whose
images have the same input size go through each method in one batch.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import skimage.data
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from clipbench.config import ConfigError
from clipbench.embeddings import resolve_device
from clipbench.explain import Targets, check_methods, explain, grad_eclip_text
from clipbench.explain.figures import heatmap_grid, text_heatmaps, words
from clipbench.explain.image import VARIANTS
from clipbench.explain.text import word_span
from clipbench.models.backbone import CLIPBackbone

log = logging.getLogger(__name__)

PAIRINGS = ("paired", "all")


def load_image(spec: str) -> torch.Tensor:
    """A scikit-image sample photograph by name (``chelsea``, ``astronaut``, ``coffee``...) or an image
    file, as uint8 (3, H, W)."""
    if Path(spec).expanduser().is_file():
        return decode_image(str(Path(spec).expanduser()), mode=ImageReadMode.RGB)
    loader = getattr(skimage.data, spec, None)
    if loader is None or not callable(loader):
        raise ConfigError(f"task.images: {spec!r} is neither an image file nor a scikit-image sample (e.g. chelsea, astronaut, coffee)")
    array = np.asarray(loader())
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1)


def input_size(backbone: CLIPBackbone, height: int, width: int, max_side: int) -> tuple[int, int]:
    """The size an image is explained at: its own aspect ratio, sides rounded to multiples of the
    patch size and the longer side at most ``max_side``; without a patch grid, the model's resolution."""
    try:
        patch = backbone.patch_size
    except NotImplementedError:
        return backbone.image_spec.size, backbone.image_spec.size
    scale = min(1.0, max_side / max(height, width))
    return tuple(max(patch, int(side * scale / patch + 0.5) * patch) for side in (height, width))


def prepare(backbone: CLIPBackbone, image: torch.Tensor, max_side: int) -> torch.Tensor:
    """uint8 (3, H, W) -> the normalised model input (1, 3, h, w) at :func:`input_size`."""
    spec = backbone.image_spec
    size = input_size(backbone, *image.shape[-2:], max_side)
    interpolation = v2.InterpolationMode(spec.interpolation)
    resized = v2.functional.resize(image.unsqueeze(0).float() / 255, list(size), interpolation=interpolation, antialias=True)
    return spec.normalize_batch(resized.clamp(0, 1))


def pairs(num_images: int, num_texts: int, pairing: str) -> list[tuple[int, int]]:
    """(image index, text index) of every explained pair."""
    if pairing == "all":
        return [(i, t) for i in range(num_images) for t in range(num_texts)]
    if num_images != num_texts:
        raise ConfigError(
            f"task.pairing=paired needs as many texts as images ({num_texts} texts, {num_images} images); or task.pairing=all"
        )
    return [(i, i) for i in range(num_images)]


def method_options(task: DictConfig, name: str) -> dict:
    """``task.options.<name>`` as keyword arguments; Grad-ECLIP also gets ``task.variant``."""
    node = task.options.get(name)
    options = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    if name == "grad_eclip":
        options["variant"] = task.variant
    return options


def explain_pairs(
    backbone: CLIPBackbone,
    inputs: Sequence[torch.Tensor],
    text_embeddings: torch.Tensor,
    prompt_set: torch.Tensor,
    explained: Sequence[tuple[int, int]],
    methods: Sequence[str],
    options: Mapping[str, dict],
) -> tuple[dict[str, list[torch.Tensor]], dict[str, float]]:
    """Each method's map for each pair (in the order of ``explained``) and its total seconds.

    Pairs whose inputs share a size form one batch per method."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for position, (image, _) in enumerate(explained):
        groups[tuple(inputs[image].shape)].append(position)
    maps: dict[str, list] = {name: [None] * len(explained) for name in methods}
    seconds = dict.fromkeys(methods, 0.0)
    for positions in groups.values():
        images = torch.cat([inputs[explained[p][0]] for p in positions])
        index = torch.tensor([explained[p][1] for p in positions], device=images.device)
        targets = Targets(text_embeddings[index], prompt_set, index)
        for name in methods:
            started = time.perf_counter()
            result = explain(name, backbone, images, targets, **options[name]).cpu()
            seconds[name] += time.perf_counter() - started
            for p, single in zip(positions, result):
                maps[name][p] = single
    return maps, seconds


def to_image_size(maps: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Maps on a grid -> maps at each image's original resolution (bilinear)."""
    return [
        F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].numpy() for m, size in zip(maps, sizes)
    ]


def check_positive(task: DictConfig, *keys: str) -> None:
    """Start-up check of integer options that must be at least 1, naming the key."""
    for key in keys:
        if not task[key] >= 1:
            raise ConfigError(f"task.{key}={task[key]!r} is invalid: expected a positive integer")


def check_common(task: DictConfig, models: Mapping[str, DictConfig]) -> None:
    """What task=explain and task=explain_eval both check before loading anything."""
    if task.variant not in VARIANTS:
        raise ConfigError(f"task.variant={task.variant!r} is invalid: expected one of {VARIANTS}")
    if len(models) != 1:
        raise ConfigError(f"task={task.name} explains one model: set `model` (task.models must be empty)")


def run(cfg: DictConfig, models: Mapping[str, DictConfig], out: Path) -> dict[str, float]:
    task = cfg.task
    check_common(task, models)
    check_positive(task, "max_side", "text_layers")
    if task.pairing not in PAIRINGS:
        raise ConfigError(f"task.pairing={task.pairing!r} is invalid: expected one of {PAIRINGS}")
    methods = list(task.methods)
    device = resolve_device(task.device)
    backbone: CLIPBackbone = instantiate(next(iter(models.values())).backbone).to(device).eval()
    check_methods(methods, backbone)
    originals = [load_image(spec) for spec in task.images]
    texts = list(task.texts)
    explained = pairs(len(originals), len(texts), task.pairing)
    inputs = [prepare(backbone, image, task.max_side).to(device) for image in originals]
    # CLIP Surgery contrasts each text with the others: a lone text is contrasted with the empty one.
    prompt_texts = texts if len(set(texts)) > 1 else [*texts, ""]
    with torch.no_grad():
        prompt_set = backbone.encode_text(backbone.tokenize(prompt_texts).to(device)).float()
    options = {name: method_options(task, name) for name in methods}
    maps, seconds = explain_pairs(backbone, inputs, prompt_set[: len(texts)], prompt_set, explained, methods, options)

    sizes = [tuple(originals[image].shape[-2:]) for image, _ in explained]
    heatmap_grid(
        [image.permute(1, 2, 0).numpy() for image in originals],
        [(image, texts[text]) for image, text in explained],
        {name: to_image_size(maps[name], sizes) for name in methods},
        out / "explain_grid.png",
    )
    timing = pd.DataFrame(
        [
            {"method": name, "pairs": len(explained), "seconds": seconds[name], "ms_per_pair": 1000 * seconds[name] / len(explained)}
            for name in methods
        ]
    )
    timing.to_csv(out / "times.csv", index=False)
    log.info("explain: time per method\n%s", timing.to_string(index=False))
    metrics = {f"{name}/ms_per_pair": 1000 * seconds[name] / len(explained) for name in methods}
    if task.text_explain:
        metrics.update(explain_texts(backbone, inputs, texts, explained, task, out))
    return metrics


def explain_texts(
    backbone: CLIPBackbone,
    inputs: Sequence[torch.Tensor],
    texts: Sequence[str],
    explained: Sequence[tuple[int, int]],
    task: DictConfig,
    out: Path,
) -> dict[str, float]:
    """Grad-ECLIP's word relevance of every pair: ``text_heatmaps.png`` and ``text_relevance.csv``."""
    device = inputs[0].device
    with torch.no_grad():
        image_embeddings = torch.cat([backbone.encode_image_dense(inputs[image]) for image, _ in explained])
    tokens = backbone.tokenize([texts[text] for _, text in explained]).to(device)
    started = time.perf_counter()
    relevance = grad_eclip_text(backbone, tokens, image_embeddings, layers=task.text_layers, variant=task.variant).cpu()
    seconds = time.perf_counter() - started
    start, end = word_span(backbone, tokens)
    rows, captions = [], []
    for p, (image, text) in enumerate(explained):
        span = range(int(start[p]), int(end[p]))
        pieces = backbone.token_strings(tokens[p, span.start : span.stop].tolist())
        weighted = words(pieces, relevance[p, span.start : span.stop].tolist())
        captions.append((f"{task.images[image]} | {texts[text]}", weighted))
        rows += [{"image": task.images[image], "text": texts[text], "word": w, "relevance": r} for w, r in weighted]
    pd.DataFrame(rows).to_csv(out / "text_relevance.csv", index=False)
    text_heatmaps(captions, out / "text_heatmaps.png")
    return {"grad_eclip_text/ms_per_pair": 1000 * seconds / len(explained)}
