"""Zero-shot image-encoding throughput of a ViT-B/32 CLIP (random weights, open_clip), images/s.

Data: the CIFAR-10 test JPEGs (``--root``, class-folder tree), 32x32, upscaled to 224.

* clipbench path: decode the JPEGs once to uint8 32x32 tensors (``clipbench.data.datamodule.decode``,
  what ``CLIPDataModule(on_device=True, decode_size=32)`` does per split), keep them on the device,
  and per batch resize to 224 + normalise on the device (``ImageSpec.batch_transform``, bicubic as
  open_clip's preprocess), then ``encode_image``. Reported as encode-only (the decoded set is
  cached in real runs) and end-to-end including the one-time decode.
* naive path (reference): ``ImageFolder`` + open_clip's own ``preprocess`` per PIL image in a torch
  ``DataLoader`` (num_workers = CPU count), batches copied to the device, then ``encode_image``.

Both use the same model settings: ``inference_mode``, bf16 autocast + channels_last on CUDA, fp32
on CPU, so the ratio isolates the input pipeline. Without ``--root`` (or if it is missing),
synthetic uint8 images stand in for the JPEGs.

Target (issue): >= 5,000 images/s on one H100 (``--device cuda``); on CPU the number is only a
smoke check (use ``--limit`` to keep it to a minute or two).

    python benchmarks/zeroshot_throughput.py [--device cpu|cuda] [--root ../shared/data/cifar10] [--limit 384] [--batch-size N]
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext
from pathlib import Path

import _common as C

TARGET_GPU_IMAGES_PER_S = 5000.0
DEFAULT_ROOT = C.REPO_ROOT.parent / "shared" / "data" / "cifar10"


class _Picked:
    """Every k-th sample of a dataset (all classes represented), keeping ``classes``."""

    def __init__(self, base, index):
        self.base, self.index, self.classes = base, list(index), base.classes

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.base[self.index[i]]


def _spread(n: int, limit: int | None) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    step = n / limit
    return [int(i * step) for i in range(limit)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arg(parser)
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 class-folder tree (uses <root>/test)")
    parser.add_argument("--limit", type=int, default=None, help="images to use (default: 384 on CPU, all 10,000 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CPU, 1024 on CUDA")
    parser.add_argument("--passes", type=int, default=None, help="timed passes over the decoded set (default 1 CPU, 3 CUDA)")
    parser.add_argument("--num-workers", type=int, default=os.cpu_count(), help="DataLoader workers of the naive path")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    device = C.resolve_device(args.device)
    cuda = device == "cuda"
    limit = args.limit if args.limit is not None else (None if cuda else 384)
    batch_size = args.batch_size or (1024 if cuda else 64)
    passes = args.passes or (3 if cuda else 1)
    channels_last = cuda and not args.no_channels_last

    import open_clip
    import torch
    from torch.utils.data import DataLoader, Dataset

    from clipbench.data import sources
    from clipbench.data.datamodule import decode
    from clipbench.models.backbone import ImageSpec

    info = C.describe_device(device)
    dev = torch.device(device)
    torch.backends.cudnn.benchmark = True
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)
    model = model.to(dev).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    pcfg = model.visual.preprocess_cfg
    size = pcfg["size"] if isinstance(pcfg["size"], int) else pcfg["size"][0]
    spec = ImageSpec(size=size, mean=tuple(pcfg["mean"]), std=tuple(pcfg["std"]), interpolation=pcfg["interpolation"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def encode(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            return model.encode_image(x)

    # ------------------------------------------------------------------ data
    root = Path(args.root).expanduser()
    real = (root / "test").is_dir()
    if real:
        folder = sources.cifar(10, root, "test", download=False)
        index = _spread(len(folder), limit)
        picked = _Picked(folder, index)
        data_desc = f"CIFAR-10 test JPEGs at {root} ({len(index)} of {len(folder)})"
    else:
        n = limit or 10000
        g = torch.Generator().manual_seed(0)
        synthetic = sources.TensorImages(
            torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.zeros(n, dtype=torch.long), ["x"]
        )
        picked = synthetic
        data_desc = f"synthetic uint8 32x32 ({n}); {root}/test not found"
    n_images = len(picked)
    print(f"device: {info['name']}; data: {data_desc}; batch {batch_size}; channels_last={channels_last}")

    # Warm the model up once (allocator, cuDNN autotune, kernels) so neither path pays for it.
    with torch.inference_mode():
        encode(torch.randn(min(batch_size, n_images), 3, size, size, device=dev))
    C.sync(device)

    # ------------------------------------------------------- clipbench path
    t0 = time.perf_counter()
    decoded = decode(picked, spec, 32, args.num_workers, "decode cifar10/test") if real else picked
    images = decoded.images.to(dev)
    C.sync(device)
    decode_s = time.perf_counter() - t0
    with torch.inference_mode():
        encode(spec.batch_transform(images[:batch_size]))  # one untimed batch at this exact shape
        C.sync(device)
        t0 = time.perf_counter()
        for _ in range(passes):
            for i in range(0, n_images, batch_size):
                feats = encode(spec.batch_transform(images[i : i + batch_size]))
        C.sync(device)
        encode_s = time.perf_counter() - t0
    clip_rate = passes * n_images / encode_s
    clip_e2e = n_images / (decode_s + encode_s / passes)
    print(f"clipbench on-device: {clip_rate:,.1f} images/s encode-only; decode {decode_s:.1f}s; end-to-end {clip_e2e:,.1f} images/s")
    del feats

    # ----------------------------------------------------------- naive path
    rows = [
        {"path": "clipbench on-device (encode only)", "images": passes * n_images, "seconds": encode_s, "images_per_s": clip_rate},
        {
            "path": "clipbench on-device (incl. one-time decode)",
            "images": n_images,
            "seconds": decode_s + encode_s / passes,
            "images_per_s": clip_e2e,
        },
    ]
    naive_rate = None
    if not args.skip_naive:
        if real:
            from torchvision.datasets import ImageFolder

            naive_ds: Dataset = torch.utils.data.Subset(ImageFolder(str(root / "test"), transform=preprocess), index)
        else:
            from PIL import Image

            class _PIL(Dataset):
                def __len__(self):
                    return n_images

                def __getitem__(self, i):
                    return preprocess(Image.fromarray(synthetic.images[i].permute(1, 2, 0).numpy())), 0

            naive_ds = _PIL()
        loader = DataLoader(naive_ds, batch_size=batch_size, num_workers=args.num_workers, pin_memory=cuda)
        with torch.inference_mode():
            t0 = time.perf_counter()
            for x, _ in loader:
                encode(x.to(dev, non_blocking=True))
            C.sync(device)
            naive_s = time.perf_counter() - t0
        naive_rate = n_images / naive_s
        print(f"naive DataLoader + open_clip preprocess: {naive_rate:,.1f} images/s")
        rows.append(
            {
                "path": f"naive DataLoader({args.num_workers} workers) + open_clip preprocess",
                "images": n_images,
                "seconds": naive_s,
                "images_per_s": naive_rate,
            }
        )
    for r in rows:
        r["ratio_vs_naive"] = (r["images_per_s"] / naive_rate) if naive_rate else None

    summary = {
        "clipbench_images_per_s": clip_rate,
        "clipbench_end_to_end_images_per_s": clip_e2e,
        "naive_images_per_s": naive_rate,
        "ratio_clipbench_over_naive": (clip_rate / naive_rate) if naive_rate else None,
        "gpu_target_images_per_s": TARGET_GPU_IMAGES_PER_S,
        "verdict": ("PASS" if clip_rate >= TARGET_GPU_IMAGES_PER_S else "FAIL") if cuda else "pending (GPU target; this is a CPU run)",
    }
    params = {
        "model": args.model,
        "pretrained": None,
        "data": data_desc,
        "images": n_images,
        "batch_size": batch_size,
        "passes": passes,
        "num_workers": args.num_workers,
        "precision": "bf16 autocast" if cuda else "fp32",
        "channels_last": channels_last,
        "input_size": size,
        "interpolation": spec.interpolation,
    }
    notes = [
        "same model, precision and inference_mode on both paths; only the input pipeline differs",
        "decode: one-time JPEG -> uint8 32x32 (cached by CLIPDataModule in real runs), then resize to 224 on the device per batch",
    ]
    if cuda:
        notes.append(f"GPU target >= {TARGET_GPU_IMAGES_PER_S:,.0f} images/s (H100): {summary['verdict']}")
    else:
        notes.append(f"GPU target (H100 >= {TARGET_GPU_IMAGES_PER_S:,.0f} images/s) is pending: run with --device cuda on the GPU machine")
    C.save_results(
        "zeroshot_throughput", info, params, rows, summary, notes, columns=["path", "images", "seconds", "images_per_s", "ratio_vs_naive"]
    )


if __name__ == "__main__":
    main()
