"""Shared by the benchmark scripts: describe the device, compose configs, print and save results.

Each benchmark writes ``benchmarks/results/<name>_<device-slug>.json`` (device, torch version, date,
parameters, rows) and a markdown table next to it (``.md``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere imports clipbench
    sys.path.insert(0, str(REPO_ROOT))


# ------------------------------------------------------------------------------------------ device
def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cuda when available, else cpu)")


def resolve_device(choice: str | None) -> str:
    import torch

    if choice is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch on this machine")
    return choice


def describe_device(device: str) -> dict[str, Any]:
    """What the numbers were measured on: enough to tell two result files apart."""
    import torch

    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other jobs on a shared machine skew CPU timings: the 1/5/15-minute load at the start.
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["name"] = f"{info['cpu']} x{info['cpu_count']} cores"
    info["git_commit"] = _git_commit()
    return info


def device_slug(info: dict[str, Any]) -> str:
    if info["device"] == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ config
def compose_train(overrides: Sequence[str], tmp_dir: str | Path):
    """``conf/train.yaml`` with these overrides, its outputs and caches under ``tmp_dir``."""
    from clipbench.runs import compose_config

    return compose_config("train", list(overrides), Path(tmp_dir) / "run", Path(tmp_dir) / "cache")


# ----------------------------------------------------------------------------------------- results
def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# ------------------------------------------------------------------------------ training step rates
def window_rate(stamps: list[float], warmup: int, steps: int) -> float:
    """Steps per second from the start of step ``warmup`` to the start of step ``warmup+steps``
    (the last stamp is the end of training when that step does not exist)."""
    end = min(warmup + steps, len(stamps) - 1)
    return (end - warmup) / (stamps[end] - stamps[warmup])


def median_step_rate(stamps: list[float], warmup: int, steps: int) -> float:
    """1 / the median step-to-step interval in the window: robust to bursts of contention from other jobs."""
    end = min(warmup + steps, len(stamps) - 1)
    return 1.0 / median(b - a for a, b in zip(stamps[warmup:end], stamps[warmup + 1 : end + 1]))


def alternating_step_rates(runners: dict[str, Any], repeats: int, warmup: int, steps: int) -> list[dict[str, Any]]:
    """Runs two training loops ``repeats`` times each, alternating which goes first, and returns a row
    per run with its step rates over the same window. ``runners``: side name -> a function returning
    the start time of every step (and the end of training last)."""
    rows = []
    first, second = runners
    for rep in range(repeats):
        order = [first, second] if rep % 2 == 0 else [second, first]
        for side in order:
            stamps = runners[side]()
            rate, robust = window_rate(stamps, warmup, steps), median_step_rate(stamps, warmup, steps)
            rows.append(
                {
                    "repeat": rep,
                    "side": side,
                    "order": order.index(side),
                    "steps_per_s": rate,
                    "ms_per_step": 1000 / rate,
                    "median_step_ms": 1000 / robust,
                    "steps_per_s_from_median_step": robust,
                }
            )
            print(f"  repeat {rep} {side:9s}: {rate:8.2f} steps/s ({1000 / rate:.1f} ms/step; median step {1000 / robust:.1f} ms)")
    return rows


def side_median(rows: Sequence[dict[str, Any]], side: str, key: str = "steps_per_s") -> float:
    return median(r[key] for r in rows if r["side"] == side)


def median_pair_ratio(rows: Sequence[dict[str, Any]], numerator: str, denominator: str) -> float:
    """The median over repeats of one side's steps/s over the other's in the same repeat."""
    by_repeat: dict[int, dict[str, float]] = {}
    for r in rows:
        by_repeat.setdefault(r["repeat"], {})[r["side"]] = r["steps_per_s"]
    return median(rates[numerator] / rates[denominator] for rates in by_repeat.values())


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_results(
    name: str,
    info: dict[str, Any],
    params: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    summary: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    columns: Sequence[str] | None = None,
    suffix: str = "",
) -> Path:
    """Print the table and write ``<name>_<slug><suffix>.json`` and ``.md`` under benchmarks/results."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{device_slug(info)}{suffix}"
    record = {
        "benchmark": name,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": info,
        "params": params,
        "summary": summary or {},
        "rows": list(rows),
        "notes": list(notes),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    json_path = RESULTS_DIR / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=2, default=str))
    table = markdown_table(rows, columns)
    md = [f"# {name} on {info['name']}", "", f"{record['date']}, torch {info['torch']}, `{record['command']}`", "", table]
    if summary:
        md += ["", markdown_table([summary])]
    if notes:
        md += [""] + [f"- {n}" for n in notes]
    (RESULTS_DIR / f"{stem}.md").write_text("\n".join(md) + "\n")
    print()
    print(table)
    if summary:
        print(markdown_table([summary]))
    for n in notes:
        print(f"- {n}")
    print(f"saved {json_path.relative_to(REPO_ROOT)} (+ .md)")
    return json_path


def run_train_subprocess(
    overrides: Sequence[str], run_dir: Path, log_path: Path, timeout: float | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``python train.py <overrides> hydra.run.dir=<run_dir>`` in a fresh process; wall clock, exit code
    and the run's ``metrics.json``."""
    import time

    cmd = [sys.executable, str(REPO_ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **(env or {})}
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - started
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return {"cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": wall, "metrics": metrics, "log": str(log_path)}


def tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
