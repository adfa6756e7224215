"""The compiled core of the similarity shuffle: exact top-k TF-IDF neighbours among unused rows.

No N x N matrix is ever formed (the reference's dense one needs 40 GB at 100,000 captions). The
TF-IDF matrix is read through its *postings* (for each term, the rows it occurs in: an inverted
index). The candidates of a visited row ``q`` are the unused rows sharing a term with it. Scoring
them all means accumulating over the postings of every term of ``q``, and most of that work is in
the postings of a few frequent terms, which carry little weight. The search skips what cannot
matter (the MaxScore rule of text retrieval, Turtle and Flood 1995):

1. score exactly (a row's CSR entries against ``q``) the rows in the postings of ``q``'s rarest
   terms, until the top list is full: its last score ``theta`` bounds the final one from below;
2. a term adds at most ``q_t`` times its largest weight in any row to a cosine. The most frequent
   terms, while their bounds sum below half of ``theta``, are set aside: a row sharing only them
   with ``q`` cannot enter the top list;
3. accumulate the other terms' part of each candidate's cosine over their postings, and score
   exactly the candidates whose part, plus the set-aside bound, could still enter the top list.

The top list is the ``k`` unused rows of highest cosine, ties broken by the lower row number; each
exact score sums its products in term order, so the result is the same as a full sparse product's.
A row whose list is empty (no unused row shares a term with it) takes a random unused row instead,
as the reference's top-k then holds only unrelated rows: so the rate Cs is reached. Used rows are
dropped from the postings (and the terms' largest weights lowered to those left) each time another
``COMPACT_EVERY`` of all rows got used, so late searches walk only what is left.

Visits run in blocks: the searches of a block's rows run in parallel threads, each against the
rows used before the block, and keep ``k + SPARE`` rows; the block is then consumed in visiting
order, each row taking the first ``k`` of its list still unused. That is exact (a row used meanwhile
only leaves the list), unless fewer than ``k`` are left of a full list: that row is searched again.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np
import scipy.sparse as sp

from clipbench.compiled import use_work_queue

use_work_queue()

SKIP_FRACTION = 0.5  # set-aside terms may add at most this fraction of theta: rows sharing only them stay unscored
ROUNDING = 1e-6  # margin for float32 rounding in the bounds
SPARE = 8  # rows kept beyond top_k by a search made ahead of its turn
VISITS_PER_THREAD = 128  # rows of a block per thread
COMPACT_EVERY = 0.02  # drop used rows from the postings each time this fraction of all rows got used


@numba.njit(cache=True)
def _better(value, row, best_scores, best_rows, j):  # pragma: no cover (compiled)
    return value > best_scores[j] or (value == best_scores[j] and row < best_rows[j])


@numba.njit(cache=True)
def _insert(best_rows, best_scores, found, value, row):  # pragma: no cover (compiled)
    """Insert (value, row) into the top list, sorted best first and holding ``found`` entries; returns its new size."""
    k = len(best_rows)
    if found == k and not _better(value, row, best_scores, best_rows, k - 1):
        return found
    j = found if found < k else k - 1
    while j > 0 and _better(value, row, best_scores, best_rows, j - 1):
        best_scores[j], best_rows[j] = best_scores[j - 1], best_rows[j - 1]
        j -= 1
    best_scores[j], best_rows[j] = value, row
    return min(found + 1, k)


@numba.njit(cache=True)
def _exact(row, matrix, query):  # pragma: no cover (compiled)
    """The cosine of ``row`` with the query (a dense vector), its products summed in term order."""
    indptr, indices, data = matrix
    value = np.float32(0.0)
    for e in range(indptr[row], indptr[row + 1]):
        value += data[e] * query[indices[e]]
    return value


@numba.njit(cache=True)
def _search(
    q, stamp, matrix, postings, term_weights, max_weight, used, query, seen, score, touched, best_rows, best_scores
):  # pragma: no cover
    """Fill the top list (``best_rows``, best first) of row ``q`` among the unused rows other than
    ``q`` (module docstring); returns its size. ``query``, ``score`` (zeros) and ``seen`` (never
    ``stamp``) are scratch arrays, left as they were found."""
    indptr, indices, data = matrix
    term_ptr, term_end, term_rows = postings
    k = len(best_rows)
    terms, weights = indices[indptr[q] : indptr[q + 1]], data[indptr[q] : indptr[q + 1]]
    for i in range(len(terms)):
        query[terms[i]] = weights[i]
    frequency = term_end[terms] - term_ptr[terms]
    done = np.zeros(len(terms), dtype=np.bool_)
    found = 0
    for i in np.argsort(frequency):  # 1. the rarest terms, until the top list is full
        if found == k:
            break
        done[i] = True
        for p in range(term_ptr[terms[i]], term_end[terms[i]]):
            other = term_rows[p]
            if not used[other] and other != q and seen[other] != stamp:
                seen[other] = stamp
                found = _insert(best_rows, best_scores, found, _exact(other, matrix, query), other)
    theta = best_scores[k - 1] if found == k else 0.0
    bounds = weights * max_weight[terms]
    slack = 0.0
    for i in np.argsort(-frequency):  # 2. set aside the most frequent terms
        if not done[i] and slack + bounds[i] < SKIP_FRACTION * theta:
            slack += bounds[i]
            done[i] = True
    m = 0
    for i in range(len(terms)):  # 3. accumulate the other terms' part
        if done[i]:
            continue
        for p in range(term_ptr[terms[i]], term_end[terms[i]]):
            other = term_rows[p]
            if used[other] or other == q:
                continue
            if score[other] == 0.0:
                touched[m] = other
                m += 1
            score[other] += weights[i] * term_weights[p]
    for j in range(m):  # ... and score exactly the rows that could still enter the top list
        other = touched[j]
        reachable = score[other] + slack + ROUNDING
        score[other] = 0.0
        if seen[other] != stamp and (found < k or reachable >= best_scores[k - 1]):
            found = _insert(best_rows, best_scores, found, _exact(other, matrix, query), other)
    for i in range(len(terms)):
        query[terms[i]] = 0.0
    return found


@numba.njit(cache=True)
def _compact(postings, term_weights, max_weight, used):  # pragma: no cover (compiled)
    """Drop used rows from every term's postings (in place, order kept) and lower the terms' largest
    weights to those of the rows left: later searches walk less and set more aside."""
    term_ptr, term_end, term_rows = postings
    for term in range(len(term_end)):
        kept = term_ptr[term]
        heaviest = np.float32(0.0)
        for p in range(term_ptr[term], term_end[term]):
            if not used[term_rows[p]]:
                term_rows[kept], term_weights[kept] = term_rows[p], term_weights[p]
                heaviest = max(heaviest, term_weights[p])
                kept += 1
        term_end[term] = kept
        max_weight[term] = heaviest


@numba.njit(cache=True)
def _any_unused(used, start):  # pragma: no cover (compiled)
    """The first unused row at or after ``start``, wrapping round; -1 if every row is used."""
    n = len(used)
    for step in range(n):
        row = (start + step) % n
        if not used[row]:
            return row
    return -1


@numba.njit(cache=True, parallel=True)
def _search_block(
    block, first_stamp, matrix, postings, term_weights, max_weight, used, scratch, lists, list_scores, counts
):  # pragma: no cover
    """:func:`_search` for every row of ``block`` at once, spread over the threads (one scratch set each)."""
    queries, seens, scores, toucheds = scratch
    threads = len(queries)
    share = (len(block) + threads - 1) // threads
    for t in numba.prange(threads):
        for i in range(t * share, min(len(block), (t + 1) * share)):
            counts[i] = _search(
                block[i], first_stamp + i, matrix, postings, term_weights, max_weight, used,
                queries[t], seens[t], scores[t], toucheds[t], lists[i], list_scores[i],
            )  # fmt: skip


@numba.njit(cache=True)
def _consume_block(
    block, first_stamp, lists, counts, matrix, postings, term_weights, max_weight, scratch, draws, target, used, source, pairs, state, top_k
):  # pragma: no cover
    """Visit the rows of ``block`` in order (module docstring); ``state`` = (misaligned rows, swaps,
    rows without a candidate, searches made again, swaps with an unrelated row) is updated in place."""
    queries, seens, scores, toucheds = scratch
    best_rows = np.empty(top_k, dtype=np.int64)
    best_scores = np.empty(top_k, dtype=np.float32)
    for i in range(len(block)):
        q = block[i]
        if state[0] >= target:
            return
        if used[q]:  # taken as a partner earlier in this block
            continue
        used[q] = True
        found = 0
        for j in range(counts[i]):
            if not used[lists[i, j]]:
                best_rows[found] = lists[i, j]
                found += 1
                if found == top_k:
                    break
        if found < top_k and counts[i] == lists.shape[1]:  # rows that mattered were taken meanwhile
            state[3] += 1
            found = _search(q, first_stamp + i, matrix, postings, term_weights, max_weight, used, queries[0], seens[0], scores[0], toucheds[0], best_rows, best_scores)  # fmt: skip
        if found > 0:
            partner = best_rows[int(draws[q] * found)]
        else:  # no unused row shares a term with q: a random unused one (the reference's top-k is then unrelated rows)
            partner = _any_unused(used, int(draws[q] * len(used)))
            if partner < 0:  # every other row is used
                state[2] += 1
                continue
            state[4] += 1
        used[partner] = True
        source[q], source[partner] = partner, q
        pairs[state[1], 0], pairs[state[1], 1] = q, partner
        state[1] += 1
        state[0] += 2


class NeighbourSwapper:
    """The state of a similarity shuffle over one TF-IDF matrix (see the module docstring)."""

    def __init__(self, tfidf: sp.csr_matrix, top_k: int) -> None:
        tfidf = tfidf.tocsr().astype(np.float32)
        tfidf.sort_indices()  # products are summed in term order
        by_term = tfidf.tocsc()
        by_term.sort_indices()
        n, features = tfidf.shape
        self.matrix = (tfidf.indptr.astype(np.int64), tfidf.indices.astype(np.int64), tfidf.data)
        self.postings = (by_term.indptr.astype(np.int64), by_term.indptr[1:].astype(np.int64), by_term.indices.astype(np.int32))
        self.term_weights = by_term.data
        self.max_weight = np.zeros(features, dtype=np.float32)
        nonempty = np.diff(by_term.indptr) > 0
        if nonempty.any():
            self.max_weight[nonempty] = np.maximum.reduceat(by_term.data, by_term.indptr[:-1][nonempty])
        threads = numba.get_num_threads()
        self.scratch = (
            np.zeros((threads, features), dtype=np.float32),
            np.full((threads, n), -1, dtype=np.int64),
            np.zeros((threads, n), dtype=np.float32),
            np.empty((threads, n), dtype=np.int64),
        )
        self.block = VISITS_PER_THREAD * threads
        self.lists = np.empty((self.block, top_k + SPARE), dtype=np.int64)
        self.list_scores = np.empty((self.block, top_k + SPARE), dtype=np.float32)
        self.counts = np.zeros(self.block, dtype=np.int64)
        self.top_k = top_k
        self.used = np.zeros(n, dtype=bool)
        self.source = np.arange(n, dtype=np.int64)
        self.pairs = np.empty((n // 2, 2), dtype=np.int64)
        self.state = np.zeros(5, dtype=np.int64)  # misaligned rows, swaps, rows without a candidate, searches made again, unrelated swaps
        self._stamp = 0

    def visit(self, order: np.ndarray, draws: np.ndarray, target: float, progress: Callable[[int], object] | None = None) -> None:
        """Visit the rows of ``order`` in turn, skipping used ones, until ``target`` rows are misaligned.
        Blocks are the next unused rows (so no search is made for a row already taken); ``progress``
        gets the misaligned rows each block added."""
        _compact(self.postings, self.term_weights, self.max_weight, self.used)  # rows without a usable caption
        position, compacted = 0, int(self.state[0])
        while self.state[0] < target and position < len(order):
            window = order[position : position + 4 * self.block]
            free = np.flatnonzero(~self.used[window])[: self.block]
            position += int(free[-1]) + 1 if len(free) else len(window)
            if not len(free):
                continue
            block, before, stamps = window[free], int(self.state[0]), self._stamp
            self._stamp += 2 * len(block)  # one stamp per search made ahead, one per search made again
            args = (self.matrix, self.postings, self.term_weights, self.max_weight)
            _search_block(block, stamps, *args, self.used, self.scratch, self.lists, self.list_scores, self.counts)
            _consume_block(
                block, stamps + len(block), self.lists, self.counts, *args, self.scratch, draws, target,
                self.used, self.source, self.pairs, self.state, self.top_k,
            )  # fmt: skip
            if self.state[0] - compacted >= COMPACT_EVERY * len(self.used):
                _compact(self.postings, self.term_weights, self.max_weight, self.used)
                compacted = int(self.state[0])
            if progress is not None:
                progress(int(self.state[0]) - before)
