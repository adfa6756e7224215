"""A 7-point neuron-pruning sweep over 10,000 cached CIFAR-10 image embeddings of width 512.

Setup (not timed): a clipbench checkpoint with a 512-wide embedding (the quickstart recipe with small
towers, trained for one step: the numbers here are timings, not accuracies), and its image
embeddings of the CIFAR-10 test split (``--root``; without it, 10,000 synthetic images) encoded once
into the embedding cache by the zero-shot task.

* clipbench: ``python evaluate.py -m task=prune task.neurons=<7 counts, 25%..100% of the width>`` in a
  fresh process, wall clock from launch to exit: Python and library start-up, Hydra, every job (the
  first one loads the model once for its class embeddings and neuron scores, which are then cached),
  and the sweep summaries written after every job. Each point scores full, high, low and 5 random
  selections (acc@1 and silhouette). Beside it, the same counts as one job (``task.neurons=[...]``),
  which composes the config, imports and draws the plots once.
* reference: ``run_eval_sam_sweep.py``'s computation per point on the same cached embeddings, in
  this process (no start-up): numpy masks of the normalised embeddings for full, min- and
  max-overlap neurons, argmax accuracy, and scikit-learn's ``silhouette_score(metric="cosine")`` on
  all samples. The reference also re-encodes every image at every point; that cost (one encoding of
  the split, timed in the setup) is reported beside it.

Target (issue): the clipbench sweep in under 30 s on 2 CPU cores, start-up included.

    python benchmarks/prune_sweep.py [--device cpu|cuda] [--root ../shared/data/cifar10] [--width 512] [--reference-points 7]
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import _common as C

TARGET_S = 30.0
DEFAULT_ROOT = C.REPO_ROOT.parent / "shared" / "data" / "cifar10"
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def _train_checkpoint(width: int, device: str, tmp: Path) -> Path:
    from clipbench.training import train

    small = ["model.backbone.text_width=64", "model.backbone.text_layers=1", "model.backbone.image_tower.widths=[16,32,64]"]
    quick = ["trainer.max_epochs=1", "+trainer.limit_train_batches=1", "logger=none", "test_ckpt=last", "~callbacks.prediction_grid"]
    accelerator = "trainer.accelerator=gpu" if device == "cuda" else "trainer.accelerator=cpu"
    train(C.compose_train(["experiment=quickstart", f"model.backbone.embed_dim={width}", *small, *quick, accelerator], tmp / "train"))
    return tmp / "train" / "run" / "checkpoints" / "last.ckpt"


def _timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall clock and CPU seconds (user + system, all threads) of a command in a fresh process."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[1:])} failed:\n{proc.stderr[-3000:]}")
    return wall, (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)


def _log_times(path: Path) -> list[datetime]:
    stamps = [LOG_TIME.match(line) for line in path.read_text().splitlines()]
    return [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in stamps if m]


def _reference_sweep(features, labels, classifier, image_proj, text_proj, counts) -> float:
    """Seconds for run_eval_sam_sweep.py's per-point computation, on cached embeddings."""
    import numpy as np
    import torch
    from sklearn.metrics import silhouette_score

    feats = features.numpy() / np.linalg.norm(features.numpy(), axis=1, keepdims=True)
    text = classifier.numpy()
    y = labels.numpy()
    started = time.perf_counter()
    for sam in counts:
        image_v = torch.nn.functional.normalize(image_proj.T, dim=1)
        text_v = torch.nn.functional.normalize(text_proj.T, dim=1)
        image_vvt, text_vvt = image_v @ image_v.T, text_v @ text_v.T
        image_vvt -= torch.diag(torch.diag(image_vvt))
        text_vvt -= torch.diag(torch.diag(text_vvt))
        total = image_vvt.abs().sum(1) + text_vvt.abs().sum(1)
        selections = [
            np.arange(feats.shape[1]),
            torch.topk(total, sam, largest=False).indices.numpy(),
            torch.topk(total, sam).indices.numpy(),
        ]
        for kept in selections:
            masked = np.zeros_like(feats)
            masked[:, kept] = feats[:, kept]
            _ = np.mean(np.argmax(100.0 * masked @ text.T, axis=1) == y)
            silhouette_score(masked, y, metric="cosine")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 class-folder tree (uses <root>/test)")
    parser.add_argument("--width", type=int, default=512, help="embedding width of the benchmark model")
    parser.add_argument("--reference-points", type=int, default=7, help="sweep points the reference computes (scikit-learn is slow)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is in the results)")
    args = parser.parse_args()
    import pandas as pd
    import torch
    from hydra.utils import instantiate

    from clipbench.data.templates import resolve_templates
    from clipbench.evaluation import evaluate
    from clipbench.runs import compose_config
    from clipbench.zeroshot import class_embeddings

    device = C.resolve_device(args.device)
    info = C.describe_device(device)

    tmp = Path(tempfile.mkdtemp(prefix="prune_sweep_"))
    data = (
        ["data=cifar10", f"data.root={args.root}"]
        if (Path(args.root) / "test").is_dir()
        else ["data=synthetic", "data.synthetic_samples=10000"]
    )
    counts = [round(args.width * f) for f in (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)]
    trainer = ["trainer=gpu"] if device == "cuda" else ["trainer.accelerator=cpu"]  # gpu: bf16, as zero-shot runs there

    # --- setup: a width-512 checkpoint and its cached image embeddings (the zero-shot task encodes them once)
    ckpt = _train_checkpoint(args.width, device, tmp)
    setup_cfg = compose_config("evaluate", [f"ckpt_path={ckpt}", *data, *trainer], tmp / "setup", tmp / "cache")
    started = time.perf_counter()
    evaluate(setup_cfg)
    encode_s = time.perf_counter() - started
    embeddings = next((tmp / "cache" / "embeddings").glob("*.pt"))

    # --- clipbench: the sweep as a user runs it, in a fresh process
    sweep = tmp / "sweep"
    overrides = [f"ckpt_path={ckpt}", *data, *trainer, f"task.neurons={','.join(map(str, counts))}"]
    cmd = [
        sys.executable,
        str(C.REPO_ROOT / "evaluate.py"),
        "-m",
        "task=prune",
        *overrides,
        f"paths.cache_dir={tmp / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    ]
    launched = datetime.now()
    wall, cpu = _timed(cmd, tmp)
    jobs = [_log_times(sweep / str(i) / "evaluate.log") for i in range(len(counts))]
    startup = (jobs[0][0] - launched).total_seconds()
    job_seconds = [(times[-1] - times[0]).total_seconds() for times in jobs]
    summaries = wall - startup - sum(job_seconds)  # between jobs: sweep summaries and plots, Hydra's job set-up, exit

    # --- clipbench, the same counts as one job (task.neurons as a list): one composition, one summary
    one_job = [
        sys.executable,
        str(C.REPO_ROOT / "evaluate.py"),
        "task=prune",
        *overrides[:-1],
        f"task.neurons=[{','.join(map(str, counts))}]",
    ]
    one_wall, one_cpu = _timed([*one_job, f"paths.cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / 'one_job'}"], tmp)

    # --- reference: its per-point computation on the same embeddings, in this process
    cached = torch.load(embeddings, weights_only=True)
    backbone = instantiate(setup_cfg.model.backbone)
    names = pd.read_csv(tmp / "setup" / f"{setup_cfg.data.name}_per_class.csv")["class"].tolist()
    classifier = class_embeddings(backbone, names, resolve_templates("dataset", dataset=setup_cfg.data.name), torch.device("cpu")).cpu()
    ref_counts = counts[: args.reference_points]
    ref_s = _reference_sweep(
        cached["features"],
        cached["labels"],
        classifier,
        backbone.projection_matrix("image").detach(),
        backbone.projection_matrix("text").detach(),
        ref_counts,
    )
    ref_per_point = ref_s / len(ref_counts)

    accuracy = pd.read_csv(sweep / f"{setup_cfg.data.name}_clipbench_accuracy_vs_neurons.csv")
    rows = [
        {
            "side": "clipbench sweep (fresh process)",
            "points": len(counts),
            "selections_per_point": 8,
            "wall_s": wall,
            "cpu_s": cpu,
            "startup_s": startup,
            "jobs_s": sum(job_seconds),
            "between_jobs_s": summaries,
            "per_point_s": sum(job_seconds) / len(counts),
        },
        {
            "side": "clipbench, the 7 counts as one job (fresh process)",
            "points": len(counts),
            "selections_per_point": 8,
            "wall_s": one_wall,
            "cpu_s": one_cpu,
        },
        {
            "side": "reference computation (in process, cached embeddings)",
            "points": len(ref_counts),
            "selections_per_point": 3,
            "wall_s": ref_s,
            "per_point_s": ref_per_point,
            "startup_s": 0.0,
        },
        {
            "side": "reference incl. re-encoding each point",
            "points": len(counts),
            "selections_per_point": 3,
            "wall_s": len(counts) * (ref_per_point + encode_s),
            "per_point_s": ref_per_point + encode_s,
        },
    ]
    summary = {
        "target_s": TARGET_S,
        "clipbench_wall_s": round(wall, 2),
        "one_job_wall_s": round(one_wall, 2),
        "verdict": "PASS" if wall < TARGET_S else "FAIL",
        "reference_7_points_s (cached embeddings)": round(7 * ref_per_point, 2),
        "ratio reference/clipbench": round(7 * ref_per_point / wall, 2),
        "samples": len(cached["labels"]),
        "width": args.width,
        "encode_split_s (setup)": round(encode_s, 2),
    }
    notes = [
        f"load average at start {info['load_avg_at_start']} (2 cores shared with other jobs: wall clock stretches, CPU seconds less so)",
        f"data: {' '.join(data)}; counts {counts}; job seconds {[round(s, 2) for s in job_seconds]}",
        f"full-width acc@1 {accuracy['full'].iloc[0]:.4f} (an untrained model: timings only)",
        "between_jobs_s: Hydra's per-job set-up and the sweep summary (summary.csv, summary.png and the two pruning curves) refreshed after every job",
        "the one-job run comes after the sweep: it finds the class embeddings and neuron scores cached too and loads no model",
        "cpu_s: user + system CPU seconds of the sweep process (all threads); on a busy machine wall_s overstates what a quiet one takes",
    ]
    C.save_results("prune_sweep", info, {"counts": counts, "data": data, "tmp_dir": str(tmp) if args.keep else None}, rows, summary, notes)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
