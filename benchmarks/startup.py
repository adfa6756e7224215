"""Start-up cost of the entry points: import times in fresh processes, the heavy libraries an import
leaves in ``sys.modules`` (and who imported them), and the wall clock minus training time of a tiny run.

* **imports**: ``import <module>`` timed inside a fresh ``python -c`` (interpreter start excluded),
  ``--repeats`` times, median; ``torch`` and ``lightning`` alone are the floor every entry point pays.
* **heavy libraries**: for ``clipbench.training``, ``clipbench.evaluation`` and the tiny run, each of :data:`HEAVY`
  found in ``sys.modules``, with its import time and the chain of packages that pulled it in (from
  ``python -X importtime``): a chain that starts in a third-party package is not clipbench's to make lazy.
* **tiny run**: ``python train.py experiment=quickstart trainer.max_epochs=1 logger=none
  ++trainer.limit_train_batches=2`` in a fresh process: wall clock, the run's ``train_time_s`` (``Trainer.fit``),
  the difference (start-up and tear-down: imports, config, data and model set-up, test, checkpoints,
  figures), and the part of it spent importing (``PYTHONPROFILEIMPORTTIME``: the sum of top-level imports).

    python benchmarks/startup.py [--device cpu|cuda] [--repeats 3] [--experiment quickstart] [hydra overrides of the tiny run...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C

MODULES = ("torch", "lightning", "clipbench.sweeps", "clipbench.training", "clipbench.evaluation", "clipbench.tasks.zeroshot")
ATTRIBUTED = ("clipbench.training", "clipbench.evaluation")  # entry modules of train.py and evaluate.py
HEAVY = ("transformers", "wandb", "matplotlib", "pandas", "sklearn", "scipy", "open_clip", "timm", "torchvision", "pyarrow")
IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)")


def timed_import(module: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Seconds to import ``module`` in a fresh interpreter, the heavy libraries loaded after it, and the process's stderr."""
    code = (
        "import json, sys, time\n"
        f"t = time.perf_counter(); import {module}; seconds = time.perf_counter() - t\n"
        f"print(json.dumps({{'seconds': seconds, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=C.REPO_ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise RuntimeError(f"import {module} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def import_tree(importtime: str) -> list[tuple[float, int, str]]:
    """``-X importtime`` lines as (cumulative seconds, depth, module), in the order Python prints them (children first)."""
    rows = []
    for line in importtime.splitlines():
        match = IMPORT_LINE.match(line)
        if match:
            rows.append((int(match.group(1)) / 1e6, len(match.group(2)) // 2, match.group(3)))
    return rows


def imported_by(tree: list[tuple[float, int, str]], lib: str) -> tuple[float, str]:
    """The seconds spent importing ``lib`` (the summed cumulative times of its modules imported from
    outside it), and the packages that pulled in the costliest of those, innermost first, down to the first
    clipbench module (``torchmetrics <- lightning <- clipbench.runs``)."""

    def package(module: str) -> str:
        return module if module.startswith("clipbench") else module.split(".")[0]

    def parents(i: int):
        depth = tree[i][1]
        for _, parent_depth, parent in tree[i + 1 :]:  # a parent is printed after its children, one level up
            if parent_depth < depth:
                depth = parent_depth
                yield parent

    entries = [i for i, (_, _, module) in enumerate(tree) if package(module) == lib and package(next(parents(i), "")) != lib]
    if not entries:
        return 0.0, "(not imported)"
    chain: list[str] = []
    for parent in parents(max(entries, key=lambda i: tree[i][0])):
        if not chain or chain[-1] != package(parent):
            chain.append(package(parent))
        if parent.startswith("clipbench"):
            break
    # -X importtime does not see importlib.import_module (Hydra's _target_, the task registry): what such a
    # module imports shows up at the top level, with no parent.
    return sum(tree[i][0] for i in entries), " <- ".join(chain) or "(a module loaded by importlib, e.g. a Hydra _target_)"


def help_wall(entry: str) -> float:
    import time

    started = time.perf_counter()
    subprocess.run([sys.executable, entry, "--help"], cwd=C.REPO_ROOT, capture_output=True, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (median)")
    parser.add_argument("--experiment", default="quickstart", help="experiment of the tiny run")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of the tiny run")
    args = parser.parse_args()
    device = C.resolve_device(args.device)
    info = C.describe_device(device)
    rows: list[dict] = []

    def add(what: str, values: list[float], detail: str = "") -> float:
        rows.append({"what": what, "seconds": C.median(values), "min_s": min(values), "max_s": max(values), "detail": detail})
        print(f"  {what:45s} {C.median(values):7.2f} s  {detail}")
        return C.median(values)

    print(f"device: {info['name']}; {args.repeats} fresh processes per figure")
    for module in MODULES:
        results = [timed_import(module)[0] for _ in range(args.repeats)]
        add(f"import {module}", [r["seconds"] for r in results], "loads " + ", ".join(results[-1]["loaded"]))
    for module in ATTRIBUTED:
        _, stderr = timed_import(module, env={"PYTHONPROFILEIMPORTTIME": "1"})
        tree = import_tree(stderr)
        loaded = timed_import(module)[0]["loaded"]
        for lib in loaded:
            seconds, chain = imported_by(tree, lib)
            add(f"  {lib} (by import {module})", [seconds], f"via {chain}")
    for entry in ("train.py", "evaluate.py"):
        add(f"python {entry} --help (wall)", [help_wall(entry) for _ in range(args.repeats)])

    overrides = [
        f"experiment={args.experiment}",
        "trainer.max_epochs=1",
        "logger=none",
        "++trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        *(["trainer.accelerator=gpu"] if device == "cuda" else []),
        *args.overrides,
    ]
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    runs = []
    for k in range(args.repeats):
        log_path = tmp / f"run{k}.log"
        run = C.run_train_subprocess(overrides, tmp / f"run{k}", log_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
        if run["rc"] != 0 or "train_time_s" not in run["metrics"]:
            raise SystemExit(f"tiny run failed (rc {run['rc']}):\n{C.tail(log_path, 30)}")
        imports = sum(seconds for seconds, depth, _ in import_tree(log_path.read_text(errors="replace")) if depth == 0)
        runs.append({"wall": run["wall_s"], "train": run["metrics"]["train_time_s"], "imports": imports})
    tiny = " ".join(overrides)
    for lib in HEAVY:  # what the whole run loads, and through whom (from the first run's -X importtime)
        seconds, chain = imported_by(import_tree((tmp / "run0.log").read_text(errors="replace")), lib)
        if seconds:
            add(f"  {lib} (by the tiny run)", [seconds], f"via {chain}")
    shutil.rmtree(tmp, ignore_errors=True)  # the runs' checkpoints and logs
    add("tiny run: wall", [r["wall"] for r in runs], tiny)
    add("tiny run: train_time_s", [r["train"] for r in runs])
    startup = add("tiny run: wall - train_time_s", [r["wall"] - r["train"] for r in runs])
    imports = add("tiny run: imports (top-level, -X importtime)", [r["imports"] for r in runs])
    add("tiny run: rest of start-up and tear-down", [r["wall"] - r["train"] - r["imports"] for r in runs])

    summary = {
        "import_clipbench_training_s": next(r["seconds"] for r in rows if r["what"] == "import clipbench.training"),
        "import_lightning_s": next(r["seconds"] for r in rows if r["what"] == "import lightning"),
        "tiny_run_wall_minus_train_s": startup,
        "tiny_run_imports_s": imports,
    }
    params = {"repeats": args.repeats, "tiny_run_overrides": overrides, "heavy": list(HEAVY)}
    notes = [
        "import times: inside fresh interpreters (interpreter start excluded), median of the repeats",
        "a heavy library's 'via' chain lists the packages that imported it, innermost first: one that starts in a "
        "third-party package (torchmetrics, timm) is loaded by that library whatever clipbench does",
        "tiny runs ran with PYTHONPROFILEIMPORTTIME=1 (a little slower than without) to split their imports out",
    ]
    C.save_results("startup", info, params, rows, summary, notes, columns=["what", "seconds", "min_s", "max_s", "detail"])


if __name__ == "__main__":
    main()
