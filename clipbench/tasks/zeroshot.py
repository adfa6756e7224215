"""Zero-shot classification of a labelled split, one or several models side by side.

The protocol is CLIP's (and open_clip's, CLIP_benchmark's): each class is the renormalised mean of its
L2-normalised template captions (:func:`clipbench.zeroshot.class_embeddings`), each image takes the
class of highest cosine similarity. Metrics: top-1 and top-5 accuracy, mean per-class recall, and the
silhouette score of the normalised image embeddings under the true labels (how well the image tower
alone separates the classes, whatever the text tower does).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from sklearn.metrics import silhouette_score
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall

from clipbench import plots
from clipbench.config import ConfigError
from clipbench.data.templates import dataset_class_names, resolve_templates
from clipbench.embeddings import EvalDataModule, cache_file, model_identity
from clipbench.hydra_ddp import ddp_job
from clipbench.models.backbone import CLIPBackbone
from clipbench.modules.evaluation import eval_trainer, predict_embeddings, predict_text_embeddings, trainer_autocast
from clipbench.zeroshot import average_captions, caption_texts, zeroshot_logits

log = logging.getLogger(__name__)

METRICS = ("acc1", "acc5", "mean_recall", "silhouette")


@dataclass
class ZeroShotResult:
    acc1: float
    acc5: float  # top-min(5, classes)
    mean_recall: float  # mean of the per-class recalls of the classes present in the split
    silhouette: float  # NaN when undefined (fewer than two classes)
    class_names: list[str]  # as put in the captions
    recall: Tensor  # (num_classes,) per-class recall; 0 for a class absent from the split
    support: Tensor  # (num_classes,) images per class
    labels: Tensor  # (N,) true class of each image, in split order
    top5: Tensor  # (N, min(5, num_classes)) predicted classes of each image, most similar first
    seconds: float  # getting the image embeddings: encoding (with decoding), or reading the cache
    cached: bool  # the image embeddings came from the cache

    @property
    def num_samples(self) -> int:
        return int(self.support.sum())


def load_class_names(spec: str | Sequence[str] | None) -> list[str] | None:
    """``task.class_names``: None (the dataset's), a list, or a JSON file: a list, or an object with a
    ``classnames`` list (CLIP_benchmark's format; the same file may hold the ``templates``)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"task.class_names={spec!r} is invalid: expected a list or a JSON file")
        loaded = json.loads(path.read_text())
        spec = loaded.get("classnames") if isinstance(loaded, dict) else loaded
        if spec is None:
            raise ConfigError(f"task.class_names={path}: the JSON object has no 'classnames' list")
    return [str(name) for name in spec]


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, Tensor | float]:
    """acc1, acc5 (top-k capped at the class count), per-class recall and support, mean recall."""
    num_classes = logits.shape[1]
    recall = multiclass_recall(logits, labels, num_classes, average=None)
    support = torch.bincount(labels, minlength=num_classes)
    return {
        "acc1": float(multiclass_accuracy(logits, labels, num_classes, top_k=1, average="micro")),
        "acc5": float(multiclass_accuracy(logits, labels, num_classes, top_k=min(5, num_classes), average="micro")),
        # Classes absent from the split have no recall; like CLIP_benchmark (balanced accuracy) skip them.
        "mean_recall": float(recall[support > 0].mean()),
        "recall": recall,
        "support": support,
    }


def silhouette(features: Tensor, labels: Tensor, max_samples: int, seed: int) -> float:
    """Silhouette score (cosine distance) of L2-normalised embeddings under ``labels``.

    It costs O(n^2) distances, so at most ``max_samples`` images (a random subset drawn with
    ``seed``) are used. NaN when undefined (fewer than two classes, or a class per sample).
    """
    x = F.normalize(features.float(), dim=-1).numpy()
    y = labels.numpy()
    num_labels = len(np.unique(y))
    if not 2 <= num_labels < len(y):
        return math.nan
    sample_size = max_samples if len(y) > max_samples else None
    return float(silhouette_score(x, y, metric="cosine", sample_size=sample_size, random_state=seed))


def zeroshot(
    backbone: CLIPBackbone,
    datamodule: EvalDataModule,
    templates: Sequence[str],
    *,
    trainer: L.Trainer | None = None,
    class_names: Sequence[str] | None = None,
    split: str = "test",
    cache_dir: str | Path | None = None,
    model_id: Mapping | None = None,
    silhouette_samples: int = 10_000,
    seed: int = 0,
) -> ZeroShotResult:
    """Zero-shot metrics of ``backbone`` on ``split`` of ``datamodule``, the images and captions
    encoded by ``trainer``'s predict loop (its devices, precision and DDP; every image once), the same
    metrics on every rank. Without a trainer (a notebook's call): one CPU process in float32.

    ``class_names`` replace the dataset's names (same order and count) in the captions.
    """
    trainer = trainer or L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    names = caption_class_names(datamodule, class_names, split)
    dtype = trainer_autocast(trainer)
    cached = cache_dir is not None and model_id is not None and cache_file(cache_dir, model_id, datamodule, split, dtype).exists()
    started = time.perf_counter()
    features, labels = predict_embeddings(trainer, backbone, datamodule, split, cache_dir, model_id)
    seconds = time.perf_counter() - started
    captions = predict_text_embeddings(trainer, backbone, caption_texts(names, templates))
    classifier = average_captions(captions, len(templates), len(names))
    return zeroshot_result(features, labels, classifier, names, seconds, cached, silhouette_samples, seed)


def caption_class_names(datamodule: EvalDataModule, class_names: Sequence[str] | None, split: str = "test") -> list[str]:
    """The names put in the captions: ``class_names`` (same order and count as the dataset's), or the
    dataset's readable names."""
    dataset_names = datamodule.dataset(split).classes
    names = list(class_names) if class_names is not None else dataset_class_names(datamodule.name, dataset_names)
    if len(names) != len(dataset_names):
        raise ConfigError(f"task.class_names has {len(names)} names but data.name={datamodule.name} has {len(dataset_names)} classes")
    return names


def zeroshot_result(
    features: Tensor,
    labels: Tensor,
    classifier: Tensor,
    names: list[str],
    seconds: float,
    cached: bool,
    silhouette_samples: int,
    seed: int,
) -> ZeroShotResult:
    """The metrics of image ``features`` (N, D) against a ``classifier`` (C, D), on the CPU."""
    logits = zeroshot_logits(features, classifier)
    metrics = classification_metrics(logits, labels)
    return ZeroShotResult(
        acc1=metrics["acc1"],
        acc5=metrics["acc5"],
        mean_recall=metrics["mean_recall"],
        silhouette=silhouette(features, labels, silhouette_samples, seed),
        class_names=names,
        recall=metrics["recall"],
        support=metrics["support"],
        labels=labels,
        top5=logits.topk(min(5, logits.shape[1]), dim=-1).indices,
        seconds=seconds,
        cached=cached,
    )


def write_results(results: Mapping[str, ZeroShotResult], dataset: str, out: Path) -> dict[str, float]:
    """The run's tables and figure; returns the flat metrics (``<model>/`` prefixed for several models).

    ``<dataset>_zeroshot.csv``: a row per model; ``<dataset>_zeroshot.png``: its metrics as bars;
    ``<dataset>_per_class.csv``: a row per class with its support and each model's recall;
    ``<dataset>_predictions.csv``: a row per model and test image (split order) with its class and top-5.
    """
    table = pd.DataFrame(
        [
            {
                "model": name,
                "dataset": dataset,
                **{metric: getattr(r, metric) for metric in METRICS},
                "num_samples": r.num_samples,
                "seconds": r.seconds,
                "images_per_s": r.num_samples / r.seconds if r.seconds > 0 else math.nan,
                "cached": r.cached,
            }
            for name, r in results.items()
        ]
    )
    table.to_csv(out / f"{dataset}_zeroshot.csv", index=False)
    plots.bar_chart(table, "model", METRICS, out / f"{dataset}_zeroshot.png", title=f"zero-shot on {dataset}")
    first = next(iter(results.values()))
    per_class = pd.DataFrame({"class": first.class_names, "support": first.support.tolist()})
    for name, r in results.items():
        per_class[name] = r.recall.tolist()
    per_class.to_csv(out / f"{dataset}_per_class.csv", index=False)
    pd.concat([predictions_table(name, r) for name, r in results.items()]).to_csv(out / f"{dataset}_predictions.csv", index=False)
    log.info("zero-shot on %s:\n%s", dataset, table.to_string(index=False))
    prefix = (lambda name: f"{name}/") if len(results) > 1 else (lambda name: "")
    return {f"{prefix(name)}test/{metric}": getattr(r, metric) for name, r in results.items() for metric in METRICS}


def predictions_table(model: str, result: ZeroShotResult) -> pd.DataFrame:
    """One row per image: its index in the split, true class and ranked predictions, as class names."""
    names = np.asarray(result.class_names)
    table = pd.DataFrame({"model": model, "index": np.arange(len(result.labels)), "label": names[result.labels.numpy()]})
    for rank in range(result.top5.shape[1]):
        table[f"top{rank + 1}"] = names[result.top5[:, rank].numpy()]
    return table


def run(cfg: DictConfig, models: Mapping[str, DictConfig], out: Path) -> dict[str, float]:
    """``evaluate.py task=zeroshot``: every model of ``models`` (name -> model config) on ``data``'s test split."""
    task = cfg.task
    templates = task_templates(task.templates, cfg.data.name)
    class_names = load_class_names(task.class_names)
    trainer = eval_trainer(cfg)
    results: dict[str, ZeroShotResult] = {}
    with ddp_job(trainer):
        for name, model_cfg in models.items():
            log.info("zero-shot: model %s", name)
            backbone: CLIPBackbone = instantiate(model_cfg.backbone).eval()
            results[name] = zeroshot(
                backbone,
                EvalDataModule.from_config(cfg.data, backbone.image_spec),
                templates,
                trainer=trainer,
                class_names=class_names,
                cache_dir=cfg.paths.cache_dir if task.cache else None,
                model_id=model_identity(model_cfg.backbone),
                silhouette_samples=task.silhouette_samples,
                seed=cfg.seed,
            )
            del backbone  # one model in device memory at a time
    if not trainer.is_global_zero:
        return {}
    return write_results(results, cfg.data.name, out)


def task_templates(spec, dataset: str) -> tuple[str, ...]:
    """``task.templates`` resolved for ``dataset``, a bad value reported under its key."""
    try:
        return resolve_templates(spec, dataset=dataset)
    except (ValueError, KeyError) as err:  # KeyError: a JSON object without "templates"
        raise ConfigError(f"task.templates={spec} is invalid: {err}") from err
