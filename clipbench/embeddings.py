"""Image embeddings of a dataset split, computed once per (model, dataset, split) and cached on disk.

Every evaluation task starts from these (zero-shot classification, sparse concepts, purity, pruning),
so a sweep over a task's own options never re-encodes the images. Evaluation runs in one process on
one device: a split is a single pass of inference in dataset order, each sample encoded exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from clipbench.data.datamodule import CLIPDataModule, atomic_save
from clipbench.data.device_batches import DeviceBatches
from clipbench.models.backbone import CLIPBackbone, ImageSpec

log = logging.getLogger(__name__)

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU if there is one, else the CPU; anything else is a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, full precision elsewhere (CPU autocast is slower than fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AUTOCAST[precision]


@contextmanager
def inference(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """No autograd, and autocast to ``dtype`` (None: full precision)."""
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        yield


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


def encode_images(
    backbone: CLIPBackbone, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device, dtype: torch.dtype | None, desc: str
) -> tuple[Tensor, Tensor]:
    """Image embeddings (float32, unnormalised) and labels of every batch, both on the CPU."""
    features, labels = [], []
    with inference(device, dtype):
        for images, targets in tqdm(batches, desc=desc, unit="batch"):
            features.append(backbone.encode_image(images.to(device, non_blocking=True)).float())
            labels.append(targets)
    return torch.cat(features).cpu(), torch.cat(labels).cpu()


def image_embeddings(
    backbone: CLIPBackbone,
    datamodule: EvalDataModule,
    split: str = "test",
    *,
    device: torch.device,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    model_id: Mapping | None = None,
) -> tuple[Tensor, Tensor]:
    """Image embeddings (N, D) float32, unnormalised, and labels (N,) of ``split``, on the CPU.

    ``backbone`` must already be on ``device`` in eval mode. With ``cache_dir`` and ``model_id``
    (:func:`model_identity`), a cached result is loaded instead of encoding, and a fresh one saved.
    """
    dtype = autocast_dtype(precision, device)
    path = cache_file(cache_dir, model_id, datamodule, split, dtype) if cache_dir is not None and model_id is not None else None
    if path is not None and path.exists():
        log.info("image embeddings of %s/%s from the cache: %s", datamodule.name, split, path)
        cached = torch.load(path, weights_only=True)
        return cached["features"], cached["labels"]
    batches = datamodule.eval_batches(split, device)
    features, labels = encode_images(backbone, batches, device, dtype, f"encode {datamodule.name}/{split}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"features": features, "labels": labels}, path)
    return features, labels
