"""Where image-caption rows come from: a CSV/TSV or Parquet table, or webdataset tar shards.

A source is read as a stream of rows, one shard after another, never all at once. A *shard* is the
unit of work that the scoring task resumes, distributes across ranks and workers, and writes as one
output file: ``shard_size`` consecutive rows of a table, or one tar file of a webdataset (its size
is the one img2dataset wrote, ``number_sample_per_shard``). Every row of the input, malformed CSV
lines included, is yielded exactly once with its shard and its index in the shard, always in the
same order, so the bookkeeping downstream can account for every one.

Tables: columns are chosen by name (``id`` may be absent: the row number is the id); an image is a
local path (relative ones under a root) or a URL. CSV/TSV files are read with pyarrow's streaming
reader, every chosen column as a string; the delimiter is a tab for ``.tsv`` files and otherwise the
likeliest of ``, \\t ; |`` in the first line. Header-less files (CC3M's ``Train_GCC-training.tsv``)
take their ``column_names`` from the config. Parquet files are read by row group, skipping the groups
a reader does not need.

Webdataset shards (a path or a brace pattern, ``data/{00000..00099}.tar``): consecutive members that
share a key (the path up to the first dot of the file name) form a sample, as img2dataset writes
them: the image is its ``jpg``/``jpeg``/``png``/``webp`` member, the caption its ``txt`` member (else
the ``json`` member's caption field), the id the ``json`` member's id field (else the key).
"""

from __future__ import annotations

import abc
import csv
import io
import json
import logging
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from braceexpand import braceexpand

from clipbench.data.image_loading import TarMember
from clipbench.data.sources import DataError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet"}
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
CANDIDATE_DELIMITERS = ",\t;|"
READ_BLOCK = 1 << 20  # bytes per CSV block / rows per Parquet batch come in pieces of about this size

# keep(shard) -> a boolean mask over that shard's rows: which rows a subset copy keeps.
KeepMask = Callable[[int], np.ndarray]


@dataclass(frozen=True)
class Columns:
    """Names of the id (None: the row number), image and caption columns."""

    id: str | None = "id"
    image: str = "image"
    caption: str = "caption"


@dataclass(frozen=True)
class PairRow:
    """One input row as read: nothing is checked or loaded yet. ``malformed`` holds the text of a CSV
    line that could not be parsed (its other fields are None)."""

    id: Any
    image: str | TarMember | None
    caption: Any
    malformed: str | None = None


class PairSource(abc.ABC):
    """A readable input of image-caption rows, in shards."""

    id_type: pa.DataType  # the arrow type of the ids, the same for every shard

    @abc.abstractmethod
    def num_shards(self) -> int: ...

    @abc.abstractmethod
    def num_rows(self) -> int:
        """Rows in the whole input (for progress bars and reports)."""

    @abc.abstractmethod
    def shard_rows(self, shard: int) -> int:
        """Rows in one shard."""

    @abc.abstractmethod
    def read(self, shards: Iterable[int]) -> Iterator[tuple[int, int, PairRow]]:
        """``(shard, index in shard, row)`` for every row of ``shards``, in input order."""

    @abc.abstractmethod
    def copy_rows(self, keep: KeepMask, destination: Path) -> Path:
        """Write the rows that ``keep`` selects, every field as in the input, in the input's format,
        next to ``destination`` (a file name stem, or a folder for tar shards); returns the path."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """What decides the rows and their shards: files (with size and mtime), columns, shard size."""


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def open_source(
    input: str, columns: Columns, shard_size: int, delimiter: str | None = None, column_names: Sequence[str] | None = None
) -> PairSource:
    """The source for ``input``: a ``.csv``/``.tsv``/``.txt`` or ``.parquet`` table, or ``.tar`` shards."""
    if str(input).endswith(".tar"):  # one shard or a brace pattern of them
        return TarSource(str(input), columns)
    path = Path(input).expanduser()
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"data.input={input}: unknown format; expected {sorted(TABLE_SUFFIXES)} or .tar shards (brace patterns allowed)")
    if not path.is_file():
        raise DataError(f"data.input={input}: no such file")
    if shard_size < 1:
        raise DataError(f"shard_size={shard_size} must be positive")
    if kind == "parquet":
        return ParquetSource(path, columns, shard_size)
    return CsvSource(path, columns, shard_size, delimiter, column_names)


# ---------------------------------------------------------------------------------------- tables
class _TableSource(PairSource):
    """Rows of one table in fixed-size shards: shard k holds rows [k * shard_size, (k + 1) * shard_size)."""

    def __init__(self, path: Path, columns: Columns, shard_size: int) -> None:
        self.path, self.columns, self.shard_size = path, columns, shard_size
        names = self.column_names()
        for key, name in (("data.id_column", columns.id), ("data.image_column", columns.image), ("data.caption_column", columns.caption)):
            if name is not None and name not in names:
                raise DataError(f"{key}={name!r}: {path} has no such column; its columns are {names}")
        self._rows: int | None = None

    @abc.abstractmethod
    def column_names(self) -> list[str]: ...

    @abc.abstractmethod
    def _batches(self, columns: list[str] | None, shards: set[int] | None) -> Iterator[tuple[int, list[str], pa.RecordBatch]]:
        """``(first row number, malformed lines, batch)`` in order; malformed lines are numbered just
        before the batch's rows. ``columns`` None: every column, as the input stores it. ``shards``: a
        hint that only these shards are needed (readers may skip what lies outside)."""

    def _wanted_columns(self) -> list[str]:
        return [c for c in (self.columns.id, self.columns.image, self.columns.caption) if c is not None]

    def num_rows(self) -> int:
        if self._rows is None:
            self._rows = sum(len(malformed) + batch.num_rows for _, malformed, batch in self._batches(self._wanted_columns()[:1], None))
        return self._rows

    def num_shards(self) -> int:
        return -(-self.num_rows() // self.shard_size)

    def shard_rows(self, shard: int) -> int:
        return max(0, min(self.shard_size, self.num_rows() - shard * self.shard_size))

    def _spans(self, first: int, count: int) -> Iterator[tuple[int, int, int]]:
        """``(shard, start, stop)`` slices of rows ``first .. first + count`` cut at shard boundaries."""
        row, end = first, first + count
        while row < end:
            shard = row // self.shard_size
            stop = min(end, (shard + 1) * self.shard_size)
            yield shard, row - first, stop - first
            row = stop

    def read(self, shards: Iterable[int]) -> Iterator[tuple[int, int, PairRow]]:
        wanted = set(shards)
        if not wanted:
            return
        last_row = (max(wanted) + 1) * self.shard_size
        for first, malformed, batch in self._batches(self._wanted_columns(), wanted):
            for offset, text in enumerate(malformed):
                row = first + offset
                if row // self.shard_size in wanted:
                    yield row // self.shard_size, row % self.shard_size, PairRow(None, None, None, malformed=text)
            first += len(malformed)
            for shard, start, stop in self._spans(first, batch.num_rows):
                if shard in wanted:
                    yield from self._rows_of(batch.slice(start, stop - start), first + start)
            if first + batch.num_rows >= last_row:
                return

    def _rows_of(self, batch: pa.RecordBatch, first: int) -> Iterator[tuple[int, int, PairRow]]:
        images = batch.column(self.columns.image).to_pylist()
        captions = batch.column(self.columns.caption).to_pylist()
        rows = range(first, first + batch.num_rows)
        ids = batch.column(self.columns.id).to_pylist() if self.columns.id else rows
        for row, id_, image, caption in zip(rows, ids, images, captions):
            yield row // self.shard_size, row % self.shard_size, PairRow(id_, image, caption)

    def _kept_batches(self, keep: KeepMask) -> Iterator[pa.RecordBatch]:
        """Every column of the rows ``keep`` selects, batch by batch (one shard's mask at a time)."""
        masks: dict[int, np.ndarray] = {}
        for first, malformed, batch in self._batches(None, None):
            first += len(malformed)  # a malformed line has no score and is never kept
            pieces = []
            for shard, start, stop in self._spans(first, batch.num_rows):
                if shard not in masks:
                    masks = {shard: np.asarray(keep(shard), dtype=bool)}
                lo = first + start - shard * self.shard_size
                pieces.append(masks[shard][lo : lo + stop - start])
            if pieces:
                yield batch.filter(pa.array(np.concatenate(pieces)))

    def identity(self) -> dict[str, Any]:
        return {"file": _file_identity(self.path), "columns": vars(self.columns), "shard_size": self.shard_size}


def _sniff_delimiter(path: Path) -> str:
    with path.open(encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
    best = max(CANDIDATE_DELIMITERS, key=first.count)
    return best if first.count(best) else ","


class CsvSource(_TableSource):
    def __init__(
        self, path: Path, columns: Columns, shard_size: int, delimiter: str | None = None, column_names: Sequence[str] | None = None
    ) -> None:
        self.delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else _sniff_delimiter(path))
        self.header_names = list(column_names) if column_names else None
        super().__init__(path, columns, shard_size)
        self.id_type = pa.string() if columns.id else pa.int64()

    def column_names(self) -> list[str]:
        if self.header_names:
            return self.header_names
        with self.path.open(newline="", encoding="utf-8-sig") as handle:
            return next(csv.reader(handle, delimiter=self.delimiter), [])

    def _batches(self, columns: list[str] | None, shards: set[int] | None) -> Iterator[tuple[int, list[str], pa.RecordBatch]]:
        malformed: list[str] = []

        def on_malformed(row) -> str:
            where = f"line {row.number}: " if row.number else ""
            malformed.append(f"{where}{row.actual_columns} fields, expected {row.expected_columns}: {row.text[:200]!r}")
            return "skip"

        names = columns or self.column_names()
        reader = pacsv.open_csv(
            self.path,
            # Single-threaded: malformed lines are then reported in a fixed order, so every run and
            # every worker numbers the rows identically.
            read_options=pacsv.ReadOptions(column_names=self.header_names, block_size=READ_BLOCK, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True, invalid_row_handler=on_malformed),
            convert_options=pacsv.ConvertOptions(include_columns=names, column_types=dict.fromkeys(names, pa.string())),
        )
        first = 0
        for batch in reader:
            bad, malformed[:] = list(malformed), []
            yield first, bad, batch
            first += len(bad) + batch.num_rows
        if malformed:  # lines after the last good one
            yield first, list(malformed), pa.RecordBatch.from_pylist([], schema=reader.schema)

    def copy_rows(self, keep: KeepMask, destination: Path) -> Path:
        path = destination.with_suffix(self.path.suffix)
        # Python's csv module quotes only fields that need it (pyarrow's writer quotes every string).
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter=self.delimiter, lineterminator="\n")
            if self.header_names is None:
                writer.writerow(self.column_names())
            for batch in self._kept_batches(keep):
                writer.writerows(zip(*(column.to_pylist() for column in batch.columns)))
        return path


class ParquetSource(_TableSource):
    def __init__(self, path: Path, columns: Columns, shard_size: int) -> None:
        self.file = pq.ParquetFile(path)
        super().__init__(path, columns, shard_size)
        self.id_type = self.file.schema_arrow.field(columns.id).type if columns.id else pa.int64()
        self._rows = self.file.metadata.num_rows
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    def __getstate__(self) -> dict:  # an open ParquetFile does not pickle: spawned processes reopen it
        return {k: v for k, v in vars(self).items() if k != "file"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, file=pq.ParquetFile(state["path"]))

    def column_names(self) -> list[str]:
        return self.file.schema_arrow.names

    def _batches(self, columns: list[str] | None, shards: set[int] | None) -> Iterator[tuple[int, list[str], pa.RecordBatch]]:
        for group in range(self.file.num_row_groups):
            first, end = self._group_starts[group], self._group_starts[group + 1]
            if shards is not None and not any(first // self.shard_size <= s <= (end - 1) // self.shard_size for s in shards):
                continue  # no wanted row in this group: not even decompressed
            for batch in self.file.iter_batches(batch_size=65536, row_groups=[group], columns=columns):
                yield int(first), [], batch
                first += batch.num_rows

    def copy_rows(self, keep: KeepMask, destination: Path) -> Path:
        path = destination.with_suffix(".parquet")
        with pq.ParquetWriter(path, self.file.schema_arrow) as writer:
            for batch in self._kept_batches(keep):
                writer.write_batch(batch)
        return path


# --------------------------------------------------------------------------------- webdataset
def _samples(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """``(key, members)`` of consecutive regular-file members sharing a key, in archive order."""
    key, members = None, []
    for member in tar:
        if not member.isfile():
            continue
        member_key = member.name[: len(member.name) - len(_extension(member))].rstrip(".")
        if member_key != key and members:
            yield key, members
            members = []
        key = member_key
        members.append(member)
    if members:
        yield key, members


def _extension(member: tarfile.TarInfo) -> str:
    """What follows the first dot of the file name (``jpg``, ``txt``, ``json``), lower case."""
    name = member.name.rpartition("/")[2]
    return name.split(".", 1)[1].lower() if "." in name else ""


class TarSource(PairSource):
    """img2dataset / webdataset shards: one shard per tar file, in the order of the pattern."""

    id_type = pa.string()

    def __init__(self, pattern: str, columns: Columns) -> None:
        self.pattern, self.columns = pattern, columns
        self.paths = [Path(p).expanduser() for p in braceexpand(pattern)]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise DataError(f"data.input={pattern}: {len(missing)} of {len(self.paths)} tar shards are missing, e.g. {missing[0]}")
        self._rows: int | None = None

    def num_shards(self) -> int:
        return len(self.paths)

    def _open(self, path: Path) -> tarfile.TarFile:
        try:
            return tarfile.open(path, "r:")  # uncompressed: members are read in place by offset
        except tarfile.TarError as err:
            raise DataError(f"{path}: not an uncompressed tar file ({err}); webdataset shards must be plain .tar") from err

    def shard_rows(self, shard: int) -> int:
        """img2dataset's ``<shard>_stats.json`` says how many samples a shard holds; else count them."""
        path = self.paths[shard]
        stats = path.with_name(f"{path.stem}_stats.json")
        if stats.is_file():
            successes = json.loads(stats.read_text()).get("successes")
            if isinstance(successes, int):
                return successes
        with self._open(path) as tar:
            return sum(1 for _ in _samples(tar))

    def num_rows(self) -> int:
        if self._rows is None:
            self._rows = sum(self.shard_rows(k) for k in range(len(self.paths)))
        return self._rows

    def read(self, shards: Iterable[int]) -> Iterator[tuple[int, int, PairRow]]:
        for shard in sorted(set(shards)):
            path = self.paths[shard]
            with self._open(path) as tar:
                try:
                    for index, (key, members) in enumerate(_samples(tar)):
                        yield shard, index, self._row(tar, path, key, members)
                except tarfile.TarError as err:  # a damaged archive: what lies beyond cannot be read
                    log.warning("%s: stopped reading at a damaged tar header (%s); the samples after it are not in the input", path, err)

    def _row(self, tar: tarfile.TarFile, path: Path, key: str, members: list[tarfile.TarInfo]) -> PairRow:
        by_ext = {_extension(m): m for m in members}
        meta: dict[str, Any] = {}
        if "json" in by_ext:
            try:
                loaded = json.loads(tar.extractfile(by_ext["json"]).read())
                meta = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                log.warning("%s: sample %s has an unreadable json member", path, key)
        image_member = next((by_ext[ext] for ext in IMAGE_MEMBERS if ext in by_ext), None)
        image = TarMember(str(path), image_member.offset_data, image_member.size) if image_member else None
        if "txt" in by_ext:
            caption = tar.extractfile(by_ext["txt"]).read().decode("utf-8", errors="replace")
        else:
            caption = meta.get(self.columns.caption)
        id_ = meta.get(self.columns.id) if self.columns.id else None
        return PairRow(str(id_) if id_ is not None else key, image, caption)

    def copy_rows(self, keep: KeepMask, destination: Path) -> Path:
        destination.mkdir(parents=True, exist_ok=True)
        for shard, path in enumerate(self.paths):
            mask = np.asarray(keep(shard), dtype=bool)
            if not mask.any():
                continue
            with self._open(path) as source, tarfile.open(destination / path.name, "w", format=tarfile.GNU_FORMAT) as kept:
                for index, (_, members) in enumerate(_samples(source)):
                    if index < len(mask) and mask[index]:
                        for member in members:
                            kept.addfile(member, io.BytesIO(source.extractfile(member).read()))
        return destination

    def identity(self) -> dict[str, Any]:
        return {"files": [_file_identity(p) for p in self.paths], "columns": vars(self.columns)}
