"""Caption shuffling at scale: 1,000,000 synthetic captions (target: under 5 minutes and 8 GB on 2 cores).

Each configuration runs in a fresh process (so that its peak resident memory is its own): it
generates the captions (:func:`clipbench.misalign.synthetic.synthetic_captions`, not timed), then
times the TF-IDF matrix and the shuffle, and reports wall time, CPU time and peak RSS.

Side by side, at a size the reference can hold (``--reference-rows``, 20,000 by default), the
reference's own algorithm (``generate_misaligned_text.py`` of feature-purity-clip: a dense N x N
similarity matrix, ``np.argsort`` of a full row per visit, used rows masked one by one) against
clipbench's, on the same captions; both give the same kind of result (not the same rows: the
reference fills short top-k lists with unrelated rows and breaks ties by argsort's order).

    python benchmarks/misalign_shuffle.py                        # 1M rows, Cs 0.1 / 0.3 / 0.8
    python benchmarks/misalign_shuffle.py --rows 100000 --cs 0.3  # smoke run

The shuffle runs on the CPU whatever ``--device`` says (there is no GPU path: the work is a sparse,
sequential greedy); the device is recorded with the results.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import resource
import time

import _common
import numpy as np


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def clipbench_run(rows: int, cs: float, mode: str, seed: int) -> dict:
    from clipbench.misalign.shuffle import random_shuffle, similarity_shuffle, tfidf_matrix, usable_captions
    from clipbench.misalign.synthetic import synthetic_captions

    captions = synthetic_captions(rows, seed=seed)
    wall, cpu = time.perf_counter(), time.process_time()
    usable = usable_captions(captions)
    if mode == "random":
        shuffle, tfidf_s = random_shuffle(rows, cs, seed, usable), 0.0
    else:
        tfidf = tfidf_matrix(captions)
        tfidf_s = time.perf_counter() - wall
        shuffle = similarity_shuffle(tfidf, cs, seed, usable=usable, progress=False)
    return {
        "method": "clipbench",
        "mode": mode,
        "rows": rows,
        "cs": cs,
        "achieved": shuffle.achieved,
        "tfidf_s": tfidf_s,
        "shuffle_s": time.perf_counter() - wall - tfidf_s,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "peak_rss_gib": _peak_rss_gib(),
    }


def reference_run(rows: int, cs: float, mode: str, seed: int, top_k: int = 10) -> dict:
    """The reference's algorithm as it is written (dense similarity, per-visit argsort), on the CPU."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from clipbench.misalign.synthetic import synthetic_captions

    captions = synthetic_captions(rows, seed=seed)
    wall, cpu = time.perf_counter(), time.process_time()
    texts = [re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", t.lower())).strip() for t in captions]
    vectorizer = TfidfVectorizer(max_features=5000, stop_words="english", ngram_range=(1, 2), min_df=2, max_df=0.95)
    matrix = vectorizer.fit_transform(texts).astype(np.float32)
    similarity = (matrix @ matrix.T).toarray()  # the reference's N x N matrix (it builds it from dense rows, on GPUs)
    tfidf_s = time.perf_counter() - wall
    np.random.seed(seed)
    indices = np.arange(rows)
    np.random.shuffle(indices)
    used, swapped = set(), 0
    for source in indices:
        if swapped >= int(cs * rows):
            break
        if source in used:
            continue
        scores = similarity[source].copy()
        scores[source] = -1
        for other in used:
            scores[other] = -1
        top = [i for i in np.argsort(scores)[-top_k:] if scores[i] >= 0]
        if top:
            target = np.random.choice(top)
            used.update((source, target))
            swapped += 2
    return {
        "method": "reference (dense)",
        "mode": mode,
        "rows": rows,
        "cs": cs,
        "achieved": swapped / rows,
        "tfidf_s": tfidf_s,
        "shuffle_s": time.perf_counter() - wall - tfidf_s,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "peak_rss_gib": _peak_rss_gib(),
    }


def _in_fresh_process(function, *args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_arg(parser)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cs", default="0.1,0.3,0.8", help="comma-separated rates")
    parser.add_argument("--modes", default="similarity,random")
    parser.add_argument("--reference-rows", type=int, default=20_000, help="rows for the side-by-side run with the reference (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = _common.describe_device(_common.resolve_device(args.device))
    rates = [float(c) for c in args.cs.split(",")]
    rows = []
    for mode in args.modes.split(","):
        for cs in rates:
            rows.append(_in_fresh_process(clipbench_run, args.rows, cs, mode, args.seed))
            print(rows[-1], flush=True)
    summary = {}
    if args.reference_rows:
        cs = 0.3
        ours = _in_fresh_process(clipbench_run, args.reference_rows, cs, "similarity", args.seed)
        theirs = _in_fresh_process(reference_run, args.reference_rows, cs, "similarity", args.seed)
        rows += [ours, theirs]
        summary = {
            "reference_rows": args.reference_rows,
            "speedup_vs_reference": theirs["wall_s"] / ours["wall_s"],
            "reference_dense_matrix_gib_at_rows": args.rows**2 * 4 / 2**30,
        }
    similar = [r for r in rows if r["method"] == "clipbench" and r["mode"] == "similarity" and r["rows"] == args.rows]
    if similar:
        summary.update(worst_wall_s=max(r["wall_s"] for r in similar), worst_peak_rss_gib=max(r["peak_rss_gib"] for r in similar))
    notes = [
        f"{args.rows:,} synthetic web-style captions (clipbench.misalign.synthetic, seed {args.seed}); each row a fresh process.",
        "wall_s/cpu_s: TF-IDF plus shuffle, caption generation excluded; peak_rss_gib: the process's peak resident memory.",
        "target: similarity shuffle of 1M captions under 300 s and 8 GiB on 2 cores.",
        "The machine's cores may be shared: see load_avg_at_start/end in the JSON; cpu_s is less sensitive to it than wall_s.",
    ]
    _common.save_results(
        "misalign_shuffle",
        info,
        vars(args),
        rows,
        summary,
        notes,
        columns=["method", "mode", "rows", "cs", "achieved", "tfidf_s", "shuffle_s", "wall_s", "cpu_s", "peak_rss_gib"],
        suffix="" if args.rows >= 1_000_000 else "_smoke",
    )


if __name__ == "__main__":
    main()
