"""Shared by the scoring benchmarks: pair files, random Hugging Face CLIPs saved locally, and one
``evaluate.py task=score`` run in this process."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import _common as C

CIFAR10 = C.REPO_ROOT.parent / "shared" / "data" / "cifar10"


def pairs_csv(path: Path, rows: int, images: list[Path] | None = None) -> Path:
    """``rows`` pairs cycling over ``images`` (default: the CIFAR-10 test JPEGs), captioned with the
    image's folder name (its class)."""
    import pandas as pd

    images = images or sorted((CIFAR10 / "test").glob("*/*.jpg"))
    if not images:
        raise SystemExit(f"no images: expected CIFAR-10 JPEGs under {CIFAR10}/test")
    picked = [images[(i * 7919) % len(images)] for i in range(rows)]  # a stride through the classes
    pd.DataFrame(
        {
            "id": [f"p{i:08d}" for i in range(rows)],
            "image": [str(p) for p in picked],
            "caption": [f"a photo of a {p.parent.name}" for p in picked],
        }
    ).to_csv(path, index=False)
    return path


def save_random_hf_clip(path: Path, image_size: int, patch_size: int, width: int, layers: int, text_width: int, text_layers: int) -> str:
    """A random-weight ``CLIPModel`` saved with CLIP's tokenizer (from open_clip's bundled vocabulary,
    as the tests build it) and image processor, loadable by ``CLIPProcessor`` and ``model=hf_clip``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    sys.path.insert(0, str(C.REPO_ROOT / "tests"))
    from tiny_models import clip_tokenizer as _clip_tokenizer

    vision = dict(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
    )
    text = dict(
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_width // 64),
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=max(width, text_width))).save_pretrained(path)
    _clip_tokenizer().save_pretrained(path)
    crop = {"height": image_size, "width": image_size}
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop).save_pretrained(path)
    return str(path)


def run_score(overrides: list[str], out: Path) -> tuple[dict, dict, float]:
    """``evaluate.py task=score <overrides>`` in this process: (metrics, report.json, wall seconds)."""
    from clipbench.evaluation import evaluate
    from clipbench.runs import compose_config

    cfg = compose_config("evaluate", ["task=score", *overrides], out, out / "cache")
    started = time.perf_counter()
    metrics = evaluate(cfg)
    wall = time.perf_counter() - started
    return metrics, json.loads((out / "report.json").read_text()), wall
