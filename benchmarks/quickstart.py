"""The quickstart, end to end: ``python train.py experiment=quickstart`` in a fresh process.

Wall clock counts everything a user waits for (interpreter and import start-up, data, the epochs of
training (all the experiment's epochs) with zero-shot validation, the test, writing results). Accuracy is the run's own
``metrics.json`` (``test/acc1``, zero-shot on the held-out digits).

Side by side with the seed-style reference setting on the same model: batch size 32, AdamW lr 1e-4,
weight decay 0.01 (what the seed repository trained with), everything else equal.

Targets (issue): quickstart test/acc1 >= 0.95 and wall < 120 s (on this 2-core CPU).

    python benchmarks/quickstart.py [--device cpu|cuda] [--repeats 1] [--skip-reference] [-- extra overrides]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common as C

TARGET_ACC = 0.95
TARGET_WALL_S = 120.0
SETTINGS = {
    "quickstart": [],
    "seed-reference": ["data.batch_size=32", "model.lr=1e-4", "model.weight_decay=0.01"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (alternating); medians reported")
    parser.add_argument("--skip-reference", action="store_true", help="only the quickstart itself")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is abandoned")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both settings")
    args = parser.parse_args()
    device = C.resolve_device(args.device)
    info = C.describe_device(device)

    base = ["experiment=quickstart", *(["trainer.accelerator=gpu"] if device == "cuda" else []), *args.overrides]
    settings = {k: v for k, v in SETTINGS.items() if not (args.skip_reference and k != "quickstart")}
    tmp = Path(tempfile.mkdtemp(prefix="bench-quickstart-"))
    rows = []
    for rep in range(args.repeats):
        names = list(settings) if rep % 2 == 0 else list(settings)[::-1]
        for name in names:
            run_dir = tmp / f"{name}-{rep}"
            print(f"running {name} (repeat {rep}) -> {run_dir}", flush=True)
            res = C.run_train_subprocess([*base, *settings[name]], run_dir, tmp / f"{name}-{rep}.log", timeout=args.timeout)
            m = res["metrics"]
            row = {
                "setting": name,
                "repeat": rep,
                "rc": res["rc"],
                "wall_s": res["wall_s"],
                "train_time_s": m.get("train_time_s"),
                "test/acc1": m.get("test/acc1"),
                "test/acc5": m.get("test/acc5"),
                "epochs": m.get("epochs"),
                "steps": m.get("steps"),
                "overrides": " ".join(settings[name]),
            }
            rows.append(row)
            print(f"  rc={res['rc']} wall={res['wall_s']:.1f}s acc1={row['test/acc1']} train_time={row['train_time_s']}")
            if res["rc"] != 0 or not m:
                print(C.tail(res["log"]))

    def med(setting: str, key: str):
        vals = [r[key] for r in rows if r["setting"] == setting and r[key] is not None]
        return C.median(vals) if vals else None

    q_acc, q_wall = med("quickstart", "test/acc1"), med("quickstart", "wall_s")
    summary = {
        "quickstart_acc1": q_acc,
        "quickstart_wall_s": q_wall,
        "quickstart_train_time_s": med("quickstart", "train_time_s"),
        "acc_target": TARGET_ACC,
        "wall_target_s": TARGET_WALL_S,
        "verdict": "PASS" if (q_acc is not None and q_acc >= TARGET_ACC and q_wall < TARGET_WALL_S) else "FAIL",
    }
    if "seed-reference" in settings:
        r_acc, r_wall = med("seed-reference", "test/acc1"), med("seed-reference", "wall_s")
        summary.update(
            {
                "reference_acc1": r_acc,
                "reference_wall_s": r_wall,
                "reference_train_time_s": med("seed-reference", "train_time_s"),
                "acc_ratio_quickstart_over_reference": (q_acc / r_acc) if q_acc and r_acc else None,
                "wall_ratio_reference_over_quickstart": (r_wall / q_wall) if q_wall and r_wall else None,
            }
        )
    params = {"base_overrides": base, "settings": settings, "repeats": args.repeats, "tmp_dir": str(tmp)}
    notes = [
        "wall_s: fresh `python train.py` process, start-up and test included; train_time_s: Trainer.fit only (from metrics.json)",
        f"targets: test/acc1 >= {TARGET_ACC} and wall < {TARGET_WALL_S:.0f} s: {summary['verdict']}",
        "seed-reference: same model and epochs, data.batch_size=32 model.lr=1e-4 model.weight_decay=0.01",
    ]
    C.save_results(
        "quickstart",
        info,
        params,
        rows,
        summary,
        notes,
        columns=["setting", "repeat", "rc", "wall_s", "train_time_s", "test/acc1", "test/acc5", "steps", "overrides"],
    )


if __name__ == "__main__":
    main()
