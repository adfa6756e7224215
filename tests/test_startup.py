"""Start-up: the modules every run imports load no heavy optional library at module level.

Lightning imports torchmetrics, which imports transformers and matplotlib when they are installed, so
``sys.modules`` cannot tell whether clipbench imports them too. A fresh interpreter records every
``import`` statement a clipbench module executes while it is imported (a wrapper around
``builtins.__import__``, which sees imports of modules already loaded as well). A library imported
inside the function that needs it runs no import statement at module import, so it is not seen.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Needed by some runs only: a multirun's summary, HF models, W&B logging, figures and tables of tasks.
LAZY = ("transformers", "wandb", "matplotlib", "pandas", "sklearn", "open_clip", "timm")

PROBE = f"""
import builtins, json, sys

LAZY = {LAZY!r}
original = builtins.__import__
seen = []


def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {{}}).get("__name__", "")
    if level == 0 and importer.startswith("clipbench") and name.split(".")[0] in LAZY:
        seen.append(importer + " imports " + name)
    return original(name, globals, locals, fromlist, level)


builtins.__import__ = recording_import
report = {{}}
for module in sys.argv[1:]:
    seen.clear()
    __import__(module)
    report[module] = {{"statements": list(seen), "loaded": sorted(m for m in LAZY if m in sys.modules)}}
print(json.dumps(report))
"""


def probe(*modules: str) -> dict:
    """Imports ``modules`` in order in a fresh interpreter; per module, the LAZY imports its clipbench
    modules executed and the LAZY libraries loaded so far."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_run_imports_no_heavy_optional_library():
    # clipbench.sweeps: the Hydra callback built for every run of train.py and evaluate.py; clipbench.training:
    # train.py's work. clipbench.callbacks writes tables with pandas at module level: the planted case that
    # shows the probe sees an import statement (pandas is not loaded before it).
    report = probe("clipbench.sweeps", "clipbench.training", "clipbench.callbacks")

    assert report["clipbench.sweeps"] == {"statements": [], "loaded": []}
    assert report["clipbench.training"]["statements"] == []
    # wandb and the model libraries would come in through open_clip (timm imports wandb); transformers and
    # matplotlib are loaded by torchmetrics, which Lightning imports: not clipbench's doing.
    assert not {"wandb", "open_clip", "timm", "pandas", "sklearn"} & set(report["clipbench.training"]["loaded"])
    assert "clipbench.callbacks imports pandas" in report["clipbench.callbacks"]["statements"]
