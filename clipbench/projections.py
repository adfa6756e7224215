"""``projections.pt``: the two projections of a projection-only fine-tuning, applied to their source model.

A model fine-tuned with ``model.trainable=projections`` differs from its source (a Hugging Face,
open_clip or LaCLIP model, a clipbench checkpoint) only in the image and text projections, so a few
megabytes describe it instead of a copy of the whole model. The file holds:

* ``projections``: each projection parameter by its backbone name (``image.visual_projection.weight``);
* ``source``: the backbone config the model was built from (its ``_target_`` and arguments);
* ``fingerprint``: a SHA-1 of every other tensor of the model's state (the frozen weights), so that a
  file applied to a model other than its source fails instead of giving wrong embeddings.

``model=projections model.backbone.path=<run>/projections.pt`` (:func:`load_with_projections`) rebuilds
the source and applies the projections, for every task and every backbone source.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from clipbench.models.backbone import CLIPBackbone

log = logging.getLogger(__name__)

FORMAT = "clipbench-projections/1"
FILE_NAME = "projections.pt"


def frozen_fingerprint(backbone: CLIPBackbone) -> str:
    """SHA-1 over the name, dtype, shape and bytes of every state tensor that is not a projection."""
    projections = {id(p) for p in backbone.projection_parameters().values()}
    digest = hashlib.sha1()
    for name, tensor in sorted(backbone.state_dict(keep_vars=True).items()):
        if id(tensor) in projections:
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_projections(backbone: CLIPBackbone, source: Mapping[str, Any], path: str | Path) -> Path:
    """Write the projections of ``backbone`` (built from the backbone config ``source``) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "format": FORMAT,
        "source": dict(source),
        "fingerprint": frozen_fingerprint(backbone),
        "projections": {name: p.detach().cpu().clone() for name, p in backbone.projection_parameters().items()},
    }
    partial = path.with_suffix(".tmp")
    torch.save(record, partial)
    partial.replace(path)  # atomic: a killed run leaves the previous file, never half of one
    return path


def load_with_projections(path: str | Path, source: CLIPBackbone | None = None, check_source: bool = True) -> CLIPBackbone:
    """The source model of ``path`` (or ``source``, an already built backbone, e.g. when its weights
    moved) with the fine-tuned projections applied. ``check_source=False`` skips the fingerprint check."""
    from clipbench.models.checkpoint import instantiate_backbone  # the allow-list of backbone builders

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone.path={path}: no such file (train.py with model.trainable=projections writes {FILE_NAME})")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a clipbench {FILE_NAME} (format {FORMAT})")
    backbone = source if source is not None else instantiate_backbone(record["source"], source=str(path))
    if check_source and frozen_fingerprint(backbone) != record["fingerprint"]:
        raise ValueError(
            f"{path} was fine-tuned from another model than the one built from its source config {record['source']}: "
            "the frozen weights differ. Pass the right source (model.backbone.source=...) or check_source=false."
        )
    params = backbone.projection_parameters()
    if set(params) != set(record["projections"]):
        raise ValueError(f"{path} holds projections {sorted(record['projections'])}, the model has {sorted(params)}")
    with torch.no_grad():
        for name, value in record["projections"].items():
            if params[name].shape != value.shape:
                raise ValueError(f"{path}: projection {name} has shape {tuple(value.shape)}, the model's is {tuple(params[name].shape)}")
            params[name].copy_(value)
    return backbone.eval()


class SaveProjections(L.Callback):
    """After every training epoch of a projection-only fine-tuning, ``<output_dir>/projections.pt``
    (nothing for ``model.trainable=all``: the towers changed too, only the checkpoint describes them)."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / FILE_NAME

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.hparams.get("trainable") == "projections":
            save_projections(pl_module.backbone, pl_module.hparams.backbone, self.path)
