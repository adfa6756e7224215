"""Sparse coding throughput: clipbench's batched Lasso against scikit-learn's one embedding at a time.

SpLiCE's default path (``splice/model.py``, solver ``skl``) fits ``Lasso(alpha=lam / (2 d),
fit_intercept=False, positive=True, max_iter=10000, tol=1e-6)`` once per image embedding. clipbench
solves a whole batch at once (:func:`clipbench.sparse.solver.lasso`: working sets, FISTA and an
active-set finish, certified by the duality gap). Same dictionary, same embeddings, same lambda:

- embeddings solved per second, each way, and the ratio (target: >= 100x on 2 CPU cores; >= 50,000
  embeddings/s on one H100 with ``--device cuda``);
- the objective ||z - D^T w||^2 + lam ||w||_1 of each solution, computed here in float64: the
  relative difference from scikit-learn's on the embeddings both solved (target: within 1e-4);
- peak memory of the solver for ``--embeddings`` (10,000) embeddings at a time: the resident set
  sampled during the call, above what it was before (target: < 4 GB on CPU); on CUDA, torch's peak
  allocation;
- optionally (``--admm-embeddings N``) SpLiCE's ADMM (``splice/admm.py``: a K x K Cholesky factor cached,
  rho 5, tol 1e-6, at most 2000 iterations) on N embeddings at once, the batched alternative the solver
  was chosen against.

Dictionaries (``--dictionary``):

- ``synthetic`` (default): 10,000 unit concepts in 512 dimensions (ViT-B/32's), drawn with a power-law
  spectrum (eigenvalue i^-decay, ``--decay``) so that they crowd a few directions as a text tower's do,
  not the near-orthogonal directions of a Gaussian; images are non-negative mixtures of 8 concepts plus
  their own component (``--noise``); both centred and renormalised as the task does (SpLiCE's recipe);
- ``checkpoint``: a real model: the concepts of the default vocabulary embedded by a clipbench checkpoint's
  text tower and its CIFAR-10 test images (``--checkpoint``, ``--data-root``; the task's embedding caches).

    python benchmarks/sparse_solver.py [--device cpu|cuda] [--concepts 10000] [--dim 512] [--embeddings 10000]
        [--reference 30] [--lam 0.25] [--dictionary synthetic|checkpoint] [--admm-embeddings 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import _common as C
import numpy as np
import torch
import torch.nn.functional as F

from clipbench.sparse.decomposition import centre, modality_mean
from clipbench.sparse.solver import lasso

CPU_RATIO_TARGET, CUDA_RATE_TARGET, CPU_MEMORY_TARGET = 100.0, 50_000.0, 4e9
SPLICE_SKLEARN = {"fit_intercept": False, "max_iter": 10_000, "tol": 1e-6}  # splice/model.py
SPLICE_ADMM = {"rho": 5.0, "tol": 1e-6, "max_iter": 2000}  # splice/model.py, splice/admm.py


# ------------------------------------------------------------------------------------ problems
def synthetic_problem(concepts: int, dim: int, embeddings: int, decay: float, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, dim + 1, dtype=torch.float64) ** (-decay / 2)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]

    def draw(n: int) -> torch.Tensor:
        return F.normalize((torch.randn(n, dim, generator=generator, dtype=torch.float64) * scale) @ basis.T, dim=1)

    dictionary = draw(concepts)
    atoms = torch.randint(0, concepts, (embeddings, 8), generator=generator)
    weights = torch.rand(embeddings, 8, generator=generator, dtype=torch.float64)
    mixtures = F.normalize((dictionary[atoms] * weights.unsqueeze(2)).sum(dim=1), dim=1)
    images = F.normalize(mixtures + noise * draw(embeddings), dim=1)
    return centre(dictionary, modality_mean(dictionary)).float(), centre(images, modality_mean(images)).float()


def checkpoint_problem(checkpoint: str, data_root: str, concepts: int, embeddings: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's own dictionary and centred test embeddings (``image_mean_split=train``), read from or
    written to the repository's embedding caches."""
    from hydra.utils import instantiate

    from clipbench.embeddings import EvalDataModule, model_identity
    from clipbench.evaluation import model_entries
    from clipbench.modules.evaluation import eval_trainer, predict_embeddings
    from clipbench.runs import compose_config
    from clipbench.sparse.vocabulary import load_vocabulary, select
    from clipbench.tasks.sparse import concept_embeddings

    cache = C.REPO_ROOT / "outputs" / "cache"
    overrides = ["task=sparse", f"ckpt_path={checkpoint}", "data=cifar10", f"data.root={data_root}", "trainer.enable_progress_bar=false"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("evaluate", overrides, tmp, cache)
        (model_cfg,) = model_entries(cfg).values()
        backbone = instantiate(model_cfg.backbone).eval()
        trainer, model_id = eval_trainer(cfg), model_identity(model_cfg.backbone)
        datamodule = EvalDataModule.from_config(cfg.data, backbone.image_spec)
        test = predict_embeddings(trainer, backbone, datamodule, "test", cache, model_id)[0]
        train = predict_embeddings(trainer, backbone, datamodule, "train", cache, model_id)[0]
        vocabulary = select(load_vocabulary("default", []), concepts, backbone.truncates)
        text = concept_embeddings(trainer, backbone, vocabulary.concepts, cache, model_id)
    images = test.repeat((embeddings + len(test) - 1) // len(test), 1)[:embeddings]  # cycled up to the count asked for
    return centre(text.float(), modality_mean(text)), centre(images.float(), modality_mean(train))


def describe(dictionary: torch.Tensor) -> dict:
    """How crowded the concepts are: effective rank of the spectrum, mean |cos| between concepts."""
    eigen = torch.linalg.svdvals(dictionary.double()) ** 2
    sample = dictionary[torch.randperm(len(dictionary), generator=torch.Generator().manual_seed(0))[:2000]].double()
    cosines = (sample @ sample.T).abs()
    return {
        "effective_rank": round(float(eigen.sum() ** 2 / (eigen**2).sum()), 1),
        "mean_abs_cos": round(float((cosines.sum() - len(sample)) / (len(sample) * (len(sample) - 1))), 3),
    }


# ------------------------------------------------------------------------------------ solvers
def objectives(embeddings: np.ndarray, dictionary: np.ndarray, weights: np.ndarray, lam: float) -> np.ndarray:
    """||z - D^T w||^2 + lam ||w||_1 per row, in float64."""
    residual = embeddings.astype(np.float64) - weights.astype(np.float64) @ dictionary.astype(np.float64)
    return (residual**2).sum(axis=1) + lam * np.abs(weights).sum(axis=1)


def sklearn_one_at_a_time(embeddings: np.ndarray, dictionary: np.ndarray, lam: float, nonneg: bool) -> tuple[np.ndarray, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    model = Lasso(alpha=lam / (2 * dictionary.shape[1]), positive=nonneg, **SPLICE_SKLEARN)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported through the objective instead
        weights = np.stack([model.fit(dictionary.T, z).coef_.copy() for z in embeddings])
    return weights, time.perf_counter() - started


def splice_admm(embeddings: torch.Tensor, dictionary: torch.Tensor, lam: float, device: str) -> tuple[torch.Tensor, float, int]:
    """SpLiCE's ADMM (splice/admm.py), batched over the embeddings, with its cached Cholesky factor;
    started from zero rather than its random start."""
    rho, tol, max_iter = SPLICE_ADMM["rho"], SPLICE_ADMM["tol"], SPLICE_ADMM["max_iter"]
    C.sync(device)
    started = time.perf_counter()
    factor = torch.linalg.cholesky(2 * dictionary @ dictionary.T + rho * torch.eye(len(dictionary), device=device))
    rhs = 2 * dictionary @ embeddings.T
    z = u = torch.zeros(len(dictionary), len(embeddings), device=device)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        previous = z
        x = torch.cholesky_solve(rhs + rho * (z - u), factor)
        z = (x + u - lam / rho).clamp_min(0)
        u = u + x - z
        if (x - z).norm(dim=0).max() < tol and (rho * (z - previous)).norm(dim=0).max() < tol:
            break
    C.sync(device)
    return z.T, time.perf_counter() - started, iterations


def ours(embeddings: torch.Tensor, dictionary: torch.Tensor, lam: float, nonneg: bool, device: str, chunk_size: int):
    """One call on every embedding; its time and its peak memory above the start."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        import psutil

        from clipbench.scoring.report import MemorySampler, release_freed_memory, tree_memory

        release_freed_memory()
        before = tree_memory(psutil.Process())
        sampler = MemorySampler(interval=0.02).start()
    # Warm-up, untimed: numba compiles the CPU kernels on a machine's first call (then caches them),
    # CUDA initialises its context. Enough rows per concept that it takes the timed call's path.
    lasso(embeddings[:8], dictionary[:64], lam, nonneg=nonneg)
    C.sync(device)
    started = time.perf_counter()
    codes = lasso(embeddings, dictionary, lam, nonneg=nonneg, chunk_size=chunk_size)
    C.sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else sampler.stop()
    return codes, seconds, peak, peak - before


def agreement(ours_objective: np.ndarray, reference: np.ndarray) -> dict:
    relative = (ours_objective - reference) / reference
    return {
        "objective_rel_diff_max": float(np.abs(relative).max()),
        "objective_rel_diff_mean": float(relative.mean()),
        "objective_rel_excess_max": float(relative.max()),  # > 0: worse than scikit-learn's on some embedding
    }


# ------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_device_arg(parser)
    parser.add_argument("--dictionary", choices=("synthetic", "checkpoint"), default="synthetic")
    parser.add_argument("--concepts", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512, help="synthetic: embedding dimension")
    parser.add_argument("--decay", type=float, default=0.8, help="synthetic: eigenvalue i of the concepts' spectrum ~ i^-decay")
    parser.add_argument("--noise", type=float, default=0.7, help="synthetic: weight of each image's own component")
    parser.add_argument("--embeddings", type=int, default=10_000, help="embeddings solved in one call by clipbench")
    parser.add_argument("--reference", type=int, default=30, help="of which scikit-learn solves this many, one at a time")
    parser.add_argument("--admm-embeddings", type=int, default=0, help="SpLiCE's ADMM on this many embeddings at once (0: skip)")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="embeddings per solver chunk (default: 4096 on CPU, all at once on CUDA)"
    )
    parser.add_argument("--lam", type=float, default=0.25)
    parser.add_argument("--signed", action="store_true", help="signed weights (default: w >= 0, as SpLiCE)")
    parser.add_argument("--checkpoint", default=str(C.REPO_ROOT / "outputs/ckpts/cifar10_fast_cpu/checkpoints/last.ckpt"))
    parser.add_argument("--data-root", default=str(C.REPO_ROOT.parent / "shared/data/cifar10"))
    parser.add_argument("--suffix", default="", help="appended to the result file names (e.g. _smoke)")
    args = parser.parse_args()
    device = C.resolve_device(args.device)
    info = C.describe_device(device)
    nonneg = not args.signed

    if args.dictionary == "synthetic":
        dictionary, embeddings = synthetic_problem(args.concepts, args.dim, args.embeddings, args.decay, args.noise, seed=0)
    else:
        dictionary, embeddings = checkpoint_problem(args.checkpoint, args.data_root, args.concepts, args.embeddings)
    shape = {"concepts": len(dictionary), "dim": dictionary.shape[1], **describe(dictionary)}
    print(f"dictionary {shape}, {len(embeddings)} embeddings, lam {args.lam}, {'w >= 0' if nonneg else 'signed'}, {device}")

    dictionary_dev, embeddings_dev = dictionary.to(device), embeddings.to(device)
    lasso(embeddings_dev[:64], dictionary_dev, args.lam, nonneg=nonneg)  # warm-up (kernels, allocator)
    chunk_size = args.chunk_size or (len(embeddings) if device == "cuda" else 4096)
    codes, seconds, peak, above = ours(embeddings_dev, dictionary_dev, args.lam, nonneg, device, chunk_size)
    codes = codes.to("cpu")
    z, d = embeddings.numpy(), dictionary.numpy()
    mine = objectives(z, d, codes.dense().numpy(), args.lam)

    reference = min(args.reference, len(embeddings))
    sk_weights, sk_seconds = sklearn_one_at_a_time(z[:reference], d, args.lam, nonneg)
    sk = objectives(z[:reference], d, sk_weights, args.lam)
    rows = [
        {
            "solver": f"clipbench lasso, batched ({device}, float32, chunks of {chunk_size})",
            "embeddings": len(embeddings),
            "seconds": seconds,
            "embeddings_per_s": len(embeddings) / seconds,
            "l0_mean": float(codes.l0.double().mean()),
            "objective_mean": float(mine.mean()),
            "converged": float(codes.converged.double().mean()),
            **agreement(mine[:reference], sk),
            "peak_memory_gb": peak / 1e9,
            "memory_above_start_gb": above / 1e9,
        },
        {
            "solver": "scikit-learn Lasso, one at a time (SpLiCE, tol 1e-6)",
            "embeddings": reference,
            "seconds": sk_seconds,
            "embeddings_per_s": reference / sk_seconds,
            "l0_mean": float((sk_weights != 0).sum(axis=1).mean()),
            "objective_mean": float(sk.mean()),
        },
    ]
    if args.admm_embeddings and nonneg:
        count = min(args.admm_embeddings, len(embeddings))
        admm_weights, admm_seconds, iterations = splice_admm(embeddings_dev[:count], dictionary_dev, args.lam, device)
        admm = objectives(z[:count], d, admm_weights.cpu().numpy(), args.lam)
        compared = min(count, reference)
        rows.append(
            {
                "solver": f"SpLiCE ADMM, batched ({device}, {iterations} iterations)",
                "embeddings": count,
                "seconds": admm_seconds,
                "embeddings_per_s": count / admm_seconds,
                "l0_mean": float((admm_weights > 0).sum(dim=1).double().mean()),
                "objective_mean": float(admm.mean()),
                **agreement(admm[:compared], sk[:compared]),
            }
        )

    ratio = rows[0]["embeddings_per_s"] / rows[1]["embeddings_per_s"]
    summary = {
        "speedup_vs_sklearn": ratio,
        "objective_rel_diff_max": rows[0]["objective_rel_diff_max"],
        "objective_rel_excess_max": rows[0]["objective_rel_excess_max"],
        "peak_memory_gb": rows[0]["peak_memory_gb"],
        "meets_speed_target": ratio >= CPU_RATIO_TARGET if device == "cpu" else rows[0]["embeddings_per_s"] >= CUDA_RATE_TARGET,
        "meets_objective_target": rows[0]["objective_rel_diff_max"] <= 1e-4,
        "meets_memory_target": peak < CPU_MEMORY_TARGET if device == "cpu" else None,
    }
    params = {**vars(args), **shape, "device": device}
    notes = [
        f"dictionary: {args.dictionary} ({shape['concepts']} x {shape['dim']}, effective rank {shape['effective_rank']}, "
        f"mean |cos| between concepts {shape['mean_abs_cos']}); lambda {args.lam}; both solvers on the same float32 inputs",
        f"objective_rel_diff: (ours - scikit-learn's) / scikit-learn's on the first {reference} embeddings, objectives computed "
        "in float64 from each solution (negative: ours is lower); excess: the largest signed difference (> 0: ours worse)",
        "peak memory: "
        + ("torch.cuda.max_memory_allocated" if device == "cuda" else "the process's resident set sampled every 20 ms during the call"),
    ]
    C.save_results("sparse_solver", info, params, rows, summary=summary, notes=notes, suffix=args.suffix)


if __name__ == "__main__":
    main()
