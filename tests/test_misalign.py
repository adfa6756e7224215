"""The misalignment study: caption shuffling (against a dense re-implementation of the reference),
the misalign task, projection-only fine-tuning of every backbone source, projections.pt, the sweep summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CIFAR10, compose_config, run_script
from omegaconf import OmegaConf
from pairs_fixtures import cifar_pairs
from sklearn.feature_extraction.text import TfidfVectorizer

from clipbench.evaluation import evaluate
from clipbench.misalign import sweep
from clipbench.misalign.cache import cached_sources
from clipbench.misalign.shuffle import random_shuffle, shuffle_captions, similarity_shuffle, tfidf_matrix, usable_captions
from clipbench.misalign.synthetic import folder_caption, synthetic_captions
from clipbench.models.checkpoint import load_clipbench
from clipbench.models.laclip import _LaCLIPNet
from clipbench.models.openclip import OpenCLIP
from clipbench.projections import load_with_projections
from clipbench.training import build_datamodule, build_module, train

needs_cifar = pytest.mark.skipif(not (CIFAR10 / "test").is_dir(), reason="the CIFAR-10 JPEGs are not here")


# ------------------------------------------------------------------------------------- shuffling
def reference_shuffle(captions: list[str], cs: float, seed: int, top_k: int = 10) -> np.ndarray:
    """The reference algorithm (feature-purity-clip's generate_misaligned_text.py) on a dense similarity
    matrix, with its own preprocessing, restricted to candidates of positive similarity (a row with
    none takes the first unused row from a random start) and with the draws and tie order clipbench
    documents, so that the two must agree row for row."""

    def preprocess(text: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()

    vectorizer = TfidfVectorizer(max_features=5000, stop_words="english", ngram_range=(1, 2), min_df=2, max_df=0.95, dtype=np.float32)
    similarity = (lambda m: (m @ m.T).toarray())(vectorizer.fit_transform([preprocess(c) for c in captions]))
    n = len(captions)
    rng = np.random.default_rng(seed)
    order, draws = rng.permutation(n), rng.random(n)
    used, source, count = np.zeros(n, dtype=bool), np.arange(n), 0
    for row in order:
        if count >= cs * n:
            break
        if used[row]:
            continue
        used[row] = True
        scores = similarity[row].copy()
        candidates = np.flatnonzero(~used & (scores > 0))
        if len(candidates):
            ranked = candidates[np.lexsort((candidates, -scores[candidates]))][:top_k]
            partner = ranked[int(draws[row] * len(ranked))]
        elif not used.all():
            walk = np.roll(np.arange(n), -int(draws[row] * n))
            partner = walk[~used[walk]][0]
        else:
            continue
        used[partner] = True
        source[row], source[partner] = partner, row
        count += 2
    return source


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return synthetic_captions(1500, seed=3)


@pytest.mark.parametrize("cs", [0.1, 0.5, 0.8, 1.0])  # 1.0: the last rows share no term with any unused row
def test_similarity_shuffle_equals_dense_reference(captions, cs):
    shuffle, _ = shuffle_captions(captions, cs, "similarity", seed=7, progress=False)
    np.testing.assert_array_equal(shuffle.source, reference_shuffle(captions, cs, seed=7))
    if cs == 1.0:  # every row, the last ones with unrelated rows
        assert shuffle.achieved == 1.0 and shuffle.unrelated > 0


def test_reference_preprocessing_is_what_tfidf_sees(captions):
    """Lower-casing, punctuation to spaces and collapsed spaces change nothing for sklearn's analyzer:
    the matrix equals the reference's on its own preprocessed text."""
    noisy = [c.upper().replace(" ", " , ", 2) + "!!" for c in captions]
    reference = TfidfVectorizer(max_features=5000, stop_words="english", ngram_range=(1, 2), min_df=2, max_df=0.95, dtype=np.float32)
    expected = reference.fit_transform([re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", c.lower())).strip() for c in noisy])
    np.testing.assert_allclose(tfidf_matrix(noisy).toarray(), expected.toarray(), atol=1e-6)


@pytest.mark.parametrize("cs", [0.0, 0.05, 0.3, 0.77, 1.0])
def test_rate_within_one_pair(captions, cs):
    similar, _ = shuffle_captions(captions, cs, "similarity", seed=1, progress=False)
    random, _ = shuffle_captions(captions, cs, "random", seed=1)
    n = len(captions)
    for shuffle in (similar, random):
        assert abs(shuffle.misaligned.sum() - cs * n) <= 2, (shuffle.mode, shuffle.misaligned.sum(), cs * n)
    # similarity swaps pairs: each row's partner points back; random mode is one cycle through its rows
    np.testing.assert_array_equal(similar.source[similar.source], np.arange(n))
    moved = np.flatnonzero(random.misaligned)
    if len(moved):
        row, steps = moved[0], 1
        while random.source[row] != moved[0]:
            row, steps = random.source[row], steps + 1
        assert steps == len(moved)


@pytest.mark.parametrize("mode", ["similarity", "random"])
def test_seeds(captions, mode):
    first, _ = shuffle_captions(captions, 0.4, mode, seed=11, progress=False)
    again, _ = shuffle_captions(captions, 0.4, mode, seed=11, progress=False)
    other, _ = shuffle_captions(captions, 0.4, mode, seed=12, progress=False)
    np.testing.assert_array_equal(first.source, again.source)
    assert (first.source != other.source).mean() > 0.2


def test_swapped_captions_are_more_similar_than_random_pairs(captions):
    tfidf = tfidf_matrix(captions)
    similar = similarity_shuffle(tfidf, 0.5, seed=0, progress=False)
    random = random_shuffle(len(captions), 0.5, seed=0)
    rows = np.arange(len(captions))

    def mean_cosine(shuffle):
        moved = rows[shuffle.misaligned]
        return np.asarray(tfidf[moved].multiply(tfidf[shuffle.source[moved]]).sum(axis=1)).mean()

    assert mean_cosine(similar) > 10 * mean_cosine(random)
    assert mean_cosine(similar) > 0.2


def test_rows_without_caption_stay(captions):
    broken = list(captions[:300])
    for i in (0, 5, 17):
        broken[i] = [None, "", "   "][i % 3]
    broken[9] = 42  # not a string
    usable = usable_captions(broken)
    assert not usable[[0, 5, 9, 17]].any() and usable.sum() == 296
    for mode in ("similarity", "random"):
        shuffle, _ = shuffle_captions(broken, 0.9, mode, seed=0, progress=False)
        assert not shuffle.misaligned[[0, 5, 9, 17]].any()
        assert not np.isin(shuffle.source[shuffle.misaligned], [0, 5, 9, 17]).any()


def test_cache_returns_the_same_shuffle(captions, tmp_path):
    computed = cached_sources(captions, 0.3, "similarity", 4, 10, tmp_path)
    files = list((tmp_path / "misalign").glob("*.npy"))
    assert len(files) == 1
    np.save(files[0], np.arange(len(captions)))  # a cached file is what is read back
    np.testing.assert_array_equal(cached_sources(captions, 0.3, "similarity", 4, 10, tmp_path), np.arange(len(captions)))
    np.testing.assert_array_equal(computed, shuffle_captions(captions, 0.3, "similarity", 4, progress=False)[0].source)
    cached_sources(captions, 0.3, "random", 4, 10, tmp_path)  # another key, another file
    assert len(list((tmp_path / "misalign").glob("*.npy"))) == 2


# ------------------------------------------------------------------------------------------- task
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_misalign_task(captions, tmp_path, cache_dir, suffix):
    table = pd.DataFrame(
        {"id": [f"r{i}" for i in range(len(captions))], "image": [f"img/{i}.jpg" for i in range(len(captions))], "caption": captions}
    )
    table.loc[3, "caption"] = ""
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".parquet":
        table.to_parquet(path)
    else:
        table.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    out = tmp_path / "run"
    cfg = compose_config("evaluate", ["task=misalign", f"task.input={path}", "task.cs=0.3", "task.seed=5"], out, cache_dir)
    metrics = evaluate(cfg)
    result = (
        pd.read_parquet(out / "misaligned.parquet")
        if suffix == ".parquet"
        else pd.read_csv(out / f"misaligned{suffix}", sep=None, engine="python", keep_default_na=False)
    )
    assert list(result.columns) == ["id", "image", "caption", "orig_index", "misaligned"]
    assert result["id"].tolist() == table["id"].tolist() and result["image"].tolist() == table["image"].tolist()
    assert result["caption"].tolist() == table["caption"].to_numpy()[result["orig_index"]].tolist()
    assert (result["misaligned"] == (result["orig_index"] != np.arange(len(table)))).all()
    expected = shuffle_captions(table["caption"].tolist(), 0.3, "similarity", 5, progress=False)[0]
    np.testing.assert_array_equal(result["orig_index"], expected.source)
    report = json.loads((out / "misalign_report.json").read_text())
    assert report["misaligned_rows"] == result["misaligned"].sum() == metrics["misalign/misaligned_rows"]
    assert report["swaps"] * 2 == report["misaligned_rows"] and report["seed"] == 5 and report["usable_rows"] == len(table) - 1
    assert report["mean_cosine_swapped"] > 10 * report["mean_cosine_random_pairs"]
    assert len(report["examples"]) == 10


def test_misalign_task_rejects_bad_values(tmp_path, cache_dir):
    cfg = compose_config("evaluate", ["task=misalign", "task.input=x.csv", "task.cs=1.5"], tmp_path, cache_dir)
    with pytest.raises(ValueError, match=r"task\.cs=1\.5"):
        evaluate(cfg)


# ------------------------------------------------------------------------ projection-only training
def write_pairs(folder, count: int, bad_rows: bool = False):
    """A pairs CSV of real CIFAR-10 JPEGs with varied captions; with ``bad_rows``: a missing file, a corrupt image, an empty caption."""
    table = cifar_pairs(count)
    rng = np.random.default_rng(0)
    table["caption"] = [folder_caption(Path(image).parent.name, rng) for image in table["image"]]
    if bad_rows:
        (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        table.loc[1, "image"] = str(folder / "missing.jpg")
        table.loc[2, "image"] = str(folder / "corrupt.jpg")
        table.loc[3, "caption"] = ""
    path = folder / "pairs.csv"
    table.to_csv(path, index=False)
    return path


class Gradients(L.Callback):
    """Which parameters had a gradient at each step (after backward, before the optimizer)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def on_after_backward(self, trainer, pl_module) -> None:
        self.names |= {name for name, p in pl_module.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def fine_tune(overrides: list[str], tmp_path, cache_dir, pairs, epochs: int = 2):
    """experiment=misalign as train.py composes it, fitted by a plain Trainer with a gradient recorder."""
    base = ["experiment=misalign", f"data.input={pairs}", "data.batch_size=16", "data.num_workers=0", f"trainer.max_epochs={epochs}"]
    cfg = compose_config("train", [*base, "trainer.accelerator=cpu", "logger=none", *overrides], tmp_path / "run", cache_dir)
    module = build_module(cfg.model)
    datamodule = build_datamodule(cfg, module.backbone)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    gradients = Gradients()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[gradients]
    )
    trainer.fit(module, datamodule=datamodule)
    return module, before, gradients, datamodule


def check_projection_only(module, before, gradients) -> None:
    projections = module.backbone.projection_parameters()
    names = {n for n, p in module.backbone.named_parameters() if any(p is q for q in projections.values())}
    assert gradients.names == names  # every projection parameter, nothing else
    optimizer = module.trainer.optimizers[0]  # parameters and state (AdamW moments) of the projections only
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in projections.values()} == {id(p) for p in optimizer.state}
    after = module.backbone.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == names, changed ^ names  # frozen weights and buffers (BatchNorm statistics) bit-identical


@needs_cifar
def test_open_clip_resnet_projection_only(open_clip_weights, tmp_path, cache_dir):
    """A ModifiedResNet tower has BatchNorm: its running statistics must not move."""
    pairs = write_pairs(tmp_path, 48, bad_rows=True)
    model = [
        "model=open_clip",
        "model.backbone.model_name=clipbench-tiny-rn",
        f"model.backbone.pretrained={open_clip_weights['clipbench-tiny-rn']}",
    ]
    module, before, gradients, datamodule = fine_tune(model, tmp_path, cache_dir, pairs)
    assert any(k.endswith("running_mean") for k in before)
    check_projection_only(module, before, gradients)
    assert sorted(datamodule.skipped_rows()) == [1, 2, 3]  # missing file, corrupt image, empty caption
    assert not module.backbone.training  # frozen towers in eval mode, also after training


@needs_cifar
@pytest.mark.parametrize("family", ["hf_clip", "hf_siglip"])  # SigLIP: its stand-in projections, trained with CLIP's loss
def test_huggingface_projection_only(family, hf_clip_dir, hf_siglip_dir, tmp_path, cache_dir):
    pairs = write_pairs(tmp_path, 32)
    model = [f"model={family}", f"model.backbone.name_or_path={hf_clip_dir if family == 'hf_clip' else hf_siglip_dir}"]
    module, before, gradients, _ = fine_tune(model, tmp_path, cache_dir, pairs)
    check_projection_only(module, before, gradients)


@needs_cifar
def test_laclip_projection_only(tmp_path, cache_dir):
    sizes = dict(embed_dim=16, text_width=32, text_heads=2, text_layers=2)
    torch.manual_seed(0)
    net = _LaCLIPNet("vit_tiny_patch16_224", {"depth": 2, "img_size": 32}, 16, 77, 49408, 32, 2, 2)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "laclip.pt")
    model = ["model=laclip", f"model.backbone.checkpoint={tmp_path / 'laclip.pt'}", "model.backbone.vision_model=vit_tiny_patch16_224"]
    model += ["+model.backbone.vision_kwargs.depth=2", "+model.backbone.vision_kwargs.img_size=32"]
    model += [f"model.backbone.{k}={v}" for k, v in sizes.items()]
    module, before, gradients, _ = fine_tune(model, tmp_path, cache_dir, write_pairs(tmp_path, 32))
    check_projection_only(module, before, gradients)


@needs_cifar
@pytest.mark.parametrize("source", ["checkpoint", "from_scratch"])
def test_clipbench_projection_only(source, quickstart_checkpoint, tmp_path, cache_dir):
    """clipbench's own models, with an airbench ResNet whose BatchNorm statistics must not move: a
    train.py checkpoint (experiment=misalign's default source) and a from-scratch config (built in
    training mode, unlike the loaded sources)."""
    if source == "checkpoint":
        model = [f"model.backbone.path={quickstart_checkpoint}"]
    else:
        model = ["model=clip_fast", "model.backbone.embed_dim=32", "model.backbone.text_width=32", "model.backbone.text_layers=1"]
        model += ["model.backbone.image_tower.widths=[16,32,32]", "model.backbone.vocabulary=null"]  # pairs: the full vocabulary
    module, before, gradients, _ = fine_tune(model, tmp_path, cache_dir, write_pairs(tmp_path, 32))
    assert any(k.endswith("running_mean") for k in before)
    check_projection_only(module, before, gradients)
    assert not module.backbone.training


@needs_cifar
def test_train_py_run_and_projections_file(open_clip_weights, tmp_path, cache_dir):
    """train.py's own path: misaligned captions made on the fly, purity per epoch, zero-shot
    evaluation on a labelled dataset, checkpoints and projections.pt, which applied to its source
    gives the fine-tuned model's embeddings."""
    pairs = write_pairs(tmp_path, 48)
    weights = open_clip_weights["clipbench-tiny-vit"]
    overrides = [
        "experiment=misalign", f"data.input={pairs}", "data.batch_size=16", "data.num_workers=0", "data.cs=0.5",
        "model=open_clip", "model.backbone.model_name=clipbench-tiny-vit", f"model.backbone.pretrained={weights}",
        "data@eval_data=synthetic", "eval_data.synthetic_samples=40", "eval_data.val_fraction=0.25",
        "trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    out = tmp_path / "run"
    metrics = train(compose_config("train", overrides, out, cache_dir))
    history = pd.read_csv(out / "epochs.csv")
    assert len(history) == 2 and {"purity/image/avg_abs_cos", "purity/text/avg_abs_cos", "val/acc1"} <= set(history.columns)
    assert history["purity/text/avg_abs_cos"].nunique() == 2  # the projections moved between epochs
    assert {"purity/image/avg_abs_cos", "test/acc1"} <= set(metrics)
    assert list((cache_dir / "misalign").glob("similarity_cs0.5_*.npy"))
    fine_tuned = load_clipbench(out / "checkpoints" / "last.ckpt")
    applied = load_with_projections(out / "projections.pt")
    source = OmegaConf.to_container(compose_config("train", overrides, out, cache_dir).model.backbone)
    assert torch.load(out / "projections.pt", weights_only=True)["source"] == source
    images, tokens = torch.randn(3, 3, 32, 32), applied.tokenize(["a red truck", "a cat", "a ship at the harbour"])
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            torch.testing.assert_close(getattr(applied, encode)(images if encode == "encode_image" else tokens),
                                       getattr(fine_tuned, encode)(images if encode == "encode_image" else tokens), rtol=0, atol=0)  # fmt: skip
    assert not torch.equal(applied.projection_matrix("text"), _source(weights).projection_matrix("text"))
    other = _source(weights, shifted=True)
    with pytest.raises(ValueError, match="frozen weights differ"):
        load_with_projections(out / "projections.pt", source=other)


def _source(weights, shifted: bool = False) -> OpenCLIP:
    """The source model; ``shifted``: with one frozen weight changed (another model)."""
    model = OpenCLIP("clipbench-tiny-vit", str(weights))
    if shifted:
        with torch.no_grad():
            model.model.ln_final.weight.add_(0.01)
    return model


# ---------------------------------------------------------------------------------- sweep summary
@pytest.mark.parametrize("grid", [False, True])  # grid: data.misalign.mode swept too, so Cs=0 ran once per mode
def test_sweep_summary(tmp_path, grid):
    """The jobs of a sweep as train.py leaves them (a saved config, metrics), summarised against Cs."""
    runs = [(0.0, "similarity", 0.10), (0.3, "similarity", 0.14), (0.8, "similarity", 0.20), (0.3, "random", 0.12), (0.8, "random", 0.16)]
    runs += [(0.0, "random", 0.11)] if grid else []
    rows = []
    for job, (cs, mode, purity) in enumerate(runs):
        folder = tmp_path / str(job)
        folder.mkdir()
        OmegaConf.save(OmegaConf.create({"data": {"cs": cs, "misalign": {"mode": mode}}}), folder / "config.yaml")
        rows.append({"job": str(job), "status": "ok", "purity/image/avg_abs_cos": purity, "purity/text/avg_abs_cos": purity / 2})
    rows.append({"job": "9", "status": "failed"})
    sweep.summarize(tmp_path, pd.DataFrame(rows))
    table = pd.read_csv(tmp_path / "misalign_summary.csv")
    assert sorted(zip(table["mode"], table["Cs"])) == [
        ("random", 0.0),
        ("random", 0.3),
        ("random", 0.8),
        ("similarity", 0.0),
        ("similarity", 0.3),
        ("similarity", 0.8),
    ]
    start = table.loc[(table["mode"] == "random") & (table["Cs"] == 0), "purity/image/avg_abs_cos"].item()
    assert start == (0.11 if grid else 0.10)  # its own Cs=0 run, else the shared one
    assert (tmp_path / "avg_abs_cos_sim_vs_cs.png").stat().st_size > 10_000


@pytest.mark.slow
@needs_cifar
def test_train_py_sweep_over_cs(quickstart_checkpoint, tmp_path):
    """``train.py -m experiment=misalign data.cs=...`` as a user runs it (from a train.py checkpoint, the
    experiment's default source): one job per Cs and mode, the summary, the plot and projections.pt per job."""
    pairs = write_pairs(tmp_path, 64)
    result = run_script(
        "train.py", "-m", "experiment=misalign", f"data.input={pairs}", "data.batch_size=16", "data.num_workers=0",
        f"model.backbone.path={quickstart_checkpoint}", "data.cs=0,0.5,1", "data.misalign.mode=similarity,random", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(tmp_path / "sweep" / "misalign_summary.csv")
    assert sorted(zip(table["mode"], table["Cs"])) == [(m, cs) for m in ("random", "similarity") for cs in (0.0, 0.5, 1.0)]
    assert table["purity/text/avg_abs_cos"].notna().all()
    assert (tmp_path / "sweep" / "avg_abs_cos_sim_vs_cs.png").exists()
    assert len(list((tmp_path / "sweep").glob("*/projections.pt"))) == 6
