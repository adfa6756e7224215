"""Explanation methods on tiny Hugging Face, open_clip, LaCLIP and clipbench ViTs (and a ResNet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from grad_eclip_reference import grad_eclip_map
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_backbone_laclip import TINY as LACLIP_TINY
from test_backbone_laclip import RefLaCLIP
from timm.layers import resample_abs_pos_embed
from tiny_models import save_tiny_clip

from clipbench.config import ConfigError
from clipbench.evaluation import evaluate
from clipbench.explain import METHODS, Targets, UnsupportedMethod, check_methods, explain, grad_eclip_text
from clipbench.explain.base import minmax, tap
from clipbench.explain.faithfulness import area, curves
from clipbench.explain.image import grad_eclip, grad_eclip_target
from clipbench.models.attention import record_attention
from clipbench.models.backbone import interpolate_positions
from clipbench.models.scratch import ScratchCLIP
from clipbench.models.towers import cifar_resnet, vit

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
SOURCES = ("hf_clip", "open_clip", "laclip", "clipbench")
FAST_OPTIONS = {"m2ib": {"steps": 2, "samples": 2}, "rise": {"masks": 16}}


def _hf_clip(root) -> object:
    """A tiny HF CLIP (patch 8 on 32 px: a 4x4 grid) saved and loaded the user's way."""
    path = save_tiny_clip(root / "hf_clip", patch_size=8)
    return instantiate(OmegaConf.load(CONF / "hf_clip.yaml").backbone, name_or_path=path)


def _laclip(root) -> object:
    torch.manual_seed(0)
    path = str(root / "laclip.pt")
    torch.save({"state_dict": RefLaCLIP().state_dict()}, path)
    return instantiate(OmegaConf.load(CONF / "laclip.yaml").backbone, checkpoint=path, **LACLIP_TINY)


def _scratch_vit(patch_size: int = 8, layers: int = 2) -> ScratchCLIP:
    torch.manual_seed(0)
    tower = vit(embed_dim=16, image_size=32, patch_size=patch_size, width=32, layers=layers, heads=2)
    return ScratchCLIP(tower, embed_dim=16, text_width=32, text_heads=2, text_layers=2).eval()


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, open_clip_weights) -> dict:
    root = tmp_path_factory.mktemp("explain_models")
    open_clip_cfg = OmegaConf.load(CONF / "open_clip.yaml").backbone
    return {
        "hf_clip": _hf_clip(root),
        "open_clip": instantiate(open_clip_cfg, model_name="clipbench-tiny-vit", pretrained=str(open_clip_weights["clipbench-tiny-vit"])),
        "laclip": _laclip(root),
        "clipbench": _scratch_vit(),
    }


def _targets(backbone, n: int) -> Targets:
    texts = ["a photo of a cat", "a dog", "a red car"]
    with torch.no_grad():
        prompts = backbone.encode_text(backbone.tokenize(texts))
    index = torch.arange(n) % len(texts)
    return Targets(prompts[index], prompts, index)


@pytest.mark.parametrize("source", SOURCES)
def test_every_method_gives_a_finite_map_of_the_grid(source, backbones):
    backbone = backbones[source]
    size = backbone.image_spec.size
    images = torch.randn(2, 3, size, size + backbone.patch_size)  # a non-square native size
    grid = (size // backbone.patch_size, size // backbone.patch_size + 1)
    targets = _targets(backbone, 2)
    for name in METHODS:
        maps = explain(name, backbone, images, targets, **FAST_OPTIONS.get(name, {}))
        expected = images.shape[-2:] if name in ("gradcam", "rise") else grid
        assert maps.shape == (2, *expected), name
        assert torch.isfinite(maps).all(), name
        assert maps.abs().sum() > 0 or name == "grad_eclip", name


@pytest.mark.parametrize("source", SOURCES)
def test_gradient_target_is_the_models_cosine(source, backbones):
    """Grad-ECLIP (ours) differentiates exactly the cosine the model reports; the official single-head
    recomputation does not."""
    backbone = backbones[source]
    size = backbone.image_spec.size
    images, targets = torch.randn(3, 3, size, size), _targets(backbone, 3)
    with torch.no_grad():
        reported = F.cosine_similarity(backbone.encode_image(images), targets.text, dim=-1)
    ours, _ = grad_eclip_target(backbone, images, targets, layers=1, variant="ours")
    torch.testing.assert_close(ours.detach(), reported, atol=1e-5, rtol=0)
    official, records = grad_eclip_target(backbone, images, targets, layers=1, variant="official")
    assert records[0].weights.shape[1] == 1  # one head
    assert (official.detach() - reported).abs().max() > 1e-4
    with pytest.raises(ValueError, match="layers=3 is invalid: this model has 2 vision blocks"):
        grad_eclip_target(backbone, images, targets, layers=3, variant="ours")


@pytest.mark.parametrize("source", ["open_clip", "clipbench"])
@pytest.mark.parametrize(("variant", "heads"), [("official", 1), ("ours", None)])
def test_grad_eclip_equals_the_official_computation_one_image_at_a_time(source, variant, heads, backbones):
    """The batched map at a non-square size equals the official code's computation (transcribed in
    grad_eclip_reference.py) run image by image; ``ours`` is the same computation with the model's heads."""
    backbone = backbones[source]
    visual = backbone.visual if source == "clipbench" else backbone.model.visual
    size = backbone.image_spec.size
    images = torch.randn(3, 3, size, size + 2 * backbone.patch_size)
    text = _targets(backbone, 3).text
    ours = grad_eclip(backbone, images, Targets(text), variant=variant)
    reference = torch.stack([grad_eclip_map(visual, images[i : i + 1], text[i], heads)[0] for i in range(3)])
    assert (reference > 0).any()
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("source", SOURCES)
def test_dense_encoding_at_the_training_resolution_is_the_model(source, backbones):
    backbone = backbones[source]
    size = backbone.image_spec.size
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image_dense(images), backbone.encode_image(images), atol=1e-6, rtol=0)
        wide = backbone.encode_image_dense(torch.randn(1, 3, size, 2 * size))
    assert wide.shape == (1, backbone.embed_dim) and torch.isfinite(wide).all()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone.encode_image_dense(torch.randn(1, 3, size, size + 1))


def test_position_interpolation_matches_timm():
    """Identity on the training grid; elsewhere timm's bicubic resampling (without antialiasing)."""
    positions = torch.randn(1 + 4 * 6, 8)
    assert interpolate_positions(positions, (4, 6), (4, 6), prefix=1) is positions
    ours = interpolate_positions(positions, (4, 6), (7, 5), prefix=1)
    reference = resample_abs_pos_embed(positions[None], (7, 5), (4, 6), num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    torch.testing.assert_close(ours, reference[0])


def test_planted_region_gets_the_most_grad_eclip_mass():
    """A grey image with random content planted in a 2x2-patch square; the text embedding is what the
    planted content adds to the image embedding. With the positional embedding zeroed, every background
    patch is identical, so only the planted content can be what the text is about."""
    for seed in range(4):
        backbone = _scratch_vit(patch_size=4)
        torch.manual_seed(seed)
        with torch.no_grad():
            backbone.visual.positional_embedding.zero_()
        blank = torch.full((1, 3, 32, 32), 0.5)
        planted = blank.clone()
        row, col = torch.randint(0, 7, (2,)).tolist()
        planted[..., 4 * row : 4 * row + 8, 4 * col : 4 * col + 8] = 2 * torch.randn(3, 8, 8)
        with torch.no_grad():
            text = backbone.encode_image(planted) - backbone.encode_image(blank)
        heat = grad_eclip(backbone, planted, Targets(text))[0]
        region = torch.zeros(8, 8, dtype=torch.bool)
        region[row : row + 2, col : col + 2] = True
        assert region.flatten()[heat.argmax()], seed
        assert heat[region].mean() > heat[~region].mean(), seed


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("variant", ["ours", "official"])
def test_text_relevance_sums_to_one_over_the_words(source, variant, backbones):
    backbone = backbones[source]
    tokens = backbone.tokenize(["a photo of a cat", "a red car on the road"])
    with torch.no_grad():
        images = backbone.encode_image(torch.randn(2, 3, backbone.image_spec.size, backbone.image_spec.size))
    relevance = grad_eclip_text(backbone, tokens, images, variant=variant)
    assert relevance.shape == tokens.shape and torch.isfinite(relevance).all() and (relevance >= 0).all()
    torch.testing.assert_close(relevance.sum(-1), torch.ones(2))
    for row, words in zip(relevance, (5, 6)):  # mass on exactly the words: not on start, end or padding
        assert row[0] == 0 and (row[1 + words :] == 0).all()
        pieces = backbone.token_strings(tokens[0, 1:6].tolist())
        assert [p.removesuffix("</w>") for p in pieces] == ["a", "photo", "of", "a", "cat"]


def test_text_recording_keeps_the_causal_text_embedding(backbones):
    """The text recorder recomputes each tower's causal attention (HF passes is_causal, open_clip a mask)."""
    for source in SOURCES:
        backbone = backbones[source]
        tokens = backbone.tokenize(["a photo of a cat", "a dog"])
        with torch.no_grad():
            plain = backbone.encode_text(tokens)
            with record_attention(backbone, tower="text") as records:
                recorded = backbone.encode_text(tokens)
        torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
        assert len(records) == 2 and (records[0].weights[0, 0].triu(1) == 0).all(), source


@pytest.mark.parametrize("tower", ["open_clip", "clipbench"])
def test_resnet_gets_a_clear_error_and_rise(tower, open_clip_weights):
    if tower == "open_clip":
        backbone = instantiate(OmegaConf.load(CONF / "open_clip.yaml").backbone, model_name="clipbench-tiny-rn", pretrained=None)
    else:
        backbone = ScratchCLIP(cifar_resnet(16, (8, 16, 16)), embed_dim=16, text_width=32, text_heads=2, text_layers=2).eval()
    with pytest.raises(UnsupportedMethod, match=r"grad_eclip, game need a vision transformer .*Methods that work for it: rise, random"):
        check_methods(["grad_eclip", "game", "rise"], backbone)
    size = backbone.image_spec.size
    maps = explain("rise", backbone, torch.randn(2, 3, size, size), _targets(backbone, 2), masks=16)
    assert maps.shape == (2, size, size) and torch.isfinite(maps).all()


def test_gradcam_is_the_token_gradcam(backbones):
    """pytorch-grad-cam's map equals Grad-CAM computed by hand on the tokens entering the last block."""
    backbone = backbones["clipbench"]
    images, targets = torch.randn(2, 3, 32, 40), _targets(backbone, 2)
    ours = explain("gradcam", backbone, images, targets)
    with tap(backbone.vision_blocks()[-2]) as entering:
        score = F.cosine_similarity(backbone.encode_image_dense(images), targets.text, dim=-1)
    tokens = entering["x"][:, 1:]
    (grad,) = torch.autograd.grad(score.sum(), [entering["x"]])
    cam = F.relu((grad[:, 1:].mean(1, keepdim=True) * tokens).sum(-1)).reshape(2, 1, 4, 5)
    cam = F.interpolate(cam, size=(32, 40), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(ours, minmax(cam.flatten(1)).view_as(cam).detach(), atol=2e-2, rtol=0)


def test_deletion_and_insertion_on_a_planted_score():
    """A score that only sees a known region: a map ranking that region first gives the hand-computed
    curves, and beats a map that ranks it last."""
    images = torch.ones(3, 3, 8, 8)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:2] = True  # the first 16 of 64 pixels: a quarter

    def score(x, labels):
        return x[:, 0][:, region].mean(-1)

    good = region.float().expand(3, 8, 8) + 0.01 * torch.rand(3, 8, 8)
    bad = 1 - good
    result = {name: curves(score, images, torch.zeros(3, dtype=torch.long), m, steps=8, deletion="noise", insertion="blank")
              for name, m in (("good", good), ("bad", bad))}  # fmt: skip
    insertion = result["good"]["insertion"][0]
    torch.testing.assert_close(insertion, torch.tensor([0, 0.5, 1, 1, 1, 1, 1, 1, 1.0]))
    assert area(result["good"]["insertion"]).mean() > area(result["bad"]["insertion"]).mean()
    assert torch.allclose(area(result["good"]["insertion"]), torch.tensor(1 - 0.25 / 2))
    # Deleted pixels become N(0, 1) noise: the region's score collapses after two steps.
    deletion = result["good"]["deletion"][0]
    assert deletion[0] == 1 and deletion[2:].abs().max() < 1.0
    assert (result["bad"]["deletion"][:, :6] == 1).all()


def _open_clip_overrides(open_clip_weights) -> list[str]:
    return [
        "model=open_clip",
        "model.backbone.model_name=clipbench-tiny-vit",
        f"model.backbone.pretrained={open_clip_weights['clipbench-tiny-vit']}",
    ]


def test_explain_task_writes_the_grid_text_heatmaps_and_times(open_clip_weights, tmp_path):
    """``evaluate.py task=explain`` on real photographs: every pair, every method, one PNG grid."""
    overrides = [
        *_open_clip_overrides(open_clip_weights),
        "task=explain",
        "task.images=[chelsea,coffee]",
        "task.texts=[a photo of a cat.,a cup of coffee.]",
        "task.pairing=all",
        "task.max_side=64",
        "task.methods=[grad_eclip,gradcam,surgery,rise]",
        "task.options.rise.masks=16",
    ]
    metrics = evaluate(compose_config("evaluate", overrides, tmp_path, tmp_path / "cache"))
    assert set(metrics) == {f"{m}/ms_per_pair" for m in ("grad_eclip", "gradcam", "surgery", "rise", "grad_eclip_text")}
    times = pd.read_csv(tmp_path / "times.csv")
    assert list(times.method) == ["grad_eclip", "gradcam", "surgery", "rise"] and (times.pairs == 4).all()
    words = pd.read_csv(tmp_path / "text_relevance.csv")
    assert len(words) == 2 * (6 + 5)  # each image with "a photo of a cat ." and "a cup of coffee ." (BPE words)
    assert np.allclose(words.groupby(["image", "text"]).relevance.sum(), 1)
    for figure in ("explain_grid.png", "text_heatmaps.png"):
        assert (tmp_path / figure).stat().st_size > 10_000


def test_explain_task_rejects_a_resnet_attention_method_at_start(open_clip_weights, tmp_path):
    overrides = ["model=open_clip", "model.backbone.model_name=clipbench-tiny-rn", "model.backbone.pretrained=null", "task=explain"]
    with pytest.raises(UnsupportedMethod, match="Methods that work for it: rise, random"):
        evaluate(compose_config("evaluate", overrides, tmp_path, tmp_path / "cache"))


def test_explain_eval_curves_and_auc_against_random(open_clip_weights, tmp_path, cache_dir):
    """``evaluate.py task=explain_eval`` on digits: curves start and end where they must, a random row."""
    overrides = [
        *_open_clip_overrides(open_clip_weights),
        "task=explain_eval",
        "data=digits",
        "task.methods=[grad_eclip,maskclip]",
        "task.num_images=24",
        "task.batch_size=12",
        "task.steps=4",
        "task.insertion=blank",
    ]
    metrics = evaluate(compose_config("evaluate", overrides, tmp_path, cache_dir))
    table = pd.read_csv(tmp_path / "faithfulness.csv").set_index("method")
    assert list(table.index) == ["grad_eclip", "maskclip", "random"] and (table.images == 24).all()
    assert metrics["grad_eclip/deletion_auc"] == pytest.approx(table.loc["grad_eclip", "deletion_auc"])
    mean = pd.read_csv(tmp_path / "curves.csv").set_index(["method", "curve", "fraction"]).probability
    for method in table.index:  # nothing deleted = everything inserted = the image itself
        assert mean[(method, "deletion", 0.0)] == pytest.approx(mean[(method, "insertion", 1.0)], abs=1e-5)
        assert mean[(method, "insertion", 0.0)] == pytest.approx(mean["random", "insertion", 0.0], abs=1e-6)
    assert len(pd.read_csv(tmp_path / "per_image_auc.csv")) == 24
    assert (tmp_path / "faithfulness.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("override", "key"),
    [("task.variant=offical", "task.variant"), ("task.steps=0", "task.steps"), ("task.deletion=zeros", "task.deletion")],
)
def test_explain_eval_rejects_impossible_values_naming_the_key(override, key, tmp_path):
    cfg = compose_config(
        "evaluate", ["model=open_clip", "model.backbone.pretrained=null", "task=explain_eval", override], tmp_path, tmp_path
    )
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        evaluate(cfg)
