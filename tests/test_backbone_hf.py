"""Hugging Face CLIP / SigLIP backbones, on tiny random models saved the way a user would save them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import check_attention_recorder
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPModel, SiglipModel

from clipbench.models.backbone import CLIP_MEAN

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def _load(config_name: str, name_or_path: str):
    """The user's path: the model config's backbone node with name_or_path overridden."""
    return instantiate(OmegaConf.load(CONF / f"{config_name}.yaml").backbone, name_or_path=name_or_path)


def _check_against_transformers(backbone, reference, context_length: int) -> None:
    images = torch.randn(2, 3, 32, 32)
    tokens = backbone.tokenize(["a photo of a cat", "a dog"])
    assert tokens.shape == (2, context_length)
    with torch.no_grad():
        image_emb, text_emb = backbone.encode_image(images), backbone.encode_text(tokens)
        assert image_emb.shape == text_emb.shape == (2, backbone.embed_dim)
        torch.testing.assert_close(image_emb, reference.get_image_features(pixel_values=images).pooler_output)
        torch.testing.assert_close(text_emb, reference.get_text_features(input_ids=tokens).pooler_output)


def test_clip_matches_transformers(hf_clip_dir):
    backbone = _load("hf_clip", hf_clip_dir)
    assert backbone.embed_dim == 16
    assert backbone.image_spec.size == 32 and backbone.image_spec.mean == CLIP_MEAN
    assert backbone.image_spec.interpolation == "bicubic"
    _check_against_transformers(backbone, CLIPModel.from_pretrained(hf_clip_dir).eval(), context_length=77)
    # CLIP's tokenizer rebuilt from open_clip's vocabulary gives CLIP's ids (open_clip pads with 0, HF with EOT).
    tokens = backbone.tokenize(["a photo of a cat"])
    reference = SimpleTokenizer()(["a photo of a cat"])
    assert torch.equal(tokens[0, :7], reference[0, :7])
    assert backbone.projection_matrix("image").shape == (32, 16)
    assert backbone.projection_matrix("text").shape == (32, 16)
    assert set(backbone.projection_parameters()) == {"image.visual_projection.weight", "text.text_projection.weight"}
    assert backbone.logit_bias() is None and backbone.logit_scale.shape == ()


def test_siglip_matches_transformers(hf_siglip_dir):
    backbone = _load("hf_siglip", hf_siglip_dir)
    assert backbone.embed_dim == 32
    assert backbone.image_spec.size == 32 and backbone.image_spec.mean == (0.5, 0.5, 0.5)
    _check_against_transformers(backbone, SiglipModel.from_pretrained(hf_siglip_dir).eval(), context_length=64)
    assert backbone.projection_matrix("image").shape == (64, 32)  # head.mlp.fc2: intermediate -> width
    assert backbone.projection_matrix("text").shape == (32, 32)  # text head: width -> projection_size
    assert set(backbone.projection_parameters()) == {
        "image.vision_model.head.mlp.fc2.weight",
        "image.vision_model.head.mlp.fc2.bias",
        "text.text_model.head.weight",
        "text.text_model.head.bias",
    }
    assert backbone.logit_bias().shape == () and backbone.logit_scale.shape == ()


# CLIP's vision tokens: a class token and 2x2 patches; SigLIP has no class token.
@pytest.mark.parametrize(("config_name", "tokens"), [("hf_clip", 5), ("hf_siglip", 4)])
def test_attention_recorder(config_name, tokens, hf_clip_dir, hf_siglip_dir):
    records = check_attention_recorder(_load(config_name, hf_clip_dir if config_name == "hf_clip" else hf_siglip_dir), layers=2)
    assert records[0].weights.shape == (2, 2, tokens, tokens) and records[0].output.shape == (2, tokens, 32)


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(InstantiationException) as failure:  # hydra wraps the builder's error
        _load("hf_clip", "openai/clip-vit-base-patch32")
    assert time.perf_counter() - start < 3
    assert isinstance(failure.value.__cause__, OSError)
    assert "'openai/clip-vit-base-patch32'" in str(failure.value.__cause__)
    assert "model.backbone.name_or_path=DIR" in str(failure.value.__cause__)
