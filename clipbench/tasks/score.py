"""``evaluate.py task=score``: how well each caption matches its image, for every pair of an input,
at scale (options and outputs: ``conf/task/score.yaml``; the data: ``conf/data/pairs.yaml``).

Lightning's predict loop does the work (:class:`clipbench.modules.scoring.PairScorer` over the
:class:`clipbench.data.pairs.PairsDataModule` stream); each rank writes the shards it owns
(:mod:`clipbench.scoring.shards`). Rank 0 then checks that every shard is there and writes the
merged files, the summary and its histogram, the extreme pairs, the curation and the time/memory
report. A re-run in the same run directory scores only the shards that are missing.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from clipbench import plots
from clipbench.config import ConfigError, check_values, take_pairs_input
from clipbench.data.image_loading import BadRow
from clipbench.data.pair_sources import PairSource
from clipbench.data.pairs import PairsDataModule
from clipbench.embeddings import model_identity
from clipbench.hydra_ddp import ddp_job
from clipbench.models.backbone import CLIPBackbone
from clipbench.modules.scoring import PairScorer
from clipbench.scoring import curation
from clipbench.scoring.report import ScoringMonitor, timing_report, write_report
from clipbench.scoring.shards import SCORE_COLUMNS, ShardStore, ShardWriter, merge
from clipbench.scoring.statistics import Extreme, Summary, extremes, summarize

log = logging.getLogger(__name__)
THUMBNAIL = 160


def prepare_config(cfg: DictConfig) -> None:
    """Impossible task values fail here, named, before any work; the task.input shorthand is applied."""
    task = cfg.task
    checks = [
        ("task.shard_size", task.shard_size, isinstance(task.shard_size, int) and task.shard_size > 0, "a positive integer"),
        ("task.format", task.format, task.format in ("parquet", "csv"), "parquet or csv"),
        ("task.keep_by", task.keep_by, task.keep_by in SCORE_COLUMNS, " or ".join(SCORE_COLUMNS)),
        ("task.keep_top_fraction", task.keep_top_fraction, task.keep_top_fraction is None or 0 < task.keep_top_fraction <= 1, "in (0, 1]"),
        ("task.grid_pairs", task.grid_pairs, task.grid_pairs >= 0, "non-negative"),
        ("task.histogram_bins", task.histogram_bins, task.histogram_bins > 0, "positive"),
    ]
    check_values(checks)
    if task.keep_min_score is not None and task.keep_top_fraction is not None:
        raise ConfigError("task.keep_min_score and task.keep_top_fraction are alternatives: set one of them")
    target = cfg.data.get("_target_", "")
    if not isinstance(get_class(target), type) or not issubclass(get_class(target), PairsDataModule):
        raise ConfigError(f"task=score reads image-caption pairs: data must be data=pairs (a PairsDataModule), not {target}")
    take_pairs_input(cfg, "the pairs to score: a CSV/TSV, a Parquet file or tar shards")


def sigmoid_parameters(backbone: CLIPBackbone) -> tuple[float, float] | None:
    """(scale, bias) of a SigLIP-style model's sigmoid, None for CLIP."""
    with torch.no_grad():
        bias = backbone.logit_bias()
        return None if bias is None else (float(backbone.similarity_scale()), float(bias))


@contextmanager
def cpu_cores_shared(trainer: L.Trainer, workers: int) -> Iterator[None]:
    """On a CPU the model's threads and the DataLoader workers share the cores: the model gets what the
    workers leave (on 2 cores, two threads spinning against two busy workers scored 4x slower than one).
    An explicit ``OMP_NUM_THREADS`` is left as it is."""
    threads = torch.get_num_threads()
    if trainer.strategy.root_device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // trainer.world_size - workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(cfg: DictConfig, models: Mapping[str, DictConfig], out: Path) -> dict[str, float]:
    prepare_config(cfg)
    if len(models) != 1:
        raise ConfigError(f"task=score scores with one model; task.models names {len(models)}")
    (model_cfg,) = models.values()
    task = cfg.task
    backbone: CLIPBackbone = instantiate(model_cfg.backbone).eval()
    sigmoid = sigmoid_parameters(backbone)
    if task.keep_by == "sigmoid" and sigmoid is None:
        raise ConfigError("task.keep_by=sigmoid needs a SigLIP-style model (one with a logit bias); use clip_score or cosine")
    datamodule: PairsDataModule = instantiate(cfg.data, _partial_=True)(
        image_spec=backbone.image_spec, tokenize_flagged=backbone.tokenize_flagged, shard_size=task.shard_size
    )
    source = datamodule.source
    datamodule.check_rows()
    log.info("scoring %s: %d rows in %d shards", cfg.data.input, source.num_rows(), source.num_shards())
    store = ShardStore(out / "shards")
    monitor, writer = ScoringMonitor(total_pairs=0), ShardWriter(store, source.id_type, sigmoid)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[writer, monitor],
        logger=False,
        enable_progress_bar=False,  # the monitor's bar counts pairs, not batches
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    ranks: list[dict] = []
    with ddp_job(trainer):
        store.claim(
            {
                "input": source.identity(),
                "image_root": cfg.data.image_root,
                "model": model_identity(model_cfg.backbone),
                "precision": str(trainer.precision),
            }
        )
        datamodule.done_shards = store.finished()
        if len(datamodule.done_shards) < source.num_shards():
            pending = {k: source.shard_rows(k) for k in datamodule.pending_shards(trainer.global_rank, trainer.world_size)}
            writer.expect(pending)
            monitor.total_pairs = sum(pending.values())
            log.info("rank %d: %d of its shards to score (%d pairs)", trainer.global_rank, len(pending), monitor.total_pairs)
            with cpu_cores_shared(trainer, datamodule.num_workers), warnings.catch_warnings():
                # Lightning looks for sampler indices for writers; our batches carry their rows
                warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
                trainer.predict(PairScorer(backbone), datamodule=datamodule, return_predictions=False)
            ranks = monitor.gathered(trainer)
            trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return {}
    store.remove_partial()
    device = torch.cuda.get_device_name() if trainer.strategy.root_device.type == "cuda" else str(trainer.strategy.root_device)
    return finish(cfg, out, store, datamodule, sigmoid, ranks, f"{device} x{trainer.world_size}")


def finish(
    cfg: DictConfig, out: Path, store: ShardStore, datamodule: PairsDataModule, sigmoid, ranks: list[dict], device: str
) -> dict[str, float]:
    """Rank 0, once every shard is written: merged files, summary, figures, curation, report."""
    task, source = cfg.task, datamodule.source
    num_shards = source.num_shards()
    summary = summarize(store, num_shards, bins=task.histogram_bins)
    if summary.input_rows != source.num_rows():
        raise RuntimeError(f"the shards hold {summary.input_rows} rows but the input has {source.num_rows()}")
    (out / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
    merge(store, num_shards, out, task.format, scores=task.merge)
    metrics: dict[str, float] = {
        "score/input_rows": summary.input_rows,
        "score/scored": summary.scored,
        "score/errors": summary.errors,
        "score/truncated": summary.truncated,
    }
    for name, column in summary.columns.items():
        metrics.update(column.flat(f"score/{name}_"))
    if summary.columns:
        markers = {name: {"mean": c.mean, "median": c.quantiles["p50"]} for name, c in summary.columns.items()}
        plots.score_histograms({name: c.histogram for name, c in summary.columns.items()}, markers, out / "score_histogram.png")
    if task.grid_pairs and summary.scored:
        best, worst = extremes(store, num_shards, "cosine", task.grid_pairs)
        cells = _pair_cells(source, datamodule, best + worst, sigmoid)
        plots.pair_grid({"highest": cells[: len(best)], "lowest": cells[len(best) :]}, out / "extremes.png")
    if task.keep_min_score is not None or task.keep_top_fraction is not None:
        metrics.update(_curate(task, out, store, source, summary))
    if ranks:
        report = timing_report(ranks, device)
        write_report(report, out)
        metrics.update({"score/pairs_per_s": report["pairs_per_s"], "score/wall_s": report["wall_s"]})
    log.info("scored %d of %d pairs (%d errors: %s)", summary.scored, summary.input_rows, summary.errors, summary.reasons)
    return metrics


def _curate(task: DictConfig, out: Path, store: ShardStore, source: PairSource, summary: Summary) -> dict[str, float]:
    column = summary.columns.get(task.keep_by)
    if column is None:  # nothing was scored
        raise RuntimeError(f"no row was scored, nothing to curate by {task.keep_by}")
    minimum = curation.threshold(store, source.num_shards(), task.keep_by, column, task.keep_min_score, task.keep_top_fraction)
    result = curation.curate(store, source.num_shards(), source, task.keep_by, minimum, out)
    rule = (
        f"{task.keep_by} >= {task.keep_min_score}"
        if task.keep_min_score is not None
        else f"best {task.keep_top_fraction:g} by {task.keep_by}"
    )
    report = {
        "rule": rule,
        **result,
        "input_rows": summary.input_rows,
        "scored": summary.scored,
        "kept_of_scored": result["kept"] / summary.scored,
        "kept_of_input": result["kept"] / summary.input_rows,
    }
    (out / "curation.json").write_text(json.dumps(report, indent=2))
    log.info(
        "curation (%s, threshold %.6g): kept %d of %d scored pairs -> %s", rule, minimum, result["kept"], summary.scored, result["output"]
    )
    return {"curation/kept": result["kept"], "curation/threshold": minimum, "curation/kept_of_scored": report["kept_of_scored"]}


def _pair_cells(source: PairSource, datamodule: PairsDataModule, rows: list[Extreme], sigmoid) -> list[tuple]:
    """(thumbnail or None, caption, label) of each extreme row, read again from the input."""
    wanted = {(e.shard, e.index): None for e in rows}
    for shard, index, row in source.read(sorted({e.shard for e in rows})):
        if (shard, index) in wanted:
            wanted[(shard, index)] = row
    cells = []
    for extreme in rows:
        row = wanted[(extreme.shard, extreme.index)]
        try:
            picture = datamodule.preparer.loader.load(row.image)
            picture.thumbnail((THUMBNAIL, THUMBNAIL))
            image = np.asarray(picture, dtype=np.float32) / 255.0
        except BadRow:  # e.g. a URL that answered during scoring but not now
            image = None
        cosine = extreme.value
        label = f"cos {cosine:.3f}, CLIP {100 * max(cosine, 0):.1f}"
        if sigmoid is not None:
            label += f", p {1 / (1 + np.exp(-(sigmoid[0] * cosine + sigmoid[1]))):.3f}"
        cells.append((image, f"[{extreme.id}] {row.caption}", label))  # the id finds the row in scores.<format>
    return cells
