"""The scoring task's LightningModule: cosine similarity of each image with its own caption."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor

from clipbench.models.backbone import CLIPBackbone
from clipbench.scoring.similarity import pair_cosine


class PairScorer(L.LightningModule):
    """``trainer.predict`` over :class:`clipbench.data.pairs.ScoringStream` batches: uint8 images at
    the model's resolution are normalised on the device, both towers encode (under the trainer's
    precision, e.g. bf16 autocast; captions without the padding that cannot change their embedding,
    :meth:`CLIPBackbone.trim_text_padding`), and each good row's cosine comes back on the CPU, in row order.
    ``model_seconds`` adds up the time spent here (the copy back to the CPU waits for the device)."""

    def __init__(self, backbone: CLIPBackbone) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.model_seconds = 0.0

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        started = time.perf_counter()
        images = batch["images"]
        if len(images) == 0:  # a batch of bad rows only, or the end marker of an empty shard
            return torch.empty(0)
        pixels = self.backbone.image_spec.batch_transform(images)
        tokens = self.backbone.trim_text_padding(batch["tokens"])
        cosine = pair_cosine(self.backbone.encode_image(pixels), self.backbone.encode_text(tokens)).cpu()
        self.model_seconds += time.perf_counter() - started
        return cosine
