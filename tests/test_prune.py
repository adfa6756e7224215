"""Neuron pruning: the selections, the silhouette against scikit-learn, the task against the zero-shot
task, start-up checks, a sweep's tables and plots, and sweep points that load no model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, run_script
from sklearn.metrics import silhouette_score

from clipbench.config import ConfigError
from clipbench.evaluation import evaluate
from clipbench.models.openclip import OpenCLIP
from clipbench.pruning import evaluate_kept, neuron_scores, select_neurons
from clipbench.purity import neuron_overlap
from clipbench.silhouette import cosine_silhouette
from clipbench.sweeps import write_summary

TINY = "clipbench-tiny-vit"  # embed_dim 16 (conftest.OPEN_CLIP_TINY)


def _tiny(weights, *extra: str) -> list[str]:
    return ["model=open_clip", f"model.backbone.model_name={TINY}", f"model.backbone.pretrained={weights[TINY]}", "data=digits", *extra]


def test_cosine_silhouette_equals_scikit_learns():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (400,), generator=g)
    features = torch.randn(6, 24, generator=g, dtype=torch.float64)[labels] + torch.randn(400, 24, generator=g, dtype=torch.float64)
    features[[3, 50]] = 0  # pruned embeddings can lose every kept dimension
    labels[7] = 9  # a cluster of one
    expected = silhouette_score(features.numpy(), labels.numpy(), metric="cosine")
    assert cosine_silhouette(features, labels) == pytest.approx(expected, abs=1e-12)
    masked = features * (torch.arange(24) < 5)
    assert cosine_silhouette(masked, labels) == pytest.approx(silhouette_score(masked.numpy(), labels.numpy(), metric="cosine"), abs=1e-12)
    assert np.isnan(cosine_silhouette(features, torch.zeros(400, dtype=torch.long)))


def test_selections_have_size_n_high_and_low_are_disjoint_and_random_is_seeded():
    scores = torch.randperm(40, generator=torch.Generator().manual_seed(1)).float()  # a planted ranking: 0 is purest
    for n in (1, 7, 20):
        high, low = select_neurons(scores, n, "high"), select_neurons(scores, n, "low")
        assert len(high) == len(low) == n and not set(high.tolist()) & set(low.tolist())
        assert sorted(scores[high].tolist()) == list(range(n))
        assert sorted(scores[low].tolist()) == list(range(40 - n, 40))
    first, again, other = (select_neurons(scores, 10, "random", seed=s) for s in (0, 0, 1))
    assert torch.equal(first, again) and set(first.tolist()) != set(other.tolist())
    assert len(set(first.tolist())) == 10
    assert set(select_neurons(scores, 5, "random", seed=0).tolist()) <= set(first.tolist())  # nested as n grows
    with pytest.raises(ValueError, match="cannot keep 41 of 40"):
        select_neurons(scores, 41, "high")


def test_scores_sum_both_projections_and_pruning_is_zeroing_the_other_dimensions():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(12, 6, generator=g), torch.randn(9, 6, generator=g)
    torch.testing.assert_close(neuron_scores(image, text), neuron_overlap(image) + neuron_overlap(text))

    # The reference's way: zero the other columns of the normalised embeddings, argmax against whole class embeddings.
    labels = torch.arange(3).repeat(40)
    features = torch.randn(3, 6, generator=g)[labels] + torch.randn(120, 6, generator=g)
    classifier = F.normalize(torch.randn(3, 6, generator=g), dim=-1)
    kept = torch.tensor([5, 1, 4])
    zeroed = F.normalize(features, dim=-1).numpy()
    zeroed[:, [0, 2, 3]] = 0
    result = evaluate_kept(F.normalize(features, dim=-1), labels, classifier, kept)
    assert result.acc1 == pytest.approx(np.mean(np.argmax(zeroed @ classifier.numpy().T, axis=1) == labels.numpy()))
    assert result.silhouette == pytest.approx(silhouette_score(zeroed, labels.numpy(), metric="cosine"), abs=1e-6)


def test_all_neurons_reproduce_the_zero_shot_task(open_clip_weights, tmp_path):
    zeroshot = evaluate(compose_config("evaluate", _tiny(open_clip_weights), tmp_path / "zs", tmp_path / "cache"))
    pruned = evaluate(
        compose_config("evaluate", _tiny(open_clip_weights, "task=prune", "task.neurons=16"), tmp_path / "p", tmp_path / "cache")
    )
    for selection in ("full", "high", "low", "random"):
        assert pruned[f"test/{selection}/acc1"] == zeroshot["test/acc1"]  # exactly: the same embeddings and classifier
        assert pruned[f"test/{selection}/silhouette"] == pytest.approx(zeroshot["test/silhouette"], abs=1e-6)
    table = pd.read_csv(tmp_path / "p" / "pruning.csv")
    assert list(table["selection"]) == ["full", "high", "low"] + ["random"] * 5 and (table["width"] == 16).all()


def test_more_neurons_than_the_width_fails_naming_both(open_clip_weights, tmp_path):
    cfg = compose_config("evaluate", _tiny(open_clip_weights, "task=prune", "task.neurons=[8,17]"), tmp_path, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"task\.neurons=17 is larger than the embedding width 16"):
        evaluate(cfg)
    assert not (tmp_path / "cache" / "embeddings").exists()  # stopped before encoding anything
    with pytest.raises(ConfigError, match=r"task\.neurons"):
        evaluate(compose_config("evaluate", _tiny(open_clip_weights, "task=prune", "task.neurons=0"), tmp_path, tmp_path / "cache"))


class CountingOpenCLIP(OpenCLIP):
    """A real backbone that counts how often it is built and how many images it encodes."""

    built = encoded = 0

    def __init__(self, *args, **kwargs):
        CountingOpenCLIP.built += 1
        super().__init__(*args, **kwargs)

    def encode_image(self, images):
        CountingOpenCLIP.encoded += len(images)
        return super().encode_image(images)


def test_a_sweep_point_after_the_first_loads_no_model_and_encodes_no_image(open_clip_weights, tmp_path):
    counting = _tiny(open_clip_weights, "task=prune", f"model.backbone._target_={__name__}.CountingOpenCLIP")
    first = evaluate(compose_config("evaluate", [*counting, "task.neurons=4"], tmp_path / "a", tmp_path / "cache"))
    assert CountingOpenCLIP.built == 1 and CountingOpenCLIP.encoded == 360
    second = evaluate(compose_config("evaluate", [*counting, "task.neurons=8"], tmp_path / "b", tmp_path / "cache"))
    assert CountingOpenCLIP.built == 1 and CountingOpenCLIP.encoded == 360
    assert second["test/full/acc1"] == first["test/full/acc1"]


def _check_sweep(sweep: Path, model: str) -> None:
    """Both curves at the sweep directory, their points those of the jobs' own tables, and a plot of each."""
    jobs = pd.concat([pd.read_csv(sweep / job / "pruning.csv") for job in ("0", "1")])
    for word, column in (("accuracy", "acc1"), ("silhouette", "silhouette")):
        curve = pd.read_csv(sweep / f"digits_{model}_{word}_vs_neurons.csv")
        assert list(curve.columns) == ["neurons", "full", "high", "low", "random", "random_std"]
        assert list(curve["neurons"]) == [4, 12]
        for _, point in curve.iterrows():
            rows = jobs[jobs["neurons"] == point["neurons"]].set_index("selection")[column]
            assert point["high"] == pytest.approx(rows["high"]) and point["low"] == pytest.approx(rows["low"])
            assert point["random"] == pytest.approx(rows["random"].mean()) and point["random_std"] == pytest.approx(rows["random"].std())
            assert point["full"] == pytest.approx(rows["full"])
        assert (sweep / f"digits_{model}_{word}_vs_neurons.png").stat().st_size > 10_000


def test_the_sweep_summary_writes_both_curves_and_their_plots(open_clip_weights, tmp_path):
    """The jobs of a sweep over two counts, run in this process, then the summary the sweep callback writes."""
    sweep = tmp_path / "sweep"
    for job, n in (("0", 4), ("1", 12)):
        cfg = compose_config(
            "evaluate", _tiny(open_clip_weights, "task=prune", f"task.neurons={n}", "task.random_seeds=3"), sweep / job, tmp_path / "cache"
        )
        evaluate(cfg)
    assert cfg.sweep_summary == "clipbench.tasks.prune.sweep_summary"
    write_summary(sweep, cfg.sweep_summary)
    _check_sweep(sweep, "open_clip")


@pytest.mark.slow
def test_a_multirun_writes_both_curves_and_their_plots(quickstart_checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script(
        "evaluate.py",
        "-m",
        "task=prune",
        f"ckpt_path={quickstart_checkpoint}",
        "data=digits",
        "task.neurons=4,12",
        "task.random_seeds=3",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check_sweep(sweep, "clipbench")
