"""open_clip backbone, on tiny registered architectures whose weights go through ``pretrained=<file>``."""

from __future__ import annotations

import time
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import check_attention_recorder
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


@pytest.fixture(scope="module")
def weights(open_clip_weights) -> dict[str, str]:
    return {name: str(path) for name, path in open_clip_weights.items()}


def _load(**overrides):
    """The user's path: the model config's backbone node with overrides."""
    return instantiate(OmegaConf.load(CONF / "open_clip.yaml").backbone, **overrides)


@pytest.mark.parametrize(("name", "image_in"), [("clipbench-tiny-vit", 32), ("clipbench-tiny-rn", 256)])
def test_matches_open_clip(name, image_in, weights):
    backbone = _load(model_name=name, pretrained=weights[name])
    reference = open_clip.create_model(name, pretrained=weights[name]).eval()
    assert backbone.embed_dim == 16
    spec = backbone.image_spec
    assert (spec.size, spec.interpolation) == (32, "bicubic")
    assert (spec.mean, spec.std) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    images = torch.randn(2, 3, 32, 32)
    tokens = backbone.tokenize(["a photo of a cat", "a dog"])
    assert tokens.shape == (2, 77)
    with torch.no_grad():
        image_emb, text_emb = backbone.encode_image(images), backbone.encode_text(tokens)
        assert image_emb.shape == text_emb.shape == (2, 16)
        torch.testing.assert_close(image_emb, reference.encode_image(images))
        torch.testing.assert_close(text_emb, reference.encode_text(tokens))
    assert backbone.projection_matrix("image").shape == (image_in, 16)
    assert backbone.projection_matrix("text").shape == (32, 16)
    resnet_keys = {"image.visual.attnpool.c_proj.weight", "image.visual.attnpool.c_proj.bias"}
    image_keys = {"image.visual.proj"} if name.endswith("vit") else resnet_keys
    assert set(backbone.projection_parameters()) == image_keys | {"text.text_projection"}
    assert backbone.logit_bias() is None and backbone.logit_scale.shape == ()


def test_attention_recorder(weights):
    records = check_attention_recorder(_load(model_name="clipbench-tiny-vit", pretrained=weights["clipbench-tiny-vit"]), layers=2)
    assert records[0].weights.shape == (2, 2, 5, 5)


def test_resnet_has_no_vision_attention(weights):
    backbone = _load(model_name="clipbench-tiny-rn", pretrained=None)
    with pytest.raises(NotImplementedError):
        backbone.vision_attention_modules()


def test_offline_tag_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(InstantiationException) as failure:  # hydra wraps the builder's error
        _load()  # the config's default: ViT-B-32 with the laion2b_s34b_b79k tag
    assert time.perf_counter() - start < 3
    assert isinstance(failure.value.__cause__, OSError)
    assert "'laion2b_s34b_b79k'" in str(failure.value.__cause__)
    assert "model.backbone.pretrained=/path/to/weights.pt" in str(failure.value.__cause__)
