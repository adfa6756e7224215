"""Batches served from a decoded dataset held on the accelerator, augmented there.

Per-sample PIL transforms in worker processes are the bottleneck of small-image training; with the
whole uint8 dataset on the device, a batch is an index, a resize, a batched crop/flip and a
normalisation, all on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clipbench.models.backbone import ImageSpec
from clipbench.seeding import AUGMENT, ORDER, stream_seed


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random crop after ``crop_padding`` pixels of reflect padding, and a
    horizontal flip with probability 0.5. Zero padding and ``hflip=False`` turn both off."""

    crop_padding: int = 4
    hflip: bool = True

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """x: float (B, C, H, W). Crops are gathered per sample in one indexing op."""
        b, _, h, w = x.shape
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p), mode="reflect")
            dy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=generator.device).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=generator.device).to(x.device)
            rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.hflip:
            flip = torch.rand(b, generator=generator, device=generator.device).to(x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


class EpochOrder:
    """The sample order of an epoch, the same on every rank: a permutation seeded by (seed, epoch).

    Lightning calls :meth:`set_epoch` at the start of every training epoch, as it does for a
    ``DistributedSampler`` (it looks for ``set_epoch`` on the loader's ``sampler``), with the epoch it
    is about to run: after ``ckpt_path=`` that is the resumed epoch, so a resumed run continues with
    the order an uninterrupted run would have used.
    """

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, device: torch.device) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.size, device=device)
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, ORDER))
        return torch.randperm(self.size, generator=generator).to(device)


class DeviceBatches:
    """An iterable of (images, labels) batches over tensors already on ``device``.

    Under DDP each rank takes its contiguous share of every *global* batch of
    ``batch_size * world_size`` samples, drawn from one permutation all ranks agree on (same seed),
    so the ranks together see exactly the batches one process with the global batch size would.
    Augmentation draws from a stream of its own per (seed, epoch, rank).
    Evaluation (``shuffle=False``) keeps every sample exactly once: no padding duplicates.
    ``indexed`` adds each sample's position in ``images`` to the batch: (images, labels, index).
    """

    batch_sampler = None  # Lightning reads it beside ``sampler``, as on a DataLoader

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        spec: ImageSpec,
        augment: Augment | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        indexed: bool = False,
    ) -> None:
        self.images, self.labels, self.indexed = images, labels, indexed
        self.batch_size, self.spec, self.augment = batch_size, spec, augment
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.sampler = EpochOrder(len(labels), shuffle, seed)
        self._generator = torch.Generator(device=images.device)

    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self._global_batch() if self.drop_last else math.ceil(n / self._global_batch())

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.sampler.indices(self.images.device)
        self._generator.manual_seed(stream_seed(self.sampler.seed, self.sampler.epoch, AUGMENT, self.rank))
        gb = self._global_batch()
        for start in range(0, len(self) * gb, gb):
            global_idx = order[start : start + gb]
            share = math.ceil(len(global_idx) / self.world_size)
            idx = global_idx[self.rank * share : (self.rank + 1) * share]
            yield (self._prepare(self.images[idx]), self.labels[idx], *((idx,) if self.indexed else ()))

    def _prepare(self, images: Tensor) -> Tensor:
        x = self.spec.resize_batch(images)
        if self.augment is not None and self.augment.active:
            x = self.augment(x, self._generator)
        return self.spec.normalize_batch(x)
