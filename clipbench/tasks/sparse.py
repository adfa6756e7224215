"""``evaluate.py task=sparse``: sparse concept embeddings (SpLiCE, Bhalla et al., NeurIPS 2024).

Each test image embedding is replaced by a sparse, non-negative combination of human-readable concepts
embedded by the same model's text encoder (:mod:`clipbench.sparse`), and zero-shot accuracy, sparsity
and memory are compared with the dense embedding. Options and outputs: ``conf/task/sparse.yaml``.

Every rank takes part: images, captions and concepts are encoded, and embeddings decomposed, on
Lightning's predict loop (:mod:`clipbench.modules.evaluation`, :class:`SparseEvaluation`), each image
once; rank 0 writes the tables and figures. Image and concept embeddings are cached, so a lambda
sweep encodes nothing after its first job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from clipbench import plots, runs
from clipbench.config import ConfigError, check_values
from clipbench.data.datamodule import atomic_save
from clipbench.embeddings import EvalDataModule, model_identity
from clipbench.hydra_ddp import ddp_job
from clipbench.models.backbone import CLIPBackbone
from clipbench.modules.evaluation import eval_trainer, predict_embeddings, predict_rows, predict_text_embeddings, trainer_autocast
from clipbench.modules.sparse import SolverOptions, SparseEvaluation
from clipbench.sparse.decomposition import centre, dtype_bytes, modality_mean, recompose, storage_bytes
from clipbench.sparse.solver import SparseCodes
from clipbench.sparse.vocabulary import Vocabulary, VocabularyError, load_vocabulary, readable, select
from clipbench.tasks.zeroshot import caption_class_names, classification_metrics, load_class_names, task_templates
from clipbench.zeroshot import average_captions, caption_texts, zeroshot_logits

log = logging.getLogger(__name__)
STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOP_CONCEPTS = 10  # per image and per class in the tables


def check_options(task: DictConfig) -> None:
    """Impossible values of the task's keys fail here, named, before any work."""
    checks = [
        ("task.lam", task.lam, isinstance(task.lam, (int, float)) and np.isfinite(task.lam) and task.lam > 0, "a positive number"),
        ("task.vocab_size", task.vocab_size, task.vocab_size is None or task.vocab_size > 0, "a positive integer, or null for all"),
        ("task.tol", task.tol, task.tol > 0, "a positive relative duality gap"),
        ("task.max_iter", task.max_iter, task.max_iter > 0, "a positive integer"),
        ("task.max_rounds", task.max_rounds, task.max_rounds > 0, "a positive integer"),
        ("task.working_set", task.working_set, task.working_set > 0, "a positive integer"),
        ("task.batch_size", task.batch_size, task.batch_size > 0, "a positive integer"),
        ("task.image_mean_split", task.image_mean_split, task.image_mean_split in ("train", "test"), "train or test"),
        ("task.storage_dtype", task.storage_dtype, task.storage_dtype in STORAGE, " or ".join(STORAGE)),
        ("task.examples", task.examples, task.examples >= 0, "non-negative"),
        ("task.vocab", task.vocab, readable(str(task.vocab)), "default, classes, or the path of an existing text file"),
    ]
    check_values(checks)


def solver_options(task: DictConfig) -> SolverOptions:
    return SolverOptions(
        lam=float(task.lam),
        nonneg=bool(task.nonneg),
        tol=float(task.tol),
        max_iter=int(task.max_iter),
        max_rounds=int(task.max_rounds),
        working_set=int(task.working_set),
    )


def concept_embeddings(
    trainer: L.Trainer, backbone: CLIPBackbone, concepts: Sequence[str], cache_dir: str | Path | None, model_id: Mapping | None
) -> Tensor:
    """Text embeddings (K, d) of the concepts, unnormalised; cached per (model, concepts, precision)
    under ``<cache_dir>/concepts/``."""
    if cache_dir is None or model_id is None:
        return predict_text_embeddings(trainer, backbone, concepts)
    key = {
        "model": model_id,
        "concepts": hashlib.sha1("\n".join(concepts).encode()).hexdigest(),
        "autocast": str(trainer_autocast(trainer)),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "concepts" / f"{len(concepts)}_{digest}.pt"
    if path.exists():
        log.info("concept embeddings from the cache: %s", path)
        return torch.load(path, weights_only=True)
    features = predict_text_embeddings(trainer, backbone, concepts)
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(features, path)
    trainer.strategy.barrier()
    return features


@dataclass
class Decomposition:
    """Everything rank 0 needs to write the run's outputs."""

    vocabulary: Vocabulary
    class_names: list[str]
    labels: Tensor  # (N,)
    dense_logits: Tensor  # (N, C)
    rows: dict  # SparseEvaluation's per-image outputs, in image order
    text_codes: SparseCodes | None  # the class embeddings' decompositions (decompose_text)
    dim: int
    datamodule: EvalDataModule


def decompose(cfg: DictConfig, trainer: L.Trainer, model_cfg: DictConfig) -> Decomposition:
    """Encode, build the dictionary, decompose every test image (on every rank)."""
    task = cfg.task
    backbone: CLIPBackbone = instantiate(model_cfg.backbone).eval()
    datamodule = EvalDataModule.from_config(cfg.data, backbone.image_spec)
    cache = {"cache_dir": cfg.paths.cache_dir if task.cache else None, "model_id": model_identity(model_cfg.backbone)}
    features, labels = predict_embeddings(trainer, backbone, datamodule, "test", **cache)

    names = caption_class_names(datamodule, load_class_names(task.class_names))
    templates = task_templates(task.templates, cfg.data.name)
    classifier = average_captions(predict_text_embeddings(trainer, backbone, caption_texts(names, templates)), len(templates), len(names))

    try:
        vocabulary = select(load_vocabulary(task.vocab, names, task.vocab_reverse), task.vocab_size, backbone.truncates)
    except VocabularyError as err:
        raise ConfigError(str(err)) from err
    log.info("dictionary: %d concepts from %s", len(vocabulary), vocabulary.source)
    concepts = concept_embeddings(trainer, backbone, vocabulary.concepts, **cache)
    text_mean = modality_mean(concepts) if task.center else None  # SpLiCE centres the dictionary by its own mean
    dictionary = centre(concepts.float(), text_mean)
    image_mean = None
    if task.center:
        reference = features if task.image_mean_split == "test" else predict_embeddings(trainer, backbone, datamodule, "train", **cache)[0]
        image_mean = modality_mean(reference)

    options = solver_options(task)
    text_codes = None
    sparse_classifier = classifier
    if task.decompose_text:  # the class embeddings decomposed the same way: classify sparse to sparse
        text_codes = options.solve(centre(classifier, text_mean), dictionary)
        sparse_classifier = recompose(text_codes, dictionary, text_mean)

    module = SparseEvaluation(dictionary, sparse_classifier, image_mean, options)
    loader = DataLoader(TensorDataset(features, labels, torch.arange(len(labels))), batch_size=task.batch_size)
    rows = predict_rows(trainer, module, dataloaders=loader)
    return Decomposition(
        vocabulary=vocabulary,
        class_names=names,
        labels=labels,
        dense_logits=zeroshot_logits(features, classifier),
        rows=rows,
        text_codes=text_codes,
        dim=features.shape[1],
        datamodule=datamodule,
    )


def sparse_accuracy(logits: Tensor, labels: Tensor, zero: Tensor, k: int) -> float:
    """Top-k accuracy, an image whose code is all zero counted as a miss (it has no concept to
    classify by)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float(((top == labels.unsqueeze(1)).any(dim=1) & ~zero).double().mean())


def metrics_of(result: Decomposition, task: DictConfig) -> dict[str, float]:
    rows, codes = result.rows, result.rows["codes"]
    l0, zero = codes.l0, codes.l0 == 0
    dense = classification_metrics(result.dense_logits, result.labels)
    value_bytes = dtype_bytes(STORAGE[task.storage_dtype])
    dense_bytes, sparse_bytes = storage_bytes(l0, result.dim, codes.num_concepts, value_bytes)
    mean_sparse = float(sparse_bytes.mean())
    metrics = {
        "test/dense_acc1": dense["acc1"],
        "test/dense_acc5": dense["acc5"],
        "test/sparse_acc1": sparse_accuracy(rows["logits"], result.labels, zero, 1),
        "test/sparse_acc5": sparse_accuracy(rows["logits"], result.labels, zero, 5),
        "sparse/lam": float(task.lam),
        "sparse/concepts": float(len(result.vocabulary)),
        "sparse/l0_mean": float(l0.double().mean()),
        "sparse/l0_median": float(l0.double().median()),
        "sparse/zero_fraction": float(zero.double().mean()),
        "sparse/cosine_mean": float(rows["cosine"].double().mean()),
        "sparse/relative_error_mean": float(rows["relative_error"].double().mean()),
        "sparse/dense_bytes": dense_bytes,
        "sparse/sparse_bytes_mean": mean_sparse,
        "sparse/solver_ms_per_embedding": 1000 * float(rows["seconds"].sum()) / len(l0),
        "sparse/objective_mean": float(codes.objective.double().mean()),
        "sparse/iterations_mean": float(codes.iterations.double().mean()),
        "sparse/rounds_mean": float(codes.rounds.double().mean()),
        "sparse/converged_fraction": float(codes.converged.double().mean()),
    }
    if mean_sparse > 0:  # with every code empty there is no ratio (sparse/zero_fraction = 1 says why)
        metrics["sparse/memory_saving"] = dense_bytes / mean_sparse
    if result.text_codes is not None:
        metrics["sparse/text_l0_mean"] = float(result.text_codes.l0.double().mean())
        metrics["sparse/text_zero_classes"] = float((result.text_codes.l0 == 0).sum())
    if zero.any():
        log.warning(
            "%d of %d images decompose to no concept at all (task.lam=%g is too large for them): counted as misses",
            int(zero.sum()),
            len(zero),
            task.lam,
        )
    return metrics


def concepts_per_class(codes: SparseCodes, labels: Tensor, class_names: Sequence[str], concepts: Sequence[str]) -> pd.DataFrame:
    """Per class, its ``TOP_CONCEPTS`` concepts by mean weight over the class's images, and the
    fraction of those images that use each."""
    rows = []
    for c, name in enumerate(class_names):
        members = (labels == c).nonzero().flatten()
        if len(members) == 0:
            continue
        weights = codes[members].dense()
        mean = weights.mean(dim=0)
        for rank, j in enumerate(mean.topk(min(TOP_CONCEPTS, len(mean))).indices.tolist(), start=1):
            if mean[j] <= 0:
                break
            used = float((weights[:, j] != 0).double().mean())
            rows.append({"class": name, "rank": rank, "concept": concepts[j], "mean_weight": float(mean[j]), "images_using": used})
    return pd.DataFrame(rows, columns=["class", "rank", "concept", "mean_weight", "images_using"])


def concepts_per_image(result: Decomposition) -> pd.DataFrame:
    """A row per image: true, dense and sparse predictions, L0, cosine, and its top concepts with weights."""
    codes, names, concepts = result.rows["codes"], result.class_names, result.vocabulary.concepts
    zero = codes.l0 == 0
    sparse_pred = result.rows["logits"].topk(1, dim=1).indices[:, 0]  # as sparse_accuracy breaks ties
    table = pd.DataFrame(
        {
            "image": np.arange(len(codes)),
            "class": [names[i] for i in result.labels.tolist()],
            "dense_prediction": [names[i] for i in result.dense_logits.argmax(dim=1).tolist()],
            "sparse_prediction": [None if z else names[i] for i, z in zip(sparse_pred.tolist(), zero.tolist())],
            "l0": codes.l0.numpy(),
            "cosine": result.rows["cosine"].numpy(),
        }
    )
    width = min(TOP_CONCEPTS, codes.values.shape[1])
    for r in range(width):  # codes keep each row's weights largest first
        values = codes.values[:, r]
        table[f"concept_{r + 1}"] = [concepts[j] if v != 0 else None for j, v in zip(codes.indices[:, r].tolist(), values.tolist())]
        table[f"weight_{r + 1}"] = values.numpy()
    return table


def example_images(datamodule: EvalDataModule, rows: Sequence[int], size: int = 96) -> Tensor | None:
    """Pixels of test images (float (n, 3, size, size) in [0, 1]) for figures; None when the split's
    positions no longer match the embeddings (unreadable files were left out of them)."""
    data = datamodule.dataset("test")
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    images = []
    for i in rows:
        image, _ = data[i]
        if image is None:
            return None
        images.append(datamodule.image_spec.fit(to_tensor(image), size))
    return torch.stack(images) if images else None


def write_outputs(result: Decomposition, task: DictConfig, out: Path) -> None:
    codes, concepts = result.rows["codes"], result.vocabulary.concepts
    concepts_per_class(codes, result.labels, result.class_names, concepts).to_csv(out / "concepts_per_class.csv", index=False)
    per_image = concepts_per_image(result)
    per_image.to_csv(out / "concepts_per_image.csv", index=False)
    if result.vocabulary.dropped:
        result.vocabulary.dropped_table().to_csv(out / "vocabulary_dropped.csv", index=False)
    plots.l0_histogram(codes.l0.numpy(), out / "l0_histogram.png", title=f"lambda = {task.lam:g}, {len(concepts)} concepts")
    if result.text_codes is not None:
        text = result.text_codes
        pd.DataFrame(
            {
                "class": result.class_names,
                "l0": text.l0.numpy(),
                "concepts": [
                    "; ".join(f"{concepts[j]} ({v:.3f})" for j, v in zip(i.tolist(), w.tolist()) if v != 0)
                    for i, w in zip(text.indices, text.values)
                ],
            }
        ).to_csv(out / "class_text_concepts.csv", index=False)
    write_examples(per_image, result, task.examples, out / "examples.png")


def write_examples(per_image: pd.DataFrame, result: Decomposition, count: int, path: Path) -> None:
    """Half correct and half incorrect sparse predictions (as available), each beside its top concepts."""
    if count == 0:
        return
    correct = per_image["sparse_prediction"] == per_image["class"]
    rng = np.random.default_rng(0)
    picked = []
    for pool, want in ((per_image.index[correct], (count + 1) // 2), (per_image.index[~correct], count // 2)):
        picked += sorted(rng.choice(pool, size=min(want, len(pool)), replace=False).tolist())
    images = example_images(result.datamodule, picked) if len(per_image) == len(result.datamodule.dataset("test")) else None
    if images is None:
        log.warning("examples.png skipped: the test split's images no longer line up with its embeddings")
        return
    codes, concepts = result.rows["codes"], result.vocabulary.concepts
    bars = []
    for i in picked:
        keep = codes.values[i] != 0
        bars.append(([concepts[j] for j in codes.indices[i][keep][:8].tolist()], codes.values[i][keep][:8].tolist()))
    titles = [f"{row['class']} → {row['sparse_prediction'] or 'no concept'}" for _, row in per_image.loc[picked].iterrows()]
    plots.concept_examples(images, titles, bars, [bool(correct[i]) for i in picked], path)


def run(cfg: DictConfig, models: Mapping[str, DictConfig], out: Path) -> dict[str, float]:
    task = cfg.task
    check_options(task)
    if len(models) != 1:
        raise ConfigError(f"task=sparse decomposes one model's embeddings; task.models names {len(models)}")
    (model_cfg,) = models.values()
    trainer = eval_trainer(cfg)
    with ddp_job(trainer):
        try:
            result = decompose(cfg, trainer, model_cfg)
            if not trainer.is_global_zero:
                return {}
            metrics = metrics_of(result, task)
            write_outputs(result, task, out)
            for logger in trainer.loggers:
                logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
                logger.log_metrics(metrics)
        finally:
            runs.finish_loggers(trainer)
    log.info("sparse: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return metrics


def sweep_summary(sweep_dir: Path, summary: pd.DataFrame) -> None:
    """After each job of a lambda sweep: ``tradeoff.csv`` (one row per finished lambda) and
    ``tradeoff.png`` (sparse accuracy against mean L0, dense accuracy as a line, memory saving on a
    second axis). When the sweep varies other keys too (``task.vocab=default,classes``), each of
    their combinations is a ``setting`` with its own line."""
    needed = ["sparse/lam", "sparse/l0_mean", "test/sparse_acc1", "test/dense_acc1", "sparse/memory_saving"]
    done = summary[summary["status"] == "ok"] if "status" in summary else summary
    if done.empty or not set(needed) <= set(done.columns):
        return
    columns = [*needed, "test/sparse_acc5", "test/dense_acc5", "sparse/cosine_mean", "sparse/solver_ms_per_embedding"]
    table = done[[c for c in ["job", *columns] if c in done.columns]].copy()
    others = [c for c in done.columns if "/" not in c and c not in ("job", "status", "error", "task.lam") and done[c].nunique() > 1]
    group = None
    if others:
        group = "setting"
        table.insert(1, group, done[others].astype(str).apply(lambda row: ", ".join(f"{k}={v}" for k, v in row.items()), axis=1))
    table = table.sort_values([c for c in (group, "sparse/lam") if c])
    table.to_csv(sweep_dir / "tradeoff.csv", index=False)
    plots.sparsity_tradeoff(table, sweep_dir / "tradeoff.png", group=group)
