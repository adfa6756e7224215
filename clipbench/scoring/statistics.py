"""Statistics of score columns over every shard with bounded memory: counts, moments, exact quantiles
and order statistics (two passes through a fine histogram), display histograms, the extreme pairs.

Nothing here holds a whole column: 100 million scores are read shard by shard, so the memory used is
that of one shard plus a histogram, whatever the input size.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from clipbench.scoring.shards import SCORE_COLUMNS, ShardStore

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
FINE_BINS = 1 << 16

Chunks = Callable[[], Iterable[np.ndarray]]  # a fresh pass over all values, piece by piece


def column_chunks(store: ShardStore, num_shards: int, column: str) -> Chunks:
    """Passes over the scored rows' values of ``column`` (float32), one shard at a time."""

    def chunks() -> Iterable[np.ndarray]:
        for table in store.tables(num_shards, columns=[column]):
            values = table.column(column)
            yield values.filter(pc.is_valid(values)).to_numpy().astype(np.float32, copy=False)

    return chunks


def _fine_bins(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The fine-histogram bin of each value; values outside [lo, hi] go to the end bins."""
    position = (values.astype(np.float64) - lo) * (FINE_BINS / (hi - lo))
    return np.clip(np.floor(position), 0, FINE_BINS - 1).astype(np.int64)


def order_statistics(chunks: Chunks, ranks: Sequence[int], bounds: tuple[float, float]) -> list[float]:
    """The values at 0-based ``ranks`` of all values sorted ascending, exactly: a first pass counts a
    fine histogram, a second keeps only the values of the bins holding those ranks."""
    lo, hi = bounds
    counts = np.zeros(FINE_BINS, dtype=np.int64)
    for values in chunks():
        counts += np.bincount(_fine_bins(values, lo, hi), minlength=FINE_BINS)
    ends = np.cumsum(counts)
    bins = np.searchsorted(ends, np.asarray(ranks), side="right")  # the bin whose cumulative count passes the rank
    wanted = np.unique(bins)
    kept: dict[int, list[np.ndarray]] = {int(b): [] for b in wanted}
    for values in chunks():
        which = _fine_bins(values, lo, hi)
        inside = np.isin(which, wanted)
        for b in np.unique(which[inside]):
            kept[int(b)].append(values[inside][which[inside] == b])
    ordered = {b: np.sort(np.concatenate(parts)) for b, parts in kept.items()}
    return [float(ordered[int(b)][r - (ends[b] - counts[b])]) for r, b in zip(ranks, bins)]


def quantiles(chunks: Chunks, count: int, levels: Sequence[float], bounds: tuple[float, float]) -> list[float]:
    """``numpy.quantile(values, levels)`` (linear interpolation) without holding the values."""
    positions = [q * (count - 1) for q in levels]
    ranks = sorted({r for p in positions for r in (math.floor(p), math.ceil(p))})
    value = dict(zip(ranks, order_statistics(chunks, ranks, bounds)))
    return [value[math.floor(p)] + (value[math.ceil(p)] - value[math.floor(p)]) * (p - math.floor(p)) for p in positions]


def kth_largest(chunks: Chunks, count: int, k: int, bounds: tuple[float, float]) -> float:
    return order_statistics(chunks, [count - k], bounds)[0]


@dataclass
class ColumnSummary:
    count: int
    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[str, float]
    histogram: tuple[np.ndarray, np.ndarray]  # (counts, edges) for the figure

    def flat(self, prefix: str) -> dict[str, float]:
        values = {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max, **self.quantiles}
        return {f"{prefix}{key}": value for key, value in values.items()}


def summarize_column(chunks: Chunks, bins: int) -> ColumnSummary | None:
    total = total_sq = 0.0
    count, low, high = 0, math.inf, -math.inf
    for values in chunks():
        if len(values):
            wide = values.astype(np.float64)
            count, total, total_sq = count + len(values), total + wide.sum(), total_sq + (wide * wide).sum()
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if count == 0:
        return None
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    edges = np.linspace(low, high if high > low else low + 1e-6, bins + 1)
    counts = sum((np.histogram(values, bins=edges)[0] for values in chunks()), np.zeros(bins, dtype=np.int64))
    levels = quantiles(chunks, count, QUANTILES, (low, high if high > low else low + 1e-6))
    return ColumnSummary(count, mean, std, low, high, {f"p{round(q * 100):02d}": v for q, v in zip(QUANTILES, levels)}, (counts, edges))


@dataclass
class Summary:
    input_rows: int
    scored: int
    errors: int
    truncated: int
    reasons: dict[str, int]
    columns: dict[str, ColumnSummary]

    def as_dict(self) -> dict:
        return {
            "input_rows": self.input_rows,
            "scored": self.scored,
            "errors": self.errors,
            "truncated": self.truncated,
            "errors_by_reason": dict(sorted(self.reasons.items())),
            **{name: {k: v for k, v in vars(c).items() if k != "histogram"} for name, c in self.columns.items()},
        }


def summarize(store: ShardStore, num_shards: int, bins: int = 50) -> Summary:
    reasons: Counter[str] = Counter()
    rows = truncated = 0
    names: list[str] = []
    for table in store.tables(num_shards, columns=None):
        names = [c for c in SCORE_COLUMNS if c in table.column_names]
        rows += table.num_rows
        truncated += int(pc.sum(table.column("truncated")).as_py() or 0)
        reasons.update(r for r in table.column("error").to_pylist() if r is not None)
    columns = {name: summarize_column(column_chunks(store, num_shards, name), bins) for name in names}
    errors = sum(reasons.values())
    return Summary(rows, rows - errors, errors, truncated, dict(reasons), {k: v for k, v in columns.items() if v is not None})


@dataclass(frozen=True)
class Extreme:
    shard: int
    index: int
    id: object
    value: float


def extremes(store: ShardStore, num_shards: int, column: str, n: int) -> tuple[list[Extreme], list[Extreme]]:
    """The ``n`` highest- and lowest-scored rows by ``column`` (ties: input order)."""
    best: list[Extreme] = []
    worst: list[Extreme] = []
    for table in store.tables(num_shards, columns=["shard", "index", "id", column]):
        table = table.filter(pc.is_valid(table.column(column)))
        values = table.column(column).to_numpy()
        if not len(values):
            continue
        order = np.argsort(values, kind="stable")
        picked = {int(i) for i in (*order[:n], *order[::-1][:n])}
        rows = [Extreme(table["shard"][i].as_py(), table["index"][i].as_py(), table["id"][i].as_py(), float(values[i])) for i in picked]
        best = sorted(best + rows, key=lambda e: (-e.value, e.shard, e.index))[:n]
        worst = sorted(worst + rows, key=lambda e: (e.value, e.shard, e.index))[:n]
    return best, worst
