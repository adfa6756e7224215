"""Faithfulness of every explanation method on a clipbench ViT trained on CIFAR-10 (issue 12's real check).

Runs ``evaluate.py task=explain_eval`` on ``--num-images`` test images and saves its full table (every
method and the random-map baseline) with the verdict: Grad-ECLIP's deletion AUC below the random map's and
its insertion AUC above it. The run's own tables and curve plot go to ``benchmarks/results/<name>/``; the
checkpoint's epoch, step and size are recorded so that a result can be traced to its model.

    python benchmarks/explain_faithfulness.py [--device cpu|cuda] [--ckpt outputs/ckpts/cifar10_vit_cpu/checkpoints/last.ckpt]
        [--root ../shared/data/cifar10] [--num-images 500] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pandas as pd
from _common import REPO_ROOT, RESULTS_DIR, add_device_arg, describe_device, resolve_device, save_results

COLUMNS = [
    "method",
    "images",
    "deletion_auc",
    "deletion_sem",
    "deletion_beats_random",
    "insertion_auc",
    "insertion_sem",
    "insertion_beats_random",
    "ms_per_image",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(parser)
    parser.add_argument("--ckpt", default=str(REPO_ROOT / "outputs/ckpts/cifar10_vit_cpu/checkpoints/last.ckpt"))
    parser.add_argument("--root", default=str(REPO_ROOT.parent / "shared/data/cifar10"))
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--name", default="cifar10_vit", help="label of the result files")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of evaluate.py")
    args = parser.parse_args()
    device = resolve_device(args.device)
    info = describe_device(device)

    import torch

    from clipbench.evaluation import evaluate
    from clipbench.runs import compose_config

    checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    trained = {
        "ckpt_epoch": checkpoint.get("epoch"),
        "ckpt_global_step": checkpoint.get("global_step"),
        "ckpt_bytes": Path(args.ckpt).stat().st_size,
    }
    del checkpoint
    run = RESULTS_DIR / f"explain_faithfulness_{args.name}"
    shutil.rmtree(run, ignore_errors=True)  # a stale table from another checkpoint must not survive
    overrides = [
        f"ckpt_path={args.ckpt}",
        "data=cifar10",
        f"data.root={args.root}",
        "task=explain_eval",
        f"task.num_images={args.num_images}",
        f"task.device={device}",
        *args.overrides,
    ]
    print(f"run directory (tables refreshed after every batch): {run}", flush=True)
    started = time.perf_counter()
    metrics = evaluate(compose_config("evaluate", overrides, run, REPO_ROOT / "outputs" / "cache"))
    wall = time.perf_counter() - started
    table = pd.read_csv(run / "faithfulness.csv")
    rows = table[COLUMNS].to_dict("records")
    ours, random = (table.set_index("method").loc[name] for name in ("grad_eclip", "random"))
    passed = ours.deletion_auc < random.deletion_auc and ours.insertion_auc > random.insertion_auc
    summary = {
        "images": int(ours.images),
        "zeroshot_acc1": metrics["test/acc1"],
        "grad_eclip_deletion_auc": ours.deletion_auc,
        "random_deletion_auc": random.deletion_auc,
        "grad_eclip_insertion_auc": ours.insertion_auc,
        "random_insertion_auc": random.insertion_auc,
        "wall_s": wall,
        "verdict": "PASS" if passed else "FAIL",
    }
    notes = [
        f"Checkpoint {args.ckpt}: {trained['ckpt_epoch'] + 1} epochs trained ({trained['ckpt_global_step']} steps), "
        f"{trained['ckpt_bytes']:,} bytes; zeroshot_acc1 is its accuracy on the explained images.",
        "Target (issue 12): Grad-ECLIP's deletion AUC lower and insertion AUC higher than the random map's.",
        "Score: zero-shot probability of the true class; deletion fills with a blurred copy, insertion starts from it "
        "(task.deletion / task.insertion, sigma task.blur_sigma). Lower deletion, higher insertion = more faithful.",
        f"*_beats_random: share of images on which the method's AUC beats the random map's. Run directory: "
        f"{run.relative_to(REPO_ROOT)} (faithfulness.csv, per_image_auc.csv, curves.csv, faithfulness.png).",
    ]
    params = {"ckpt": args.ckpt, **trained, "num_images": args.num_images, "overrides": overrides}
    save_results(f"explain_faithfulness_{args.name}", info, params, rows, summary, notes, columns=COLUMNS)


if __name__ == "__main__":
    main()
