"""``evaluate.py task=purity`` on every backbone source against each library's own projection weights,
the reference's full-matrix statistics, Cs labels, and the task's outputs."""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import compose_config
from test_backbone_laclip import TINY as LACLIP_TINY
from test_backbone_laclip import RefLaCLIP, _save
from transformers import CLIPModel, SiglipModel

from clipbench.config import ConfigError
from clipbench.evaluation import evaluate
from clipbench.purity import METRICS, purity_metrics
from clipbench.tasks.purity import chance_abs_cos, label_cs

OPEN_CLIP = "clipbench-tiny-rn"


def _source_overrides(hf_clip: str, hf_siglip: str, open_clip_weights, laclip: str, quickstart) -> list[str]:
    laclip_sizes = {k: v for k, v in LACLIP_TINY.items() if k != "vision_kwargs"}
    return [
        f"+task.checkpoints.quickstart={quickstart}",
        "+model@task.checkpoints.hf=hf_clip",
        f"task.checkpoints.hf.backbone.name_or_path={hf_clip}",
        "+model@task.checkpoints.siglip=hf_siglip",
        f"task.checkpoints.siglip.backbone.name_or_path={hf_siglip}",
        "+model@task.checkpoints.open_clip=open_clip",
        f"task.checkpoints.open_clip.backbone.model_name={OPEN_CLIP}",
        f"task.checkpoints.open_clip.backbone.pretrained={open_clip_weights[OPEN_CLIP]}",
        "+model@task.checkpoints.laclip=laclip",
        f"task.checkpoints.laclip.backbone.checkpoint={laclip}",
        *(f"task.checkpoints.laclip.backbone.{k}={v}" for k, v in laclip_sizes.items()),
        *(f"+task.checkpoints.laclip.backbone.vision_kwargs.{k}={v}" for k, v in LACLIP_TINY["vision_kwargs"].items()),
    ]


def test_every_source_reports_the_purity_of_its_own_projection_weights(request, open_clip_weights, quickstart_checkpoint, tmp_path):
    hf_clip, hf_siglip = request.getfixturevalue("hf_clip_dir"), request.getfixturevalue("hf_siglip_dir")
    torch.manual_seed(0)
    reference = RefLaCLIP()
    laclip = _save(tmp_path, reference.state_dict())
    overrides = ["task=purity", *_source_overrides(hf_clip, hf_siglip, open_clip_weights, laclip, quickstart_checkpoint)]
    metrics = evaluate(compose_config("evaluate", overrides, tmp_path / "run", tmp_path / "cache"))

    # Each library's own (in_features, embed_dim) projections, read without clipbench's backbones.
    hf, siglip = CLIPModel.from_pretrained(hf_clip), SiglipModel.from_pretrained(hf_siglip)
    oc = open_clip.create_model(OPEN_CLIP, pretrained=str(open_clip_weights[OPEN_CLIP]))
    state = {k.removeprefix("backbone."): v for k, v in torch.load(quickstart_checkpoint, weights_only=True)["state_dict"].items()}
    expected = {
        "quickstart": {"image": state["visual.proj.weight"].T, "text": state["text.text_projection"]},
        "hf": {"image": hf.visual_projection.weight.T, "text": hf.text_projection.weight.T},
        # SigLIP has no projections: the documented stand-ins, the last Linear of each tower's head
        "siglip": {"image": siglip.vision_model.head.mlp.fc2.weight.T, "text": siglip.text_model.head.weight.T},
        "open_clip": {"image": oc.visual.attnpool.c_proj.weight.T, "text": oc.text_projection},
        "laclip": {"image": reference.image_projection, "text": reference.text_projection},
    }
    table = pd.read_csv(tmp_path / "run" / "purity.csv")
    assert sorted(zip(table["label"], table["projection"])) == sorted((label, p) for label in expected for p in ("image", "text"))
    for label, towers in expected.items():
        for tower, projection in towers.items():
            row = table[(table["label"] == label) & (table["projection"] == tower)].iloc[0]
            assert (row["in_features"], row["embed_dim"]) == tuple(projection.shape)
            for metric, value in purity_metrics(projection.detach()).items():
                assert row[metric] == pytest.approx(value, rel=1e-9), (label, tower, metric)
                assert metrics[f"{label}/{tower}/{metric}"] == pytest.approx(value, rel=1e-9)
    assert table["Cs"].isna().all()
    for figure in ("purity_vs_label.png", "cosine_histograms.png"):
        assert (tmp_path / "run" / figure).stat().st_size > 20_000


def test_include_diagonal_reproduces_the_reference_scripts_numbers_and_cs_labels_are_read(quickstart_checkpoint, tmp_path):
    assert (label_cs("Cs30"), label_cs("cs12.5"), label_cs("Cs0")) == (0.30, 0.125, 0.0)
    assert math.isnan(label_cs("baseline")) and math.isnan(label_cs("Cs30b"))
    mapping = f"task.checkpoints={{Cs30: {quickstart_checkpoint}, Cs0: {quickstart_checkpoint}}}"
    overrides = ["task=purity", mapping, "task.projection=text", "task.include_diagonal=true"]
    metrics = evaluate(compose_config("evaluate", overrides, tmp_path, tmp_path / "cache"))
    assert set(metrics) == {f"{label}/text/{metric}" for label in ("Cs30", "Cs0") for metric in METRICS}
    table = pd.read_csv(tmp_path / "purity.csv")
    assert list(table["Cs"]) == [0.30, 0.0] and list(table["projection"]) == ["text", "text"]

    # analyze_purity.py's computation: the full matrix with its diagonal set to zero, in numpy.
    projection = torch.load(quickstart_checkpoint, weights_only=True)["state_dict"]["backbone.text.text_projection"].double().numpy()
    neurons = projection.T / np.linalg.norm(projection.T, axis=1, keepdims=True)
    cosines = neurons @ neurons.T
    cosines -= np.diag(np.diag(cosines))
    assert metrics["Cs0/text/avg_abs_cos"] == pytest.approx(np.abs(cosines).mean(), rel=1e-9)
    assert metrics["Cs0/text/max_abs_cos"] == pytest.approx(np.abs(cosines).max(), rel=1e-9)
    assert metrics["Cs0/text/median_abs_cos"] == pytest.approx(np.median(np.abs(cosines)), rel=1e-9)
    assert metrics["Cs0/text/avg_cos"] == pytest.approx(cosines.mean(), abs=1e-12)


def test_chance_level_of_random_directions():
    assert chance_abs_cos(2) == pytest.approx(2 / math.pi) and chance_abs_cos(3) == pytest.approx(0.5)  # E|cos| on a circle, a sphere


def test_a_bad_entry_or_projection_fails_naming_its_key(quickstart_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"task\.checkpoints\.x="):
        evaluate(compose_config("evaluate", ["task=purity", "+task.checkpoints.x={a: 1}"], tmp_path, tmp_path))
    with pytest.raises(ConfigError, match=r"task\.projection='vision'"):
        evaluate(
            compose_config("evaluate", ["task=purity", f"ckpt_path={quickstart_checkpoint}", "task.projection=vision"], tmp_path, tmp_path)
        )
