"""End-to-end scoring throughput of ``evaluate.py task=score`` from 256 px JPEG files on local disk,
with a random-weight ViT-B/32 (open_clip), pairs/s.

The script writes its own JPEGs first: CIFAR-10 test images upscaled to ``--image-size`` (bicubic)
with a random crop, saved at quality 90 on local disk (natural-image content, so decoding costs what
a photo costs), and a CSV of (id, path, caption). Then it scores them through the real task: the
Lightning predict loop, DataLoader workers that decode, resize to 224 and tokenise, bf16 autocast
on CUDA, shards written and merged. A first, small run warms up everything a first run pays for
once (CUDA context, cuDNN, matplotlib's font cache); the second run is timed. Reported: pairs/s of
the predict loop (headline) and of the whole run, where the time goes (ms per pair in the workers
and in the model), peak GPU memory, and the time 100M pairs would take on 1 and 8 such GPUs.

Target (issue): >= 5,000 pairs/s on one H100 (100M pairs in under 6 hours). On CPU, a smoke run.

    python benchmarks/score_throughput.py [--device cpu|cuda] [--pairs N] [--num-workers N] [--batch-size N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from multiprocessing import Pool
from pathlib import Path

import _common as C
from _pairs import CIFAR10, pairs_csv, run_score

TARGET = 5000.0


def _write_jpeg(job: tuple[int, str, int, str]) -> str:
    """One CIFAR image upscaled to ``size`` with a random crop, saved as JPEG (a worker process)."""
    import random

    from PIL import Image

    index, source, size, folder = job
    rng = random.Random(index)
    scale = int(size * rng.uniform(1.0, 1.25))
    image = Image.open(source).convert("RGB").resize((scale, scale), Image.BICUBIC)
    left, top = rng.randrange(scale - size + 1), rng.randrange(scale - size + 1)
    path = Path(folder) / Path(source).parent.name / f"{index:07d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.crop((left, top, left + size, top + size)).save(path, quality=90)
    return str(path)


def make_jpegs(count: int, size: int, folder: Path) -> list[Path]:
    sources = sorted((CIFAR10 / "test").glob("*/*.jpg"))
    if not sources:
        raise SystemExit(f"no CIFAR-10 JPEGs under {CIFAR10}/test to build the images from")
    jobs = [(i, str(sources[i % len(sources)]), size, str(folder)) for i in range(count)]
    with Pool(os.cpu_count()) as pool:
        return [Path(p) for p in pool.map(_write_jpeg, jobs, chunksize=64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--pairs", type=int, default=None, help="pairs in the timed run (default: 100,000 on CUDA, 256 on CPU)")
    parser.add_argument("--distinct-images", type=int, default=20_000, help="JPEG files written (the pairs cycle over them)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--batch-size", type=int, default=None, help="default: 1024 on CUDA, 64 on CPU")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--tmp", default=None, help="folder for the JPEGs and runs (default: a temporary folder on local disk)")
    args = parser.parse_args()
    device = C.resolve_device(args.device)
    cuda = device == "cuda"
    pairs = args.pairs or (100_000 if cuda else 256)
    batch = args.batch_size or (1024 if cuda else 64)
    info = C.describe_device(device)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        images = make_jpegs(min(pairs, args.distinct_images), args.image_size, tmp / "jpegs")
        trainer = ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"] if cuda else ["trainer.accelerator=cpu"]
        model = ["model=open_clip", f"model.backbone.model_name={args.model}", "model.backbone.pretrained=null"]
        data = [f"data.num_workers={args.num_workers}", f"data.eval_batch_size={batch}", "task.shard_size=20000"]
        warmup = pairs_csv(tmp / "warmup.csv", min(pairs, 4 * batch), images)
        run_score([*model, *trainer, *data, f"task.input={warmup}"], tmp / "warmup")
        csv = pairs_csv(tmp / "pairs.csv", pairs, images)
        _, report, wall = run_score([*model, *trainer, *data, f"task.input={csv}"], tmp / "run")
    rate = report["pairs_per_s"]
    rows = [
        {"measure": "pairs/s, predict loop", "value": rate},
        {"measure": "pairs/s, whole run (start-up, merge, summary)", "value": pairs / wall},
        {"measure": "fetch + decode, worker ms/pair", "value": report["fetch_decode_ms_per_pair"]},
        {"measure": "resize + tokenise, worker ms/pair", "value": report["preprocess_ms_per_pair"]},
        {"measure": "model, ms/pair", "value": report["model_ms_per_pair"]},
        {"measure": "peak GPU memory, MB", "value": report["peak_gpu_mb_per_rank"]},
        {"measure": "peak host memory (main + workers), MB", "value": report["peak_ram_mb_per_rank"]},
        {"measure": "100M pairs on 1 device, hours", "value": 1e8 / rate / 3600},
        {"measure": "100M pairs on 8 devices, hours (linear: shards are independent)", "value": 1e8 / rate / 3600 / 8},
    ]
    summary = {"pairs_per_s": rate, "target": f">= {TARGET:g} pairs/s on one H100"}
    summary["verdict"] = ("PASS" if rate >= TARGET else "FAIL") if cuda else "pending (GPU target; this is a CPU smoke run)"
    notes = [
        f"{pairs} pairs over {min(pairs, args.distinct_images)} JPEGs of {args.image_size} px (CIFAR-10 upscaled, quality 90) on local disk",
        f"open_clip {args.model}, random weights; {'bf16-mixed' if cuda else 'fp32'}; batch {batch}; {args.num_workers} DataLoader workers",
        "timed run after a warm-up run; worker milliseconds are summed over workers that run in parallel",
    ]
    C.save_results(
        "score_throughput", info, {**vars(args), "pairs": pairs, "batch_size": batch}, rows, summary, notes, suffix="" if cuda else "_smoke"
    )


if __name__ == "__main__":
    main()
