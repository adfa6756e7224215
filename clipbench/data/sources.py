"""Labelled image datasets, each a torch ``Dataset`` of (image, label) with a ``classes`` list.

Images are PIL images or uint8 CHW tensors; torchvision v2 transforms accept both. A dataset that
fits in memory at a fixed size is a :class:`TensorImages`, which the on-device path uses as is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = IMG_EXTENSIONS  # what torchvision's ImageFolder reads
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

    def subset(self, index: Tensor) -> TensorImages:
        return TensorImages(self.images[index], self.labels[index], self.classes)


def _open_rgb(path: str) -> Image.Image | None:
    """ImageFolder's loader, tolerant: an unreadable image is reported and skipped, not fatal."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:
        log.warning("skipping unreadable image %s: %s", path, err)
        return None


class FolderImages(ImageFolder):
    """A class-folder tree (``<root>/<class>/<image>``), read lazily by torchvision's ``ImageFolder``.

    ``classes`` fixes the class list and order (a test split uses its train split's). An unreadable
    image does not stop a job: ``__getitem__`` returns ``None`` for it and the loaders drop it
    (:func:`clipbench.data.datamodule.decode`).
    """

    def __init__(self, root: Path, classes: Sequence[str] | None = None) -> None:
        self._requested_classes = None if classes is None else list(classes)
        super().__init__(str(root), loader=_open_rgb, allow_empty=True)
        self.labels = torch.tensor(self.targets)
        empty = [name for label, name in enumerate(self.classes) if not (self.labels == label).any()]
        if empty:
            raise DataError(f"{root}: class folder '{empty[0]}' has no images (suffixes {sorted(IMAGE_SUFFIXES)})")

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        found = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        classes = self._requested_classes or found
        missing = sorted(set(classes) - set(found))
        if missing:
            raise DataError(f"{directory}: class folders {missing} are missing (every split needs the same classes)")
        return classes, {name: i for i, name in enumerate(classes)}


def image_folder(root: str | Path, split: str) -> FolderImages:
    """``<root>/train`` and ``<root>/test``, class names from folder names (test uses train's)."""
    root = Path(root).expanduser()
    if not (root / split).is_dir():
        raise DataError(
            f"data.root={root}: no '{split}/' folder there. Expected <root>/train/<class>/*.jpg and "
            f"<root>/test/<class>/*.jpg (e.g. data.root=../shared/data/cifar10)"
        )
    # The test split takes train's classes and order (its sorted folder names, as FolderImages finds them)
    # without listing train's files: CIFAR-10's 50,000 would cost every evaluation run a second or so.
    classes = None if split == "train" else sorted(entry.name for entry in os.scandir(root / "train") if entry.is_dir())
    return FolderImages(root / split, classes)


SPLIT_SEED = 0  # fixed, not ${seed}: a dataset without an official split always has the same test set


def _torchvision(name: str, layout: str, root: Path, build):
    """``build()`` a torchvision dataset; its "not found" (or a failed download) becomes a DataError."""
    try:
        return build()
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found"; urllib: no network
        raise DataError(
            f"{name} not found at data.root={root} and could not be downloaded ({err}). Place torchvision's "
            f"files there ({layout}), point data.root at such a copy, or run online with data.download=true"
        ) from err


def _stratified_split(labels: Sequence[int], split: str, test_fraction: float = 0.2, seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices of ``split`` under a stratified train/test split (for datasets without one)."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)
    return np.sort(train_idx if split == "train" else test_idx)


def _gray_to_rgb(images: Tensor) -> Tensor:
    """uint8 (N, H, W) grayscale -> (N, 3, H, W)."""
    return v2.functional.grayscale_to_rgb(images.unsqueeze(1)).contiguous()


def digits(split: str, test_fraction: float = 0.2) -> TensorImages:
    """scikit-learn's bundled 8x8 digits (1,797 images), a fixed stratified train/test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    chosen = _stratified_split(bunch.target, split, test_fraction)
    images = _gray_to_rgb(torch.from_numpy(pixels[chosen]))
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return TensorImages(images, torch.from_numpy(bunch.target[chosen]), names)


def synthetic(split: str, size: int = 32, num_classes: int = 10, samples: int = 512, seed: int = SPLIT_SEED) -> TensorImages:
    """Random images whose class sets a colour bias, so a model can learn it (tests, benchmarks).
    Fixed by ``seed`` (not the run's): every run sees the same train and test images."""
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
    layout = "a class-folder tree <root>/train/<class>/*.jpg + <root>/test/<class>/*.jpg, e.g. ../shared/data/cifar10, or torchvision's extracted batches"
    ds = _torchvision(f"CIFAR-{num_classes}", layout, root, lambda: cls(str(root), train=split == "train", download=download))
    return TensorImages(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes)


# ------------------------------------------------------------------ torchvision benchmark datasets
# Each loads torchvision's on-disk layout under data.root (downloading it with data.download=true when
# online). File-based datasets become a ListedImages, read lazily and decoded (and cached) like a
# class-folder tree; array-based ones become TensorImages.


class ListedImages(Dataset):
    """Image files named by a list of (path, label): a torchvision dataset's index, read like a tree."""

    def __init__(self, samples: Sequence[tuple[str | Path, int]], classes: Sequence[str]) -> None:
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.classes = list(classes)
        self.labels = torch.tensor([label for _, label in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        path, label = self.samples[i]
        return _open_rgb(path), label


# Where torchvision's file-based datasets keep their index: private attributes (no public API lists
# the files). Read here only, and checked against real instances by a test, so a torchvision release
# that renames them fails that test loudly instead of silently breaking evaluation.
TORCHVISION_FILE_LISTS = {"Food101": "_image_files", "DTD": "_image_files", "OxfordIIITPet": "_images"}


def torchvision_file_list(ds: Dataset) -> list[tuple[str, int]]:
    """(path, label) of every image of a Food101, DTD or OxfordIIITPet dataset, in its order."""
    files_attr = TORCHVISION_FILE_LISTS[type(ds).__name__]
    try:
        return [(str(path), int(label)) for path, label in zip(getattr(ds, files_attr), ds._labels, strict=True)]
    except AttributeError as err:
        raise RuntimeError(f"torchvision's {type(ds).__name__} no longer has {files_attr}/_labels: update clipbench.data.sources") from err


def food101(root: str | Path, split: str, download: bool) -> ListedImages:
    """Food-101: 75,750 train / 25,250 test photos, 101 dishes (official split)."""
    from torchvision.datasets import Food101

    root = Path(root).expanduser()
    ds = _torchvision(
        "Food-101", "<root>/food-101/images and <root>/food-101/meta", root, lambda: Food101(str(root), split=split, download=download)
    )
    return ListedImages(torchvision_file_list(ds), ds.classes)


def caltech101(root: str | Path, split: str, download: bool) -> ListedImages:
    """Caltech-101: 8,677 images of 101 objects (torchvision drops BACKGROUND_Google). No official
    split: a stratified 80/20 train/test split with a fixed seed (:data:`SPLIT_SEED`)."""
    from torchvision.datasets import Caltech101

    root = Path(root).expanduser()
    ds = _torchvision(
        "Caltech-101",
        "<root>/caltech101/101_ObjectCategories/<class>/image_NNNN.jpg",
        root,
        lambda: Caltech101(str(root), target_type="category", download=download),
    )
    folder = Path(ds.root) / "101_ObjectCategories"
    files = [folder / ds.categories[y] / f"image_{i:04d}.jpg" for i, y in zip(ds.index, ds.y)]
    chosen = _stratified_split(ds.y, split)
    return ListedImages([(files[i], ds.y[i]) for i in chosen], ds.categories)


def oxford_pets(root: str | Path, split: str, download: bool) -> ListedImages:
    """Oxford-IIIT Pets: 37 breeds; train is the official trainval (3,680), test 3,669."""
    from torchvision.datasets import OxfordIIITPet

    root = Path(root).expanduser()
    tv_split = "trainval" if split == "train" else "test"
    ds = _torchvision(
        "Oxford-IIIT Pets",
        "<root>/oxford-iiit-pet/images and <root>/oxford-iiit-pet/annotations",
        root,
        lambda: OxfordIIITPet(str(root), split=tv_split, target_types="category", download=download),
    )
    return ListedImages(torchvision_file_list(ds), ds.classes)


def dtd(root: str | Path, split: str, download: bool) -> ListedImages:
    """Describable Textures, partition 1: 47 textures; train is train+val (3,760), test 1,880."""
    from torchvision.datasets import DTD

    root = Path(root).expanduser()
    parts = ("train", "val") if split == "train" else ("test",)
    layout = "<root>/dtd/dtd/images and <root>/dtd/dtd/labels"
    sets = [_torchvision("DTD", layout, root, lambda p=p: DTD(str(root), split=p, partition=1, download=download)) for p in parts]
    return ListedImages([s for ds in sets for s in torchvision_file_list(ds)], sets[0].classes)


def eurosat(root: str | Path, split: str, download: bool) -> ListedImages:
    """EuroSAT RGB: 27,000 64x64 satellite tiles, 10 land-use classes. No official split: a stratified
    80/20 train/test split with a fixed seed (:data:`SPLIT_SEED`), 5,400 test tiles."""
    from torchvision.datasets import EuroSAT

    root = Path(root).expanduser()
    ds = _torchvision("EuroSAT", "<root>/eurosat/2750/<class>/*.jpg", root, lambda: EuroSAT(str(root), download=download))
    chosen = _stratified_split(ds.targets, split)
    return ListedImages([ds.samples[i] for i in chosen], ds.classes)


def stl10(root: str | Path, split: str, download: bool) -> TensorImages:
    """STL-10: 96x96 images, 10 classes, 5,000 train / 8,000 test (the unlabelled split is not used)."""
    from torchvision.datasets import STL10

    root = Path(root).expanduser()
    ds = _torchvision("STL-10", "<root>/stl10_binary/*.bin", root, lambda: STL10(str(root), split=split, download=download))
    return TensorImages(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64)), ds.classes)


def fashion_mnist(root: str | Path, split: str, download: bool) -> TensorImages:
    """Fashion-MNIST: 28x28 grayscale (repeated to RGB), 10 classes, 60,000 train / 10,000 test."""
    from torchvision.datasets import FashionMNIST

    root = Path(root).expanduser()
    ds = _torchvision(
        "Fashion-MNIST", "<root>/FashionMNIST/raw/*-ubyte", root, lambda: FashionMNIST(str(root), train=split == "train", download=download)
    )
    return TensorImages(_gray_to_rgb(ds.data), ds.targets, ds.classes)
