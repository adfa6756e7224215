"""The scoring task's LightningModule: cosine similarity of each image with its own caption."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor

from clipbench.models.backbone import CLIPBackbone
from clipbench.scoring.similarity import pair_cosine

# Pairs per forward pass on a CPU. A batch's activations then stay in the cores' caches: a small model's
# elementwise work (activations, norms) ran 1.85x as fast in slices of 128 as in one pass of 512 (a 2-core
# EPYC, 512 KB L2 per core); a large model is dominated by matrix products of 128 x tokens rows, which
# slicing should not slow. Accelerators take the batch whole.
CPU_SLICE = 128


class PairScorer(L.LightningModule):
    """``trainer.predict`` over :class:`clipbench.data.pairs.ScoringStream` batches: uint8 images at
    the model's resolution are normalised on the device, both towers encode (under the trainer's
    precision, e.g. bf16 autocast; captions without the padding that cannot change their embedding,
    :meth:`CLIPBackbone.trim_text_padding`; on a CPU in slices of :data:`CPU_SLICE` pairs), and each
    good row's cosine comes back on the CPU, in row order.
    ``model_seconds`` adds up the time spent here (the copy back to the CPU waits for the device)."""

    def __init__(self, backbone: CLIPBackbone) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.model_seconds = 0.0

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> dict[str, Any]:
        """Only the images and tokens go to the device. Lightning's default walks every element of the
        per-row lists too (ids, reasons, flags: thousands per batch), which took the main process more
        time than normalising the images."""
        return {**batch, "images": batch["images"].to(device, non_blocking=True), "tokens": batch["tokens"].to(device, non_blocking=True)}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        started = time.perf_counter()
        images = batch["images"]
        if len(images) == 0:  # a batch of bad rows only, or the end marker of an empty shard
            return torch.empty(0)
        pixels = self.backbone.image_spec.batch_transform(images)
        slice_size = CPU_SLICE if images.device.type == "cpu" else len(images)
        parts = zip(pixels.split(slice_size), batch["tokens"].split(slice_size))
        cosine = torch.cat([self._cosine(p, t) for p, t in parts]).cpu()
        self.model_seconds += time.perf_counter() - started
        return cosine

    def _cosine(self, pixels: Tensor, tokens: Tensor) -> Tensor:
        return pair_cosine(self.backbone.encode_image(pixels), self.backbone.encode_text(self.backbone.trim_text_padding(tokens)))
