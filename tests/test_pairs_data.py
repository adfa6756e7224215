"""The image-caption data layer: every input format reads the same pairs, URL fetching keeps to its
policy, and the training loader yields model input the backbone's own preprocessing would give."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from pairs_fixtures import Endpoints, cifar_pairs, serve, write_shards
from PIL import Image
from torch.utils.data import DistributedSampler

from clipbench.data.image_loading import BadRow, HttpPolicy, ImageLoader, Reason, TarMember
from clipbench.data.pair_sources import Columns, open_source
from clipbench.data.pairs import PairsDataModule
from clipbench.data.sources import DataError
from clipbench.losses import clip_loss
from clipbench.models.scratch import ScratchCLIP
from clipbench.models.towers import vit

CAP = 4096  # the byte cap of the HTTP tests


def _images_and_captions(source) -> list[tuple[bytes, str]]:
    loader = ImageLoader()
    return [(loader.read(row.image), row.caption) for _, _, row in source.read(range(source.num_shards()))]


def test_csv_tsv_parquet_and_tar_shards_read_the_same_pairs(tmp_path):
    pairs = cifar_pairs(10)
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    # CC3M-style: tab-separated filepath/title, no id column, paths relative to a root.
    cc3m = pd.DataFrame({"filepath": [p.split("cifar10/")[1] for p in pairs.image], "title": pairs.caption})
    cc3m.to_csv(tmp_path / "cc3m.tsv", sep="\t", index=False)
    pq.write_table(pa.Table.from_pandas(pairs), tmp_path / "pairs.parquet", row_group_size=3)
    pattern = write_shards(pairs, tmp_path / "shards", per_shard=4)
    expected = [(Path(p).read_bytes(), c) for p, c in zip(pairs.image, pairs.caption)]

    csv = open_source(str(tmp_path / "pairs.csv"), Columns(), shard_size=4)
    tsv = open_source(str(tmp_path / "cc3m.tsv"), Columns(None, "filepath", "title"), shard_size=4)
    parquet = open_source(str(tmp_path / "pairs.parquet"), Columns(), shard_size=4)
    tar = open_source(pattern, Columns(), shard_size=4)
    assert tsv.delimiter == "\t" and csv.delimiter == ","
    root = ImageLoader(pairs.image[0].split("cifar10/")[0] + "cifar10")
    assert [(root.read(r.image), r.caption) for _, _, r in tsv.read(range(3))] == expected
    for source in (csv, parquet, tar):
        assert source.num_rows() == 10 and source.num_shards() == 3
        assert _images_and_captions(source) == expected
        assert _images_and_captions(pickle.loads(pickle.dumps(source))) == expected  # spawned processes get a working copy
    assert [row.id for _, _, row in tsv.read([1])] == [4, 5, 6, 7]  # no id column: the row number
    assert [(s, i, row.id) for s, i, row in parquet.read([2])] == [(2, 0, "pair00008"), (2, 1, "pair00009")]
    assert [row.id for _, _, row in tar.read([1])] == list(pairs.id[4:8])  # the json member's id
    assert isinstance(next(tar.read([0]))[2].image, TarMember)


def test_header_less_tsv_takes_column_names_and_a_missing_column_is_named(tmp_path):
    pairs = cifar_pairs(3)
    pairs[["caption", "image"]].to_csv(tmp_path / "gcc.tsv", sep="\t", index=False, header=False)  # CC3M's original layout
    source = open_source(str(tmp_path / "gcc.tsv"), Columns(None, "url", "caption"), 10, column_names=["caption", "url"])
    assert [(row.image, row.caption) for _, _, row in source.read([0])] == list(zip(pairs.image, pairs.caption))
    with pytest.raises(DataError, match=r"data\.caption_column='text'.*columns are \['id', 'image', 'caption'\]"):
        pairs.to_csv(tmp_path / "pairs.csv", index=False)
        open_source(str(tmp_path / "pairs.csv"), Columns(caption="text"), 10)


def test_url_fetching_keeps_to_its_policy(tmp_path):
    image = Path(cifar_pairs(1).image[0]).read_bytes()
    base, server = serve(image, CAP)
    policy = HttpPolicy(connect_timeout=1.0, read_timeout=0.4, total_timeout=0.5, retries=1, backoff=0.01, max_bytes=CAP, max_redirects=3)
    loader = ImageLoader(http=policy)
    try:
        assert loader.read(f"{base}/ok.jpg") == image
        assert loader.read(f"{base}/redirect.jpg") == image
        assert loader.read(f"{base}/flaky.jpg") == image  # a 503, then a retry that succeeds
        expected = {
            "slow.jpg": Reason.URL_TIMEOUT,
            "trickle.jpg": Reason.URL_TIMEOUT,
            "big-declared.jpg": Reason.OVER_BYTE_CAP,
            "big-streamed.jpg": Reason.OVER_BYTE_CAP,
            "missing.jpg": Reason.HTTP_STATUS,
            "error.jpg": Reason.HTTP_STATUS,
            "loop.jpg": Reason.TOO_MANY_REDIRECTS,
            "to-ftp.jpg": Reason.BAD_SCHEME,
        }
        for path, reason in expected.items():
            with pytest.raises(BadRow) as failure:
                loader.read(f"{base}/{path}")
            assert failure.value.reason == reason, (path, failure.value)
        assert Endpoints.hits["/error.jpg"] == 2 and Endpoints.hits["/missing.jpg"] == 1  # 5xx retried, 404 never
        assert Endpoints.hits["/loop.jpg"] == 4  # the first request and three redirects
        with pytest.raises(BadRow, match="bad_scheme"):
            loader.read("ftp://127.0.0.1/image.jpg")
    finally:
        server.shutdown()


def test_local_files_fail_with_their_reason(tmp_path):
    good = Path(cifar_pairs(1).image[0]).read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    loader = ImageLoader(tmp_path)
    for name, reason in [
        ("nowhere.jpg", Reason.MISSING_FILE),
        ("empty.jpg", Reason.ZERO_BYTE),
        ("junk.jpg", Reason.UNREADABLE),
        ("cut.jpg", Reason.TRUNCATED),
    ]:
        with pytest.raises(BadRow) as failure:
            loader.load(name)
        assert failure.value.reason == reason, name


@pytest.fixture(scope="module")
def backbone() -> ScratchCLIP:
    torch.manual_seed(0)
    tower = vit(embed_dim=32, image_size=32, patch_size=8, width=32, layers=1, heads=2)
    return ScratchCLIP(tower, embed_dim=32, text_width=32, text_layers=1, text_heads=2)


def test_training_batches_match_the_backbones_preprocessing_and_skip_bad_rows(tmp_path, backbone, caplog):
    pairs = cifar_pairs(14)
    pairs.loc[3, "image"] = str(tmp_path / "gone.jpg")  # missing: replaced by the next readable row
    pairs.loc[7, "caption"] = "  "  # blank caption: known bad before any image is read
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    data = PairsDataModule(
        str(tmp_path / "pairs.csv"), backbone.image_spec, tokenize=backbone.tokenize, batch_size=4, num_workers=2, seed=3
    )
    data.setup("fit")
    loader = data.train_dataloader()
    sampler: DistributedSampler = loader.sampler
    sampler.set_epoch(0)
    order = list(sampler)
    batches = list(loader)
    assert len(batches) == 14 // 4 and all(images.shape == (4, 3, 32, 32) for images, _ in batches)
    substitute = {3: 4, 7: 8}  # a bad row's place is taken by the next readable row
    transform = backbone.image_spec.pil_transform()
    for (images, tokens), rows in zip(batches, [order[i : i + 4] for i in range(0, 12, 4)]):
        rows = [substitute.get(r, r) for r in rows]
        expected = torch.stack([transform(Image.open(pairs.image[r]).convert("RGB")) for r in rows])
        torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)
        assert torch.equal(tokens, backbone.tokenize([pairs.caption[r] for r in rows]))
    shown = [r for r in order[:12] if r in (3, 7)]
    assert sorted(data.skipped_rows()) == sorted({7, *shown})  # the blank caption at once, the missing file when drawn
    assert "row 7 (id 'pair00007') skipped: empty_caption" in caplog.text
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new shuffle each epoch ...
    again = PairsDataModule(str(tmp_path / "pairs.csv"), backbone.image_spec, batch_size=4, num_workers=0, seed=3)
    again.setup("fit")
    ranks = [DistributedSampler(again.train_set, num_replicas=2, rank=r, shuffle=True, seed=3, drop_last=True) for r in (0, 1)]
    for rank in ranks:
        rank.set_epoch(0)
    interleaved = [i for pair in zip(*ranks) for i in pair]
    assert interleaved == order  # ... from the seed, and two DDP ranks share one process's order


class _PairsCLIP(L.LightningModule):
    """The smallest training loop on pairs: CLIP's loss on (images, tokens) batches."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone, self.epochs_seen = backbone, []

    def training_step(self, batch, batch_idx):
        images, tokens = batch
        return clip_loss(
            F.normalize(self.backbone.encode_image(images), dim=-1),
            F.normalize(self.backbone.encode_text(tokens), dim=-1),
            self.backbone.similarity_scale(),
        )

    def on_train_epoch_start(self) -> None:
        self.epochs_seen.append(self.trainer.train_dataloader.sampler.epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_trainer_fit_keeps_the_seeded_sampler_and_reshuffles_each_epoch(tmp_path, backbone):
    cifar_pairs(10).to_csv(tmp_path / "pairs.csv", index=False)
    data = PairsDataModule(
        str(tmp_path / "pairs.csv"), backbone.image_spec, tokenize=backbone.tokenize, batch_size=4, num_workers=0, seed=5
    )
    module = _PairsCLIP(backbone)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=data)
    sampler = trainer.train_dataloader.sampler
    assert isinstance(sampler, DistributedSampler) and sampler.seed == 5  # Lightning kept ours
    assert module.epochs_seen == [0, 1] and trainer.global_step == 2 * (10 // 4)


def test_truncation_flag_marks_exactly_the_captions_longer_than_the_context(backbone):
    # CLIP's BPE: "cat" is one token; start and end tokens take two of the 32 positions.
    fits, cut = " ".join(["cat"] * 30), " ".join(["cat"] * 31)
    assert backbone.truncates(["a photo of a cat", fits, cut]) == [False, False, True]
    tokens = backbone.tokenize([fits, cut])
    assert torch.equal(tokens[0, :31], tokens[1, :31])  # the longer one is indeed cut to the same tokens


@pytest.mark.parametrize("shard_size", [10, 3])  # one shard: batches dealt to the workers; four: shards dealt
def test_scoring_stream_gives_every_row_once_in_the_same_batches_whatever_the_workers(tmp_path, backbone, shard_size):
    pairs = cifar_pairs(10)
    pairs.loc[4, "caption"] = ""
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    data = PairsDataModule(
        str(tmp_path / "pairs.csv"),
        backbone.image_spec,
        tokenize=backbone.tokenize,
        eval_batch_size=2,
        num_workers=2,
        shard_size=shard_size,
    )
    seen = sorted((b["shard"], tuple(b["index"])) for b in data.predict_dataloader())
    expected = []  # consecutive pairs of rows, cut shard by shard
    for shard in range(-(-10 // shard_size)):
        indices = range(min(shard_size, 10 - shard * shard_size))
        expected += [(shard, tuple(indices[k : k + 2])) for k in range(0, len(indices), 2)]
    assert seen == sorted(expected)
    errors = [e for b in data.predict_dataloader() for e in b["error"] if e]
    assert errors == ["empty_caption"]
