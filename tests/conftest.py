"""Shared test helpers: the real configs (composed by clipbench.runs.compose_config), scripts, tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from tiny_models import save_tiny_clip, save_tiny_siglip

from clipbench.models.attention import record_attention
from clipbench.runs import compose_config  # tests import it from here

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decode cache for the whole session (CIFAR-10 is decoded at most once)."""
    return tmp_path_factory.mktemp("cache")


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run an entry point as a user would (fresh interpreter), capturing its output."""
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)


# Tiny open_clip architectures: registered with open_clip, random weights saved to files so they load
# through the same ``pretrained=<file>`` path as released weights.
OPEN_CLIP_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
OPEN_CLIP_TINY = {
    "clipbench-tiny-vit": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16},
    "clipbench-tiny-rn": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
}


@pytest.fixture(scope="session")
def open_clip_weights(tmp_path_factory) -> dict[str, Path]:
    """Architecture name -> a saved random state dict of it."""
    root = tmp_path_factory.mktemp("open_clip")
    paths = {}
    for name, vision in OPEN_CLIP_TINY.items():
        (root / f"{name}.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": OPEN_CLIP_TEXT}))
        open_clip.add_model_config(root / f"{name}.json")
        torch.manual_seed(0)
        paths[name] = root / f"{name}.pt"
        torch.save(open_clip.create_model(name).state_dict(), paths[name])
    return paths


@pytest.fixture(scope="session")
def quickstart_checkpoint(tmp_path_factory, cache_dir) -> Path:
    """A train.py checkpoint of the quickstart recipe with small widths, trained for 2 steps (a few seconds)."""
    from clipbench.training import train

    out = tmp_path_factory.mktemp("quickstart")
    small = [
        "model.backbone.embed_dim=32",
        "model.backbone.text_width=32",
        "model.backbone.text_layers=1",
        "model.backbone.image_tower.widths=[16,32,32]",
    ]
    quick = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "data.batch_size=64", "logger=none", "test_ckpt=last"]
    quiet = ["~callbacks.prediction_grid", "~callbacks.epoch_history", "trainer.enable_progress_bar=false"]
    train(compose_config("train", ["experiment=quickstart", *small, *quick, *quiet], out, cache_dir))
    return out / "checkpoints" / "last.ckpt"


def check_attention_recorder(backbone, layers: int) -> list:
    """Recording must not change the embedding, and the recorded weights must carry gradients."""
    images = torch.randn(2, 3, backbone.image_spec.size, backbone.image_spec.size)
    with torch.no_grad():
        plain = backbone.encode_image(images)
    with record_attention(backbone) as records:
        recorded = backbone.encode_image(images)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    assert len(records) == layers
    grads = torch.autograd.grad(recorded.sum(), [record.weights for record in records])
    assert all(grad.abs().sum() > 0 for grad in grads)
    return records


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory) -> str:
    """A tiny Hugging Face CLIP saved with save_pretrained (see ``tiny_models``)."""
    return save_tiny_clip(tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="session")
def hf_siglip_dir(tmp_path_factory) -> str:
    """A tiny Hugging Face SigLIP saved with save_pretrained (see ``tiny_models``)."""
    return save_tiny_siglip(tmp_path_factory.mktemp("hf_siglip"))
