"""The scoring task's output, one Parquet file per input shard, written atomically; and the merge.

A shard file holds *every* row of its input shard, in input order: scored rows with their scores,
bad rows with their reason. A file exists only once complete (written to a temporary name, synced,
then renamed), so after a crash or a kill a re-run skips exactly the shards whose files exist and
scores the rest, and the final output is the same as an uninterrupted run's. Each rank writes only
its own shards (shard k belongs to rank k mod world size); file names carry the global shard number,
so the output does not depend on the number of ranks.

``manifest.json`` records what the shards were computed from (input files, columns, shard size,
model, precision): a re-run in the same directory with anything else fails instead of mixing outputs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from clipbench.config import ConfigError
from clipbench.scoring.similarity import clip_score, sigmoid_probability

SHARD_NAME = re.compile(r"part-(\d{6,})\.parquet")
SCORE_COLUMNS = ("cosine", "clip_score", "sigmoid")


def shard_schema(id_type: pa.DataType, sigmoid: bool) -> pa.Schema:
    scores = [pa.field(name, pa.float32()) for name in SCORE_COLUMNS if name != "sigmoid" or sigmoid]
    return pa.schema(
        [
            pa.field("shard", pa.int64()),
            pa.field("index", pa.int64()),  # the row's position in its shard
            pa.field("id", id_type),
            *scores,
            pa.field("truncated", pa.bool_()),  # the caption was longer than the model's context
            pa.field("error", pa.string()),  # why the row was not scored (a Reason code); null when scored
            pa.field("detail", pa.string()),
        ]
    )


def _atomic_replace(tmp: Path, path: Path) -> None:
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ShardStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, shard: int) -> Path:
        return self.folder / f"part-{shard:06d}.parquet"

    def claim(self, identity: dict[str, Any]) -> None:
        """Record what the shards here are computed from, or check that it is what they were computed from."""
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / "manifest.json"
        text = json.dumps(identity, indent=2, sort_keys=True, default=str)
        if manifest.exists():
            previous = json.loads(manifest.read_text())
            current = json.loads(text)
            if previous != current:
                changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
                raise ConfigError(
                    f"{self.folder} holds shards of another scoring run (different {', '.join(changed)}): "
                    "score into a new run directory, or restore the settings it was run with"
                )
            return
        tmp = manifest.with_name(f".manifest.{os.getpid()}.tmp")  # every rank may write it: identical text
        tmp.write_text(text)
        _atomic_replace(tmp, manifest)

    def finished(self) -> set[int]:
        if not self.folder.is_dir():
            return set()
        return {int(m.group(1)) for p in self.folder.iterdir() if (m := SHARD_NAME.fullmatch(p.name))}

    def write(self, shard: int, table: pa.Table) -> Path:
        path = self.path(shard)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        _atomic_replace(tmp, path)
        return path

    def remove_partial(self) -> None:
        """Temporary files of writes that a kill interrupted (call when no rank is writing)."""
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def tables(self, num_shards: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Every shard's table in shard order (all of them must be finished)."""
        missing = [k for k in range(num_shards) if not self.path(k).exists()]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {num_shards} shards are not written yet (e.g. shard {missing[0]}); run again to finish them"
            )
        for shard in range(num_shards):
            yield pq.read_table(self.path(shard), columns=columns)

    def row_offsets(self, num_shards: int) -> np.ndarray:
        """The input row number at which each shard starts."""
        counts = [pq.ParquetFile(self.path(k)).metadata.num_rows for k in range(num_shards)]
        return np.concatenate([[0], np.cumsum(counts)])[:-1].astype(np.int64)


class ShardWriter(BasePredictionWriter):
    """Collects each batch's rows under its shard and writes a shard once all its rows have come
    (``expect`` says how many each of this rank's shards holds; a shard without rows is written at once)."""

    def __init__(self, store: ShardStore, id_type: pa.DataType, sigmoid: tuple[float, float] | None) -> None:
        super().__init__(write_interval="batch")
        self.store, self.sigmoid = store, sigmoid  # sigmoid: (scale, bias) of a SigLIP model
        self.schema = shard_schema(id_type, sigmoid is not None)
        self.expected: dict[int, int] = {}
        self.pending: dict[int, list[pa.RecordBatch]] = {}

    def expect(self, rows_per_shard: dict[int, int]) -> None:
        self.expected = dict(rows_per_shard)
        self.pending = {}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for shard in [k for k, rows in self.expected.items() if rows == 0]:
            self._write(shard, [])

    def rows(self, batch: dict[str, Any], cosine: torch.Tensor) -> pa.RecordBatch:
        errors = batch["error"]
        scored = np.array([e is None for e in errors], dtype=bool)
        if int(scored.sum()) != len(cosine):
            raise RuntimeError(f"shard {batch['shard']}: {len(cosine)} scores for {int(scored.sum())} good rows")
        columns: dict[str, Any] = {
            "shard": [batch["shard"]] * len(errors),
            "index": batch["index"],
            "id": pa.array(batch["ids"], type=self.schema.field("id").type),
        }
        scores = {"cosine": cosine, "clip_score": clip_score(cosine)}
        if self.sigmoid is not None:
            scores["sigmoid"] = sigmoid_probability(cosine, *self.sigmoid)
        for name, values in scores.items():
            full = np.zeros(len(errors), dtype=np.float32)
            full[scored] = values.float().numpy()
            columns[name] = pa.array(full, mask=~scored)
        columns.update(truncated=batch["truncated"], error=errors, detail=batch["detail"])
        return pa.RecordBatch.from_pydict(columns, schema=self.schema)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        shard = batch["shard"]
        parts = self.pending.setdefault(shard, [])
        parts.append(self.rows(batch, prediction))
        if sum(part.num_rows for part in parts) == self.expected[shard]:
            self._write(shard, self.pending.pop(shard))

    def _write(self, shard: int, parts: list[pa.RecordBatch]) -> None:
        table = pa.Table.from_batches(parts, schema=self.schema).sort_by("index")  # workers' batches may interleave
        self.store.write(shard, table)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pending:  # rows missing from a shard: never expected, never silently dropped
            counts = {k: sum(p.num_rows for p in parts) for k, parts in self.pending.items()}
            raise RuntimeError(f"shards ended incomplete (rows received: {counts}, expected: {[self.expected[k] for k in counts]})")


def merge(store: ShardStore, num_shards: int, out: Path, fmt: str, scores: bool = True) -> dict[str, Path]:
    """``errors.csv`` (id, row, reason, detail) and, with ``scores``, ``scores.<fmt>`` (scored rows: id,
    row, scores, truncated), in input order, streamed shard by shard; each written atomically."""
    offsets = store.row_offsets(num_shards)
    paths = {"errors": out / "errors.csv", **({"scores": out / f"scores.{fmt}"} if scores else {})}
    tmps = {name: path.with_name(f".{path.name}.tmp") for name, path in paths.items()}
    writers: dict[str, Any] = {}
    try:
        for shard, table in enumerate(store.tables(num_shards)):
            table = table.append_column("row", pa.array(offsets[shard] + table.column("index").to_numpy()))
            failed = table.filter(pc.is_valid(table.column("error"))).select(["id", "row", "error", "detail"])
            parts = {"errors": failed.rename_columns(["id", "row", "reason", "detail"])}
            if scores:
                scored = table.filter(pc.is_null(table.column("error")))
                parts["scores"] = scored.select(["id", "row", *[c for c in SCORE_COLUMNS if c in table.column_names], "truncated"])
            for name, part in parts.items():
                if name not in writers:
                    parquet = name == "scores" and fmt == "parquet"
                    writers[name] = pq.ParquetWriter(tmps[name], part.schema) if parquet else pacsv.CSVWriter(tmps[name], part.schema)
                writers[name].write_table(part)
    finally:
        for writer in writers.values():
            writer.close()
    for name, path in paths.items():
        _atomic_replace(tmps[name], path)
    return paths
