"""Training steps/s of seed 003's configuration: a plain PyTorch loop as the seed project describes it vs clipbench.

The configuration (``/work/shared/seeds/003_*.txt``): CIFAR-10, batch 32, AdamW lr 1e-4 weight decay
0.01, cosine schedule over 50 epochs, fp32; CLIP with a ModifiedResNet image tower (layers 2,2,2,2,
width 32, 32x32 input) and a text Transformer (width 512, 8 heads, 6 layers, context 77, vocabulary
49,408, QuickGELU), embedding 512; random crop with padding 4 and horizontal flip, images scaled to
[-1, 1]; a caption per image from five templates; symmetric contrastive loss.

* **seed**: written from that description (not the seed's code): open_clip's ``CLIP`` built from
  ``CLIPVisionCfg`` / ``CLIPTextCfg`` at that shape, fp32, cuDNN autotuning off and full-precision
  matmuls (torch's defaults, which the seed keeps); torchvision ``ImageFolder`` over the CIFAR-10 JPEGs
  with per-sample PIL transforms in a ``DataLoader`` (``--workers`` processes, shuffled), a random
  template per sample, the batch's captions tokenised in the collate function with open_clip's
  tokenizer; ``model(images, tokens)``, symmetric cross-entropy, ``backward``, AdamW ``step``; the
  cosine schedule steps once per epoch. No host sync per step (no ``loss.item()``): the strictest
  plain loop.
* **clipbench**: ``clipbench.training.train`` (what ``python train.py`` runs: its validation, seeding,
  module, datamodule, callbacks, logger and Trainer) with ``experiment=cifar10_clip`` and overrides for
  the seed's batch, optimiser, image width, context length and templates; on the GPU what the recipe
  uses there (``trainer=gpu``: bf16-mixed, data on the device), on the CPU ``32-true``. The test at the
  end is cut to one batch (``limit_test_batches``): it is outside the timed window anyway.

Timing: a timestamp at the start of every step (after the batch is fetched; a callback's
``on_train_batch_start`` on the clipbench side) and one when training ends; steps/s over steps
``warmup .. warmup+steps``, so start-up, the first steps and teardown are excluded, data loading
included. The pair is repeated ``--repeats`` times, alternating which side runs first; medians are
reported, and the ratio clipbench / seed. Target (issue 13, one H100): ratio >= 1.5.

    python benchmarks/seed003_step.py [--device cpu|cuda] [--steps 300] [--warmup 30] [--repeats 3]
        [--workers N] [--threads N] [--data-root ../shared/data/cifar10] [hydra overrides of the clipbench side...]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import _common as C

TARGET_RATIO = 1.5
BATCH_SIZE = 32
LR, WEIGHT_DECAY, EPOCHS = 1e-4, 0.01, 50
TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {} photo", "a {} picture")
DEFAULT_ROOT = C.REPO_ROOT.parent / "shared" / "data" / "cifar10"


# -------------------------------------------------------------------------------------------- seed
def seed_model():
    """Seed 003's CLIP shape, built with open_clip (ModifiedResNet image tower: the config's layers are a tuple)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=(2, 2, 2, 2), width=32, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=6)
    return CLIP(embed_dim=512, vision_cfg=vision, text_cfg=text, quick_gelu=True)


class CaptionedFolder:
    """An ``ImageFolder`` whose samples are (augmented image, caption from a random template)."""

    def __init__(self, root: Path) -> None:
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder

        augment = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]  # to [-1, 1]
        )
        self.images = ImageFolder(str(root), transform=augment)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, label = self.images[index]
        return image, random.choice(TEMPLATES).format(self.images.classes[label])


def collate_captions(samples):
    """Images stacked; the batch's captions tokenised (open_clip's BPE, context 77)."""
    import open_clip
    import torch

    images, captions = zip(*samples, strict=True)
    return torch.stack(images), open_clip.tokenize(list(captions))


def run_seed(root: Path, device: str, total_steps: int, workers: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    # The seed's numerics: Lightning's trainer=gpu turns cuDNN autotuning on for the whole process.
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    random.seed(0)
    dev = torch.device(device)
    model = seed_model().to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    loader = DataLoader(
        CaptionedFolder(root),
        batch_size=BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=collate_captions,
        pin_memory=device == "cuda",
        persistent_workers=workers > 0,
    )
    stamps: list[float] = []
    while len(stamps) < total_steps:
        for images, tokens in loader:
            if len(stamps) >= total_steps:
                break
            stamps.append(time.perf_counter())
            images, tokens = images.to(dev, non_blocking=True), tokens.to(dev, non_blocking=True)
            image_features, text_features, scale = model(images, tokens)
            logits = scale * image_features @ text_features.T
            targets = torch.arange(len(images), device=dev)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            scheduler.step()  # the seed's cosine schedule is per epoch
    C.sync(device)
    stamps.append(time.perf_counter())
    return {"stamps": stamps, "parameters": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------------------- clipbench
def clipbench_overrides(root: Path, device: str, total_steps: int) -> list[str]:
    templates = ",".join(f"'{t}'" for t in TEMPLATES)
    on_cpu = ["trainer.accelerator=cpu", "trainer.precision=32-true"] if device == "cpu" else []  # cuda: the recipe's trainer=gpu
    return [
        "experiment=cifar10_clip",
        f"data.root={root}",
        f"data.batch_size={BATCH_SIZE}",
        f"model.lr={LR}",
        f"model.weight_decay={WEIGHT_DECAY}",
        "model.backbone.image_tower.width=32",
        "model.backbone.context_length=77",
        f"model.train_templates=[{templates}]",
        f"++trainer.max_steps={total_steps}",
        "++trainer.limit_test_batches=1",
        *on_cpu,
    ]


def run_clipbench(overrides: list[str], device: str, cache_dir: Path) -> dict:
    from _stamps import StepStamps
    from omegaconf import open_dict

    from clipbench.runs import compose_config
    from clipbench.training import train

    tmp = Path(tempfile.mkdtemp(prefix="bench-seed003-"))
    cfg = compose_config("train", overrides, tmp / "run", cache_dir)
    with open_dict(cfg):
        cfg.callbacks.step_stamps = {"_target_": "_stamps.StepStamps", "device": device}
    try:
        train(cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # its checkpoints: hundreds of MB a run
    return {"stamps": StepStamps.latest.stamps, "parameters": StepStamps.latest.parameters}


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps before the window")
    parser.add_argument("--repeats", type=int, default=3, help="seed/clipbench pairs, alternating order")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers of the seed side")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="CIFAR-10 class-folder tree (train/<class>/*.jpg)")
    parser.add_argument("--cache-dir", type=Path, default=C.REPO_ROOT / "outputs" / "cache", help="clipbench's decoded-data cache")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of the clipbench side")
    args = parser.parse_args()
    device = C.resolve_device(args.device)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data_root / "train").is_dir():
        raise SystemExit(f"--data-root {args.data_root}: no train/ folder (CIFAR-10 as train/<class>/*.jpg)")
    total = args.warmup + args.steps + 1
    overrides = [*clipbench_overrides(args.data_root, device, total), *args.overrides]
    info = C.describe_device(device)
    print(f"device: {info['name']}; {args.repeats} pairs of {total} steps (timed: {args.warmup}..{args.warmup + args.steps})")

    runners = {
        "seed": lambda: run_seed(args.data_root / "train", device, total, args.workers),
        "clipbench": lambda: run_clipbench(overrides, device, args.cache_dir),
    }
    parameters = {}

    def timed(side: str):
        def run() -> list[float]:
            result = runners[side]()
            parameters[side] = result["parameters"]
            return result["stamps"]

        return run

    rows = C.alternating_step_rates({side: timed(side) for side in runners}, args.repeats, args.warmup, args.steps)
    seed, ours = C.side_median(rows, "seed"), C.side_median(rows, "clipbench")
    seed_med = C.side_median(rows, "seed", "steps_per_s_from_median_step")
    ours_med = C.side_median(rows, "clipbench", "steps_per_s_from_median_step")
    summary = {
        "seed_steps_per_s": seed,
        "clipbench_steps_per_s": ours,
        "ratio_clipbench_over_seed": ours / seed,
        "median_pair_ratio": C.median_pair_ratio(rows, "clipbench", "seed"),
        "seed_steps_per_s_median_step": seed_med,
        "clipbench_steps_per_s_median_step": ours_med,
        "ratio_median_step": ours_med / seed_med,
        "seed_parameters": parameters["seed"],
        "clipbench_parameters": parameters["clipbench"],
        "target_ratio": TARGET_RATIO,
        # The target is an H100's: on a CPU both steps are arithmetic-bound and the ratio says little about it.
        "verdict": ("PASS" if ours / seed >= TARGET_RATIO else "FAIL") if device == "cuda" else "n/a (CPU)",
    }
    params = {
        "batch_size": BATCH_SIZE,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "seed_workers": args.workers,
        "threads": torch.get_num_threads(),
        "data_root": str(args.data_root),
        "clipbench_overrides": overrides,
        "seed_precision": "32-true",
    }
    notes = [
        "steps/s over the same window of steps on both sides (warm-up excluded); median over repeats (order alternates)",
        f"target: clipbench at least {TARGET_RATIO}x the seed's steps/s on one H100: {summary['verdict']}",
        "seed side: fp32, per-sample PIL transforms in DataLoader workers, captions tokenised per batch; "
        "clipbench side: train() with the run's callbacks and logger"
        + (" (trainer=gpu: bf16-mixed, data on the device)" if device == "cuda" else " (32-true on the CPU)"),
    ]
    if device == "cpu":
        notes.append("CPU: a smoke size on a shared machine; the target is defined on an H100 (--device cuda)")
    C.save_results("seed003_step", info, params, rows, summary, notes)


if __name__ == "__main__":
    main()
