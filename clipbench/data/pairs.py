"""Image-caption pairs for training and for scoring: one data layer, one way to turn a row into input.

Rows come from :mod:`clipbench.data.pair_sources` (CSV/TSV, Parquet, webdataset tars); images from
:mod:`clipbench.data.image_loading` (local files, URLs, tar members). :class:`PairPreparer` turns a
row into model input or the reason it cannot be one, in the DataLoader workers:

* the caption must be a non-blank string (else ``empty_caption`` / ``caption_not_string``); one longer
  than the model's context is truncated by the tokenizer and flagged, not dropped;
* the image is read, fully decoded to RGB (:func:`~clipbench.data.image_loading.decode_all`: small JPEGs
  by libjpeg a batch at a time, the same pixels as PIL's) and fitted to the model's resolution with its
  own :class:`ImageSpec` (resize of the short side with the model's interpolation, centre crop) as
  uint8; scaling and normalisation follow per batch on the model's device
  (:meth:`ImageSpec.batch_transform`), identical to :meth:`ImageSpec.pil_transform`;
* captions are tokenised per batch, in the workers (scoring: tokens and truncation flags in one call).

:class:`PairsDataModule` serves both uses:

* ``train_dataloader()``: ``(images (B, 3, S, S) float normalised, tokens (B, L))``, shuffled per epoch
  from ``seed`` (a ``DistributedSampler`` with the trainer's rank and world size, so one process and
  DDP see the same global order). A bad row is logged with its row number, id and reason, counted,
  and replaced by the next readable row, so that every batch is full (DDP gathers need equal shapes).
* ``predict_dataloader()``: the scoring stream (:class:`ScoringStream`): batches of consecutive rows
  of one shard, bad rows included with their reasons, each rank reading only its own shards.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from clipbench.data.image_loading import BadRow, HttpPolicy, ImageLoader, Reason, TarMember, decode_all, is_url
from clipbench.data.pair_sources import Columns, PairRow, PairSource, TarSource, open_source
from clipbench.data.sources import DataError
from clipbench.models.backbone import ImageSpec

log = logging.getLogger(__name__)

Tokenize = Callable[[Sequence[str]], Tensor]
TokenizeFlagged = Callable[[Sequence[str]], tuple[Tensor, Sequence[bool]]]  # tokens and truncation flags


def check_caption(caption: Any) -> str:
    """The caption if it is a usable string, else :class:`BadRow`."""
    if caption is None:
        raise BadRow(Reason.EMPTY_CAPTION, "no caption (null)")
    if not isinstance(caption, str):
        raise BadRow(Reason.CAPTION_NOT_STRING, f"caption is a {type(caption).__name__}: {str(caption)[:80]!r}")
    if not caption.strip():
        raise BadRow(Reason.EMPTY_CAPTION, "caption is blank" if caption else "caption is empty")
    return caption


def row_caption(row: PairRow) -> str:
    """A row's caption if the row parsed and the caption is usable, else :class:`BadRow`."""
    if row.malformed is not None:
        raise BadRow(Reason.MALFORMED_ROW, row.malformed)
    return check_caption(row.caption)


class PairPreparer:
    """Rows -> model input (uint8 images at the model's resolution, captions, tokens), or reasons."""

    def __init__(
        self, image_spec: ImageSpec, loader: ImageLoader, tokenize: Tokenize | None, tokenize_flagged: TokenizeFlagged | None = None
    ) -> None:
        self.image_spec, self.loader, self.tokenize, self.tokenize_flagged = image_spec, loader, tokenize, tokenize_flagged

    def _fit(self, pixels: Tensor) -> Tensor:
        """uint8 RGB (3, H, W) -> uint8 (3, S, S) by :meth:`ImageSpec.fit`, resized as a channels-last batch
        of one: torchvision's vectorised uint8 path, twice as fast as the planar one, with the same pixels."""
        return self.image_spec.fit(pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last))[0]

    def sample(self, row: PairRow) -> tuple[Tensor, str]:
        """One row -> (uint8 (3, S, S) image, caption), or :class:`BadRow`."""
        caption = row_caption(row)
        return self._fit(self.loader.load_pixels(row.image)), caption

    def batch(self, rows: Sequence[PairRow], pool: ThreadPoolExecutor | None = None) -> dict[str, Any]:
        """Several rows at once (URLs fetched concurrently on ``pool``): uint8 images and tokens of the
        good rows, per row an error reason (None if good), a detail and a truncation flag; and the
        seconds spent reading/fetching plus decoding, and fitting plus tokenising."""
        failures: list[BadRow | None] = [None] * len(rows)
        captions: dict[int, str] = {}
        for i, row in enumerate(rows):
            try:
                captions[i] = row_caption(row)
            except BadRow as bad:
                failures[i] = bad
        started = time.perf_counter()
        fetched = self._fetch({i: rows[i].image for i in captions}, pool)
        fetch_s, fit_s = time.perf_counter() - started, 0.0
        for i, data in fetched.items():
            if isinstance(data, BadRow):
                failures[i] = data
        readable = [i for i, data in fetched.items() if not isinstance(data, BadRow)]
        decoded = decode_all([(fetched[i], rows[i].image) for i in readable])
        images: dict[int, Tensor] = {}
        for i in readable:
            tick = time.perf_counter()
            pixels = next(decoded)
            tock = time.perf_counter()
            if isinstance(pixels, BadRow):
                failures[i] = pixels
            else:
                images[i] = self._fit(pixels)
            fetch_s, fit_s = fetch_s + tock - tick, fit_s + time.perf_counter() - tock
        started = time.perf_counter()
        tokens, flags = self._tokens([captions[i] for i in images])
        truncated = dict(zip(images, flags))
        size = self.image_spec.size
        return {
            "images": torch.stack(list(images.values())) if images else torch.empty(0, 3, size, size, dtype=torch.uint8),
            "tokens": tokens,
            "error": [bad.reason if bad else None for bad in failures],
            "detail": [bad.detail if bad else None for bad in failures],
            "truncated": [bool(truncated.get(i, False)) for i in range(len(rows))],
            "fetch_s": fetch_s,
            "preprocess_s": fit_s + time.perf_counter() - started,
        }

    def _tokens(self, texts: list[str]) -> tuple[Tensor | list[str], Sequence[bool]]:
        """The texts' tokens (the texts themselves without a tokenizer) and whether each was truncated
        (known only with ``tokenize_flagged``). No text: an empty batch of the tokenizer's width."""
        if self.tokenize_flagged is not None:
            tokens, truncated = self.tokenize_flagged(texts or [""])
            return (tokens, truncated) if texts else (tokens[:0], [])
        if self.tokenize is None:
            return texts, [False] * len(texts)
        return self.tokenize(texts or [""])[: len(texts)], [False] * len(texts)

    def _fetch(self, references: dict[int, Any], pool: ThreadPoolExecutor | None) -> dict[int, bytes | BadRow]:
        """The bytes of each image, or its BadRow; URLs in parallel when a pool is given."""

        def read(reference) -> bytes | BadRow:
            try:
                return self.loader.read(reference)
            except BadRow as bad:
                return bad

        urls = any(isinstance(r, str) and is_url(r) for r in references.values())
        data = pool.map(read, references.values()) if pool is not None and urls else map(read, references.values())
        return dict(zip(references, data))


# ------------------------------------------------------------------------------------- training
@dataclass
class RowTable:
    """Every row of a source held compactly (arrow arrays, not Python objects, so that forked
    workers do not copy them page by page through reference counts)."""

    ids: pa.Array
    images: pa.Array  # paths or URLs; for tar sources the tar file of each row
    captions: pa.Array  # strings; null where the row is bad from the start
    offsets: np.ndarray | None  # tar sources: where each image member lies
    sizes: np.ndarray | None
    rejected: list[tuple[int, Any, str, str]]  # (row, id, reason, detail) known without reading images

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, i: int) -> PairRow:
        image = self.images[i].as_py()
        if self.offsets is not None and image is not None:
            image = TarMember(image, int(self.offsets[i]), int(self.sizes[i]))
        return PairRow(self.ids[i].as_py(), image, self.captions[i].as_py())

    @classmethod
    def from_source(cls, source: PairSource, chunk: int = 65536) -> RowTable:
        tar = isinstance(source, TarSource)
        parts: dict[str, list] = {"ids": [], "images": [], "captions": [], "offsets": [], "sizes": []}
        rejected: list[tuple[int, Any, str, str]] = []
        rows = enumerate(row for _, _, row in source.read(range(source.num_shards())))
        while block := list(itertools.islice(rows, chunk)):
            captions = []
            for number, row in block:
                try:
                    captions.append(row_caption(row))
                except BadRow as bad:
                    rejected.append((number, row.id, bad.reason, bad.detail))
                    captions.append(None)
            images = [r.image for _, r in block]
            parts["ids"].append(pa.array([r.id for _, r in block], type=source.id_type))
            parts["captions"].append(pa.array(captions, type=pa.string()))
            parts["images"].append(pa.array([i.path if isinstance(i, TarMember) else i for i in images], type=pa.string()))
            if tar:
                parts["offsets"].append(np.array([i.offset if i else -1 for i in images], dtype=np.int64))
                parts["sizes"].append(np.array([i.size if i else 0 for i in images], dtype=np.int64))
        return cls(
            ids=pa.concat_arrays(parts["ids"]),
            images=pa.concat_arrays(parts["images"]),
            captions=pa.concat_arrays(parts["captions"]),
            offsets=np.concatenate(parts["offsets"]) if tar else None,
            sizes=np.concatenate(parts["sizes"]) if tar else None,
            rejected=rejected,
        )


class PairsTrainingSet(Dataset):
    """Map-style: item i is row i, or, when row i is bad, the next readable row (logged and marked in
    a bitmap shared with the workers, so it is tried once and counted once)."""

    def __init__(self, table: RowTable, preparer: PairPreparer) -> None:
        self.table, self.preparer = table, preparer
        self.bad = torch.zeros(len(table), dtype=torch.bool).share_memory_()
        for row, *_ in table.rejected:
            self.bad[row] = True

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        for step in range(len(self)):
            j = (i + step) % len(self)
            if self.bad[j]:
                continue
            row = self.table.row(j)
            try:
                return self.preparer.sample(row)
            except BadRow as bad:
                self.bad[j] = True
                log.warning("data.input row %d (id %r) skipped: %s: %s", j, row.id, bad.reason, bad.detail)
        raise DataError("data.input: no row has both a readable image and a caption")


class TrainingCollate:
    """(uint8 image, caption) samples -> (normalised float images, tokens), in the worker."""

    def __init__(self, image_spec: ImageSpec, tokenize: Tokenize | None) -> None:
        self.image_spec, self.tokenize = image_spec, tokenize

    def __call__(self, samples: list[tuple[Tensor, str]]) -> tuple[Tensor, Tensor | list[str]]:
        images = self.image_spec.batch_transform(torch.stack([image for image, _ in samples]))
        captions = [caption for _, caption in samples]
        return images, self.tokenize(captions) if self.tokenize else captions


# -------------------------------------------------------------------------------------- scoring
class ScoringStream(IterableDataset):
    """Batches of up to ``batch_size`` consecutive rows of one shard, for the given shards in order.

    With at least as many shards as DataLoader workers, the shards are dealt round-robin to the
    workers, each reading only its own. With fewer, the batches are dealt instead: each worker reads
    the rows of every shard and prepares only its own batches, so all workers help however few
    shards there are. A batch carries its shard, the rows' indices in it and their ids; the writer
    knows a shard is complete when it has all of its rows. Batches are cut from each shard the same
    way whatever the number of workers or ranks, so the scores do not depend on them.
    """

    def __init__(self, source: PairSource, shards: Sequence[int], preparer: PairPreparer, batch_size: int, concurrency: int) -> None:
        self.source, self.shards, self.preparer = source, list(shards), preparer
        self.batch_size, self.concurrency = batch_size, concurrency

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        mine, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        by_shard = len(self.shards) >= workers
        shards, deal = (self.shards[mine::workers], None) if by_shard else (self.shards, itertools.count())
        with ThreadPoolExecutor(self.concurrency) as pool:
            for shard, rows in itertools.groupby(self.source.read(shards), key=lambda item: item[0]):
                while chunk := list(itertools.islice(rows, self.batch_size)):
                    if by_shard or next(deal) % workers == mine:
                        yield self._batch(shard, chunk, pool)

    def _batch(self, shard: int, items: list[tuple[int, int, PairRow]], pool: ThreadPoolExecutor) -> dict[str, Any]:
        batch = self.preparer.batch([row for _, _, row in items], pool)
        batch.update(shard=shard, index=[index for _, index, _ in items], ids=[row.id for _, _, row in items])
        return batch


def freeze_heap_before_fork() -> None:
    """Leave the objects that exist now out of garbage collection (``gc.freeze``). A forked DataLoader
    worker's collector would otherwise visit every object inherited from the parent and so copy the
    parent's heap page by page (copy-on-write): a few hundred MB per worker. ``gc.unfreeze`` undoes it."""
    gc.collect()
    gc.freeze()


# ---------------------------------------------------------------------------------- datamodule
class PairsDataModule(L.LightningDataModule):
    """Image-caption pairs from a CSV/TSV, Parquet or webdataset input (see the module docstring).

    ``tokenize`` (the backbone's) turns captions into tokens in the workers; without it batches carry
    the caption strings. ``tokenize_flagged`` (the backbone's; scoring passes it instead) also flags
    the captions longer than the context, in the same pass.
    ``shard_size`` (tables) is the scoring task's unit of work; ``done_shards`` lists the shards the
    scoring task has already written, which ``predict_dataloader`` leaves out.
    """

    def __init__(
        self,
        input: str,
        image_spec: ImageSpec,
        tokenize: Tokenize | None = None,
        image_root: str | None = None,
        id_column: str | None = "id",
        image_column: str = "image",
        caption_column: str = "caption",
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        seed: int = 0,
        tokenize_flagged: TokenizeFlagged | None = None,
        delimiter: str | None = None,
        column_names: Sequence[str] | None = None,
        shard_size: int = 10_000,
        http: Mapping[str, Any] | None = None,
        cs: float = 0.0,
        misalign: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.input, self.image_spec, self.tokenize = input, image_spec, tokenize
        self.cs, self.misalign, self.cache_dir = cs, dict(misalign or {}), cache_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.source = open_source(
            input, Columns(id_column, image_column, caption_column), shard_size, delimiter, list(column_names) if column_names else None
        )
        self.http = HttpPolicy(**dict(http or {}))
        self.preparer = PairPreparer(image_spec, ImageLoader(image_root, self.http), tokenize, tokenize_flagged)
        self.train_set: PairsTrainingSet | None = None
        self.done_shards: set[int] = set()

    # ----------------------------------------------------------------- training
    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            self.check_rows()
            table = self._misaligned(RowTable.from_source(self.source))
            for row, id_, reason, detail in table.rejected:
                log.warning("data.input row %d (id %r) skipped: %s: %s", row, id_, reason, detail)
            self.train_set = PairsTrainingSet(table, self.preparer)
            log.info("data.input=%s: %d rows", self.input, len(table))

    def _misaligned(self, table: RowTable) -> RowTable:
        """With ``cs > 0``, the table with a fraction cs of its captions swapped (the misalignment study,
        :mod:`clipbench.misalign.shuffle`; options in ``misalign``), cached under ``cache_dir``."""
        if not self.cs:
            return table
        from clipbench.misalign.cache import cached_sources

        options = {"mode": "similarity", "top_k": 10, "seed": self.seed, **self.misalign}
        source = cached_sources(table.captions.to_pylist(), self.cs, options["mode"], options["seed"], options["top_k"], self.cache_dir)
        table.captions = table.captions.take(pa.array(source))
        return table

    def check_rows(self) -> None:
        if self.source.num_rows() == 0:
            raise DataError(f"data.input={self.input}: no rows")

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world = self._rank_and_world()
        # An explicit DistributedSampler (Lightning keeps one it is given): the seed's shuffle, new each
        # epoch through set_epoch, the same global order whatever the number of processes.
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=True)
        if self.num_workers > 0:
            freeze_heap_before_fork()
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=TrainingCollate(self.image_spec, self.tokenize),
            pin_memory=torch.cuda.is_available(),
        )

    def skipped_rows(self) -> list[int]:
        """Rows found bad so far in training (every worker's finds)."""
        return [] if self.train_set is None else self.train_set.bad.nonzero().flatten().tolist()

    def teardown(self, stage: str) -> None:
        gc.unfreeze()
        if stage == "fit" and self.skipped_rows():
            log.warning("training skipped %d bad rows of data.input (each logged above)", len(self.skipped_rows()))

    # ------------------------------------------------------------------ scoring
    def pending_shards(self, rank: int, world: int) -> list[int]:
        """The shards of rank ``rank`` not yet done: shard k belongs to rank k mod world size."""
        return [k for k in range(rank, self.source.num_shards(), world) if k not in self.done_shards]

    def predict_dataloader(self) -> DataLoader:
        shards = self.pending_shards(*self._rank_and_world())
        stream = ScoringStream(self.source, shards, self.preparer, self.eval_batch_size, self.http.concurrency)
        workers = min(self.num_workers, -(-sum(self.source.shard_rows(k) for k in shards) // self.eval_batch_size))
        if workers > 0:
            freeze_heap_before_fork()
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False, pin_memory=torch.cuda.is_available())
