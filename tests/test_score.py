"""evaluate.py task=score: the model's own similarities, every row accounted for, resumption after a
kill, DDP equal to one process, exact curation, SigLIP probabilities."""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, compose_config
from pairs_fixtures import cifar_pairs, save_tiny_clip, save_tiny_siglip, serve, write_shards
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel

from clipbench.config import ConfigError
from clipbench.evaluation import evaluate

ROWS, SHARD = 400, 20  # rows of the runs compared row for row, and rows per shard (one batch each)
RUN = [f"data.eval_batch_size={SHARD}", "data.num_workers=1", f"task.shard_size={SHARD}"]
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.sync_batchnorm=false"]
# One thread per process in every run compared bitwise (DDP ranks get one from Lightning anyway), and
# no OpenMP spinning against the other jobs of a busy 2-core machine.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# Runs that must be processes of their own (to be killed, to be DDP ranks) are forked from this one:
# real processes, without the 10-20 s of imports a fresh interpreter pays on a 2-core machine.
FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _score(out: Path, cache: Path, overrides: list[str]) -> dict:
    cfg = compose_config("evaluate", ["task=score", *overrides], out, cache)
    return evaluate(cfg)


def _cli(out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "evaluate.py"), "task=score", *overrides, f"hydra.run.dir={out}", f"paths.cache_dir={out}/cache"]


def _forked(out: Path, overrides: list[str], environ: dict[str, str] | None = None) -> multiprocessing.Process:
    """A started child process of this one that runs task=score into ``out`` (with ``environ`` set)."""

    def run() -> None:
        os.environ.update(environ or {})
        _score(out, out / "cache", overrides)

    child = FORK.Process(target=run)
    child.start()
    return child


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    cifar_pairs(ROWS).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, clip_dir, pairs_csv) -> tuple[Path, list[str]]:
    """One uninterrupted single-process run: what the other runs must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    overrides = ["model=hf_clip", f"model.backbone.name_or_path={clip_dir}", f"task.input={pairs_csv}", *RUN]
    _score(out, out / "cache", overrides)
    return out, overrides


def _outputs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(out / "scores.parquet"), pd.read_csv(out / "errors.csv")


def test_scores_are_the_models_own_cosine_and_are_summarised(reference, clip_dir, pairs_csv):
    out, _ = reference
    scores, errors = _outputs(out)
    pairs = pd.read_csv(pairs_csv)
    assert list(scores["id"]) == list(pairs["id"]) and list(scores["row"]) == list(range(len(pairs))) and errors.empty
    # transformers' own forward: its processor's pixels, its tokenizer's ids, logits_per_image / scale.
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    some = pairs.iloc[::37]
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in some.image], return_tensors="pt").pixel_values
        ids = tokenizer(list(some.caption), padding=True, return_tensors="pt").input_ids
        expected = (model(input_ids=ids, pixel_values=pixels).logits_per_image.diagonal() / model.logit_scale.exp()).numpy()
    np.testing.assert_allclose(scores.cosine[some.index], expected, atol=2e-6)
    np.testing.assert_array_equal(scores.clip_score, (100 * np.maximum(scores.cosine, 0)).astype(np.float32))
    assert not scores.truncated.any() and "sigmoid" not in scores
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_rows"] == summary["scored"] == len(pairs) and summary["errors"] == 0
    levels = np.quantile(scores.cosine.to_numpy(np.float64), [0.01, 0.5, 0.99])
    np.testing.assert_allclose([summary["cosine"]["quantiles"][k] for k in ("p01", "p50", "p99")], levels, rtol=1e-12)
    assert math.isclose(summary["cosine"]["mean"], scores.cosine.astype(float).mean(), rel_tol=1e-9)
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] == len(pairs) and report["pairs_per_s"] > 0 and report["peak_ram_mb_per_rank"] > 100
    assert len(list((out / "shards").glob("part-*.parquet"))) == len(pairs) // SHARD
    for figure in ("score_histogram.png", "extremes.png"):
        assert Image.open(out / figure).size[0] > 400


def test_every_bad_row_is_accounted_for_with_its_reason(tmp_path, clip_dir):
    good = cifar_pairs(4)
    image = Path(good.image[0]).read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    (tmp_path / "cut.jpg").write_bytes(image[: len(image) // 2])
    base, server = serve(image, cap=4096)
    closed = f"http://127.0.0.1:{_free_port()}/x.jpg"
    rows = [
        ("good1", good.image[1], "a photo of a cat", None),
        ("relative", Path(good.image[2]).name, "a photo", "missing_file"),  # relative to data.image_root (tmp_path): absent
        ("missing", str(tmp_path / "nowhere.jpg"), "a photo", "missing_file"),
        ("zero", "empty.jpg", "a photo", "zero_byte"),
        ("junk", "junk.jpg", "a photo", "unreadable"),
        ("cut", "cut.jpg", "a photo", "truncated"),
        ("nocaption", good.image[3], "", "empty_caption"),
        ("blank", good.image[3], "   ", "empty_caption"),
        ("noimage", "", "a photo", "missing_image"),
        ("url_ok", f"{base}/ok.jpg", "a photo of a frog", None),
        ("url_redirect", f"{base}/redirect.jpg", "a photo", None),
        ("url_flaky", f"{base}/flaky.jpg", "a photo", None),
        ("url_slow", f"{base}/slow.jpg", "a photo", "url_timeout"),
        ("url_big", f"{base}/big-declared.jpg", "a photo", "over_byte_cap"),
        ("url_big_stream", f"{base}/big-streamed.jpg", "a photo", "over_byte_cap"),
        ("url_404", f"{base}/missing.jpg", "a photo", "http_status"),
        ("url_500", f"{base}/error.jpg", "a photo", "http_status"),
        ("url_loop", f"{base}/loop.jpg", "a photo", "too_many_redirects"),
        ("url_to_ftp", f"{base}/to-ftp.jpg", "a photo", "bad_scheme"),
        ("ftp", "ftp://127.0.0.1/a.jpg", "a photo", "bad_scheme"),
        ("refused", closed, "a photo", "connection_error"),
        ("long", good.image[1], "a photo of " + "a very very long caption " * 20, None),
    ]
    lines = ["id,image,caption", *[f'{i},{img},"{cap}"' for i, img, cap, _ in rows]]
    lines.insert(5, "malformed,too,many,fields,here")
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    http = [
        "data.http.read_timeout=0.5",
        "data.http.total_timeout=1",
        "data.http.backoff=0.01",
        "data.http.retries=1",
        "data.http.max_bytes=4096",
    ]
    try:
        _score(
            out,
            tmp_path / "cache",
            [
                "model=hf_clip",
                f"model.backbone.name_or_path={clip_dir}",
                f"task.input={tmp_path / 'bad.csv'}",
                f"data.image_root={tmp_path}",
                "task.shard_size=8",
                "data.num_workers=2",
                *http,
            ],
        )
    finally:
        server.shutdown()
    scores, errors = _outputs(out)
    assert len(scores) + len(errors) == len(rows) + 1 and not set(scores.id) & set(errors.id.dropna())
    reasons = dict(zip(errors.id.fillna("<malformed>"), errors.reason))
    assert reasons.pop("<malformed>") == "malformed_row"
    assert reasons == {i: reason for i, _, _, reason in rows if reason}
    assert set(scores.id) == {i for i, _, _, reason in rows if reason is None}
    assert scores.set_index("id").truncated.to_dict() == {i: i == "long" for i in scores.id}
    assert sorted(errors.row) == sorted(set(range(len(rows) + 1)) - set(scores.row))  # rows number the input's lines
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors_by_reason"]["empty_caption"] == 2 and summary["truncated"] == 1


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_killed_run_resumes_to_the_same_output(reference, tmp_path):
    expected, overrides = reference
    out = tmp_path / "run"
    run = _forked(out, overrides)
    deadline = time.monotonic() + 300
    while len(list((out / "shards").glob("part-*.parquet"))) < 2 and run.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.is_alive(), f"the run ended (exit code {run.exitcode}) before it could be killed midway"
    os.kill(run.pid, signal.SIGKILL)
    run.join()
    done = len(list((out / "shards").glob("part-*.parquet")))
    assert run.exitcode == -signal.SIGKILL and 2 <= done < ROWS // SHARD and not (out / "scores.parquet").exists()
    _score(out, out / "cache", overrides)  # the same run again (here, in this process)
    assert json.loads((out / "report.json").read_text())["pairs"] == (ROWS // SHARD - done) * SHARD  # only the missing shards
    for got, want in zip(_outputs(out), _outputs(expected)):
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert not list((out / "shards").glob(".*.tmp"))


@pytest.mark.parametrize(
    "launch",
    [
        "external",  # the ranks are started from outside, as torchrun and SLURM start them
        pytest.param("lightning", marks=pytest.mark.slow),  # python evaluate.py trainer=ddp: Lightning starts rank 1
    ],
)
def test_two_process_ddp_equals_one_process_row_for_row(reference, tmp_path, launch):
    expected, overrides = reference
    out = tmp_path / "ddp"
    if launch == "external":
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0"}
        ranks = [_forked(out, [*overrides, *DDP], {**rendezvous, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
        for rank in ranks:
            rank.join(timeout=600)
        assert [rank.exitcode for rank in ranks] == [0, 0]
    else:
        result = subprocess.run(_cli(out, [*overrides, *DDP]), cwd=tmp_path, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
        assert result.returncode == 0, result.stderr[-3000:]
    for got, want in zip(_outputs(out), _outputs(expected)):
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    report = json.loads((out / "report.json").read_text())
    assert report["ranks"] == 2 and [r["pairs"] for r in report["per_rank"]] == [ROWS // 2, ROWS // 2]  # no pair twice, none skipped


def test_curation_keeps_exactly_the_rows_at_or_above_the_threshold(reference, pairs_csv, tmp_path):
    source, overrides = reference
    scores, _ = _outputs(source)
    out = tmp_path / "curated"
    shutil.copytree(source / "shards", out / "shards")  # finished shards: only the final steps run
    threshold = float(np.median(scores.clip_score[scores.clip_score > 0]))
    metrics = _score(out, tmp_path / "cache", [*overrides, f"task.keep_min_score={threshold}"])
    kept = pd.read_csv(out / "kept.csv")
    assert list(kept.id) == list(scores.id[scores.clip_score >= threshold]) and metrics["curation/kept"] == len(kept)
    lines = pairs_csv.read_text().splitlines()
    assert (out / "kept.csv").read_text().splitlines() == [lines[0]] + [lines[1 + r] for r in scores.row[scores.clip_score >= threshold]]
    report = json.loads((out / "curation.json").read_text())
    assert report["kept"] == len(kept) and report["threshold"] == threshold

    metrics = _score(out, tmp_path / "cache", [*overrides, "task.keep_top_fraction=0.1", "task.keep_by=cosine"])
    best = scores.sort_values("cosine", ascending=False, kind="stable").id[: math.ceil(0.1 * len(scores))]
    assert sorted(pd.read_csv(out / "kept.csv").id) == sorted(best)
    assert metrics["curation/threshold"] == float(scores.cosine.loc[best.index].min())


def test_siglip_probability_is_the_sigmoid_of_scale_cosine_plus_bias(tmp_path):
    model_dir = save_tiny_siglip(tmp_path / "siglip")
    pairs = cifar_pairs(12)
    pairs["caption"] = ["a photo of a cat", "a dog", "a photo of a dog", "cat"] * 3  # words of the tiny tokenizer
    write_shards(pairs, tmp_path / "shards", per_shard=5)  # 00000..00002.tar
    with tarfile.open(tmp_path / "shards" / "00003.tar", "w") as tar:  # two bad samples
        for name, data in [
            ("x1.json", b'{"id": "numeric", "caption": 5}'),
            ("x1.jpg", Path(pairs.image[0]).read_bytes()),
            ("x2.txt", b"a cat"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pattern = str(tmp_path / "shards" / "{00000..00003}.tar")
    out = tmp_path / "run"
    overrides = ["model=hf_siglip", f"model.backbone.name_or_path={model_dir}", f"task.input='{pattern}'", "data.num_workers=0"]
    _score(out, tmp_path / "cache", [*overrides, "task.keep_by=sigmoid", "task.keep_top_fraction=0.25"])
    scores = pd.read_parquet(out / "scores.parquet")
    model = SiglipModel.from_pretrained(model_dir).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in pairs.image], return_tensors="pt").pixel_values
        ids = tokenizer(list(pairs.caption), padding="max_length", max_length=64, return_tensors="pt").input_ids
        logits = model(input_ids=ids, pixel_values=pixels).logits_per_image.diagonal()
    assert list(scores.id) == list(pairs.id)
    errors = pd.read_csv(out / "errors.csv")
    assert dict(zip(errors.id, errors.reason)) == {"numeric": "caption_not_string", "x2": "missing_image"}  # x2: its key
    np.testing.assert_allclose(scores.sigmoid, torch.sigmoid(logits).numpy(), atol=1e-6)
    scale, bias = model.logit_scale.exp().item(), model.logit_bias.item()
    np.testing.assert_allclose(scores.sigmoid, 1 / (1 + np.exp(-(scale * scores.cosine + bias))), atol=1e-6)
    # Curation of tar shards writes tar shards of the kept samples, every member as it was.
    kept_ids = set(scores.sort_values("sigmoid", ascending=False).id[:3])
    members = {}
    for tar in sorted((out / "kept").glob("*.tar")):
        with tarfile.open(tar) as archive:
            members.update({m.name: archive.extractfile(m).read() for m in archive})
    keys = {json.loads(data)["id"]: name.split(".")[0] for name, data in members.items() if name.endswith(".json")}
    assert set(keys) == kept_ids
    for id_, key in keys.items():
        assert members[f"{key}.jpg"] == Path(pairs.image[pairs.id == id_].item()).read_bytes()


def test_parquet_input_curates_to_parquet_and_impossible_options_are_named(tmp_path, clip_dir):
    pairs = cifar_pairs(6)
    pairs["extra"] = range(6)  # a column the scorer does not read: kept as it was
    pq.write_table(pa.Table.from_pandas(pairs, preserve_index=False), tmp_path / "pairs.parquet")
    overrides = [
        "model=hf_clip",
        f"model.backbone.name_or_path={clip_dir}",
        f"task.input={tmp_path / 'pairs.parquet'}",
        "data.num_workers=0",
    ]
    _score(tmp_path / "run", tmp_path / "cache", [*overrides, "task.keep_min_score=0", "task.format=csv", "task.grid_pairs=0"])
    kept = pd.read_parquet(tmp_path / "run" / "kept.parquet")
    pd.testing.assert_frame_equal(kept, pairs)  # every scored row has clip_score >= 0
    assert pd.read_csv(tmp_path / "run" / "scores.csv").id.tolist() == pairs.id.tolist()
    for override, message in [
        ("task.keep_top_fraction=1.5", r"task\.keep_top_fraction=1\.5 is invalid"),
        ("task.keep_by=sigmoid", r"task\.keep_by=sigmoid needs a SigLIP"),
        ("task.shard_size=0", r"task\.shard_size=0 is invalid"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _score(tmp_path / "bad", tmp_path / "cache", [*overrides, override])
    with pytest.raises(ConfigError, match="holds shards of another scoring run"):
        _score(tmp_path / "run", tmp_path / "cache", [*overrides, "task.shard_size=2"])
