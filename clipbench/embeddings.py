"""Image embeddings of a dataset split, computed once per (model, dataset, split) and cached on disk.

Every evaluation task starts from these (zero-shot classification, sparse concepts, purity, pruning),
so a sweep over a task's own options never re-encodes the images. The encoding itself runs on
Lightning's predict loop (:func:`clipbench.modules.evaluation.predict_embeddings`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clipbench.data.datamodule import CLIPDataModule, _collate_readable, _Transformed, atomic_save
from clipbench.data.device_batches import DeviceBatches
from clipbench.models.backbone import ImageSpec

log = logging.getLogger(__name__)


class EvalDataModule(CLIPDataModule):
    """A :class:`CLIPDataModule` that reads only the splits asked for.

    The parent's ``setup`` reads and decodes train and test to hold out validation; evaluation needs
    one split and touches nothing else (Food-101's train split alone is 75,750 photos).
    """

    @classmethod
    def from_config(cls, data_cfg: DictConfig, image_spec: ImageSpec) -> EvalDataModule:
        """From a ``data`` config, whose ``_target_`` (the training datamodule) is replaced by this class."""
        options = OmegaConf.to_container(data_cfg, resolve=True)
        options.pop("_target_", None)
        return cls(image_spec=image_spec, **options)

    def dataset(self, split: str) -> Dataset:
        """The split as its source gives it (a file index or arrays in memory): nothing decoded yet."""
        if split not in self.splits:
            self.splits[split] = self._load(split)
            self.class_names = list(self.splits[split].classes)
        return self.splits[split]

    def eval_batches(self, split: str, device: torch.device) -> Iterable[tuple[Tensor, Tensor]]:
        """Model-ready batches of ``split`` in dataset order, every sample once.

        With ``on_device`` the decoded uint8 split moves to ``device`` and each batch is resized and
        normalised there by the model's ``image_spec``; otherwise a loader transforms per image.
        """
        data = self.dataset(split)
        if not self.on_device:
            return self._loader(split, train=False)
        decoded = self._decoded(data, split)
        return DeviceBatches(decoded.images.to(device), decoded.labels.to(device), self.eval_batch_size, self.image_spec)

    def predict_batches(self, split: str, device: torch.device, rank: int = 0, world_size: int = 1) -> Iterable[tuple[Tensor, ...]]:
        """Like :meth:`eval_batches`, each sample with its position in the split: (images, labels,
        index), for Lightning's predict loop. Under DDP a DataLoader is sharded by Lightning's
        unrepeated distributed sampler; on-device batches shard themselves (``rank`` of ``world_size``).
        Neither pads: every sample goes to exactly one rank, and the index puts it back in place."""
        data = self.dataset(split)
        if not self.on_device:
            return DataLoader(
                _Indexed(_Transformed(data, self.image_spec.pil_transform())),
                batch_size=self.eval_batch_size,
                num_workers=self.num_workers,
                collate_fn=_collate_readable,
            )
        decoded = self._decoded(data, split)
        return DeviceBatches(
            decoded.images.to(device),
            decoded.labels.to(device),
            self.eval_batch_size,
            self.image_spec,
            rank=rank,
            world_size=world_size,
            indexed=True,
        )

    def identity(self, split: str) -> dict[str, Any]:
        """What a split's embeddings depend on, besides the model."""
        return {
            "name": self.name,
            "root": str(Path(self.root).expanduser().resolve()) if self.root else None,
            "split": split,
            "decode_size": self.decode_size if self.on_device else None,
            "samples": len(self.dataset(split)),
            "interpolation": self.image_spec.interpolation,
        }


class _Indexed(Dataset):
    """(image, label) samples as (image, label, index)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple:
        return (*self.base[i], i)


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU if there is one, else the CPU; anything else is a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=256)
def _hash_file(path: Path, size: int, mtime_ns: int) -> str:
    """SHA-1 of a file's bytes; memoised by (path, size, mtime) so a sweep hashes each file once."""
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _content(path: Path) -> str:
    stat = path.stat()
    return _hash_file(path.resolve(), stat.st_size, stat.st_mtime_ns)


def model_identity(backbone_cfg: DictConfig | Mapping) -> dict[str, Any]:
    """What a model's embeddings depend on: its resolved backbone config, and the content (SHA-1) of
    every file it names (of each file in a directory it names), so that weights rewritten at the same
    path (a retrained ``last.ckpt``) are encoded afresh, and a copy elsewhere is recognised."""
    config = OmegaConf.to_container(backbone_cfg, resolve=True) if isinstance(backbone_cfg, DictConfig) else dict(backbone_cfg)
    files: dict[str, Any] = {}
    for value in _strings(config):
        path = Path(value).expanduser()
        if path.is_file():
            files[value] = _content(path)
        elif path.is_dir():
            files[value] = sorted((p.name, _content(p)) for p in path.iterdir() if p.is_file())
    return {"config": config, "files": files}


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _strings(value)


def cache_file(cache_dir: str | Path, model_id: Mapping, datamodule: EvalDataModule, split: str, dtype: torch.dtype | None) -> Path:
    """``<cache_dir>/embeddings/<dataset>_<split>_<key>.pt``, the key a hash of everything the
    embeddings depend on (bf16 and fp32 embeddings differ, so precision is part of it)."""
    key = {"model": model_id, "data": datamodule.identity(split), "autocast": str(dtype)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / "embeddings" / f"{datamodule.name}_{split}_{digest}.pt"


def read_cache(path: Path) -> tuple[Tensor, Tensor]:
    """Cached image embeddings and labels (see :func:`cache_file`)."""
    log.info("image embeddings from the cache: %s", path)
    cached = torch.load(path, weights_only=True)
    return cached["features"], cached["labels"]


def write_cache(path: Path, features: Tensor, labels: Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"features": features, "labels": labels}, path)
