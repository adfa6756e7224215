"""Projection-only fine-tuning (``model.trainable=projections``, experiment=misalign) against full fine-tuning.

One model, one batch of image-caption pairs (random images, synthetic captions), the training
module's own pairs loss (CLIP's InfoNCE, ``CLIPTrainingModule._pairs_loss``) and optimiser
(``configure_optimizers``: AdamW, warmup and cosine). Three timings, alternated and repeated:

* ``frozen forward``: both towers and the loss under ``torch.no_grad`` (what inference costs);
* ``projections step``: forward, backward and AdamW step with every parameter but the two
  projections frozen: the towers record no autograd graph, so the backward is the projections' own;
* ``full step``: the same with every parameter trained.

Target (issue): trainable parameters and optimiser state are only the projections' (counted), and a
projection-only step costs no more than a frozen forward plus the projections' backward: the
verdict compares the step with the frozen forward plus that step's own backward-and-update time.

    python benchmarks/misalign_finetune.py                                   # CPU: clip_fast at 32 px, batch 256
    python benchmarks/misalign_finetune.py --batch-size 64 --steps 5         # smoke
    python benchmarks/misalign_finetune.py --device cuda --model vit_b32     # H100: ViT-B/32 at 224 px, bf16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import _common as C

MODELS = {
    # the real run's architecture: clipbench's airbench ResNet (BatchNorm) and text Transformer, embed 256
    "clip_fast": ["model=clip_fast", "model.backbone.vocabulary=null"],  # pairs' captions: CLIP's full vocabulary
    # the reference's scale: open_clip ViT-B/32, random weights (no download)
    "vit_b32": ["model=open_clip", "model.backbone.model_name=ViT-B-32", "model.backbone.pretrained=null"],
}
TOLERANCE = 1.10  # timing noise allowed on the verdict


def build(model: str, trainable: str, device: str, steps: int):
    """A fresh training module (seeded: both sides start from the same weights) and its optimiser."""
    import lightning as L

    from clipbench.training import build_module

    L.seed_everything(0, verbose=False)
    cfg = C.compose_train(
        ["experiment=misalign", *MODELS[model], f"model.trainable={trainable}"], tempfile.mkdtemp(prefix="bench-misalign-")
    )
    module = build_module(cfg.model).to(device)
    if trainable == "all":
        module.train()
    # The module asks its trainer a few questions; a stub answers them.
    module.trainer = SimpleNamespace(world_size=1, estimated_stepping_batches=steps, max_epochs=1)
    return module, module.configure_optimizers()["optimizer"]


def counts(module, optimizer) -> dict:
    trainable = sum(p.numel() for p in module.backbone.parameters() if p.requires_grad)
    optimised = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if hasattr(t, "numel") and t.ndim > 0)
    projections = sum(p.numel() for p in module.backbone.projection_parameters().values())
    return {
        "params_total": sum(p.numel() for p in module.backbone.parameters()),
        "params_trainable": trainable,
        "params_optimised": optimised,
        "optimizer_state_numel": state,
        "projection_params": projections,
    }


def time_steps(module, optimizer, images, tokens, steps: int, warmup: int, device: str, train: bool, autocast) -> dict:
    """Median seconds per step; for training steps also the forward and the backward-and-update parts."""
    import torch

    totals, forwards = [], []
    for step in range(warmup + steps):
        C.sync(device)
        start = time.perf_counter()
        with torch.no_grad() if not train else nullcontext(), autocast:
            loss = module._pairs_loss(images, tokens)
        C.sync(device)
        forward = time.perf_counter()
        if train:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        C.sync(device)
        if step >= warmup:
            totals.append(time.perf_counter() - start)
            forwards.append(forward - start)
    total, fwd = C.median(totals), C.median(forwards)
    return {"s_per_step": total, "forward_s": fwd, "backward_and_update_s": total - fwd if train else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default: clip_fast on the CPU, vit_b32 on a GPU")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per step (experiment=misalign: 256)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three timings, in rotating order")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    device = C.resolve_device(args.device)
    model = args.model or ("vit_b32" if device == "cuda" else "clip_fast")

    import torch

    from clipbench.misalign.synthetic import synthetic_captions

    if args.threads:  # on a CPU shared with other jobs, one thread: a parallel region waits for its slowest thread
        torch.set_num_threads(args.threads)

    info = C.describe_device(device)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    sides = {trainable: build(model, trainable, device, args.warmup + args.steps) for trainable in ("projections", "all")}
    frozen_module = sides["projections"][0]
    size = frozen_module.backbone.image_spec.size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, size, size, generator=generator).to(device)
    tokens = frozen_module.backbone.tokenize(synthetic_captions(args.batch_size, seed=0)).to(device)
    print(f"device: {info['name']}; model {model} at {size} px, batch {args.batch_size}")

    runs = {
        "frozen forward": lambda: time_steps(*sides["projections"], images, tokens, args.steps, args.warmup, device, False, autocast),
        "projections step": lambda: time_steps(*sides["projections"], images, tokens, args.steps, args.warmup, device, True, autocast),
        "full step": lambda: time_steps(*sides["all"], images, tokens, args.steps, args.warmup, device, True, autocast),
    }
    names = list(runs)
    rows = []
    for repeat in range(args.repeats):
        for name in names[repeat % 3 :] + names[: repeat % 3]:
            result = runs[name]()
            rows.append({"repeat": repeat, "run": name, "steps_per_s": 1 / result["s_per_step"], **result})
            print(f"  {repeat} {name:17s} {rows[-1]['steps_per_s']:8.2f} steps/s  ({result['s_per_step'] * 1000:.1f} ms)", flush=True)

    def med(run: str, key: str) -> float:
        return C.median(r[key] for r in rows if r["run"] == run)

    projection_counts, full_counts = counts(*sides["projections"]), counts(*sides["all"])
    frozen_s, step_s, full_s = med("frozen forward", "s_per_step"), med("projections step", "s_per_step"), med("full step", "s_per_step")
    backward_s = med("projections step", "backward_and_update_s")
    only_projections = (
        projection_counts["params_trainable"] == projection_counts["params_optimised"] == projection_counts["projection_params"]
        and projection_counts["optimizer_state_numel"] == 2 * projection_counts["projection_params"]  # AdamW: two moments
    )
    summary = {
        "model": model,
        "batch_size": args.batch_size,
        "projection_params": projection_counts["projection_params"],
        "trainable_params_projections": projection_counts["params_trainable"],
        "trainable_params_full": full_counts["params_trainable"],
        "optimizer_state_numel_projections": projection_counts["optimizer_state_numel"],
        "optimizer_state_numel_full": full_counts["optimizer_state_numel"],
        "frozen_forward_steps_per_s": 1 / frozen_s,
        "projections_steps_per_s": 1 / step_s,
        "full_steps_per_s": 1 / full_s,
        "speedup_projections_over_full": full_s / step_s,
        "projections_step_over_frozen_forward": step_s / frozen_s,
        "projections_backward_and_update_ms": backward_s * 1000,
        "verdict": "PASS" if only_projections and step_s <= TOLERANCE * (frozen_s + backward_s) and backward_s < 0.1 * frozen_s else "FAIL",
    }
    notes = [
        f"{model} with random weights; one batch of {args.batch_size} random images and synthetic captions, reused every step.",
        f"medians over {args.repeats} rounds x {args.steps} timed steps ({args.warmup} warm-up steps each), the three runs in rotating order.",
        "PASS: trainable parameters, optimised parameters and AdamW state (two moments) are exactly the projections', the step takes"
        f" at most {TOLERANCE}x (frozen forward + its own backward-and-update), and that backward-and-update is under 10% of the frozen forward.",
        "CPU timings on a shared machine are noisy: see load_avg_at_start/end in the JSON.",
    ]
    C.save_results(
        "misalign_finetune",
        info,
        vars(args) | {"model": model},
        rows,
        summary,
        notes,
        columns=["repeat", "run", "steps_per_s", "s_per_step", "forward_s", "backward_and_update_s"],
        suffix="" if args.batch_size >= 256 else "_smoke",
    )


if __name__ == "__main__":
    main()
