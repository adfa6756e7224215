"""``evaluate.py task=misalign``: a copy of an image-caption table with a fraction Cs of its captions
swapped (options: ``conf/task/misalign.yaml``; the method: :mod:`clipbench.misalign.shuffle`).

The output keeps every row and column of the input, in its format (CSV/TSV with the same delimiter,
or Parquet), with the caption column rewritten and two columns added: ``orig_index``, the input row
(0-based, in file order) whose caption the row now carries, and ``misaligned``, whether that is
another row. ``misalign_report.json`` says what was done (rates, swaps, TF-IDF cosines of the
swapped pairs against random pairs, rows without a candidate, seed, time).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from omegaconf import DictConfig

from clipbench.config import ConfigError, check_values, take_pairs_input
from clipbench.data.pair_sources import Columns, CsvSource, open_source
from clipbench.misalign.shuffle import MODES, pair_cosines, shuffle_captions, shuffle_report, tfidf_matrix

log = logging.getLogger(__name__)


def prepare_config(cfg: DictConfig) -> None:
    """Impossible values fail here, named; the task.input shorthand is applied."""
    task = cfg.task
    checks = [
        ("task.cs", task.cs, isinstance(task.cs, (int, float)) and 0 <= task.cs <= 1, "a fraction in [0, 1]"),
        ("task.mode", task.mode, task.mode in MODES, " or ".join(MODES)),
        ("task.top_k", task.top_k, isinstance(task.top_k, int) and task.top_k > 0, "a positive integer"),
        ("task.examples", task.examples, isinstance(task.examples, int) and task.examples >= 0, "a non-negative integer"),
    ]
    check_values(checks)
    take_pairs_input(cfg, "the image-caption table to misalign: a CSV/TSV or Parquet file")


def read_table(cfg: DictConfig) -> tuple[pa.Table, Any, int]:
    """The whole input table (every column as stored; CSV fields as strings), how to write it back
    (the CsvSource, or None for Parquet), and the number of malformed CSV lines left out."""
    data = cfg.data
    if str(data.input).endswith(".tar") or "{" in str(data.input):
        raise ConfigError(f"task=misalign rewrites a table; data.input={data.input} is webdataset shards (train with data.cs instead)")
    source = open_source(data.input, Columns(data.id_column, data.image_column, data.caption_column), 1, data.delimiter, data.column_names)
    if not isinstance(source, CsvSource):
        return pq.read_table(source.path), None, 0
    malformed = []
    table = pacsv.read_csv(
        source.path,
        read_options=pacsv.ReadOptions(column_names=source.header_names),
        parse_options=pacsv.ParseOptions(
            delimiter=source.delimiter, newlines_in_values=True, invalid_row_handler=lambda row: malformed.append(row.number) or "skip"
        ),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(source.column_names(), pa.string()), strings_can_be_null=False),
    )
    if malformed:
        log.warning("data.input: %d malformed lines left out (first at line %s)", len(malformed), malformed[0])
    return table, source, len(malformed)


def write_table(table: pa.Table, csv_source: CsvSource | None, out: Path) -> Path:
    if csv_source is None:
        path = out / "misaligned.parquet"
        pq.write_table(table, path)
        return path
    path = out / f"misaligned{csv_source.path.suffix}"
    frame = table.to_pandas()
    frame.to_csv(path, sep=csv_source.delimiter, index=False, header=csv_source.header_names is None)
    return path


def run(cfg: DictConfig, models: Mapping[str, DictConfig], out: Path) -> dict[str, float]:
    prepare_config(cfg)
    task, column = cfg.task, cfg.data.caption_column
    started = time.perf_counter()
    table, csv_source, malformed = read_table(cfg)
    captions = table.column(column).to_pylist()
    shuffle, tfidf = shuffle_captions(captions, task.cs, task.mode, task.seed, task.top_k)
    shuffle_s = time.perf_counter() - started
    if tfidf is None:  # random mode: TF-IDF only to report how similar the swapped captions are
        tfidf = tfidf_matrix(captions)
    new_captions = pa.array(np.asarray(captions, dtype=object)[shuffle.source], type=table.schema.field(column).type)
    table = table.set_column(table.schema.get_field_index(column), column, new_captions)
    table = table.append_column("orig_index", pa.array(shuffle.source)).append_column("misaligned", pa.array(shuffle.misaligned))
    path = write_table(table, csv_source, out)
    report = shuffle_report(shuffle, captions, tfidf, task.seed)
    report.update(
        input=str(cfg.data.input),
        output=str(path),
        malformed_lines_left_out=malformed,
        top_k=task.top_k,
        shuffle_s=shuffle_s,
        total_s=time.perf_counter() - started,
        examples=_examples(shuffle.pairs if shuffle.mode == "similarity" else _moved(shuffle.source), captions, tfidf, task.examples),
    )
    (out / "misalign_report.json").write_text(json.dumps(report, indent=2))
    log.info(
        "misaligned %d of %d rows (%.4f, target %.4f) in %.1f s -> %s; TF-IDF cosine swapped %.3f vs random pairs %.3f",
        report["misaligned_rows"], report["rows"], report["achieved_fraction"], task.cs, report["total_s"], path,
        report["mean_cosine_swapped"] or 0.0, report["mean_cosine_random_pairs"] or 0.0,
    )  # fmt: skip
    return {f"misalign/{k}": v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


def _moved(source: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(source != np.arange(len(source)))
    return np.stack([rows, source[rows]], axis=1)


def _examples(pairs: np.ndarray, captions: list, tfidf, count: int) -> list[dict[str, Any]]:
    """The first ``count`` (row, caption it had, caption it got, their TF-IDF cosine)."""
    pairs = pairs[:count]
    cosines = pair_cosines(tfidf, pairs[:, 0], pairs[:, 1]) if len(pairs) else []
    return [
        {"row": int(a), "caption": captions[a], "new_caption": captions[b], "tfidf_cosine": float(c)} for (a, b), c in zip(pairs, cosines)
    ]
