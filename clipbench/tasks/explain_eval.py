"""``evaluate.py task=explain_eval``: how faithful is each explanation method? Deletion and insertion
curves on a labelled dataset, with the zero-shot probability of the true class as the score.

Each image is explained against its true class's zero-shot embedding (the mean of its template
captions; CLIP Surgery contrasts it with the other classes). Images go through the methods in batches
(``task.batch_size``), and the curves' steps of a batch share forward passes. A ``random`` map is
always added as the baseline a method has to beat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from clipbench.config import ConfigError
from clipbench.data.templates import dataset_class_names, resolve_templates
from clipbench.embeddings import EvalDataModule, resolve_device
from clipbench.explain import Targets, check_methods, explain
from clipbench.explain.faithfulness import DELETION_FILLS, INSERTION_BASES, area, curves
from clipbench.explain.figures import faithfulness_curves
from clipbench.models.backbone import CLIPBackbone
from clipbench.tasks.explain import check_common, check_positive, method_options
from clipbench.zeroshot import class_embeddings, zeroshot_logits

log = logging.getLogger(__name__)

BASELINE = "random"
KINDS = ("deletion", "insertion")


def evenly_spaced(total: int, count: int) -> torch.Tensor:
    """``count`` indices spread evenly over ``total`` (a dataset in class order gets every class)."""
    return torch.linspace(0, total - 1, min(count, total)).round().long().unique()


def selected_batches(datamodule: EvalDataModule, split: str, indices: torch.Tensor, device: torch.device):
    """The model-ready images and labels at ``indices`` of ``split``, in batches as the data module
    yields them (only the batches holding a selected image are kept)."""
    offset = 0
    for images, labels in datamodule.eval_batches(split, device):
        local = indices[(indices >= offset) & (indices < offset + len(images))] - offset
        offset += len(images)
        if len(local):
            yield images[local.to(images.device)], labels[local.to(labels.device)]
        if offset > int(indices.max()):
            return


def run(cfg: DictConfig, models: Mapping[str, DictConfig], out: Path) -> dict[str, float]:
    task = cfg.task
    check_common(task, models)
    check_positive(task, "num_images", "batch_size", "score_batch_size", "steps")
    if task.deletion not in DELETION_FILLS:
        raise ConfigError(f"task.deletion={task.deletion!r} is invalid: expected one of {DELETION_FILLS}")
    if task.insertion not in INSERTION_BASES:
        raise ConfigError(f"task.insertion={task.insertion!r} is invalid: expected one of {INSERTION_BASES}")
    if not task.blur_sigma > 0:
        raise ConfigError(f"task.blur_sigma={task.blur_sigma!r} is invalid: expected a positive number of pixels")
    methods = list(dict.fromkeys([*task.methods, BASELINE]))
    device = resolve_device(task.device)
    backbone: CLIPBackbone = instantiate(next(iter(models.values())).backbone).to(device).eval()
    check_methods(methods, backbone)
    datamodule = EvalDataModule.from_config(cfg.data, backbone.image_spec)
    dataset = datamodule.dataset(task.split)
    names = dataset_class_names(datamodule.name, dataset.classes)
    try:
        templates = resolve_templates(task.templates, dataset=cfg.data.name)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"task.templates={task.templates} is invalid: {err}") from err
    classifier = class_embeddings(backbone, names, templates, device).float()
    scale = backbone.similarity_scale().detach().float()

    def true_class_probability(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probabilities = (scale * zeroshot_logits(backbone.encode_image_dense(images), classifier)).softmax(-1)
        return probabilities.gather(1, labels.view(-1, 1)).squeeze(1)

    options = {name: method_options(task, name) for name in methods}
    generator = torch.Generator().manual_seed(cfg.seed)
    indices = evenly_spaced(len(dataset), task.num_images)
    per_image: dict[str, dict[str, list]] = {name: {kind: [] for kind in KINDS} for name in methods}
    seconds = dict.fromkeys(methods, 0.0)
    correct = []
    selected = list(selected_batches(datamodule, task.split, indices, device))
    all_images, all_labels = torch.cat([x for x, _ in selected]), torch.cat([y for _, y in selected]).to(device)
    # Batches mix the classes (a class-ordered split would otherwise give class-sorted batches), so the
    # tables written after each batch are already a fair sample.
    order = torch.randperm(len(all_labels), generator=generator).to(device)
    for batch, start in enumerate(tqdm(range(0, len(order), task.batch_size), desc="explain_eval", unit="batch")):
        chosen = order[start : start + task.batch_size]
        images, labels = all_images[chosen], all_labels[chosen]
        with torch.no_grad():
            correct.append(zeroshot_logits(backbone.encode_image_dense(images), classifier).argmax(-1) == labels)
        targets = Targets(classifier[labels], classifier, labels)
        for name in methods:
            started = time.perf_counter()
            extra = {"seed": cfg.seed + batch} if name == BASELINE else {}
            maps = explain(name, backbone, images, targets, **{**options[name], **extra})
            seconds[name] += time.perf_counter() - started
            result = curves(
                true_class_probability, images, labels, maps.to(device),
                steps=task.steps, deletion=task.deletion, insertion=task.insertion, sigma=task.blur_sigma,
                batch_size=task.score_batch_size, generator=generator,
            )  # fmt: skip
            for kind in KINDS:
                per_image[name][kind].append(result[kind].cpu())
        # The tables so far after every batch: a long run that is stopped still leaves its results.
        metrics = write_results(per_image, seconds, torch.cat(correct).float().mean().item(), task.steps, out)
    return metrics


def write_results(
    per_image: dict[str, dict[str, list]], seconds: dict[str, float], accuracy: float, steps: int, out: Path
) -> dict[str, float]:
    """``faithfulness.csv`` (AUC per method, with its standard error and the share of images on which
    the method beats the random map), ``per_image_auc.csv``, ``curves.csv`` and ``faithfulness.png``."""
    fractions = np.linspace(0, 1, steps + 1)
    stacked = {name: {kind: torch.cat(per_image[name][kind]) for kind in KINDS} for name in per_image}
    auc = {name: {kind: area(stacked[name][kind]) for kind in KINDS} for name in stacked}
    n = len(auc[BASELINE]["deletion"])
    rows = []
    for name in stacked:
        row = {"method": name, "images": n}
        for kind in KINDS:
            values = auc[name][kind]
            row[f"{kind}_auc"] = values.mean().item()
            row[f"{kind}_sem"] = (values.std() / n**0.5).item() if n > 1 else float("nan")
            wins = values < auc[BASELINE][kind] if kind == "deletion" else values > auc[BASELINE][kind]
            row[f"{kind}_beats_random"] = wins.float().mean().item() if name != BASELINE else float("nan")
        row["ms_per_image"] = 1000 * seconds[name] / n
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "faithfulness.csv", index=False)
    pd.DataFrame({f"{name}/{kind}": auc[name][kind].numpy() for name in auc for kind in KINDS}).to_csv(
        out / "per_image_auc.csv", index=False
    )
    mean_curves = {name: {kind: stacked[name][kind].mean(0).numpy() for kind in KINDS} for name in stacked}
    pd.DataFrame(
        [
            {"method": name, "curve": kind, "fraction": f, "probability": p}
            for name in mean_curves
            for kind in KINDS
            for f, p in zip(fractions, mean_curves[name][kind])
        ]
    ).to_csv(out / "curves.csv", index=False)
    faithfulness_curves(fractions, mean_curves, out / "faithfulness.png")
    log.info("explain_eval on %d images (zero-shot acc1 %.3f):\n%s", n, accuracy, table.to_string(index=False))
    metrics = {"test/acc1": accuracy, "images": float(n)}
    for row in rows:
        metrics.update({f"{row['method']}/{kind}_auc": row[f"{kind}_auc"] for kind in KINDS})
    return metrics
