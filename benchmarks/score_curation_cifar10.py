"""The real run: does the CLIP score of a trained model find the captions that do not match?

Pairs: every CIFAR-10 test image (10,000), captioned "a photo of a <class>." with its own class, except a
``--wrong`` fraction of them (drawn with ``--seed``) whose caption names another class, drawn uniformly.
Scored by ``evaluate.py task=score`` with a clipbench checkpoint (default: the lead's ``clip_fast`` CIFAR-10
run), curated with ``task.keep_top_fraction`` = the share of true captions. Reported: how well the cosine
separates true from wrong captions (ROC AUC, scikit-learn), the precision of the kept set against the base
rate (what a random filter would keep) and the recall of the true pairs. The run directory's figures,
summary, curation and time/memory report go to ``results/score_curation_cifar10/``.

    python benchmarks/score_curation_cifar10.py [--ckpt outputs/ckpts/cifar10_fast_cpu/checkpoints/last.ckpt] [--wrong 0.3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import _common as C
from _pairs import CIFAR10, run_score

OUT = C.RESULTS_DIR / "score_curation_cifar10"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--ckpt", default=str(C.REPO_ROOT / "outputs/ckpts/cifar10_fast_cpu/checkpoints/last.ckpt"))
    parser.add_argument("--wrong", type=float, default=0.3, help="fraction of pairs whose caption names another class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    device = C.resolve_device(args.device)
    info = C.describe_device(device)
    files = sorted((CIFAR10 / "test").glob("*/*.jpg"))
    classes = sorted({f.parent.name for f in files})
    truth = np.array([classes.index(f.parent.name) for f in files])
    rng = np.random.default_rng(args.seed)
    wrong = rng.random(len(files)) < args.wrong
    captioned = np.where(wrong, (truth + rng.integers(1, len(classes), len(files))) % len(classes), truth)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = pd.DataFrame(
            {
                "id": [f"{f.parent.name}/{f.stem}" for f in files],
                "image": [str(f) for f in files],
                "caption": [f"a photo of a {classes[c]}." for c in captioned],
            }
        )
        pairs.to_csv(tmp / "pairs.csv", index=False)
        keep = float(1 - wrong.mean())
        overrides = [
            f"ckpt_path={args.ckpt}",
            f"task.input={tmp / 'pairs.csv'}",
            f"task.keep_top_fraction={keep}",
            f"data.num_workers={args.num_workers}",
            *(["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"] if device == "cuda" else ["trainer.accelerator=cpu"]),
        ]
        metrics, report, wall = run_score(overrides, tmp / "run")
        scores = pd.read_parquet(tmp / "run" / "scores.parquet")
        kept = set(pd.read_csv(tmp / "run" / "kept.csv").id)
        OUT.mkdir(parents=True, exist_ok=True)
        for name in ("score_histogram.png", "extremes.png", "summary.json", "curation.json", "report.md"):
            shutil.copy(tmp / "run" / name, OUT / name)
    assert list(scores.id) == list(pairs.id), "every pair of CIFAR-10's test set is expected to score"
    true_pair = ~wrong
    kept_mask = pairs.id.isin(kept).to_numpy()
    rows = [
        {
            "filter": f"CLIP score, best {keep:.0%} kept",
            "kept": int(kept_mask.sum()),
            "precision": float(true_pair[kept_mask].mean()),
            "recall": float(kept_mask[true_pair].mean()),
        },
        {"filter": "random (base rate)", "kept": int(kept_mask.sum()), "precision": keep, "recall": keep},
    ]
    summary = {
        "roc_auc_cosine_true_vs_wrong": float(roc_auc_score(true_pair, scores.cosine)),
        "mean_cosine_true": float(scores.cosine[true_pair].mean()),
        "mean_cosine_wrong": float(scores.cosine[wrong].mean()),
        "kept_threshold_clip_score": metrics["curation/threshold"],
        "pairs_per_s": report["pairs_per_s"],
        "wall_s": wall,
    }
    notes = [
        f"checkpoint {args.ckpt}; {len(files)} CIFAR-10 test JPEGs; {wrong.mean():.1%} captions name another class (seed {args.seed})",
        "precision: share of true captions among the kept pairs; recall: share of the true pairs kept",
        f"figures and the run's summary, curation and time/memory report: {OUT.relative_to(C.REPO_ROOT)}/",
    ]
    C.save_results("score_curation_cifar10", info, vars(args), rows, summary, notes)


if __name__ == "__main__":
    main()
