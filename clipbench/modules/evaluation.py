"""Evaluation tasks on Lightning's predict loop: the trainer's devices, precision and DDP apply.

Every sample goes to exactly one rank: Lightning shards a DataLoader with its *unrepeated*
distributed sampler when predicting (no padding duplicates, unlike its test loop), and on-device
batches shard themselves (:class:`clipbench.data.device_batches.DeviceBatches`). Each sample carries
its index; :func:`predict_rows` gathers every rank's rows to every rank, puts them back in order and
checks that no index is missing or repeated.

Image embeddings keep coming from the per-(model, dataset, split) cache of :mod:`clipbench.embeddings`,
so a sweep over a task's own options (the sparse task's lambda) encodes the images once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from clipbench import runs
from clipbench.config import ConfigError
from clipbench.embeddings import EvalDataModule, cache_file, read_cache, write_cache
from clipbench.models.backbone import CLIPBackbone

log = logging.getLogger(__name__)

# The trainer's precision -> the autocast dtype the embedding cache is keyed by (clipbench.embeddings).
AUTOCAST = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def eval_trainer(cfg: DictConfig) -> L.Trainer:
    """The ``trainer`` config (shared with training) for a predict-only run: its devices, precision
    and strategy, the run's loggers (``logger=``), no checkpoints."""
    precision = str(cfg.trainer.precision)
    if precision not in AUTOCAST:
        raise ConfigError(f"trainer.precision={precision} is invalid for evaluation: expected one of {sorted(AUTOCAST)}")
    loggers = runs.instantiate_group(cfg.get("logger"))
    return instantiate(cfg.trainer, logger=loggers or False, enable_checkpointing=False, enable_model_summary=False)


def trainer_autocast(trainer: L.Trainer) -> torch.dtype | None:
    return AUTOCAST[str(trainer.precision)]


class Encoder(L.LightningModule):
    """``predict_step``: a batch of images (images, labels, index) or of token ids (tokens, index)
    -> their embeddings (float32, unnormalised) with what came with them."""

    def __init__(self, backbone: CLIPBackbone, tower: str) -> None:
        super().__init__()
        self.backbone, self.tower = backbone.eval(), tower

    def predict_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        if self.tower == "image":
            images, labels, index = batch
            return {"features": self.backbone.encode_image(images).float(), "labels": labels, "index": index}
        tokens, index = batch
        return {"features": self.backbone.encode_text(tokens).float(), "index": index}


class SplitPrediction(L.LightningDataModule):
    """One split of an :class:`EvalDataModule` as indexed predict batches for this rank."""

    def __init__(self, datamodule: EvalDataModule, split: str) -> None:
        super().__init__()
        self.datamodule, self.split = datamodule, split

    def predict_dataloader(self) -> Iterable:
        trainer = self.trainer
        return self.datamodule.predict_batches(self.split, trainer.strategy.root_device, trainer.global_rank, trainer.world_size)


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    return torch.cat(parts) if isinstance(first, Tensor) else type(first).cat(parts)


def predict_rows(trainer: L.Trainer, module: L.LightningModule, **data: Any) -> dict[str, Any]:
    """``trainer.predict(module, **data)``, whose steps return dicts of per-row values (tensors, or
    objects with ``cat``, ``to`` and row indexing) with an ``index``; every rank's rows gathered to
    every rank, on the CPU, in index order. Fails if an index is repeated (a sample counted twice)."""
    outputs = trainer.predict(module, return_predictions=True, **data) or []
    outputs = [{k: v.to("cpu") for k, v in out.items()} for out in outputs if len(out["index"])]
    local = {k: _concat([out[k] for out in outputs]) for k in outputs[0]} if outputs else {}
    if trainer.world_size > 1:
        gathered: list[dict] = [{}] * trainer.world_size
        dist.all_gather_object(gathered, local)
        parts = [part for part in gathered if part]
        local = {k: _concat([part[k] for part in parts]) for k in parts[0]} if parts else {}
    if not local:
        return {}
    index = local["index"]
    if len(index.unique()) != len(index):
        raise RuntimeError(f"the predict loop returned {len(index)} rows but only {len(index.unique())} distinct samples")
    order = index.argsort()
    return {k: v[order] for k, v in local.items()}


def predict_embeddings(
    trainer: L.Trainer,
    backbone: CLIPBackbone,
    datamodule: EvalDataModule,
    split: str = "test",
    cache_dir: str | Path | None = None,
    model_id: Mapping | None = None,
) -> tuple[Tensor, Tensor]:
    """Image embeddings (N, D) float32, unnormalised, and labels (N,) of ``split``, on the CPU of every
    rank: from the cache when there (the cache of :func:`clipbench.embeddings.image_embeddings`), else
    encoded by the predict loop and cached by rank 0."""
    path = None
    if cache_dir is not None and model_id is not None:
        path = cache_file(cache_dir, model_id, datamodule, split, trainer_autocast(trainer))
        if path.exists():
            return read_cache(path)
    rows = predict_rows(trainer, Encoder(backbone, "image"), datamodule=SplitPrediction(datamodule, split))
    features, labels = rows["features"], rows["labels"]
    if path is not None:
        if trainer.is_global_zero:
            write_cache(path, features, labels)
        trainer.strategy.barrier()
    return features, labels


def predict_text_embeddings(trainer: L.Trainer, backbone: CLIPBackbone, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """Text embeddings (N, D) float32, unnormalised, of ``texts`` in order, on the CPU of every rank."""
    tokens = backbone.tokenize(texts)
    loader = DataLoader(TensorDataset(tokens, torch.arange(len(tokens))), batch_size=batch_size)
    return predict_rows(trainer, Encoder(backbone, "text"), dataloaders=loader)["features"]
