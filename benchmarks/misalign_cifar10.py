"""The real run of the misalignment study: projection-only fine-tuning of a clipbench CIFAR-10 checkpoint
on image-caption pairs misaligned at rate Cs, and the purity of its projections against Cs.

1. An image-caption CSV of CIFAR-10 training images (``--per-class`` per class), each captioned by
   :func:`clipbench.misalign.synthetic.folder_caption`: one of 8 phrasings, one of 3-4 names of the
   class, and, each with probability 0.7, a size, a colour and a setting drawn per image ("a photo of
   a small red lorry on a street", "jet above the clouds, photographed from afar"), so that TF-IDF
   neighbours are not simply "the other captions of the class".
2. ``python evaluate.py task=misalign`` at Cs=0.3 in both modes, for the report of what a shuffle
   does to these captions (TF-IDF cosine of the swapped pairs against random pairs).
3. ``python train.py -m experiment=misalign model.backbone.path=<ckpt> data.cs=<rates>
   data.misalign.mode=<modes> data@eval_data=cifar10``: per job, the shuffle made on the fly,
   ``--epochs`` of projection-only fine-tuning (the experiment's recipe otherwise: AdamW lr 1e-3,
   weight decay 0.5, one warmup epoch then cosine, batch 256), zero-shot accuracy on the CIFAR-10 test
   split with the training templates.

Written to ``benchmarks/results/misalign_cifar10/``: ``misalign_summary.csv`` and
``avg_abs_cos_sim_vs_cs.png`` (the sweep's own), the sweep's ``summary.csv``, the two shuffle reports,
a sample of the captions; and ``misalign_cifar10_<device>.json/.md`` with the table, the source
checkpoint's purity, and whether mean |cos| rises with Cs (Spearman's rank correlation per series).

    python benchmarks/misalign_cifar10.py [--ckpt outputs/ckpts/cifar10_fast_cpu/checkpoints/last.ckpt] \\
        [--per-class 500] [--epochs 3] [--cs 0,0.1,0.3,0.5,0.8] [--modes similarity,random] [--device cpu|cuda]
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
DEFAULT_CKPT = C.REPO_ROOT / "outputs" / "ckpts" / "cifar10_fast_cpu" / "checkpoints" / "last.ckpt"
OUT = C.RESULTS_DIR / "misalign_cifar10"
METRICS = ["purity/image/avg_abs_cos", "purity/text/avg_abs_cos", "purity/image/max_abs_cos", "purity/text/max_abs_cos", "test/acc1"]


def _run(script: str, args: list[str], cwd: Path, log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, str(C.REPO_ROOT / script), *args], cwd=cwd, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed (log: {log}):\n{C.tail(log, 40)}")
    return time.perf_counter() - started


def source_purity(ckpt: Path) -> dict[str, float]:
    """The purity of the checkpoint's own projections, before any fine-tuning."""
    from clipbench.models.checkpoint import load_clipbench
    from clipbench.purity import purity_metrics

    backbone = load_clipbench(ckpt)
    return {
        f"purity/{tower}/{name}": float(value)
        for tower in ("image", "text")
        for name, value in purity_metrics(backbone.projection_matrix(tower).detach()).items()
        if name in ("avg_abs_cos", "max_abs_cos")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="a train.py checkpoint (the source model)")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 class-folder tree")
    parser.add_argument("--per-class", type=int, default=500, help="training images per class in the pairs CSV")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cs", default="0,0.1,0.3,0.5,0.8")
    parser.add_argument("--modes", default="similarity,random")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the pairs")
    parser.add_argument("--cache-dir", default=str(C.REPO_ROOT / "outputs" / "cache"), help="decode cache shared with other runs")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    from scipy.stats import spearmanr

    from clipbench.misalign.synthetic import folder_caption_table

    device = C.resolve_device(args.device)
    info = C.describe_device(device)
    ckpt, root = Path(args.ckpt).resolve(), Path(args.root).resolve()
    if not ckpt.is_file():
        raise SystemExit(f"--ckpt {ckpt}: no such checkpoint")
    work = Path(tempfile.mkdtemp(prefix="misalign_cifar10_"))
    OUT.mkdir(parents=True, exist_ok=True)

    table = folder_caption_table(root / "train", per_class=args.per_class, seed=0)
    pairs = work / "pairs.csv"
    table.to_csv(pairs, index=False)
    table.sample(30, random_state=0).sort_values("id").to_csv(OUT / "captions_sample.csv", index=False)
    print(f"{len(table)} pairs, {table['caption'].nunique()} distinct captions -> {pairs}", flush=True)

    timings = {}
    common = [f"paths.cache_dir={args.cache_dir}", f"data.image_root={root / 'train'}"]
    for mode in args.modes.split(","):
        run_dir = work / f"shuffle_{mode}"
        task = ["task=misalign", f"task.input={pairs}", "task.cs=0.3", f"task.mode={mode}", f"hydra.run.dir={run_dir}"]
        timings[f"shuffle_{mode}_s"] = round(_run("evaluate.py", [*task, *common], work, work / f"shuffle_{mode}.log"), 1)
        shutil.copy(run_dir / "misalign_report.json", OUT / f"misalign_report_{mode}_cs0.3.json")

    sweep = work / "sweep"
    overrides = [
        "-m",
        "experiment=misalign",
        f"model.backbone.path={ckpt}",
        f"data.input={pairs}",
        f"data.cs={args.cs}",
        f"data.misalign.mode={args.modes}",
        f"data.num_workers={args.workers}",
        "data@eval_data=cifar10",
        f"eval_data.root={root}",
        "eval_data.val_fraction=0.02",  # 1,000 held-out training images: a cheap per-epoch monitor; the test split is the result
        f"trainer.max_epochs={args.epochs}",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.sweep.dir={sweep}",
        *common,
    ]
    timings["sweep_s"] = round(_run("train.py", overrides, work, work / "sweep.log"), 1)
    for name in ("misalign_summary.csv", "avg_abs_cos_sim_vs_cs.png", "summary.csv"):
        shutil.copy(sweep / name, OUT / name)

    summary_table = pd.read_csv(sweep / "misalign_summary.csv")
    rows = [{"mode": "source (not fine-tuned)", "Cs": None, **source_purity(ckpt)}]
    rows += [{k: row[k] for k in ["mode", "Cs", *METRICS] if k in row} for _, row in summary_table.iterrows()]
    verdicts = {}
    for mode, series in summary_table.groupby("mode"):
        for tower in ("image", "text"):
            rho = spearmanr(series["Cs"], series[f"purity/{tower}/avg_abs_cos"]).statistic
            verdicts[f"{mode}/{tower}/spearman_cs_vs_avg_abs_cos"] = float(np.round(rho, 3))
    summary = {**verdicts, **timings, "pairs": len(table), "epochs": args.epochs}
    notes = [
        f"source: {ckpt.relative_to(C.REPO_ROOT) if ckpt.is_relative_to(C.REPO_ROOT) else ckpt}; {len(table)} CIFAR-10 training images"
        f" ({args.per_class} per class) with synthetic captions (clipbench.misalign.synthetic.folder_caption, seed 0).",
        f"experiment=misalign (projection-only, AdamW lr 1e-3, wd 0.5, 1 warmup epoch, cosine, batch 256), {args.epochs} epochs per job;"
        " test/acc1: zero-shot on the 10,000 CIFAR-10 test images with the five training templates.",
        "The study's claim: purity falls (mean |cos| rises) as Cs grows. spearman_* > 0: this run's mean |cos| rises with Cs.",
    ]
    C.save_results("misalign_cifar10", info, vars(args), rows, summary, notes, columns=["mode", "Cs", *METRICS])


if __name__ == "__main__":
    main()
