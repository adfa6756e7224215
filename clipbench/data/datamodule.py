"""One LightningDataModule for every labelled image dataset clipbench trains or evaluates on.

Batches are (images, labels); captions are made from labels by the model (prompt templates), so the
same data serves contrastive training, zero-shot evaluation and every analysis task.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from clipbench.data import sources
from clipbench.data.device_batches import Augment, DeviceBatches
from clipbench.data.sources import DataError, TensorImages
from clipbench.models.backbone import ImageSpec
from clipbench.seeding import INIT_SAMPLE, stream_seed

log = logging.getLogger(__name__)


def _source(name: str, root: str | None, download: bool, synthetic_samples: int) -> Callable[[str], Dataset]:
    """``load(split=...)`` -> dataset, for the dataset called ``name`` (picklable, for spawned ranks).

    No split depends on the run's seed: a seed sweep compares models on the same test set.
    """
    # torchvision's benchmark datasets: (root, split, download) -> dataset, in torchvision's layout under root
    torchvision = {
        "food101": sources.food101,
        "caltech101": sources.caltech101,
        "oxford_pets": sources.oxford_pets,
        "stl10": sources.stl10,
        "dtd": sources.dtd,
        "eurosat": sources.eurosat,
        "fashion_mnist": sources.fashion_mnist,
    }
    needs_root = {"cifar10", "cifar100", "imagefolder", *torchvision}
    if name in needs_root and not root:
        raise DataError(f"data.root must be set for data.name={name}")
    table: dict[str, Callable[[str], Dataset]] = {
        "digits": sources.digits,
        "synthetic": partial(sources.synthetic, samples=synthetic_samples),
        "cifar10": partial(sources.cifar, 10, root, download=download),
        "cifar100": partial(sources.cifar, 100, root, download=download),
        "imagefolder": partial(sources.image_folder, root),
        **{name: partial(load, root, download=download) for name, load in torchvision.items()},
    }
    if name not in table:
        raise DataError(f"data.name={name!r} is unknown; choose one of {sorted(table)}")
    return table[name]


class _Transformed(Dataset):
    """Applies a per-sample transform; unreadable images (``None``) pass through to be dropped."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return (None if image is None else self.transform(image)), label


def _collate_readable(batch: list) -> tuple[Tensor, ...]:
    """Default collation of (image, label, ...) samples minus those whose image could not be read
    (already logged)."""
    kept = [sample for sample in batch if sample[0] is not None]
    return torch.stack([sample[0] for sample in kept]), *(torch.tensor(column) for column in list(zip(*kept))[1:])


def decode(dataset: Dataset, spec: ImageSpec, size: int, num_workers: int, desc: str) -> TensorImages:
    """Decode a dataset into uint8 tensors at ``size`` x ``size`` (:meth:`ImageSpec.fit`: the model's
    interpolation, short-side resize, centre crop)."""
    if isinstance(dataset, TensorImages):
        return TensorImages(spec.fit(dataset.images, size), dataset.labels, dataset.classes)
    to_uint8 = v2.Compose([v2.ToImage(), partial(spec.fit, size=size)])
    loader = DataLoader(_Transformed(dataset, to_uint8), batch_size=512, num_workers=num_workers, collate_fn=_collate_readable)
    parts = [batch for batch in tqdm(loader, desc=desc, unit="batch")]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    if len(labels) < len(dataset):
        log.warning(
            "%s: %d of %d images were unreadable and are left out (see warnings above)", desc, len(dataset) - len(labels), len(dataset)
        )
    return TensorImages(images, labels, dataset.classes)


def _content_key(dataset: Dataset) -> str:
    """What a decoded folder tree depends on: each file's path and size (a rewritten image of another
    size, or an added or removed file, is a new dataset), and its label."""
    listing = "\n".join(f"{path}\t{Path(path).stat().st_size}\t{label}" for path, label in dataset.samples)
    return hashlib.sha1(listing.encode()).hexdigest()[:16]


def decoded_cache_file(cache_dir: Path, name: str, split: str, dataset: Dataset, spec: ImageSpec, size: int) -> Path:
    """``<cache_dir>/decoded/<name>_<split>_<size>px_<key>.pt``: the key covers the files and how they
    are resized (the model's interpolation)."""
    key = hashlib.sha1(f"{_content_key(dataset)}\n{size}\n{spec.interpolation}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "decoded" / f"{name}_{split}_{size}px_{key}.pt"


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a killed writer leaves no truncated file."""
    partial_file = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, partial_file)
    partial_file.replace(path)


class CLIPDataModule(L.LightningDataModule):
    def __init__(
        self,
        name: str,
        image_spec: ImageSpec,
        root: str | None = None,
        download: bool = False,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        crop_padding: int = 4,
        hflip: bool = True,
        on_device: bool = True,
        decode_size: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        synthetic_samples: int = 512,
    ) -> None:
        super().__init__()
        self.name, self.root, self.image_spec = name, root, image_spec
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.val_fraction, self.on_device, self.seed = num_workers, val_fraction, on_device, seed
        self.augment = Augment(crop_padding, hflip)
        self.decode_size = decode_size or image_spec.size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._load = _source(name, root, download, synthetic_samples)
        self.splits: dict[str, Dataset] = {}
        self.class_names: list[str] = []

    # ----------------------------------------------------------------- datasets
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, test = self._load(split="train"), self._load(split="test")
        if self.on_device:
            train, test = self._decoded(train, "train"), self._decoded(test, "test")
        self.class_names = list(train.classes)
        self.splits = {"test": test, **self._split_validation(train)}

    def _split_validation(self, train: Dataset) -> dict[str, Dataset]:
        """Hold out a stratified ``val_fraction`` of train; with 0, validate on the test split."""
        if self.val_fraction <= 0:
            return {"train": train}
        labels = train.labels.numpy()
        held_out, num_classes = round(self.val_fraction * len(labels)), len(train.classes)
        if held_out < num_classes:
            raise DataError(
                f"data.val_fraction={self.val_fraction} holds out {held_out} of {len(labels)} training images, "
                f"fewer than the {num_classes} classes; raise it, or set 0 to validate on the test split"
            )
        fit_idx, val_idx = train_test_split(range(len(labels)), test_size=self.val_fraction, stratify=labels, random_state=self.seed)
        pick = (
            (lambda idx: train.subset(torch.as_tensor(idx)))
            if isinstance(train, TensorImages)
            else (lambda idx: torch.utils.data.Subset(train, idx))
        )
        return {"train": pick(fit_idx), "val": pick(val_idx)}

    def _decoded(self, dataset: Dataset, split: str) -> TensorImages:
        """Decode once; cache folder trees on disk, keyed by their content (see :func:`decoded_cache_file`).

        Under DDP every rank calls this at once: the first to take the lock decodes and writes the
        cache (to a temporary file, then renamed, so nobody reads half a file); the others wait on the
        lock and read what it wrote.
        """
        decode_here = partial(decode, dataset, self.image_spec, self.decode_size, self.num_workers, f"decode {self.name}/{split}")
        if isinstance(dataset, TensorImages) or self.cache_dir is None:
            return decode_here()
        path = decoded_cache_file(self.cache_dir, self.name, split, dataset, self.image_spec, self.decode_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            if path.exists():
                cached = torch.load(path, weights_only=True)
                return TensorImages(cached["images"], cached["labels"], cached["classes"])
            decoded = decode_here()
            atomic_save({"images": decoded.images, "labels": decoded.labels, "classes": decoded.classes}, path)
        return decoded

    # -------------------------------------------------------------- dataloaders
    def _device_batches(self, split: str, train: bool) -> DeviceBatches:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        data: TensorImages = self.splits[split]
        images, labels = data.images.to(device), data.labels.to(device)
        # Overfitting a few batches (debug=overfit) means the same batches every epoch: no shuffling.
        shuffle = train and not (trainer is not None and trainer.overfit_batches > 0)
        return DeviceBatches(
            images,
            labels,
            batch_size=self.batch_size if train else self.eval_batch_size,
            spec=self.image_spec,
            augment=self.augment if train else None,
            shuffle=shuffle,
            drop_last=train,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            seed=self.seed,
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        spec, augment = self.image_spec, []
        if train and self.augment.crop_padding > 0:
            augment.append(v2.RandomCrop(spec.size, padding=self.augment.crop_padding, padding_mode="reflect"))
        if train and self.augment.hflip:
            augment.append(v2.RandomHorizontalFlip())
        return DataLoader(
            _Transformed(self.splits[split], spec.pil_transform(augment)),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_collate_readable,
        )

    def _batches(self, split: str, train: bool = False):
        self.setup()
        return self._device_batches(split, train) if self.on_device else self._loader(split, train)

    def train_sample(self, count: int) -> Tensor:
        """Up to ``count`` training images, a random sample fixed by the run's seed (a class-sorted
        folder tree's first images are one class), as the model sees them without augmentation: float
        (n, C, size, size), normalised, on the CPU. For data-dependent initialisation (the whitened
        stem of :class:`clipbench.models.towers.CifarResNet`)."""
        self.setup()
        train = self.splits["train"]
        generator = torch.Generator().manual_seed(stream_seed(self.seed, INIT_SAMPLE))
        index = torch.randperm(len(train), generator=generator)[:count]
        if isinstance(train, TensorImages):
            return self.image_spec.batch_transform(train.images[index])
        sample = _Transformed(torch.utils.data.Subset(train, index.tolist()), self.image_spec.pil_transform())
        loader = DataLoader(sample, batch_size=512, num_workers=self.num_workers, collate_fn=_collate_readable)
        return torch.cat([images for images, *_ in loader])

    def train_dataloader(self):
        return self._batches("train", train=True)

    def val_dataloader(self):
        return self._batches("val" if "val" in self.splits else "test")

    def test_dataloader(self):
        return self._batches("test")
