"""The restricted Lasso problems of the working-set solver, on the CPU: compiled coordinate descent.

Each row's problem is small (its working set: tens of concepts) and given by its Gram matrix G and
b = D_S z::

    min_w  w'Gw - 2 b'w + lam |w|_1        (+ ||z||^2; w >= 0 with ``nonneg``)

Solved one row per task, both cores sharing the rows: a row's G stays in cache for all its sweeps,
where a batched tensor method reads every row's G from memory at each iteration (FISTA over a batch of
2048 rows of 64 concepts spent most of its time there). Coordinate descent, as scikit-learn's Lasso
and Celer, plus an exact step on the sign pattern once the support has settled: coordinate descent
finds the support early but converges on it slowly when concepts are nearly collinear (a text tower
that maps many words almost alike), and over a fixed sign pattern the problem is a linear system.

A row stops once its duality gap is within ``tol`` of its objective (see ``solver._gap``; the same
formula, in float64, on the working set).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from clipbench.compiled import use_work_queue

use_work_queue()


def solve(gram: Tensor, b: Tensor, zz: Tensor, w: Tensor, lam: float, nonneg: bool, tol: float, max_iter: int, resolution: float):
    """Every row's restricted problem given its Gram matrix (n, k, k) and b (n, k), warm-started at
    ``w`` (n, k); float64 CPU tensors. Returns the solutions (n, k) and the sweeps each row took (n,)."""
    solution = w.contiguous().numpy().copy()
    sweeps = np.zeros(len(b), dtype=np.int64)
    _solve_rows(gram.contiguous().numpy(), b.contiguous().numpy(), zz.numpy(), solution, lam, nonneg, tol, max_iter, resolution, sweeps)
    return torch.from_numpy(solution), torch.from_numpy(sweeps)


def swap_and_solve(
    dictionary_gram: Tensor,
    correlations: Tensor,
    rows: Tensor,
    base: Tensor,
    base_rows: Tensor,
    candidates: Tensor,
    w: Tensor,
    zz: Tensor,
    lam: float,
    nonneg: bool,
    tol: float,
    max_iter: int,
    resolution: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every row's restricted problem, its working set improved before the next dense check.

    Each row reads its Gram matrix from ``dictionary_gram`` (K, K) and b from ``correlations[rows]``
    (D z). Once solved, its correlations with the whole dictionary are brought up to date from
    ``base[base_rows]`` (D r, exact, at the warm start ``w``) through the rows of D D^T of the weights
    that changed: a product over the support (tens of concepts) instead of over the d dimensions,
    cheaper than the dense check, but in the inputs' precision, so it only chooses concepts and
    never certifies. The concepts that violate optimality by it replace the working set's concepts
    of weight zero, and the row is solved again (at most ``MAX_SWAPS`` times): the dense check that
    follows then finds most rows done, where the concepts most correlated with z, or most violating
    at the last check, miss a few of the support (the support moves as the weights settle).

    Returns the working sets (n, k), their solutions (n, k, float64) and the sweeps each row took (n,)."""
    chosen = candidates.contiguous().numpy().copy()
    solution = w.contiguous().double().numpy().copy()
    sweeps = np.zeros(len(chosen), dtype=np.int64)
    _swap_and_solve_rows(
        dictionary_gram.numpy(),
        correlations.numpy(),
        rows.numpy(),
        base.numpy(),
        base_rows.numpy(),
        chosen,
        solution,
        zz.double().numpy(),
        lam,
        nonneg,
        tol,
        max_iter,
        resolution,
        sweeps,
    )
    return torch.from_numpy(chosen), torch.from_numpy(solution), torch.from_numpy(sweeps)


MAX_SWAPS = 8  # working-set improvements per row and round


@numba.njit(cache=True, parallel=True)
def _solve_rows(gram, b, zz, w, lam, nonneg, tol, max_iter, resolution, sweeps):  # pragma: no cover - compiled
    for row in numba.prange(len(b)):
        sweeps[row] = _solve_row(gram[row], b[row], zz[row], w[row], lam, nonneg, tol, max_iter, resolution)


@numba.njit(cache=True, parallel=True)
def _swap_and_solve_rows(
    dictionary_gram, correlations, rows, base, base_rows, candidates, w, zz, lam, nonneg, tol, max_iter, resolution, sweeps
):  # pragma: no cover - compiled
    for i in numba.prange(len(candidates)):
        sweeps[i] = _swap_and_solve_row(
            dictionary_gram, correlations[rows[i]], base[base_rows[i]], candidates[i], w[i], zz[i], lam, nonneg, tol, max_iter, resolution
        )


@numba.njit(cache=True)
def _swap_and_solve_row(dictionary_gram, dz, base, concepts, w, zz, lam, nonneg, tol, max_iter, resolution):  # pragma: no cover - compiled
    k = len(concepts)
    start_concepts, start_w = concepts.copy(), w.copy()
    member = np.zeros(len(dz), dtype=np.bool_)
    member[concepts] = True
    gram, b = np.empty((k, k)), np.empty(k)
    sweeps = 0
    for swap in range(MAX_SWAPS + 1):
        for i in range(k):
            b[i] = dz[concepts[i]]
            for j in range(k):
                gram[i, j] = dictionary_gram[concepts[i], concepts[j]]
        sweeps += _solve_row(gram, b, zz, w, lam, nonneg, tol, max_iter, resolution)
        if swap == MAX_SWAPS:
            break
        corr = _updated_correlations(dictionary_gram, base, start_concepts, start_w, concepts, w)
        violators = np.array([j for j in range(len(corr)) if not member[j] and 2 * (corr[j] if nonneg else abs(corr[j])) > lam])
        free = np.nonzero(w == 0)[0]
        if len(violators) == 0 or len(free) == 0:
            break
        score = corr[violators] if nonneg else np.abs(corr[violators])
        entering = violators[np.argsort(-score)[: len(free)]]
        for slot, concept in zip(free[: len(entering)], entering):
            member[concepts[slot]] = False
            member[concept] = True
            concepts[slot] = concept
    return sweeps


@numba.njit(cache=True)
def _updated_correlations(dictionary_gram, base, start_concepts, start_w, concepts, w):  # pragma: no cover - compiled
    """D r for the weights ``w`` on ``concepts``, from ``base``, D r at ``start_w`` on ``start_concepts``:
    base + sum_i start_w_i D D_i - sum_i w_i D D_i (D D_i: a row of the dictionary's Gram matrix)."""
    corr = base.astype(np.float64)
    for weights, members, sign in ((start_w, start_concepts, 1.0), (w, concepts, -1.0)):
        for i in range(len(members)):
            if weights[i] != 0:
                row, step = dictionary_gram[members[i]], sign * weights[i]
                for j in range(len(corr)):
                    corr[j] += step * row[j]
    return corr


CHECK_EVERY = 5  # sweeps between duality-gap checks


@numba.njit(cache=True)
def _solve_row(gram, b, zz, w, lam, nonneg, tol, max_iter, resolution):  # pragma: no cover - compiled
    k = len(b)
    q = gram @ w  # G w, kept up to date by every coordinate step
    support = w != 0
    for sweep in range(1, max_iter + 1):
        for j in range(k):
            diagonal = gram[j, j]
            if diagonal <= 0:  # an all-zero concept can take no weight
                continue
            u = w[j] - (q[j] - b[j]) / diagonal
            threshold = lam / (2 * diagonal)
            new = max(u - threshold, 0.0) if nonneg else np.sign(u) * max(abs(u) - threshold, 0.0)
            if new != w[j]:
                delta = new - w[j]
                for i in range(k):
                    q[i] += delta * gram[j, i]
                w[j] = new
        if sweep % CHECK_EVERY and sweep != max_iter:
            continue
        q[:] = gram @ w  # the incremental updates drift
        if _gap_within(b, zz, w, q, lam, nonneg, tol):
            return sweep
        # The exact step once the support has settled, and every fifth check in any case (nearly
        # collinear concepts can keep a support swapping for long).
        settled = w != 0
        due = np.array_equal(settled, support) or sweep % (5 * CHECK_EVERY) == 0
        if due and settled.any() and _pattern_step(gram, b, w, q, lam, resolution):
            q[:] = gram @ w
            if _gap_within(b, zz, w, q, lam, nonneg, tol):
                return sweep
        support = settled
    return max_iter


@numba.njit(cache=True)
def _gap_within(b, zz, w, q, lam, nonneg, tol):  # pragma: no cover - compiled
    """solver._gap on the working set: is the duality gap at most ``tol`` times the objective?"""
    bw = b @ w
    zr = zz - bw
    rr = zz - 2 * bw + w @ q
    corr = b - q  # D_S r
    max_corr = corr.max() if nonneg else np.abs(corr).max()
    primal = rr + lam * np.abs(w).sum()
    tiny = np.finfo(np.float64).tiny
    s = max(min(zr / max(rr, tiny), (lam / 2) / max(max_corr, tiny)), 0.0)
    return primal - (2 * s * zr - s * s * rr) <= tol * primal


@numba.njit(cache=True)
def _pattern_step(gram, b, w, q, lam, resolution):  # pragma: no cover - compiled
    """Active-set descent from w on its support (as Lawson and Hanson's NNLS, and the batched
    solver's ``_support_step``): step towards x, the minimiser over w's sign pattern (G_AA x =
    b_A - lam/2 sign(w_A) on the support A), as far as the signs hold; a weight that reaches zero
    first leaves the support and the step repeats on the smaller one, until a full step lands on its
    minimiser. Where dropping every flipped weight of x at once lowers the objective more, that is
    taken instead. w is replaced if the objective dropped; returns whether it was."""
    current = w.copy()
    for _ in range(len(w)):
        active = np.nonzero(current)[0]
        if len(active) == 0:
            break
        now, sign = current[active], np.sign(current[active])
        system = gram[active][:, active].copy()
        ridge = resolution * np.diag(system).max()  # keeps duplicate concepts factorisable
        for i in range(len(active)):
            system[i, i] += ridge
        x = _cholesky_solve(system, b[active] - lam / 2 * sign)
        if not np.all(np.isfinite(x)):
            break
        flips = x * sign <= 0
        if not flips.any():
            current[active] = x
            break
        ratio = np.where(flips, now / (now - x), np.inf)
        alpha = min(ratio.min(), 1.0)
        step = np.where(flips & (ratio <= alpha), 0.0, now + alpha * (x - now))
        projected = np.where(flips, 0.0, x)
        stepped, dropped = current.copy(), current.copy()
        stepped[active], dropped[active] = step, projected
        current = dropped if _objective(gram, b, dropped, lam) < _objective(gram, b, stepped, lam) else stepped
    if _objective(gram, b, current, lam) >= w @ q - 2 * (b @ w) + lam * np.abs(w).sum():
        return False
    w[:] = current
    return True


@numba.njit(cache=True)
def _objective(gram, b, w, lam):  # pragma: no cover - compiled
    """w'Gw - 2b'w + lam |w|_1: the objective less its constant ||z||^2."""
    return w @ (gram @ w) - 2 * (b @ w) + lam * np.abs(w).sum()


@numba.njit(cache=True)
def _cholesky_solve(system, rhs):  # pragma: no cover - compiled
    """x with system x = rhs for a symmetric positive-definite system; NaNs if it is not."""
    n = len(rhs)
    lower = np.zeros_like(system)
    for i in range(n):
        for j in range(i + 1):
            total = system[i, j] - lower[i, :j] @ lower[j, :j]
            if i == j:
                if not total > 0:
                    return np.full(n, np.nan)
                lower[i, i] = np.sqrt(total)
            else:
                lower[i, j] = total / lower[j, j]
    y = np.empty(n)
    for i in range(n):
        y[i] = (rhs[i] - lower[i, :i] @ y[:i]) / lower[i, i]
    x = np.empty(n)
    for i in range(n - 1, -1, -1):
        total = y[i]
        for j in range(i + 1, n):
            total -= lower[j, i] * x[j]
        x[i] = total / lower[i, i]
    return x
