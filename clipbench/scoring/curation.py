"""Curation: the score as a filter for text-to-image training data (keep the pairs that match well).

A rule keeps the scored rows whose ``column`` (cosine, clip_score or SigLIP's sigmoid) is at or above
a threshold: a given minimum (``keep_min_score``), or the value of the k-th best row where
k = ceil(fraction x scored rows) (``keep_top_fraction``; ties at the threshold are all kept). Rows that
could not be scored are never kept. The kept rows are copied from the input, every field unchanged,
in the input's format (a CSV/TSV, a Parquet file, or tar shards of the same names).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipbench.data.pair_sources import PairSource
from clipbench.scoring.shards import ShardStore
from clipbench.scoring.statistics import ColumnSummary, column_chunks, kth_largest


def threshold(
    store: ShardStore, num_shards: int, column: str, summary: ColumnSummary, min_score: float | None, top_fraction: float | None
) -> float:
    if min_score is not None:
        return float(min_score)
    k = max(1, math.ceil(top_fraction * summary.count))
    return kth_largest(column_chunks(store, num_shards, column), summary.count, k, (summary.min, summary.max))


def keep_mask(store: ShardStore, shard: int, column: str, minimum: float) -> np.ndarray:
    """Which rows of a shard are kept: scored, and ``column`` >= ``minimum`` (float32 values, compared exactly)."""
    values = pq.read_table(store.path(shard), columns=[column]).column(column).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(values.astype(np.float64), nan=-np.inf) >= minimum  # an unscored row is null (NaN here)


def curate(store: ShardStore, num_shards: int, source: PairSource, column: str, minimum: float, out: Path) -> dict:
    """Copy the kept rows into ``out/kept...`` and say how many there are."""
    kept = sum(int(keep_mask(store, k, column, minimum).sum()) for k in range(num_shards))
    path = source.copy_rows(lambda shard: keep_mask(store, shard, column, minimum), out / "kept")
    return {"column": column, "threshold": minimum, "kept": kept, "output": str(path)}
