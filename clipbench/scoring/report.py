"""Where the time and memory of a scoring run go: a progress bar in pairs/s with an ETA, and the
seed project's table, measured (``report.json`` and ``report.md``).

Times come from three places: the DataLoader workers time reading/fetching plus decoding, and
preprocessing (fitting to the model's resolution, tokenising), per batch; the LightningModule times
the model (normalising on the device, both towers, the similarity, the copy back); the wall clock
covers the whole predict loop. Worker seconds are summed over workers that run in parallel, so they
can exceed the wall clock. Peak RAM is sampled over this process and its children (the workers):
the main process's resident set plus the workers' private pages (see :func:`tree_memory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
from tqdm.auto import tqdm

TRIM_GROWTH = 32 * 2**20  # hand freed memory back once the resident set has grown this much (release_freed_memory)
# What one rank measures, in this order (a tensor row per rank when gathered).
FIELDS = ("pairs", "scored", "fetch_decode_s", "preprocess_s", "model_s", "wall_s", "peak_ram_mb", "peak_gpu_mb")


def tree_memory(process: psutil.Process) -> int:
    """Memory of a process and its children, in bytes: the process's resident set plus each child's
    unique set (its private pages), so that what forked workers share with their parent counts once,
    and the shared libraries that other programs on the machine also map do not move the figure."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # a worker that just ended
            total += child.memory_full_info().uss
    return total


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    glibc raises its threshold for serving large blocks with their own mappings as such blocks are
    freed, so after a while a CPU forward's activations come from the heap, and blocks of varying
    sizes (the last batch of a shard is smaller) leave holes that it keeps: measured on 2 cores, each
    CPU batch left 10-15 MB behind, a saw-tooth of 200-300 MB between hand-backs every 16 batches,
    whose peak a run draws from by chance and a longer run more often. Handing back whenever the
    resident set has grown by ``TRIM_GROWTH`` bounds the tooth; on a GPU the host set hardly grows
    and this seldom runs (it takes a few milliseconds).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemorySampler:
    """Peak memory of a process (default: this one) and its children, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.5, process: psutil.Process | None = None) -> None:
        self.interval, self.peak = interval, 0
        self.process = process or psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):  # a sampled process that has just ended
            self.peak = max(self.peak, tree_memory(self.process))

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                return

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stops sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peak


class ScoringMonitor(L.Callback):
    """A progress bar over this rank's pairs (rank 0 shows it) and the timings of the predict loop."""

    def __init__(self, total_pairs: int) -> None:
        self.total_pairs = total_pairs
        self.stats = dict.fromkeys(FIELDS, 0.0)
        self._bar: tqdm | None = None
        self._memory: MemorySampler | None = None
        self._started = 0.0
        self._process = psutil.Process()
        self._resident_after_release = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bar = tqdm(
            total=self.total_pairs, unit="pair", unit_scale=True, desc="score", disable=not trainer.is_global_zero, smoothing=0.05
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._memory = MemorySampler().start()
        self._started = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        pairs = len(batch["index"])
        self.stats["pairs"] += pairs
        self.stats["scored"] += len(outputs)
        self.stats["fetch_decode_s"] += batch["fetch_s"]
        self.stats["preprocess_s"] += batch["preprocess_s"]
        self._bar.update(pairs)
        if self._process.memory_info().rss > self._resident_after_release + TRIM_GROWTH:
            release_freed_memory()
            self._resident_after_release = self._process.memory_info().rss

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats["wall_s"] = time.perf_counter() - self._started
        self.stats["model_s"] = pl_module.model_seconds
        self.stats["peak_ram_mb"] = self._memory.stop() / 2**20
        if torch.cuda.is_available():
            self.stats["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self._bar.close()

    def gathered(self, trainer: L.Trainer) -> list[dict[str, float]]:
        """Every rank's stats (a collective call: every rank must make it)."""
        mine = torch.tensor([self.stats[f] for f in FIELDS], dtype=torch.float64, device=trainer.strategy.root_device)
        rows = trainer.strategy.all_gather(mine).reshape(-1, len(FIELDS)).cpu()
        return [dict(zip(FIELDS, row.tolist())) for row in rows]


def timing_report(ranks: list[dict[str, float]], device: str) -> dict[str, Any]:
    """The run's totals: pairs/s over the slowest rank's wall clock, seconds per part, peaks."""
    pairs = sum(r["pairs"] for r in ranks)
    wall = max(r["wall_s"] for r in ranks)
    parts = {part: sum(r[part] for r in ranks) for part in ("fetch_decode_s", "preprocess_s", "model_s")}
    return {
        "device": device,
        "ranks": len(ranks),
        "pairs": int(pairs),
        "scored": int(sum(r["scored"] for r in ranks)),
        "wall_s": wall,
        "pairs_per_s": pairs / wall if wall > 0 else 0.0,
        **parts,
        **{f"{part[:-2]}_ms_per_pair": 1000 * seconds / pairs if pairs else 0.0 for part, seconds in parts.items()},
        "peak_ram_mb_per_rank": max(r["peak_ram_mb"] for r in ranks),
        "peak_gpu_mb_per_rank": max(r["peak_gpu_mb"] for r in ranks),
        "per_rank": ranks,
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    pairs = max(report["pairs"], 1)
    rows = [
        ("fetch + decode (workers, summed)", report["fetch_decode_s"]),
        ("preprocess: resize, crop, tokenize (workers, summed)", report["preprocess_s"]),
        ("model: normalise, encode, similarity", report["model_s"]),
        ("wall clock of the predict loop", report["wall_s"]),
    ]
    lines = [
        f"# Scoring: time and memory ({report['device']}, {report['ranks']} rank(s))",
        "",
        "| part | total s | ms per pair |",
        "|---|---|---|",
        *[f"| {name} | {seconds:.2f} | {1000 * seconds / pairs:.3f} |" for name, seconds in rows],
        "",
        "| measure | value |",
        "|---|---|",
        f"| pairs (scored + errors) | {report['pairs']:,} |",
        f"| pairs per second (end to end) | {report['pairs_per_s']:,.1f} |",
        f"| peak RAM per rank (main process + workers) | {report['peak_ram_mb_per_rank']:,.0f} MB |",
        f"| peak GPU memory per rank | {report['peak_gpu_mb_per_rank']:,.0f} MB |",
        f"| 100M pairs at this rate | {1e8 / max(report['pairs_per_s'], 1e-9) / 3600:,.1f} h |",
        "",
        "Worker seconds run in parallel across DataLoader workers and can exceed the wall clock.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
