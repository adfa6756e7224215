"""Labelled image datasets, each a torch ``Dataset`` of (image, label) with a ``classes`` list.

Images are PIL images or uint8 CHW tensors; torchvision v2 transforms accept both. A dataset that
fits in memory at a fixed size is a :class:`TensorImages`, which the on-device path uses as is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}
SPLITS = ("train", "test")


class DataError(ValueError):
    """A dataset cannot be used as configured; the message says which key or file to fix."""


class TensorImages(Dataset):
    """An in-memory dataset: uint8 images (N, 3, H, W) and int64 labels (N,)."""

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"TensorImages wants uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.classes = images, labels.long(), list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])

    def subset(self, index: Tensor) -> "TensorImages":
        return TensorImages(self.images[index], self.labels[index], self.classes)


class FolderImages(Dataset):
    """A class-folder tree (``<root>/<class>/<image>``), read lazily.

    An unreadable image does not stop a job: ``__getitem__`` returns ``None`` for it and the loaders
    report the file and the reason (see :func:`clipbench.data.loading.decode`).
    """

    def __init__(self, root: Path, classes: Sequence[str] | None = None) -> None:
        found = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.classes = list(classes) if classes is not None else found
        missing = sorted(set(self.classes) - set(found))
        if missing:
            raise DataError(f"{root}: class folders {missing} are missing (every split needs the same classes)")
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"{root / name}: class folder '{name}' has no images (suffixes {sorted(IMAGE_SUFFIXES)})")
            self.samples.extend((p, label) for p in files)
        self.labels = torch.tensor([label for _, label in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except Exception as err:  # a corrupt file is reported by the caller, not fatal
            log.warning("skipping unreadable image %s: %s", path, err)
            return None, label


def image_folder(root: str | Path, split: str) -> FolderImages:
    """``<root>/train`` and ``<root>/test``, class names from folder names (test uses train's)."""
    root = Path(root).expanduser()
    if not (root / split).is_dir():
        raise DataError(
            f"data.root={root}: no '{split}/' folder there. Expected <root>/train/<class>/*.jpg and "
            f"<root>/test/<class>/*.jpg (e.g. data.root=../shared/data/cifar10)"
        )
    classes = None if split == "train" else FolderImages(root / "train").classes
    return FolderImages(root / split, classes)


def digits(split: str, test_fraction: float = 0.2, seed: int = 0) -> TensorImages:
    """scikit-learn's bundled 8x8 digits (1,797 images), a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    index = np.arange(len(pixels))
    train_idx, test_idx = train_test_split(index, test_size=test_fraction, stratify=bunch.target, random_state=seed)
    chosen = train_idx if split == "train" else test_idx
    images = torch.from_numpy(pixels[chosen]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return TensorImages(images, torch.from_numpy(bunch.target[chosen]), names)


def synthetic(split: str, size: int = 32, num_classes: int = 10, samples: int = 512, seed: int = 0) -> TensorImages:
    """Random images whose class sets a colour bias, so a model can learn it (tests, benchmarks)."""
    g = torch.Generator().manual_seed(seed + SPLITS.index(split))
    labels = torch.randint(0, num_classes, (samples,), generator=g)
    palette = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(seed)) * 255
    noise = torch.rand(samples, 3, size, size, generator=g) * 255
    images = (0.5 * noise + 0.5 * palette[labels]).to(torch.uint8)
    return TensorImages(images, labels, [f"class{i}" for i in range(num_classes)])


def cifar(num_classes: int, root: str | Path, split: str, download: bool) -> Dataset:
    """CIFAR-10/100 from a local class-folder tree, torchvision's files, or a download."""
    from torchvision.datasets import CIFAR10, CIFAR100

    root = Path(root).expanduser()
    if (root / split).is_dir():
        return image_folder(root, split)
    cls = CIFAR10 if num_classes == 10 else CIFAR100
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found"; urllib: no network
        raise DataError(
            f"CIFAR-{num_classes} not found at data.root={root} and could not be downloaded ({err}). "
            f"Either put a class-folder tree at <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg "
            f"(e.g. data.root=../shared/data/cifar10), or place torchvision's extracted files in <root>, "
            f"or run online with data.download=true"
        ) from err
    return TensorImages(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes)
