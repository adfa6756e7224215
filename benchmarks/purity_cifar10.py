"""The real run: feature purity and a neuron-pruning sweep of clipbench checkpoints trained on CIFAR-10.

For each ``--ckpt label=path`` (a train.py checkpoint), in fresh processes as a user runs them:

* ``python evaluate.py task=purity task.checkpoints={label: path, ...} task.projection=both``;
* ``python evaluate.py -m task=prune ckpt_path=<path> data=cifar10 task.neurons=<7 counts, 25%..100% of
  the embedding width>`` on the CIFAR-10 test split (``--root``).

Tables and plots are copied to ``benchmarks/results/purity_cifar10/`` (``purity.csv``,
``purity_vs_label.png``, ``cosine_histograms.png``, and per model the two ``*_vs_neurons`` CSVs and
plots); the summary says, per count, whether high-purity neurons beat random and low-purity ones.

    python benchmarks/purity_cifar10.py --ckpt clip_fast=outputs/ckpts/cifar10_fast_cpu/checkpoints/last.ckpt \
        [--ckpt clip_vit=outputs/ckpts/cifar10_vit_cpu/checkpoints/last.ckpt] [--root ../shared/data/cifar10] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

DEFAULT_ROOT = C.REPO_ROOT.parent / "shared" / "data" / "cifar10"
OUT = C.RESULTS_DIR / "purity_cifar10"
FRACTIONS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def _evaluate(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(C.REPO_ROOT / "evaluate.py"), *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"evaluate.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--ckpt", action="append", required=True, help="label=path of a train.py checkpoint (repeatable)")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 class-folder tree")
    parser.add_argument("--cache-dir", default=str(C.REPO_ROOT / "outputs" / "cache"), help="embedding cache shared with other runs")
    args = parser.parse_args()
    import pandas as pd
    import torch

    device = C.resolve_device(args.device)
    info = C.describe_device(device)
    checkpoints = dict(item.split("=", 1) for item in args.ckpt)
    checkpoints = {label: str(Path(path).resolve()) for label, path in checkpoints.items()}
    tmp = Path(tempfile.mkdtemp(prefix="purity_cifar10_"))
    OUT.mkdir(parents=True, exist_ok=True)
    common = [f"paths.cache_dir={args.cache_dir}"]

    mapping = "{" + ", ".join(f"{label}: {path}" for label, path in checkpoints.items()) + "}"
    purity_s = _evaluate(["task=purity", f"task.checkpoints={mapping}", *common, f"hydra.run.dir={tmp / 'purity'}"], tmp)
    for name in ("purity.csv", "purity_vs_label.png", "cosine_histograms.png"):
        shutil.copy(tmp / "purity" / name, OUT / name)

    rows, timings = [], {"purity_s": round(purity_s, 1)}
    for label, path in checkpoints.items():
        width = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]["backbone"]["embed_dim"]
        counts = ",".join(str(round(width * f)) for f in FRACTIONS)
        sweep = tmp / f"sweep_{label}"
        prune = [
            "-m",
            "task=prune",
            f"ckpt_path={path}",
            f"model_name={label}",
            "data=cifar10",
            f"data.root={args.root}",
            f"task.neurons={counts}",
        ]
        timings[f"{label}_sweep_s"] = round(
            _evaluate([*prune, *common, "trainer=gpu" if device == "cuda" else "trainer.accelerator=cpu", f"hydra.sweep.dir={sweep}"], tmp),
            1,
        )
        for file in sweep.glob(f"cifar10_{label}_*_vs_neurons.*"):
            shutil.copy(file, OUT / file.name)
        for metric in ("accuracy", "silhouette"):
            curve = pd.read_csv(sweep / f"cifar10_{label}_{metric}_vs_neurons.csv")
            for _, point in curve[curve["neurons"] < width].iterrows():
                rows.append(
                    {
                        "model": label,
                        "metric": metric,
                        "neurons": int(point["neurons"]),
                        "width": width,
                        "full": point["full"],
                        "high": point["high"],
                        "low": point["low"],
                        "random": point["random"],
                        "random_std": point["random_std"],
                        "high-random": point["high"] - point["random"],
                        "high-low": point["high"] - point["low"],
                    }
                )
    table = pd.DataFrame(rows)
    summary = dict(timings)
    for (label, metric), part in table.groupby(["model", "metric"], sort=False):
        beats_random = int((part["high-random"] > part["random_std"]).sum())
        beats_low = int((part["high-low"] > 0).sum())
        summary[f"{label}/{metric}"] = f"high > random+std at {beats_random}/{len(part)} counts, high > low at {beats_low}/{len(part)}"
    purity = pd.read_csv(OUT / "purity.csv")
    notes = [
        f"purity (off-diagonal avg |cos|): {', '.join(f'{r.label}/{r.projection} {r.avg_abs_cos:.4f}' for r in purity.itertuples())}",
        f"tables and plots: {OUT.relative_to(C.REPO_ROOT)}/",
    ]
    C.save_results("purity_cifar10", info, {"checkpoints": checkpoints, "root": args.root}, table.to_dict("records"), summary, notes)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
