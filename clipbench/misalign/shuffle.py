"""Caption shuffling at rate Cs: swap captions among TF-IDF-similar rows, or permute them at random.

``similarity`` mode follows the reference (``generate_misaligned_text.py`` of feature-purity-clip):

1. captions are normalised (lower case, punctuation replaced by spaces, spaces collapsed) and turned
   into TF-IDF vectors: at most 5,000 features, 1- and 2-grams, English stop words removed, terms in
   at least 2 and at most 95% of the captions, rows L2-normalised (a dot product is a cosine);
2. rows are visited in a seeded random order; a row not yet used picks, uniformly, one of its
   ``top_k`` most similar rows not yet used, the two captions are swapped, both rows are marked used
   and counted misaligned; visiting stops once the count reaches Cs x N.

Where it differs from the reference, and why:

* The neighbours come from a search of the TF-IDF matrix's inverted index (only unused rows sharing
  a term are touched, and frequent terms are skipped where they cannot change the top-k:
  :mod:`clipbench.misalign.neighbours`). The reference builds the dense N x N similarity matrix:
  40 GB at 100,000 captions.
  The answer is the same: the exact top-k among the unused rows, recomputed as rows get used.
* A candidate must share a term with the row (cosine > 0). When fewer than ``top_k`` such rows are
  left, the reference fills its top-k with arbitrary unrelated rows (cosine 0); here the row picks
  among the ones that are left. A row with none left at all takes a random unused row, as the
  reference would (its top-k then holds only unrelated rows), so that the rate Cs is reached; those
  swaps are counted (``unrelated``). A row visited when no other row is unused keeps its caption
  (``no_candidate``).
* Rows without a usable caption (missing, not a string, blank) are never visited nor chosen.

``random`` mode: a seeded random choice of round(Cs x N) rows whose captions are permuted in one
cycle (Sattolo's algorithm), so that every chosen row gets another row's caption.

The result is :class:`Shuffle`: ``source[i]`` is the row whose caption row ``i`` now carries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from tqdm.auto import tqdm

from clipbench.misalign.neighbours import NeighbourSwapper

log = logging.getLogger(__name__)

MODES = ("similarity", "random")
TOP_K = 10


@dataclass
class Shuffle:
    """A caption assignment: row ``i`` carries the caption of row ``source[i]``."""

    source: np.ndarray  # int64 (N,)
    mode: str
    cs: float
    seed: int
    pairs: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))  # similarity: the swapped rows
    no_candidate: int = 0  # similarity: visited rows that found no unused row at all
    unrelated: int = 0  # similarity: swaps with a random unused row, none sharing a term being left

    @property
    def misaligned(self) -> np.ndarray:
        return self.source != np.arange(len(self.source))

    @property
    def achieved(self) -> float:
        """The fraction of rows whose caption came from another row."""
        return float(self.misaligned.mean()) if len(self.source) else 0.0


def usable_captions(captions: Sequence[Any]) -> np.ndarray:
    """Which rows have a caption to shuffle: a string with something besides spaces."""
    return np.fromiter((isinstance(c, str) and bool(c.strip()) for c in captions), dtype=bool, count=len(captions))


def normalize_captions(captions: Sequence[Any]) -> list[str]:
    """The reference's preprocessing: lower case, every non-word character a space, spaces collapsed.
    Anything that is not a string becomes the empty caption."""
    text = pd.Series([c if isinstance(c, str) else "" for c in captions], dtype="string")
    text = text.str.lower().str.replace(r"[^\w\s]", " ", regex=True).str.replace(r"\s+", " ", regex=True).str.strip()
    return text.tolist()


def tfidf_matrix(
    captions: Sequence[Any], max_features: int = 5000, ngram_range: tuple[int, int] = (1, 2), min_df: int = 2, max_df: float = 0.95
) -> sp.csr_matrix:
    """(N, features) L2-normalised TF-IDF rows of the normalised captions (float32, CSR). A corpus
    with no term that passes the document-frequency limits gives a matrix without columns."""
    vectorizer = TfidfVectorizer(
        max_features=max_features,
        stop_words="english",
        ngram_range=tuple(ngram_range),
        min_df=min_df,
        max_df=max_df,
        lowercase=False,  # normalize_captions did it
        dtype=np.float32,
    )
    try:
        matrix = vectorizer.fit_transform(normalize_captions(captions))
    except ValueError as err:  # no term left (tiny or degenerate corpora): nothing is similar to anything
        log.warning("TF-IDF of %d captions has no terms (%s): no row has a similar one", len(captions), err)
        return sp.csr_matrix((len(captions), 0), dtype=np.float32)
    return matrix.tocsr()


def pair_cosines(tfidf: sp.csr_matrix, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The TF-IDF cosine of rows ``a[i]`` and ``b[i]`` (rows are L2-normalised; 0 for an empty row)."""
    if len(a) == 0:
        return np.empty(0, dtype=np.float32)
    return np.asarray(tfidf[a].multiply(tfidf[b]).sum(axis=1)).ravel()


def similarity_shuffle(
    tfidf: sp.csr_matrix, cs: float, seed: int, top_k: int = TOP_K, usable: np.ndarray | None = None, progress: bool = True
) -> Shuffle:
    """Swap captions among TF-IDF neighbours until Cs x N rows are misaligned (module docstring)."""
    n = tfidf.shape[0]
    _check_rate(cs, top_k)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    draws = rng.random(n)  # row r's pick among its candidates
    if usable is not None:
        order = order[usable[order]]
    swapper = NeighbourSwapper(tfidf, top_k)
    if usable is not None:
        swapper.used[~usable] = True  # never a partner either
    target = cs * n
    with tqdm(total=int(np.ceil(target)), desc=f"similarity shuffle Cs={cs:g}", unit="row", disable=not progress) as bar:
        swapper.visit(order, draws, target, bar.update)
    misaligned, swaps, no_candidate, again, unrelated = (int(v) for v in swapper.state)
    log.debug("similarity shuffle: %d searches made ahead were redone", again)
    if unrelated:
        log.info("similarity shuffle: %d of %d swaps with an unrelated row (no unused row shared a term)", unrelated, swaps)
    if misaligned < target - 1:
        log.warning(
            "similarity shuffle reached %d misaligned rows of the %.0f asked for (Cs=%g): too few usable rows", misaligned, target, cs
        )
    return Shuffle(swapper.source, "similarity", cs, seed, swapper.pairs[:swaps].copy(), no_candidate, unrelated)


def random_shuffle(n: int, cs: float, seed: int, usable: np.ndarray | None = None) -> Shuffle:
    """round(Cs x N) usable rows, chosen at random, pass their captions round one random cycle."""
    _check_rate(cs)
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(usable) if usable is not None else np.arange(n)
    chosen = rng.permutation(candidates)[: min(round(cs * n), len(candidates))]
    source = np.arange(n, dtype=np.int64)
    if len(chosen) >= 2:  # one row alone cannot take another's caption
        source[chosen] = np.roll(chosen, -1)  # a random order, each taking the next one's caption: one cycle
    return Shuffle(source, "random", cs, seed)


def _check_rate(cs: float, top_k: int = TOP_K) -> None:
    if not 0 <= cs <= 1:
        raise ValueError(f"cs={cs} is invalid: expected a fraction in [0, 1]")
    if top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: expected a positive integer")


def shuffle_captions(
    captions: Sequence[Any], cs: float, mode: str = "similarity", seed: int = 0, top_k: int = TOP_K, progress: bool = True
) -> tuple[Shuffle, sp.csr_matrix | None]:
    """Shuffle a list of captions at rate ``cs``; returns the shuffle and, in similarity mode, the TF-IDF matrix."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: expected one of {MODES}")
    usable = usable_captions(captions)
    if mode == "random":
        return random_shuffle(len(captions), cs, seed, usable), None
    tfidf = tfidf_matrix(captions)
    return similarity_shuffle(tfidf, cs, seed, top_k, usable, progress=progress), tfidf


def shuffle_report(shuffle: Shuffle, captions: Sequence[Any], tfidf: sp.csr_matrix, seed: int) -> dict[str, Any]:
    """What a shuffle did: its rates, swaps, and the mean TF-IDF cosine of each misaligned row's new
    caption with its own, against that of as many random pairs of usable rows (at least 10,000)."""
    n = len(shuffle.source)
    usable = usable_captions(captions)
    moved = np.flatnonzero(shuffle.misaligned)
    rng = np.random.default_rng([seed, 1])
    pool = np.flatnonzero(usable)
    samples = max(len(moved), min(10_000, len(pool)))
    a, b = (rng.choice(pool, samples), rng.choice(pool, samples)) if len(pool) > 1 else (np.empty(0, int), np.empty(0, int))
    distinct = a != b
    swapped_cos, random_cos = pair_cosines(tfidf, moved, shuffle.source[moved]), pair_cosines(tfidf, a[distinct], b[distinct])
    text = np.asarray(captions, dtype=object)
    return {
        "mode": shuffle.mode,
        "cs": shuffle.cs,
        "rows": n,
        "usable_rows": int(usable.sum()),
        "rows_without_terms": int(np.sum(np.diff(tfidf.indptr) == 0)),
        "target_misaligned": shuffle.cs * n,
        "misaligned_rows": len(moved),
        "achieved_fraction": shuffle.achieved,
        "swaps": len(shuffle.pairs) if shuffle.mode == "similarity" else None,
        "no_candidate": shuffle.no_candidate,
        "unrelated_swaps": shuffle.unrelated if shuffle.mode == "similarity" else None,
        "mean_cosine_swapped": float(swapped_cos.mean()) if len(swapped_cos) else None,
        "mean_cosine_random_pairs": float(random_cos.mean()) if len(random_cos) else None,
        "random_pairs": int(distinct.sum()),
        "misaligned_with_same_text": int(np.sum(text[moved] == text[shuffle.source[moved]])),  # duplicate captions
        "seed": shuffle.seed,
    }
