"""Lightning's overhead on the training step: plain PyTorch loop vs ``lightning.Trainer.fit``.

Both sides train the same model (the quickstart CLIP, composed from ``conf/`` with
``experiment=quickstart``) on the same on-device batches (``DeviceBatches``, same seed, same
augmentation), with the same optimiser and schedule (``configure_optimizers``):

* plain:     ``loss = module._loss(images, labels, template); loss.backward(); opt.step(); sched.step(); opt.zero_grad()``
* lightning: ``Trainer.fit(module)`` with logger=False, no checkpointing, no progress bar, no
  validation, no model summary; the module's ``training_step`` (its ``self.log`` calls included).

Timing: a timestamp at the start of every step (after the batch is fetched; a Callback's
``on_train_batch_start`` on the Lightning side); steps/s over steps ``warmup .. warmup+steps`` so
start-up, the first steps and teardown are excluded, epoch boundaries and data fetches included.
The pair is repeated ``--repeats`` times, alternating which side runs first; medians are reported.

Target (issue): Lightning at most 5% slower than the plain loop (ratio lightning/plain >= 0.95).

``--preset tiny`` shrinks the model to a few thousand parameters so fixed per-step costs dominate
(how the overhead is measured on a CPU); ``--sync-debug`` (CUDA) makes torch warn at every host-device
synchronisation during the Lightning run, with its stack, to find what stalls the queue.

    python benchmarks/lightning_overhead.py [--device cpu|cuda] [--steps 60] [--warmup 10] [--repeats 3]
        [--preset tiny] [--sync-debug] [--experiment cifar10_fast --precision bf16-mixed]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace

import _common as C

TARGET_RATIO = 0.95
# A model so small that the step is Lightning's and the framework's fixed costs, not arithmetic.
PRESETS = {
    "tiny": [
        "model.backbone.embed_dim=16",
        "model.backbone.text_width=16",
        "model.backbone.text_heads=1",
        "model.backbone.text_layers=1",
        "model.backbone.image_tower.widths=[8,8,8]",
        "data.batch_size=32",
    ],
}


def build(cfg, device: str):
    """A fresh module and datamodule, seeded identically every time."""
    import lightning as L
    from hydra.utils import instantiate

    from clipbench.training import build_module

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg.model)
    datamodule = instantiate(cfg.data, _partial_=True)(image_spec=module.backbone.image_spec)
    datamodule.setup()
    return module, datamodule


def run_plain(cfg, device: str, total_steps: int, precision: str) -> list[float]:
    import torch

    module, datamodule = build(cfg, device)
    dev = torch.device(device)
    # The module and datamodule ask their trainer for a few things; a stub answers them.
    datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=dev), global_rank=0, world_size=1, overfit_batches=0)
    module.trainer = SimpleNamespace(world_size=1, estimated_stepping_batches=total_steps, datamodule=datamodule)
    module.setup("fit")
    module.to(dev).train()
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    batches = datamodule.train_dataloader()
    stamps: list[float] = []
    step = 0
    while step < total_steps:
        for images, labels in batches:
            if step >= total_steps:
                break
            stamps.append(time.perf_counter())
            images = module._in_memory_format(images)  # as training_step does (channels_last recipes)
            template = torch.randint(len(module.train_templates), labels.shape, device=labels.device)  # as training_step draws
            with autocast:
                loss = module._loss(images, labels, template)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    C.sync(device)
    stamps.append(time.perf_counter())
    return stamps


def run_lightning(cfg, device: str, total_steps: int, precision: str) -> list[float]:
    import lightning as L
    from _stamps import StepStamps

    module, datamodule = build(cfg, device)

    stamps = StepStamps(device)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=total_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        benchmark=bool(cfg.trainer.get("benchmark", False)),
        log_every_n_steps=int(cfg.trainer.get("log_every_n_steps", 50)),
        callbacks=[stamps],
    )
    trainer.fit(module, datamodule=datamodule)
    return stamps.stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before the window")
    parser.add_argument("--repeats", type=int, default=3, help="plain/lightning pairs, alternating order")
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed (autocast on the plain side)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model-size overrides (tiny: fixed costs dominate)")
    parser.add_argument("--sync-debug", action="store_true", help="CUDA: warn at every host sync during the Lightning runs")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data=synthetic data.batch_size=256")
    args = parser.parse_args()
    device = C.resolve_device(args.device)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [
        f"experiment={args.experiment}",
        "logger=none",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        *PRESETS.get(args.preset, []),
        *args.overrides,
    ]
    tmp = tempfile.mkdtemp(prefix="bench-lightning-")
    cfg = C.compose_train(overrides, tmp)
    torch.backends.cudnn.benchmark = bool(cfg.trainer.get("benchmark", False))
    total = args.warmup + args.steps + 1
    info = C.describe_device(device)
    print(f"device: {info['name']}; {args.repeats} pairs of {total} steps (timed: {args.warmup}..{args.warmup + args.steps})")

    if args.sync_debug and device == "cuda":
        torch.cuda.set_sync_debug_mode("warn")  # both sides: a sync the plain loop has too is not Lightning's
    runners = {side: partial(run, cfg, device, total, args.precision) for side, run in (("plain", run_plain), ("lightning", run_lightning))}
    rows = C.alternating_step_rates(runners, args.repeats, args.warmup, args.steps)
    plain, light = C.side_median(rows, "plain"), C.side_median(rows, "lightning")
    ratio = light / plain
    plain_med = C.side_median(rows, "plain", "steps_per_s_from_median_step")
    light_med = C.side_median(rows, "lightning", "steps_per_s_from_median_step")
    summary = {
        "plain_steps_per_s": plain,
        "lightning_steps_per_s": light,
        "ratio_lightning_over_plain": ratio,
        "overhead_pct": (1 / ratio - 1) * 100,
        "median_pair_ratio": C.median_pair_ratio(rows, "lightning", "plain"),
        "plain_steps_per_s_median_step": plain_med,
        "lightning_steps_per_s_median_step": light_med,
        "ratio_median_step": light_med / plain_med,
        "target_ratio": TARGET_RATIO,
        "verdict": "PASS" if ratio >= TARGET_RATIO else "FAIL",
        "verdict_median_step": "PASS" if light_med / plain_med >= TARGET_RATIO else "FAIL",
    }
    params = {
        "experiment": args.experiment,
        "preset": args.preset,
        "overrides": overrides,
        "precision": args.precision,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "batch_size": int(cfg.data.batch_size),
        "data": str(cfg.data.name),
        "model_image_tower": str(cfg.model.backbone.image_tower._target_),
    }
    notes = [
        "steps/s over the same window of steps on both sides; median over repeats (order alternates)",
        f"target: Lightning at most 5% slower (ratio >= {TARGET_RATIO}): {summary['verdict']}",
    ]
    if device == "cpu":
        notes.append(
            "CPU timings on a shared machine are noisy: compare the per-pair ratios and the median-step "
            "rates (1 / median step interval), which shrug off bursts of load from other jobs"
        )
    # One file per model: the quickstart as before, other experiments and presets beside it.
    suffix = "".join(f"_{part}" for part in (args.experiment if args.experiment != "quickstart" else None, args.preset) if part)
    C.save_results("lightning_overhead", info, params, rows, summary, notes, suffix=suffix)


if __name__ == "__main__":
    main()
