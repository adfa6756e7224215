"""What the compact text vocabulary saves: CLIP's full 49,408-token embedding vs the captions' own.

Builds the training module of an experiment (default ``experiment=cifar10_fast``) twice from the same
seed, with ``model.backbone.vocabulary=null`` (full) and ``captions`` (resolved, as ``setup`` does, from
the CIFAR-10 class names and the experiment's templates), and measures for each:

* parameters of the backbone and of its token embedding;
* the size of a checkpoint file holding what a Lightning checkpoint holds of the model (weights and the
  AdamW state after one step), and of the weights alone;
* the median time of one ``optimizer.step()`` (the module's own AdamW from ``configure_optimizers``,
  gradients from one real training step), and of a whole training step (forward, backward, step).

    python benchmarks/compact_vocabulary.py [--device cpu|cuda] [--batch-size 256] [--repeats 5] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import _common as C

# The class names CIFAR-10's datamodule gives (torchvision's, and the folder tree's), so no data is read.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VARIANTS = {"full": "null", "compact": "captions"}


def build(cfg, device: str):
    """The module set up on the CIFAR-10 class names (a stub answers its trainer questions) and its optimiser."""
    import lightning as L

    from clipbench.training import build_module

    L.seed_everything(cfg.seed, verbose=False)
    module = build_module(cfg.model)
    datamodule = SimpleNamespace(class_names=CIFAR10_CLASSES, setup=lambda stage: None)
    module.trainer = SimpleNamespace(world_size=1, estimated_stepping_batches=1000, max_epochs=1, datamodule=datamodule)
    module.setup("fit")
    module.to(device).train()
    return module, module.configure_optimizers()["optimizer"]


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        C.sync(device)
        start = time.perf_counter()
        fn()
        C.sync(device)
        times.append(time.perf_counter() - start)
    return C.median(times)


def measure(cfg, device: str, batch_size: int, repeats: int, precision: str, tmp: Path) -> dict:
    import torch

    module, optimizer = build(cfg, device)
    size = module.backbone.image_spec.size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(len(CIFAR10_CLASSES), (batch_size,), generator=generator).to(device)
    templates = torch.randint(len(module.train_templates), (batch_size,), generator=generator).to(device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()

    def backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = module._loss(images, labels, templates)
        loss.backward()

    def train_step() -> None:
        backward()
        optimizer.step()

    step_s = timed(train_step, device, repeats)
    backward()  # fresh gradients; stepping again on them times the optimiser alone
    adamw_s = timed(optimizer.step, device, repeats)
    sizes, write_s = {}, {}
    for name, record in {
        "checkpoint": {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()]},
        "weights": module.state_dict(),
    }.items():
        path = tmp / f"{name}.pt"
        write_s[name] = timed(lambda record=record, path=path: torch.save(record, path), device, repeats)
        sizes[name] = path.stat().st_size / 1e6
    embedding = module.backbone.text.token_embedding
    return {
        "vocabulary_rows": embedding.num_embeddings,
        "params_backbone": sum(p.numel() for p in module.backbone.parameters()),
        "params_token_embedding": embedding.weight.numel(),
        "checkpoint_mb": sizes["checkpoint"],
        "weights_mb": sizes["weights"],
        "checkpoint_write_ms": 1000 * write_s["checkpoint"],
        "weights_write_ms": 1000 * write_s["weights"],
        "adamw_step_ms": 1000 * adamw_s,
        "train_step_ms": 1000 * step_s,
        "fused_adamw": bool(optimizer.defaults.get("fused")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--experiment", default="cifar10_fast")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per timed step (default: 256 on CPU, the experiment's on a GPU)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--precision", default=None, help="32-true or bf16-mixed (default: bf16-mixed on a GPU)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    device = C.resolve_device(args.device)
    precision = args.precision or ("bf16-mixed" if device == "cuda" else "32-true")
    info = C.describe_device(device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vocabulary-"))
    rows = []
    for variant, vocabulary in VARIANTS.items():
        cfg = C.compose_train([f"experiment={args.experiment}", f"model.backbone.vocabulary={vocabulary}", *args.overrides], tmp)
        batch_size = args.batch_size or (cfg.data.batch_size if device == "cuda" else 256)
        rows.append({"variant": variant, **measure(cfg, device, batch_size, args.repeats, precision, tmp)})
        print(rows[-1])
    full, compact = rows
    summary = {
        "params_ratio": compact["params_backbone"] / full["params_backbone"],
        "checkpoint_ratio": compact["checkpoint_mb"] / full["checkpoint_mb"],
        "checkpoint_write_speedup": full["checkpoint_write_ms"] / compact["checkpoint_write_ms"],
        "adamw_speedup": full["adamw_step_ms"] / compact["adamw_step_ms"],
        "train_step_speedup": full["train_step_ms"] / compact["train_step_ms"],
    }
    params = {
        "experiment": args.experiment,
        "batch_size": batch_size,
        "repeats": args.repeats,
        "precision": precision,
        "overrides": args.overrides,
    }
    notes = [
        "checkpoint_mb: weights + AdamW state after one step (what a Lightning checkpoint holds of the model); weights_mb: weights only",
        "*_write_ms: torch.save of that record to local disk (median): what each checkpoint write costs; the old default wrote "
        "two full checkpoints (best and last) every epoch, cifar10_fast now one at the end",
        "adamw_step_ms: optimizer.step() alone (the module's configure_optimizers); train_step_ms: forward + backward + step",
    ]
    C.save_results("compact_vocabulary", info, params, rows, summary, notes)


if __name__ == "__main__":
    main()
