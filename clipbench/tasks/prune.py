"""``evaluate.py task=prune``: zero-shot accuracy and silhouette with only N embedding neurons kept,
chosen by feature purity (:mod:`clipbench.pruning`), against random choices and all neurons.

A sweep point needs three things from a model besides its image embeddings: its class embeddings,
its neuron scores and its image preprocessing (which keys the image-embedding cache). All are
cached next to the image embeddings, so after the first point a sweep loads no model and encodes
no image or caption: a point costs a few matrix products.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from torch import Tensor

from clipbench import plots
from clipbench.config import ConfigError
from clipbench.data.datamodule import atomic_save
from clipbench.embeddings import EvalDataModule, cache_file, model_identity
from clipbench.hydra_ddp import ddp_job
from clipbench.models.backbone import CLIPBackbone, ImageSpec
from clipbench.modules.evaluation import eval_trainer, predict_embeddings, predict_text_embeddings, trainer_autocast
from clipbench.pruning import evaluate_kept, neuron_scores, select_neurons
from clipbench.tasks.zeroshot import caption_class_names, load_class_names, task_templates
from clipbench.zeroshot import average_captions, caption_texts

log = logging.getLogger(__name__)

TABLE = "pruning.csv"  # each run's rows; a sweep's summary gathers them from its jobs
CURVES = {"accuracy": "acc1", "silhouette": "silhouette"}  # word in the file names -> column of TABLE
CURVE_COLUMNS = ("full", "high", "low", "random")
DEFAULT_FRACTIONS = np.linspace(0.25, 1.0, 7)  # task.neurons=null: 25%, 37.5%, ..., 100% of the width


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path | None, compute: Callable[[], dict]) -> dict:
    """``compute()``, or what an earlier call saved at ``path`` (None: no cache)."""
    if path is not None and path.exists():
        return torch.load(path, weights_only=True)
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(value, path)
    return value


class PruningInputs:
    """One model's inputs to pruning, each read from the cache when it is there; the backbone is
    loaded, and ``trainer``'s predict loop run, only for a part that is not."""

    def __init__(self, name: str, model_cfg: DictConfig, trainer: L.Trainer, cache_dir: str | Path | None) -> None:
        self.name, self.config, self.trainer = name, model_cfg.backbone, trainer
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.model_id = model_identity(model_cfg.backbone)

    def _path(self, kind: str, **key: Any) -> Path | None:
        return self.cache_dir / "pruning" / f"{kind}_{_digest({'model': self.model_id, **key})}.pt" if self.cache_dir else None

    @functools.cached_property
    def backbone(self) -> CLIPBackbone:
        log.info("prune: loading model %s", self.name)
        return instantiate(self.config).eval()

    @functools.cached_property
    def _projections(self) -> dict:
        def compute() -> dict:
            image, text = (self.backbone.projection_matrix(tower).detach().float().cpu() for tower in ("image", "text"))
            return {"scores": neuron_scores(image, text), "image_spec": asdict(self.backbone.image_spec)}

        return _cached(self._path("projections"), compute)

    @property
    def scores(self) -> Tensor:
        """(embed_dim,) overlap of each neuron with the others, image plus text projection (low: pure)."""
        return self._projections["scores"]

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(**self._projections["image_spec"])

    def classifier(self, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """(classes, embed_dim) zero-shot class embeddings, as the zero-shot task builds them."""

        def compute() -> dict:
            captions = predict_text_embeddings(self.trainer, self.backbone, caption_texts(class_names, templates))
            return {"classifier": average_captions(captions, len(templates), len(class_names))}

        autocast = str(trainer_autocast(self.trainer))
        return _cached(self._path("classifier", class_names=list(class_names), templates=list(templates), autocast=autocast), compute)[
            "classifier"
        ]

    def image_embeddings(self, datamodule: EvalDataModule) -> tuple[Tensor, Tensor]:
        """The test split's image embeddings, through the shared per-(model, dataset, split) cache."""
        dtype = trainer_autocast(self.trainer)
        cached = self.cache_dir is not None and cache_file(self.cache_dir, self.model_id, datamodule, "test", dtype).exists()
        # A cached split is read without touching the backbone, so it need not be loaded for one.
        return predict_embeddings(self.trainer, None if cached else self.backbone, datamodule, "test", self.cache_dir, self.model_id)


def neuron_counts(spec: Any) -> list[int] | None:
    """``task.neurons``: None (the default fractions of the width), an integer, or a list of them."""
    if spec is None:
        return None
    counts = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
        raise ConfigError(f"task.neurons={spec!r} is invalid: expected a positive integer, a list of them, or null")
    return sorted(set(counts))


def default_counts(width: int) -> list[int]:
    return sorted({max(1, round(width * fraction)) for fraction in DEFAULT_FRACTIONS})


def prune_rows(
    features: Tensor, labels: Tensor, classifier: Tensor, scores: Tensor, counts: Sequence[int], seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """Per count of neurons kept: the ``full`` result, ``high`` and ``low`` purity, and ``random`` per seed."""
    width = len(scores)
    features = F.normalize(features.float(), dim=-1)
    full = evaluate_kept(features, labels, classifier, torch.arange(width, device=features.device))
    rows = []
    for n in counts:
        rows.append({"neurons": n, "selection": "full", "seed": None, **asdict(full)})
        for selection in ("high", "low"):
            result = evaluate_kept(features, labels, classifier, select_neurons(scores, n, selection))
            rows.append({"neurons": n, "selection": selection, "seed": None, **asdict(result)})
        for seed in seeds:
            result = evaluate_kept(features, labels, classifier, select_neurons(scores, n, "random", seed=seed))
            rows.append({"neurons": n, "selection": "random", "seed": seed, **asdict(result)})
    return rows


def neuron_curve(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """One dataset's and model's ``column`` per count: full, high, low, random (mean over seeds) and
    random_std (sample standard deviation over seeds; empty with one seed)."""
    means = rows.pivot_table(index="neurons", columns="selection", values=column, aggfunc="mean", dropna=False)
    spread = rows[rows["selection"] == "random"].groupby("neurons")[column].std()
    return means.reindex(columns=list(CURVE_COLUMNS)).assign(random_std=spread).reset_index().rename_axis(columns=None)


def write_curves(table: pd.DataFrame, out: Path) -> None:
    """``<dataset>_<model>_{accuracy,silhouette}_vs_neurons.csv`` and a plot of each."""
    for (dataset, model), rows in table.groupby(["dataset", "model"]):
        width = int(rows["width"].iloc[0])
        for word, column in CURVES.items():
            stem = f"{dataset}_{model}_{word}_vs_neurons"
            curve = neuron_curve(rows, column)
            curve.to_csv(out / f"{stem}.csv", index=False)
            title = f"{dataset}, {model}: {word} with N of {width} neurons kept"
            plots.neuron_curves(
                curve, out / f"{stem}.png", ylabel="zero-shot acc@1" if column == "acc1" else "silhouette (cosine)", title=title
            )


def sweep_summary(sweep_dir: Path, summary: pd.DataFrame) -> None:
    """``task.sweep_summary`` of a multirun: the curves of every finished job's rows, at the sweep directory."""
    done = summary[summary["status"] == "ok"]
    tables = [pd.read_csv(path) for path in (sweep_dir / str(job) / TABLE for job in done["job"]) if path.exists()]
    if not tables:
        return
    table = pd.concat(tables, ignore_index=True)
    repeated = table.duplicated(["dataset", "model", "neurons", "selection", "seed"], keep="last")
    if repeated.any():  # jobs that differ in another swept key (templates, ...) but not in data, model or neurons
        log.warning("prune sweep: %d rows repeat a (dataset, model, neurons) of another job; the later job's are kept", repeated.sum())
        table = table[~repeated]
    write_curves(table, sweep_dir)


def run(cfg: DictConfig, models: Mapping[str, DictConfig], out: Path) -> dict[str, float]:
    """``evaluate.py task=prune``: every model of ``models`` on ``data``'s test split. Images and captions
    are encoded (when not cached) by the ``trainer``'s predict loop; the pruning itself is a few matrix
    products, on the trainer's device."""
    task = cfg.task
    counts = neuron_counts(task.neurons)
    if task.random_seeds < 1:
        raise ConfigError(f"task.random_seeds={task.random_seeds} is invalid: expected a positive integer")
    templates = task_templates(task.templates, cfg.data.name)
    class_names = load_class_names(task.class_names)
    seeds = [cfg.seed + k for k in range(task.random_seeds)]
    trainer = eval_trainer(cfg)
    device = trainer.strategy.root_device
    rows = []
    with ddp_job(trainer):
        for name, model_cfg in models.items():
            model = PruningInputs(name, model_cfg, trainer, cfg.paths.cache_dir if task.cache else None)
            width = len(model.scores)
            too_many = [n for n in counts or () if n > width]
            if too_many:
                raise ConfigError(f"task.neurons={too_many[0]} is larger than the embedding width {width} of model {name}")
            datamodule = EvalDataModule.from_config(cfg.data, model.image_spec)
            names = caption_class_names(datamodule, class_names)
            features, labels = model.image_embeddings(datamodule)
            if features.shape[1] != width:
                raise ValueError(f"model {name}: image embeddings have {features.shape[1]} dimensions but its projections {width} neurons")
            classifier = model.classifier(names, templates)
            inputs = (t.to(device) for t in (features, labels, classifier, model.scores))
            model_rows = prune_rows(*inputs, counts or default_counts(width), seeds)
            rows += [{"dataset": datamodule.name, "model": name, "width": width, **row} for row in model_rows]
            del model  # one backbone in memory at a time
    if not trainer.is_global_zero:
        return {}
    table = pd.DataFrame(rows)
    table.to_csv(out / TABLE, index=False)
    several_counts = table["neurons"].nunique() > 1
    if several_counts:
        write_curves(table, out)
    return run_metrics(table, several_models=len(models) > 1, several_counts=several_counts)


def run_metrics(table: pd.DataFrame, several_models: bool, several_counts: bool) -> dict[str, float]:
    """Flat keys ``[<model>/][n<count>/]test/<selection>/<metric>``, selection one of full, high, low,
    random (the mean over seeds) and random_std."""
    metrics = {}
    for model, rows in table.groupby("model", sort=False):
        for column in CURVES.values():
            for _, point in neuron_curve(rows, column).iterrows():
                prefix = (f"{model}/" if several_models else "") + (f"n{int(point['neurons'])}/" if several_counts else "")
                for selection in (*CURVE_COLUMNS, "random_std"):
                    metrics[f"{prefix}test/{selection}/{column}"] = point[selection]
    return metrics
