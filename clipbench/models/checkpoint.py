"""Backbones trained by ``train.py``, loaded from their Lightning checkpoints.

A checkpoint's hyper-parameters hold the backbone's config, so the model rebuilds without the
training config; only the backbone's weights are taken from the state dict.

A config stored in a file is data from whoever wrote the file, and instantiating it calls whatever
its ``_target_`` names: ``torch.load(weights_only=True)`` alone would not stop a checkpoint whose
target is ``shutil.copyfile``. So every backbone config is instantiated through
:func:`instantiate_backbone`, which accepts only the builders in :data:`BACKBONE_TARGETS`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from clipbench.models.backbone import CLIPBackbone

PREFIX = "backbone."

# Every callable a backbone config may name (conf/model/*.yaml): the backbone sources and the
# from-scratch image towers. A new source adds its builder here.
BACKBONE_TARGETS = frozenset(
    {
        "clipbench.models.scratch.ScratchCLIP",
        "clipbench.models.towers.cifar_resnet",
        "clipbench.models.towers.modified_resnet",
        "clipbench.models.towers.vit",
        "clipbench.models.hf.HFCLIP",
        "clipbench.models.hf.HFSigLIP",
        "clipbench.models.openclip.OpenCLIP",
        "clipbench.models.laclip.LaCLIP",
        "clipbench.models.checkpoint.load_clipbench",
        "clipbench.projections.load_with_projections",
    }
)


class UnsafeConfigError(ValueError):
    """A stored config names a callable that is not a known backbone builder."""


def _targets(node: Any) -> Iterator[str]:
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield str(node["_target_"])
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _targets(value)


def instantiate_backbone(config: Mapping, source: str = "the backbone config") -> CLIPBackbone:
    """``hydra.utils.instantiate(config)`` once every ``_target_`` in it is a known backbone builder."""
    for target in _targets(config):
        if target not in BACKBONE_TARGETS:
            raise UnsafeConfigError(
                f"{source} names _target_={target!r}, which is not a clipbench backbone builder; refusing to call it. "
                f"Allowed: {sorted(BACKBONE_TARGETS)}"
            )
    return instantiate(config)


def load_clipbench(path: str | Path) -> CLIPBackbone:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.path={path}: no such checkpoint (train.py writes them under <run dir>/checkpoints/)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        config = checkpoint["hyper_parameters"]["backbone"]
    except KeyError as err:
        raise ValueError(f"{path} is not a clipbench checkpoint: it has no hyper_parameters.backbone") from err
    backbone = instantiate_backbone(config, source=str(path))
    state = {k[len(PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)}
    backbone.load_state_dict(state, strict=True)
    return backbone.eval()
