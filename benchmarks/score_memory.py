"""Peak host memory of ``evaluate.py task=score`` does not grow with the input (it streams).

Scores ``--small`` and then ``--large`` rows (10,000 and 100,000 by default: CIFAR-10 test JPEGs
cycled, a tiny random Hugging Face CLIP) in fresh processes, and samples the memory of the whole
process tree from outside, over the whole run (start-up, scoring, merge, summary): the main process's
resident set plus each DataLoader worker's private pages, so what the workers share with it after the
fork counts once (``clipbench.scoring.report.tree_memory``). Also
reports the peak the run measures itself over its predict loop (``report.json``). Target (issue):
the large run's peak within 10% of the small run's.

On a CPU the model's activations live in host memory too, and glibc does not hand every freed block
back at once, so the main process's resident set swings from batch to batch whatever the input size
(the scoring loop bounds that, see ``clipbench.scoring.report.release_freed_memory``), and the peak of
a run is a maximum over the swing. The default batch of 128 scores as fast as 512 on 2 cores and swings
less, which leaves the comparison to what it is about: whether anything grows with the input.

    python benchmarks/score_memory.py [--small 10000] [--large 100000] [--num-workers 2] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
from _pairs import pairs_csv, save_random_hf_clip

TARGET = 1.10


def measure(rows: int, model_dir: str, workers: int, batch_size: int, tmp: Path) -> dict:
    import psutil

    from clipbench.scoring.report import MemorySampler

    csv = pairs_csv(tmp / f"pairs_{rows}.csv", rows)
    out = tmp / f"run_{rows}"
    command = [
        sys.executable,
        str(C.REPO_ROOT / "evaluate.py"),
        "task=score",
        "model=hf_clip",
        f"model.backbone.name_or_path={model_dir}",
        f"task.input={csv}",
        f"data.num_workers={workers}",
        f"data.eval_batch_size={batch_size}",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={out}",
    ]
    started = time.perf_counter()
    with open(tmp / f"log_{rows}.txt", "w") as log:
        # One torch thread in the main process: no OpenMP spinning against the workers on 2 cores.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        sampler = MemorySampler(interval=0.2, process=psutil.Process(proc.pid)).start()
        proc.wait()
        peak = sampler.stop()
    if proc.returncode:
        raise SystemExit(f"scoring {rows} rows failed:\n{C.tail(tmp / f'log_{rows}.txt', 40)}")
    report = json.loads((out / "report.json").read_text())
    return {
        "rows": rows,
        "peak_mb_whole_run": peak / 2**20,
        "peak_mb_predict_loop": report["peak_ram_mb_per_rank"],
        "pairs_per_s": report["pairs_per_s"],
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="pairs per forward (see the module docstring)")
    args = parser.parse_args()
    info = C.describe_device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_random_hf_clip(tmp / "model", image_size=32, patch_size=8, width=64, layers=2, text_width=64, text_layers=2)
        rows = [measure(n, model_dir, args.num_workers, args.batch_size, tmp) for n in (args.small, args.large)]
    ratio = rows[1]["peak_mb_whole_run"] / rows[0]["peak_mb_whole_run"]
    summary = {"peak_ratio_large_over_small": ratio, "target": f"<= {TARGET:g}", "verdict": "PASS" if ratio <= TARGET else "FAIL"}
    notes = [
        "peak memory of the process tree (main RSS + workers' USS) sampled every 0.2 s from outside",
        f"model: tiny random HF CLIP (32 px); {args.batch_size} pairs per forward, {args.num_workers} DataLoader workers",
    ]
    C.save_results("score_memory", info, vars(args), rows, summary, notes)


if __name__ == "__main__":
    main()
