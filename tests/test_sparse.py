"""Sparse concept embeddings (``task=sparse``, SpLiCE): the batched solver against scikit-learn's Lasso,
planted atoms, memory accounting, vocabulary and input errors, the task on every kind of backbone
against SpLiCE's recipe written out by hand, the lambda sweep, and zero-shot through the same path."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import CIFAR10, ROOT, compose_config, run_script
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso

from clipbench.config import ConfigError
from clipbench.embeddings import EvalDataModule
from clipbench.evaluation import evaluate, model_entries
from clipbench.models.checkpoint import load_clipbench
from clipbench.sparse.decomposition import index_bytes, recompose, storage_bytes
from clipbench.sparse.solver import SolverError, SparseCodes, dictionary_gram, lasso
from clipbench.sparse.vocabulary import DEFAULT_FILE, Vocabulary, VocabularyError, load_vocabulary, select
from clipbench.sweeps import write_summary
from clipbench.tasks.sparse import Decomposition, check_options, metrics_of

CPU = torch.device("cpu")
OPEN_CLIP = "clipbench-tiny-vit"
CIFAR10_CKPT = ROOT / "outputs" / "ckpts" / "cifar10_fast_cpu" / "checkpoints" / "last.ckpt"
QUIET = ["trainer.enable_progress_bar=false"]
MEAN_OF_TEST = ["task.image_mean_split=test"]  # the default (the train split's mean) is tested once: it costs an encoding


# ------------------------------------------------------------------------------------ references
def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def objective(z: np.ndarray, dictionary: np.ndarray, w: np.ndarray, lam: float) -> float:
    """||z - D^T w||^2 + lam ||w||_1, the issue's objective, by hand."""
    return float(((z - w @ dictionary) ** 2).sum() + lam * np.abs(w).sum())


def sklearn_objectives(embeddings: np.ndarray, dictionary: np.ndarray, lam: float, nonneg: bool) -> np.ndarray:
    """One Lasso per embedding, as SpLiCE's default path: its objective is ours divided by 2d."""
    d = dictionary.shape[1]
    model = Lasso(alpha=lam / (2 * d), fit_intercept=False, positive=nonneg, tol=1e-8, max_iter=1_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a reference that did not converge is no reference
        return np.array([objective(z, dictionary, model.fit(dictionary.T, z).coef_, lam) for z in embeddings])


def check_agreement(embeddings: torch.Tensor, dictionary: torch.Tensor, lam: float, nonneg: bool, **options) -> SparseCodes:
    codes = lasso(embeddings, dictionary, lam, nonneg=nonneg, **options)
    z, d = embeddings.double().numpy(), dictionary.double().numpy()
    ours = np.array([objective(z[i], d, w, lam) for i, w in enumerate(codes.dense().double().numpy())])
    np.testing.assert_allclose(codes.objective.double().numpy(), ours, rtol=1e-5)  # the reported objective is the real one
    np.testing.assert_allclose(ours, sklearn_objectives(z, d, lam, nonneg), rtol=1e-4)
    assert bool(codes.converged.all())
    if nonneg:
        assert bool((codes.values >= 0).all())
    return codes


def random_unit(rows: int, dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator, dtype=dtype), dim=1)


# ------------------------------------------------------------------------------------ the solver
# Each way of solving the restricted problems (compiled on the CPU, batched as on a GPU), each way of
# getting their Gram matrices (read from the dictionary's, or gathered and multiplied).
METHODS = [{"restricted_method": "compiled"}, {"restricted_method": "batched"}, {"restricted_method": "compiled", "gram": None}]


@pytest.mark.parametrize("method", METHODS, ids=["compiled", "batched", "compiled-gathered"])
@pytest.mark.parametrize("nonneg", [True, False], ids=["nonneg", "signed"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-8), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_objective_matches_sklearn_on_random_embeddings(nonneg, dtype, tol, method):
    dictionary, embeddings = random_unit(300, 32, 0, dtype), random_unit(6, 32, 1, dtype)
    for lam in (0.1, 0.5):
        check_agreement(embeddings, dictionary, lam, nonneg, tol=tol, **method)


def _centred(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.nn.functional.normalize(x, dim=1) - mean, dim=1)


def real_problem(backbone, concepts: list[str], images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A model's own concept dictionary and image embeddings, each centred by its own mean (SpLiCE)."""
    with torch.no_grad():
        text = torch.nn.functional.normalize(backbone.encode_text(backbone.tokenize(concepts)).double(), dim=1)
        image = torch.nn.functional.normalize(backbone.encode_image(images).double(), dim=1)
    return _centred(text, text.mean(0)), _centred(image, image.mean(0))


@pytest.mark.parametrize("method", METHODS, ids=["compiled", "batched", "compiled-gathered"])
@pytest.mark.parametrize("nonneg", [True, False], ids=["nonneg", "signed"])
def test_objective_matches_sklearn_on_real_embeddings(nonneg, method, quickstart_checkpoint):
    backbone = load_clipbench(quickstart_checkpoint)
    data = EvalDataModule("digits", backbone.image_spec, decode_size=8, eval_batch_size=64)
    images, _ = next(iter(data.eval_batches("test", CPU)))
    concepts = DEFAULT_FILE.read_text().splitlines()[:400]
    dictionary, embeddings = real_problem(backbone, concepts, images[:6])
    check_agreement(embeddings.float(), dictionary.float(), 0.25, nonneg, **method)  # the task's precision and tolerance
    check_agreement(embeddings, dictionary, 0.1, nonneg, tol=1e-8, **method)


@pytest.mark.slow
@pytest.mark.skipif(not (CIFAR10_CKPT.is_file() and CIFAR10.is_dir()), reason="needs the shared CIFAR-10 checkpoint and images")
@pytest.mark.parametrize("nonneg", [True, False], ids=["nonneg", "signed"])
def test_objective_matches_sklearn_on_the_cifar10_model(nonneg):
    """A trained model's dictionary is far from random: its concepts crowd a few directions."""
    backbone = load_clipbench(CIFAR10_CKPT)
    files = sorted((CIFAR10 / "test").glob("*/*.jpg"))[::1000][:6]
    transform = backbone.image_spec.pil_transform()
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    dictionary, embeddings = real_problem(backbone, DEFAULT_FILE.read_text().splitlines()[:1000], images)
    check_agreement(embeddings.float(), dictionary.float(), 0.25, nonneg)


@pytest.mark.parametrize("nonneg", [True, False], ids=["nonneg", "signed"])
def test_an_embedding_that_is_an_atom_selects_that_atom(nonneg):
    dictionary = random_unit(300, 32, 2)
    atoms = torch.tensor([5, 100, 299])
    lam = 1e-3
    codes = lasso(dictionary[atoms], dictionary, lam, nonneg=nonneg, tol=1e-8)
    # z = D_j: w_j = 1 - lam/2 alone leaves the residual (lam/2) z, whose correlation with every other
    # atom is below lam/2, so that is the unique solution.
    assert codes.l0.tolist() == [1, 1, 1]
    assert codes.indices[:, 0].tolist() == atoms.tolist()
    torch.testing.assert_close(codes.values[:, 0], torch.full((3,), 1 - lam / 2, dtype=torch.float64))
    single = lasso(dictionary[atoms].float(), dictionary.float(), lam, nonneg=nonneg)  # the task's float32 path
    assert single.indices[:, 0].tolist() == atoms.tolist()


def test_a_penalty_above_every_correlation_gives_all_zero_codes_not_nans():
    dictionary, embeddings = random_unit(50, 16, 3, torch.float32), random_unit(4, 16, 4, torch.float32)
    codes = lasso(embeddings, dictionary, 5.0)  # 2 |D z| <= 2 < lam: w = 0 is optimal
    assert codes.l0.tolist() == [0, 0, 0, 0] and bool(codes.converged.all())
    torch.testing.assert_close(codes.objective, torch.ones(4))  # ||z||^2
    mean = torch.nn.functional.normalize(torch.ones(16), dim=0)
    torch.testing.assert_close(recompose(codes, dictionary, mean), mean.expand(4, -1))  # the mean alone
    assert torch.equal(recompose(codes, dictionary, None), torch.zeros(4, 16))


def test_bad_inputs_are_refused_with_their_reason():
    dictionary, embeddings = random_unit(20, 8, 5), random_unit(3, 8, 6)
    for lam in (0, -0.5, math.nan, math.inf):
        with pytest.raises(SolverError, match="lam="):
            lasso(embeddings, dictionary, lam)
    broken = embeddings.clone()
    broken[1, 2] = math.nan
    with pytest.raises(SolverError, match=r"embeddings has non-finite values .* 1 rows, first: \[1\]"):
        lasso(broken, dictionary, 0.1)
    bad_dictionary = dictionary.clone()
    bad_dictionary[7, 0] = math.inf
    with pytest.raises(SolverError, match=r"dictionary has non-finite values .* first: \[7\]"):
        lasso(embeddings, bad_dictionary, 0.1)
    with pytest.raises(SolverError, match="8 dimensions but the dictionary's concepts have 16"):
        lasso(embeddings, random_unit(20, 16, 7), 0.1)
    with pytest.raises(SolverError, match="must match"):
        lasso(embeddings.float(), dictionary, 0.1)
    with pytest.raises(SolverError, match="restricted_method='newton' is invalid"):
        lasso(embeddings, dictionary, 0.1, restricted_method="newton")
    with pytest.raises(SolverError, match=r"gram \(5, 5\) .* is not this dictionary's"):
        lasso(embeddings, dictionary, 0.1, gram=dictionary_gram(dictionary[:5]))
    with pytest.raises(SolverError, match=r"solves float32 or float64, not torch\.float16"):
        lasso(embeddings.half(), dictionary.half(), 0.1, tol=0.2)
    tracked = lasso(embeddings.clone().requires_grad_(), dictionary, 0.1)  # a solve, not a graph node
    torch.testing.assert_close(tracked.values, lasso(embeddings, dictionary, 0.1).values)


@pytest.mark.parametrize(("key", "value"), [("lam", 0), ("lam", -0.25), ("lam", math.nan), ("lam", math.inf), ("vocab", "/no/such/file")])
def test_impossible_task_options_fail_at_start_up_naming_the_key(key, value, tmp_path):
    task = compose_config("evaluate", ["task=sparse"], tmp_path, tmp_path).task
    task[key] = value
    with pytest.raises(ConfigError, match=f"task.{key}="):
        check_options(task)


# ------------------------------------------------------------------------------------ memory and misses
def hand_made_result(storage_dtype: str = "float32") -> tuple[Decomposition, DictConfig]:
    """Three images over a 300-concept dictionary in 64 dimensions: 2 non-zeros, none, 1; the sparse
    logits all point at the true class, so only the empty code can miss."""
    codes = SparseCodes(
        indices=torch.tensor([[3, 7, 0], [0, 0, 0], [5, 0, 0]]),
        values=torch.tensor([[0.5, 0.25, 0.0], [0.0, 0.0, 0.0], [0.1, 0.0, 0.0]]),
        num_concepts=300,
        objective=torch.tensor([0.3, 1.0, 0.6]),
        gap=torch.zeros(3),
        iterations=torch.tensor([10, 0, 10]),
        rounds=torch.ones(3, dtype=torch.long),
        converged=torch.ones(3, dtype=torch.bool),
    )
    labels = torch.tensor([0, 1, 2])
    logits = torch.eye(3)
    rows = {"codes": codes, "logits": logits, "cosine": torch.ones(3), "relative_error": torch.zeros(3), "seconds": torch.full((3,), 1e-3)}
    vocabulary = Vocabulary([f"concept {i}" for i in range(300)], list(range(1, 301)), "hand-made")
    result = Decomposition(
        vocabulary=vocabulary,
        class_names=["a", "b", "c"],
        labels=labels,
        dense_logits=logits,
        rows=rows,
        text_codes=None,
        dim=64,
        datamodule=None,
    )
    return result, OmegaConf.create({"lam": 0.25, "storage_dtype": storage_dtype})


def test_memory_of_a_hand_made_sparse_code():
    result, _ = hand_made_result()
    codes = result.rows["codes"]
    assert codes.l0.tolist() == [2, 0, 1]
    expected = torch.zeros(3, 300)
    expected[0, 3], expected[0, 7], expected[2, 5] = 0.5, 0.25, 0.1
    assert torch.equal(codes.dense(), expected)
    dictionary = torch.randn(300, 64)
    torch.testing.assert_close(codes.reconstruct(dictionary), expected @ dictionary)
    # Each non-zero stores its index in the smallest unsigned type that addresses the dictionary.
    assert [index_bytes(k) for k in (256, 257, 65_536, 65_537)] == [1, 2, 2, 4]
    dense, sparse = storage_bytes(codes.l0, 64, 300, 4)
    assert dense == 256 and sparse.tolist() == [12, 0, 6]  # 64 x 4 bytes; 2 x (2 + 4), 0, 1 x (2 + 4)


@pytest.mark.parametrize(("storage_dtype", "dense_bytes", "sparse_bytes"), [("float32", 256, 6), ("float16", 128, 4)])
def test_the_empty_code_is_a_miss_and_memory_is_counted_at_the_stored_precision(storage_dtype, dense_bytes, sparse_bytes):
    metrics = metrics_of(*hand_made_result(storage_dtype))
    assert metrics["test/dense_acc1"] == 1.0
    assert metrics["test/sparse_acc1"] == pytest.approx(2 / 3)  # the all-zero code has no class to give
    assert metrics["sparse/zero_fraction"] == pytest.approx(1 / 3)
    assert metrics["sparse/l0_mean"] == 1.0 and metrics["sparse/l0_median"] == 1.0
    assert metrics["sparse/dense_bytes"] == dense_bytes and metrics["sparse/sparse_bytes_mean"] == sparse_bytes
    assert metrics["sparse/memory_saving"] == dense_bytes / sparse_bytes
    assert not any(math.isnan(v) for v in metrics.values())


# ------------------------------------------------------------------------------------ vocabularies
BAD_LINES = ["Cat", "", "dog", "cat", "   ", "word " * 80, "red car"]
KEPT = {1: "Cat", 3: "dog", 7: "red car"}
DROPPED = {2: "empty", 4: "duplicate of line 1", 5: "empty", 6: "longer than the text encoder's context"}


def test_bad_lines_are_reported_with_their_line_numbers_and_dropped(quickstart_checkpoint, hf_clip_dir, open_clip_weights, tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(BAD_LINES) + "\n")
    backbones = {
        "quickstart": load_clipbench(quickstart_checkpoint),
        "hf_clip": _instantiate("hf_clip", name_or_path=hf_clip_dir),
        "open_clip": _instantiate("open_clip", model_name=OPEN_CLIP, pretrained=str(open_clip_weights[OPEN_CLIP])),
    }
    for name, backbone in backbones.items():
        vocabulary = select(load_vocabulary(str(path), []), None, backbone.truncates)
        assert dict(zip(vocabulary.lines, vocabulary.concepts)) == KEPT, name
        assert {d.line: d.reason for d in vocabulary.dropped} == DROPPED, name
    first_two = select(load_vocabulary(str(path), []), 2, backbones["quickstart"].truncates)
    assert first_two.concepts == ["Cat", "dog"] and first_two.lines == [1, 3]
    reversed_file = select(load_vocabulary(str(path), [], reverse=True), 2, backbones["quickstart"].truncates)
    assert reversed_file.concepts == ["red car", "cat"] and reversed_file.lines == [7, 4]  # read from the last line up
    path.write_text("\n\n")
    with pytest.raises(VocabularyError, match="no usable concept left"):
        select(load_vocabulary(str(path), []), None, backbones["quickstart"].truncates)


def test_the_default_vocabulary_is_shipped_clean_and_is_what_its_script_makes():
    lines = DEFAULT_FILE.read_text().splitlines()
    assert (
        len(lines) >= 10_000 and len({line.lower() for line in lines}) == len(lines) and all(line.strip() == line != "" for line in lines)
    )
    assert {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"} <= set(lines)
    assert any(" " in line for line in lines[:1000])  # two-word concepts too


def _instantiate(config_name: str, **overrides):
    return instantiate(OmegaConf.load(ROOT / "conf" / "model" / f"{config_name}.yaml").backbone, **overrides).eval()


# ------------------------------------------------------------------------------------ the task
def model_overrides(source: str, request) -> list[str]:
    if source == "quickstart":
        return [f"ckpt_path={request.getfixturevalue('quickstart_checkpoint')}"]
    if source in ("hf_clip", "hf_siglip"):
        return [f"model={source}", f"model.backbone.name_or_path={request.getfixturevalue(source + '_dir')}"]
    weights = request.getfixturevalue("open_clip_weights")
    return ["model=open_clip", f"model.backbone.model_name={OPEN_CLIP}", f"model.backbone.pretrained={weights[OPEN_CLIP]}"]


def reference_objectives(cfg, concepts: list[str], per_image: pd.DataFrame, images: int) -> tuple[np.ndarray, np.ndarray]:
    """SpLiCE's recipe written out here, images encoded in a plain loop (no Lightning), one
    scikit-learn Lasso per image; and the objective of the task's own solution as its table lists it
    (concept names and weights), for the first ``images`` images whose every non-zero is listed."""
    (model_cfg,) = model_entries(cfg).values()
    backbone = instantiate(model_cfg.backbone).eval()
    data = EvalDataModule.from_config(cfg.data, backbone.image_spec)
    with torch.no_grad():
        encode = lambda split: np.concatenate([backbone.encode_image(x).double().numpy() for x, _ in data.eval_batches(split, CPU)])  # noqa: E731
        text = unit(backbone.encode_text(backbone.tokenize(concepts)).double().numpy())
        test = unit(encode("test"))
        centring = test if cfg.task.image_mean_split == "test" else unit(encode("train"))
    dictionary = unit(text - text.mean(0))
    embeddings = unit(test - centring.mean(0))
    index = {c: i for i, c in enumerate(concepts)}
    listed = per_image[per_image["l0"] <= 10].head(images)
    ours = []
    for _, row in listed.iterrows():
        w = np.zeros(len(concepts))
        for r in range(1, int(row["l0"]) + 1):
            w[index[row[f"concept_{r}"]]] = row[f"weight_{r}"]
        ours.append(objective(embeddings[int(row["image"])], dictionary, w, cfg.task.lam))
    reference = sklearn_objectives(embeddings[listed["image"].to_numpy()], dictionary, cfg.task.lam, nonneg=True)
    return np.array(ours), reference


@pytest.mark.parametrize("source", ["quickstart", "hf_clip", "open_clip"])
def test_the_task_on_each_source_follows_splices_recipe(source, request, tmp_path):
    overrides = ["data=digits", *model_overrides(source, request), *QUIET]
    sparse = [*overrides, "task=sparse", "task.vocab_size=200", "task.examples=4"]
    if source != "quickstart":
        sparse += MEAN_OF_TEST
    cfg = compose_config("evaluate", sparse, tmp_path / "sparse", tmp_path / "cache")
    metrics = evaluate(cfg)
    zeroshot = evaluate(compose_config("evaluate", overrides, tmp_path / "zeroshot", tmp_path / "cache"))
    assert metrics["test/dense_acc1"] == pytest.approx(zeroshot["test/acc1"], abs=1e-6)
    assert metrics["test/dense_acc5"] == pytest.approx(zeroshot["test/acc5"], abs=1e-6)

    out = tmp_path / "sparse"
    written = json.loads((out / "metrics.json").read_text())
    assert written == pytest.approx(metrics) and metrics["sparse/concepts"] == 200
    assert metrics["sparse/converged_fraction"] == 1.0 and metrics["sparse/l0_mean"] > 0
    per_image = pd.read_csv(out / "concepts_per_image.csv")
    assert len(per_image) == 360 and per_image["image"].tolist() == list(range(360))  # every test image once, in order
    assert metrics["sparse/l0_mean"] == pytest.approx(per_image["l0"].mean())
    assert metrics["test/sparse_acc1"] == pytest.approx(
        (per_image["sparse_prediction"].astype(str) == per_image["class"].astype(str)).mean()
    )
    per_class = pd.read_csv(out / "concepts_per_class.csv")
    assert per_class["class"].nunique() == 10
    for figure in ("examples.png", "l0_histogram.png"):
        assert (out / figure).stat().st_size > 10_000

    concepts = DEFAULT_FILE.read_text().splitlines()[:200]  # no line of the shipped file is dropped
    ours, reference = reference_objectives(cfg, concepts, per_image, images=5)
    assert len(ours) == 5
    np.testing.assert_allclose(ours, reference, rtol=1e-4)


def test_a_users_file_with_bad_lines_and_sparse_to_sparse_classification(quickstart_checkpoint, tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(BAD_LINES) + "\n")
    overrides = [
        "task=sparse",
        f"ckpt_path={quickstart_checkpoint}",
        "data=digits",
        f"task.vocab={path}",
        "task.decompose_text=true",
        *MEAN_OF_TEST,
    ]
    metrics = evaluate(compose_config("evaluate", [*overrides, "task.lam=0.05", "task.examples=0", *QUIET], tmp_path, tmp_path / "cache"))
    dropped = pd.read_csv(tmp_path / "vocabulary_dropped.csv")
    assert dict(zip(dropped["line"], dropped["reason"])) == DROPPED
    assert metrics["sparse/concepts"] == 3 and "sparse/text_l0_mean" in metrics
    per_image = pd.read_csv(tmp_path / "concepts_per_image.csv")
    assert set(per_image["concept_1"].dropna()) <= set(KEPT.values())
    text = pd.read_csv(tmp_path / "class_text_concepts.csv")
    assert len(text) == 10 and not (tmp_path / "examples.png").exists()


def test_a_penalty_no_image_can_meet_counts_every_image_as_a_miss(quickstart_checkpoint, tmp_path):
    overrides = [
        "task=sparse",
        f"ckpt_path={quickstart_checkpoint}",
        "data=digits",
        "task.vocab=classes",
        "task.lam=50",
        *MEAN_OF_TEST,
        *QUIET,
    ]
    metrics = evaluate(compose_config("evaluate", overrides, tmp_path, tmp_path / "cache"))
    assert metrics["test/sparse_acc1"] == 0.0 and metrics["test/sparse_acc5"] == 0.0
    assert metrics["sparse/zero_fraction"] == 1.0 and metrics["sparse/l0_mean"] == 0.0
    assert "sparse/memory_saving" not in metrics  # no ratio to nothing; zero_fraction says why
    assert not any(math.isnan(v) for v in metrics.values())
    assert pd.read_csv(tmp_path / "concepts_per_image.csv")["sparse_prediction"].isna().all()


SWEEP = ["task=sparse", "data=digits", "task.vocab_size=200", "task.examples=0", *MEAN_OF_TEST, *QUIET]


def check_sweep(sweep: Path, cache: Path) -> pd.DataFrame:
    """summary.csv and the trade-off table and plot at the sweep directory, their points those of the
    jobs; the second job encoded nothing (one cache file per split, one concept dictionary)."""
    jobs = [json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")]
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 2 and (summary["status"] == "ok").all()
    tradeoff = pd.read_csv(sweep / "tradeoff.csv")
    assert tradeoff["sparse/lam"].tolist() == [0.1, 0.5]
    for column in ("sparse/l0_mean", "test/sparse_acc1", "test/dense_acc1", "sparse/memory_saving"):
        assert tradeoff[column].tolist() == pytest.approx([job[column] for job in jobs])
    assert jobs[0]["sparse/l0_mean"] > jobs[1]["sparse/l0_mean"]  # a larger penalty, fewer concepts
    assert (sweep / "tradeoff.png").stat().st_size > 10_000
    assert len(list((cache / "embeddings").glob("digits_test_*.pt"))) == 1
    assert len(list((cache / "concepts").iterdir())) == 1
    return summary


def test_the_sweep_summary_of_two_lambdas_writes_the_tradeoff_table_and_plot(quickstart_checkpoint, tmp_path):
    """The jobs of a two-lambda sweep run in this process, then what the sweep callback writes after them."""
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    for job, lam in (("0", 0.1), ("1", 0.5)):
        cfg = compose_config("evaluate", [*SWEEP, f"ckpt_path={quickstart_checkpoint}", f"task.lam={lam}"], sweep / job, cache)
        evaluate(cfg)
    assert cfg.sweep_summary == "clipbench.tasks.sparse.sweep_summary"
    write_summary(sweep, cfg.sweep_summary)
    check_sweep(sweep, cache)


@pytest.mark.slow
def test_a_two_lambda_multirun_writes_the_summary_and_the_tradeoff_plot(quickstart_checkpoint, tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    result = run_script(
        "evaluate.py",
        "-m",
        *SWEEP,
        f"ckpt_path={quickstart_checkpoint}",
        "task.lam=0.1,0.5",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={cache}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_sweep(sweep, cache)
    assert summary["task.lam"].tolist() == [0.1, 0.5] and (sweep / "summary.png").exists()
    assert "concept embeddings from the cache" in (sweep / "1" / "evaluate.log").read_text()


@pytest.mark.slow
def test_two_process_ddp_decomposes_every_image_once_as_one_process_does(quickstart_checkpoint, tmp_path):
    common = ["task=sparse", f"ckpt_path={quickstart_checkpoint}", "data=digits", "task.vocab_size=200", "task.examples=0", *QUIET]
    runs = {}
    for name, extra in {
        "single": [],
        "ddp": ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.sync_batchnorm=false"],
    }.items():
        out = tmp_path / name
        result = run_script(
            "evaluate.py", *common, *extra, f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / name / 'cache'}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (json.loads((out / "metrics.json").read_text()), pd.read_csv(out / "concepts_per_image.csv"))
    (single, single_rows), (ddp, ddp_rows) = runs["single"], runs["ddp"]
    assert ddp_rows["image"].tolist() == list(range(360)) and ddp_rows["l0"].tolist() == single_rows["l0"].tolist()
    for key in ("test/dense_acc1", "test/sparse_acc1", "sparse/l0_mean", "sparse/cosine_mean"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key


# ------------------------------------------------------------------------------------ zero-shot on the shared path
def test_zeroshot_through_evaluate_still_equals_open_clips_own_classifier(open_clip_weights, tmp_path):
    """task=zeroshot (and task=sparse's dense accuracy) on Lightning's predict loop against open_clip's
    own zero-shot classifier and a plain loop over the images."""
    weights = open_clip_weights[OPEN_CLIP]
    overrides = ["data=digits", "model=open_clip", f"model.backbone.model_name={OPEN_CLIP}", f"model.backbone.pretrained={weights}"]
    overrides += ["task.templates=single", *QUIET]
    metrics = evaluate(compose_config("evaluate", overrides, tmp_path / "zs", tmp_path / "cache"))
    sparse = evaluate(
        compose_config(
            "evaluate", [*overrides, "task=sparse", "task.vocab_size=50", "task.examples=0"], tmp_path / "sp", tmp_path / "cache"
        )
    )

    model = open_clip.create_model(OPEN_CLIP, pretrained=str(weights)).eval()
    backbone = _instantiate("open_clip", model_name=OPEN_CLIP, pretrained=str(weights))
    data = EvalDataModule("digits", backbone.image_spec, decode_size=8, eval_batch_size=128)
    names = pd.read_csv(tmp_path / "zs" / "digits_per_class.csv")["class"].astype(str).tolist()
    classifier = build_zero_shot_classifier(model, open_clip.get_tokenizer(OPEN_CLIP), names, ["a photo of a {}."], device=CPU)
    with torch.no_grad():
        batches = list(data.eval_batches("test", CPU))
        features = torch.cat([model.encode_image(x, normalize=True) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    top5 = (features @ classifier).topk(5, dim=-1).indices
    acc1, acc5 = (top5[:, 0] == labels).double().mean().item(), (top5 == labels[:, None]).any(-1).double().mean().item()
    assert metrics["test/acc1"] == pytest.approx(acc1, abs=1e-6) and metrics["test/acc5"] == pytest.approx(acc5, abs=1e-6)
    assert sparse["test/dense_acc1"] == pytest.approx(acc1, abs=1e-6)
    assert Path(tmp_path / "zs" / "digits_zeroshot.csv").exists()
