"""Backbones trained by ``train.py``, loaded from their Lightning checkpoints.

A checkpoint's hyper-parameters hold the backbone's config, so the model rebuilds without the
training config; only the backbone's weights are taken from the state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

from clipbench.models.backbone import CLIPBackbone

PREFIX = "backbone."


def load_clipbench(path: str | Path) -> CLIPBackbone:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.path={path}: no such checkpoint (train.py writes them under <run dir>/checkpoints/)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        config = checkpoint["hyper_parameters"]["backbone"]
    except KeyError as err:
        raise ValueError(f"{path} is not a clipbench checkpoint: it has no hyper_parameters.backbone") from err
    backbone: CLIPBackbone = instantiate(config)
    state = {k[len(PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)}
    backbone.load_state_dict(state, strict=True)
    return backbone.eval()
