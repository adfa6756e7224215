"""Sparse coding of many embeddings at once over a concept dictionary: the Lasso, batched.

For each row z of ``embeddings`` (N, d) and the dictionary ``D`` (K, d), one concept per row::

    min_w  ||z - D^T w||_2^2 + lam * ||w||_1        (w >= 0 with ``nonneg``, as SpLiCE)

scikit-learn's ``Lasso(alpha=lam / (2 d), fit_intercept=False, positive=nonneg)`` has the same
minimiser (its objective is this one divided by 2d). SpLiCE solves one image at a time with it.

Here every row is solved at once, on the CPU or a GPU, by a *working-set* method (as Celer, Blitz
and skglm do): the solution has few non-zeros among thousands of concepts, so each row gets a small
set of candidate concepts (its current support plus the concepts that most violate optimality), the
problem restricted to that set is solved on its k x k Gram matrix (read from the dictionary's Gram
matrix D D^T, computed once), and one dense product over the whole dictionary checks optimality.
Rows whose *duality gap* is within ``tol`` of their objective are done; the others get a larger
working set. The restricted problems are small: on the CPU, compiled coordinate descent solves them
one row per thread, in cache (:mod:`clipbench.sparse.restricted`); on an accelerator, FISTA solves
them all at once as one batched (B, k, k) problem.

The gap certifies the answer: the objective is at most ``tol`` (relative) above the optimum,
whatever the conditioning, which is what the agreement with scikit-learn is tested on. A dense
FISTA or ADMM over all K concepts costs two (d x K) products per iteration and per row, for hundreds
of iterations (SpLiCE's ADMM, with its cached K x K Cholesky factor, a K x K solve); here each round
costs one, for a handful of rounds (``benchmarks/sparse_solver.py`` measures this solver, SpLiCE's
ADMM and scikit-learn one embedding at a time on the same problem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from clipbench.sparse import restricted


class SolverError(ValueError):
    """The inputs of the solver are unusable (the message says which and why)."""


@dataclass
class SparseCodes:
    """The solution for N rows: each row's non-zero weights as (concept index, weight) pairs.

    ``indices`` and ``values`` are (N, k) with k the largest support of any row; a row with fewer
    non-zeros is padded with weight 0 (its padding indices are arbitrary concepts).
    """

    indices: Tensor  # (N, k) long
    values: Tensor  # (N, k)
    num_concepts: int  # K, the dictionary size
    objective: Tensor  # (N,) ||z - D^T w||^2 + lam ||w||_1 at the solution
    gap: Tensor  # (N,) duality gap: the objective is at most this far above the optimum
    iterations: Tensor  # (N,) iterations spent on the row, all rounds together (coordinate-descent sweeps or FISTA steps)
    rounds: Tensor  # (N,) working-set rounds (dense optimality checks) the row took
    converged: Tensor  # (N,) bool: gap <= tol * objective

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, rows: Tensor | slice) -> SparseCodes:
        """The solutions of some rows (an index tensor, a mask or a slice)."""
        return SparseCodes(num_concepts=self.num_concepts, **{f: getattr(self, f)[rows] for f in _ROW_FIELDS})

    def to(self, device: torch.device | str) -> SparseCodes:
        return SparseCodes(num_concepts=self.num_concepts, **{f: getattr(self, f).to(device) for f in _ROW_FIELDS})

    @property
    def l0(self) -> Tensor:
        """Non-zeros per row (N,)."""
        return (self.values != 0).sum(dim=1)

    def dense(self) -> Tensor:
        """The (N, K) weight matrix."""
        weights = self.values.new_zeros(len(self), self.num_concepts)
        return weights.scatter_add_(1, self.indices, self.values)

    def reconstruct(self, dictionary: Tensor) -> Tensor:
        """D^T w per row (N, d)."""
        return _combine(self.indices, self.values, dictionary)

    @staticmethod
    def cat(parts: list[SparseCodes]) -> SparseCodes:
        """Rows of several solutions, in order (supports padded to the widest)."""
        width = max(p.indices.shape[1] for p in parts)

        def pad(t: Tensor) -> Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]))

        return SparseCodes(
            num_concepts=parts[0].num_concepts,
            **{f: torch.cat([pad(getattr(p, f)) if f in ("indices", "values") else getattr(p, f) for p in parts]) for f in _ROW_FIELDS},
        )


_ROW_FIELDS = ("indices", "values", "objective", "gap", "iterations", "rounds", "converged")


def _combine(indices: Tensor, values: Tensor, dictionary: Tensor) -> Tensor:
    """sum_j values[n, j] D[indices[n, j]] per row n: a sparse (N, K) x dense (K, d) product, its
    cost and memory in the non-zeros only."""
    rows = torch.arange(len(indices), device=values.device).unsqueeze(1).expand_as(indices)
    coordinates = torch.stack([rows.flatten(), indices.flatten()])
    weights = torch.sparse_coo_tensor(coordinates, values.flatten(), (len(indices), len(dictionary)), check_invariants=False)
    return torch.sparse.mm(weights, dictionary)


def dictionary_gram(dictionary: Tensor, max_bytes: int = 1 << 30) -> Tensor | None:
    """The concepts' inner products D D^T (K, K), from which every working set's Gram matrix is read
    (and, on the CPU, the correlations that improve the working sets; see
    :func:`restricted.swap_and_solve`). None if it would take more than ``max_bytes``: the working
    sets' concepts are then gathered and multiplied each round. Solving many batches over one
    dictionary, compute it once and pass it to :func:`lasso`."""
    if len(dictionary) ** 2 * dictionary.element_size() > max_bytes:
        return None
    return dictionary @ dictionary.T


def lasso(
    embeddings: Tensor,
    dictionary: Tensor,
    lam: float,
    *,
    nonneg: bool = True,
    tol: float = 1e-5,
    max_iter: int = 2000,
    max_rounds: int = 20,
    working_set: int = 32,
    chunk_size: int = 4096,
    gram: Tensor | str | None = "auto",
    restricted_method: str = "auto",
) -> SparseCodes:
    """Solve the Lasso above for every row of ``embeddings`` (N, d) over ``dictionary`` (K, d).

    Runs on the device and in the floating dtype of the inputs. ``tol``: stop a row once its duality
    gap is at most ``tol`` times its objective. ``max_iter``: iterations per solve of a restricted
    problem (coordinate-descent sweeps on the CPU, FISTA steps elsewhere; on the CPU a round solves
    again after each improvement of the working set, at most ``restricted.MAX_SWAPS`` times);
    ``max_rounds``: working-set rounds (dense checks). The compiled method runs numba kernels on its
    work-queue threading layer, which refuses concurrent calls: do not call it from several threads
    at once. ``working_set``: the initial number of candidate concepts per row (it grows as needed).
    Rows are solved ``chunk_size`` at a time, which bounds the memory. ``gram``: the dictionary's
    :func:`dictionary_gram`, or None to gather the working sets' concepts each round instead; "auto"
    computes it when there are at least a tenth as many rows as concepts (below that it costs more
    than it saves). ``restricted_method``: how the restricted problems are solved, "compiled"
    (coordinate descent, one row per CPU thread), "batched" (FISTA over all rows at once, on any
    device), or "auto": compiled on the CPU, batched elsewhere.
    """
    embeddings, dictionary = embeddings.detach(), dictionary.detach()  # a solve, not a differentiable op
    _check(embeddings, dictionary, lam, tol)
    if isinstance(gram, str):
        gram = dictionary_gram(dictionary) if 10 * len(embeddings) >= len(dictionary) else None
    elif gram is not None and (gram.shape != (len(dictionary), len(dictionary)) or gram.device != dictionary.device):
        raise SolverError(
            f"gram {tuple(gram.shape)} on {gram.device} is not this dictionary's D D^T: expected ({len(dictionary)}, {len(dictionary)}) "
            f"on {dictionary.device} (see dictionary_gram)"
        )
    if restricted_method == "auto":
        restricted_method = "compiled" if embeddings.device.type == "cpu" else "batched"
    if restricted_method == "compiled" and embeddings.dtype not in (torch.float32, torch.float64):
        raise SolverError(f"restricted_method='compiled' solves float32 or float64, not {embeddings.dtype}: cast, or use 'batched'")
    if restricted_method not in ("compiled", "batched") or (restricted_method == "compiled" and embeddings.device.type != "cpu"):
        raise SolverError(
            f"restricted_method={restricted_method!r} is invalid on {embeddings.device}: expected one of 'auto', 'compiled' (CPU), 'batched'"
        )
    parts = [
        _solve_chunk(chunk, dictionary, gram, restricted_method, lam, nonneg, tol, max_iter, max_rounds, min(working_set, len(dictionary)))
        for chunk in embeddings.split(chunk_size)
    ]
    return SparseCodes.cat(parts)


def _check(embeddings: Tensor, dictionary: Tensor, lam: float, tol: float) -> None:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise SolverError(f"lam={lam!r} is invalid: the l1 penalty must be a positive finite number")
    if not tol > 0:
        raise SolverError(f"tol={tol!r} is invalid: expected a positive relative duality gap")
    if embeddings.is_floating_point() and tol < 20 * torch.finfo(embeddings.dtype).eps:
        raise SolverError(
            f"tol={tol:g} is below what {embeddings.dtype} can certify (about {20 * torch.finfo(embeddings.dtype).eps:.0e}): "
            "raise it, or solve in float64"
        )
    if embeddings.ndim != 2 or dictionary.ndim != 2:
        raise SolverError(
            f"expected embeddings (N, d) and a dictionary (K, d); got {tuple(embeddings.shape)} and {tuple(dictionary.shape)}"
        )
    if embeddings.shape[1] != dictionary.shape[1]:
        raise SolverError(
            f"the embeddings have {embeddings.shape[1]} dimensions but the dictionary's concepts have {dictionary.shape[1]}: "
            "were they embedded by different models?"
        )
    if len(dictionary) == 0:
        raise SolverError("the dictionary is empty")
    if embeddings.device != dictionary.device or embeddings.dtype != dictionary.dtype:
        raise SolverError(
            f"embeddings ({embeddings.dtype} on {embeddings.device}) and dictionary ({dictionary.dtype} on {dictionary.device}) must match"
        )
    if not embeddings.is_floating_point():
        raise SolverError(f"expected floating-point embeddings, got {embeddings.dtype}")
    for name, t in (("embeddings", embeddings), ("dictionary", dictionary)):
        bad = ~torch.isfinite(t).all(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten()
            raise SolverError(f"{name} has non-finite values (NaN or inf) in {len(rows)} rows, first: {rows[:5].tolist()}")


def _violation_order(corr: Tensor, nonneg: bool) -> Tensor:
    """A new tensor scoring the concepts by ``corr`` (D r, the correlations with the residual) as their
    violation of optimality orders them (2 corr - lam, or 2 |corr| - lam signed: the gradient of the
    smooth part is -2 corr): the first ones most want to enter. ``corr`` itself is left intact (it is
    the next round's exact base)."""
    return corr.clone() if nonneg else corr.abs()


def _gap(zz: Tensor, zr: Tensor, rr: Tensor, l1: Tensor, max_corr: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Primal objective and duality gap per row.

    The dual of the problem is max_theta ||z||^2 - ||z - theta||^2 subject to D theta <= lam/2 (each
    side for the signed problem). theta = s r, the residual scaled by the best feasible s (the
    unconstrained best, z.r / r.r, capped so that the largest correlation meets lam / 2), gives
    D = 2 s z.r - s^2 r.r. ``max_corr``: max_j (D r)_j, or max_j |(D r)_j| for the signed problem.
    """
    primal = rr + lam * l1
    best = zr / rr.clamp_min(torch.finfo(rr.dtype).tiny)
    cap = (lam / 2) / max_corr.clamp_min(torch.finfo(rr.dtype).tiny)
    s = torch.minimum(best, cap).clamp_min(0)
    dual = 2 * s * zr - s * s * rr
    return primal, (primal - dual).clamp_min(0)


def _matvec(gram: Tensor, vectors: Tensor) -> Tensor:
    """(B, k, k) symmetric x (B, k) -> (B, k), as row vector times matrix: on the CPU, batched
    vector-matrix products of small matrices run several times faster than matrix-vector ones."""
    return torch.bmm(vectors.unsqueeze(1), gram).squeeze(1)


def _lipschitz(gram: Tensor) -> Tensor:
    """An upper bound on 2 x the largest eigenvalue of each Gram matrix: the smaller of its
    Frobenius norm and its largest absolute row sum (Gershgorin), both cheap and never below it."""
    frobenius = gram.flatten(1).norm(dim=1)
    gershgorin = gram.abs().sum(dim=2).amax(dim=1)
    return 2 * torch.minimum(frobenius, gershgorin).clamp_min(torch.finfo(gram.dtype).tiny)


def _restricted_objective(gram: Tensor, b: Tensor, zz: Tensor, w: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """For w over a working set: (z.r, r.r, D_S r) with r = z - D_S^T w, from the Gram matrix alone."""
    gw = _matvec(gram, w)
    bw = (b * w).sum(dim=1)
    return zz - bw, zz - 2 * bw + (w * gw).sum(dim=1), b - gw


def _pattern_objective(gram: Tensor, b: Tensor, w: Tensor, lam: float) -> Tensor:
    """w'Gw - 2b'w + lam |w|_1: the objective less its constant ||z||^2."""
    return (w * (_matvec(gram, w) - 2 * b)).sum(dim=1) + lam * w.abs().sum(dim=1)


def _support_step(gram: Tensor, b: Tensor, w: Tensor, lam: float, resolution: float) -> Tensor:
    """Active-set descent from ``w`` on its support (as Lawson and Hanson's NNLS): step towards x, the
    minimiser over w's sign pattern (G_AA x = b_A - lam/2 sign(w_A) on the support A, by a batched
    Cholesky factorisation), as far as the signs hold; if a weight reaches zero first, it leaves the
    support and the step repeats on the smaller one, until a full step lands on the minimiser. Over a
    pattern the objective is a convex quadratic minimised at x, so no step raises it.

    Proximal gradient finds the support long before it converges on it, slowly when concepts are
    nearly collinear (a text tower that maps many words almost alike); this finishes the job."""
    width = int((w != 0).sum(dim=1).max())
    if width == 0:
        return w
    k = w.shape[1]
    order = w.abs().topk(width, dim=1).indices  # the support first, then padding
    current = w.gather(1, order)
    mask, sign = current != 0, torch.sign(current)
    full = gram.gather(1, order.unsqueeze(2).expand(-1, -1, k)).gather(2, order.unsqueeze(1).expand(-1, width, -1))
    b_sub = b.gather(1, order)
    rhs_full = b_sub - lam / 2 * sign
    # A ridge at the Gram matrix's own resolution (relative: ``resolution``) keeps duplicate and
    # near-duplicate concepts factorisable (their huge opposite weights block the step at once, and
    # one of them leaves); the identity stands in on padding.
    ridge = resolution * full.diagonal(dim1=1, dim2=2).amax(dim=1, keepdim=True)
    rows = mask.any(dim=1).nonzero().flatten()  # the rows still stepping
    for _ in range(width):
        m, c, sg = mask[rows], current[rows], sign[rows]
        pair = m.unsqueeze(2) & m.unsqueeze(1)
        system = torch.where(pair, full[rows], 0) + torch.diag_embed(torch.where(m, ridge[rows], 1.0))
        chol, info = torch.linalg.cholesky_ex(system)
        x = torch.cholesky_solve(torch.where(m, rhs_full[rows], 0).unsqueeze(2), chol).squeeze(2)
        solved = (info == 0) & torch.isfinite(x).all(dim=1)
        x = torch.where(solved.unsqueeze(1) & m, x, c)
        flips = m & (x * sg <= 0)
        ratio = torch.where(flips, c / (c - x), math.inf)
        alpha = ratio.amin(dim=1, keepdim=True).clamp_max(1)
        blocked = flips & (ratio <= alpha)  # these weights reached zero: they leave the support
        step = torch.where(blocked, 0, c + alpha * (x - c))
        # Often better still: x with every flipped weight dropped at once (a projected Newton step),
        # taken where it lowers the objective more than the safe step does.
        projected = torch.where(flips, 0, x)
        take = _pattern_objective(full[rows], b_sub[rows], projected, lam) < _pattern_objective(full[rows], b_sub[rows], step, lam)
        step = torch.where(take.unsqueeze(1), projected, step)
        current[rows] = step
        mask[rows] = m & (step != 0)
        rows = rows[solved & flips.any(dim=1)]  # a row whose full step held its signs sits at its minimiser
        if len(rows) == 0:
            break
    return torch.zeros_like(w).scatter_(1, order, torch.where(mask, current, 0))


def _restricted_solve(
    gram: Tensor,
    b: Tensor,
    zz: Tensor,
    w: Tensor,
    lam: float,
    nonneg: bool,
    tol: float,
    max_iter: int,
    resolution: float,
    check_every: int = 10,
) -> tuple[Tensor, Tensor]:
    """min_w w'Gw - 2b'w + lam |w|_1 (+ ||z||^2) per row over its working set, warm-started at ``w``:
    FISTA with adaptive restart (O'Donoghue & Candes), and every ``check_every`` iterations an
    active-set step on the current support (:func:`_support_step`), kept where it lowers the
    objective. A row stops once its restricted duality gap is within ``tol``, and leaves the batch.
    Returns the solutions and the iterations each row took."""
    solution, iterations = w.clone(), torch.zeros(len(b), dtype=torch.long, device=b.device)
    rows = torch.arange(len(b), device=b.device)  # the rows still running
    step = (1.0 / _lipschitz(gram)).unsqueeze(1)
    y, t = w.clone(), torch.ones_like(zz)
    support = w != 0  # at the last check
    for it in range(1, max_iter + 1):
        z = y - step * 2 * (_matvec(gram, y) - b)
        threshold = lam * step
        w_next = (z - threshold).clamp_min(0) if nonneg else torch.sign(z) * (z.abs() - threshold).clamp_min(0)
        uphill = ((y - w_next) * (w_next - w)).sum(dim=1) > 0  # the momentum points uphill: restart
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        momentum = torch.where(uphill, 0.0, (t - 1) / t_next).unsqueeze(1)
        t = torch.where(uphill, torch.ones_like(t), t_next)
        y = w_next + momentum * (w_next - w)
        w = w_next
        if it % check_every and it != max_iter:
            continue
        iterations[rows] = it
        # The active-set step costs a factorisation per dropped weight: taken once a row's support has
        # settled (unchanged since the last check), and every fifth check in any case (near-duplicate
        # concepts can keep a support swapping for long).
        settled = ((w != 0) == support).all(dim=1) | (it % (5 * check_every) == 0)
        support = w != 0
        if settled.any():
            exact = w.clone()
            exact[settled] = _support_step(gram[settled], b[settled], w[settled], lam, resolution)
            better = settled & (_pattern_objective(gram, b, exact, lam) < _pattern_objective(gram, b, w, lam))
            w = torch.where(better.unsqueeze(1), exact, w)
            y = torch.where(better.unsqueeze(1), exact, y)
            t = torch.where(better, torch.ones_like(t), t)
            support = w != 0
        zr, rr, corr = _restricted_objective(gram, b, zz, w, lam)
        max_corr = corr.amax(dim=1) if nonneg else corr.abs().amax(dim=1)
        primal, gap = _gap(zz, zr, rr, w.abs().sum(dim=1), max_corr, lam)
        solution[rows] = w
        running = gap > tol * primal
        if not running.all():
            rows, gram, b, zz, w, y, t, step, support = (v[running] for v in (rows, gram, b, zz, w, y, t, step, support))
        if len(rows) == 0:
            break
    return solution, iterations


def _solve_chunk(
    z: Tensor,
    dictionary: Tensor,
    gram: Tensor | None,
    method: str,
    lam: float,
    nonneg: bool,
    tol: float,
    max_iter: int,
    max_rounds: int,
    working_set: int,
) -> SparseCodes:
    n, num_concepts = len(z), len(dictionary)
    zz = (z * z).sum(dim=1)
    objective, gap = zz.clone(), torch.zeros_like(zz)
    iterations = torch.zeros(n, dtype=torch.long, device=z.device)
    rounds = torch.zeros_like(iterations)
    solutions: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows, candidates, weights) of finished rows
    todo = torch.arange(n, device=z.device)  # rows not yet certified
    # D z, the correlations at w = 0: each row's first candidates are the concepts most correlated
    # with it, and it holds every b = D_S z the restricted problems need.
    correlations = z @ dictionary.T
    candidates = _violation_order(correlations, nonneg).topk(working_set, dim=1).indices  # (n, k)
    w = torch.zeros(n, working_set, dtype=z.dtype, device=z.device)
    precise = torch.zeros(n, dtype=torch.bool, device=z.device)  # rows given float64 Gram matrices (_WorkingSets)
    base, base_rows = correlations, todo  # D r at each row's warm start w, exact: at the first round, D z
    for round_ in range(1, max_rounds + 1):
        problem = _WorkingSets(todo, z, dictionary, gram, correlations, base, base_rows, candidates, precise[todo])
        candidates, w, its = problem.solve(method, w, zz[todo], lam, nonneg, tol / 5, max_iter)
        iterations[todo] += its
        rounds[todo] += 1
        # The whole dictionary checks the restricted solutions: one dense product per round.
        # From the residual itself rather than as D z - D (D^T w): its rounding error then scales with
        # the residual, not with z, so float32 can certify a small objective (a close fit, a small lam).
        residual = z[todo] - _combine(candidates, w, dictionary)
        corr = residual @ dictionary.T  # (b, K): D r, the correlations with the residual
        max_corr = corr.amax(dim=1) if nonneg else corr.abs().amax(dim=1)
        zr, rr = (z[todo] * residual).sum(dim=1), (residual * residual).sum(dim=1)
        objective[todo], gap[todo] = _gap(zz[todo], zr, rr, w.abs().sum(dim=1), max_corr, lam)
        unfinished = gap[todo] > tol * objective[todo]
        if round_ == max_rounds:
            unfinished[:] = False
        solutions.append((todo[~unfinished], candidates[~unfinished], w[~unfinished]))
        if not unfinished.any():
            break
        # Next working set: the current support first, then the concepts that most violate optimality.
        todo, corr, candidates, w = todo[unfinished], corr[unfinished], candidates[unfinished], w[unfinished]
        base, base_rows = corr, torch.arange(len(todo), device=z.device)
        current = torch.zeros_like(corr).scatter_(1, candidates, w)
        score = _violation_order(corr, nonneg).scatter_(1, candidates, -math.inf)
        # A row that failed although no concept outside its working set wants in needs more accurate
        # arithmetic, not a larger set.
        precise[todo[2 * score.amax(dim=1) <= lam]] = True
        score.scatter_(1, candidates, torch.where(w != 0, math.inf, -math.inf).to(corr.dtype))
        support = int((w != 0).sum(dim=1).max())
        size = min(num_concepts, max(candidates.shape[1] + working_set, support + max(working_set, support // 2)))
        candidates = score.topk(size, dim=1).indices
        w = current.gather(1, candidates)
    return _compact(solutions, n, num_concepts, objective, gap, iterations, rounds, tol)


@dataclass
class _WorkingSets:
    """The restricted problems of one round: for the chunk's rows ``rows``, the concepts ``candidates``
    (b, k) of their working sets.

    The restricted problems are solved in float64: their gap is a difference of near-equal terms
    (||z||^2 - 2b'w + w'Gw), below float32's resolution at the tolerances asked for. Their Gram
    matrices and b = D_S z are read from the dictionary's Gram matrix and from D z, in the inputs'
    precision, except for the ``precise`` rows, for which the concepts are gathered and multiplied in
    float64: enough for most rows, but with nearly collinear concepts (a text tower that maps many
    words almost alike) a float32 Gram matrix can move the restricted solution by more than the
    tolerance. Without the dictionary's Gram matrix (too large, or not worth computing for few rows),
    the concepts are gathered and multiplied for every row."""

    rows: Tensor
    z: Tensor
    dictionary: Tensor
    gram: Tensor | None
    correlations: Tensor  # (n, K) D z of the chunk's rows
    base: Tensor  # D r at the warm start, exact (from the last dense product), of the rows ``base_rows``
    base_rows: Tensor
    candidates: Tensor
    precise: Tensor
    max_elements: int = 1 << 26  # of the gathered concepts and Gram matrices at a time

    def solve(
        self, method: str, w: Tensor, zz: Tensor, lam: float, nonneg: bool, tol: float, max_iter: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The restricted solutions, warm-started at ``w``, "compiled" or "batched" (see :func:`lasso`).
        Returns the working sets (b, k) (improved along the way where the compiled method reads
        the dictionary's Gram matrix), their solutions (b, k) and the iterations each row took."""
        k = self.candidates.shape[1]
        size = max(1, self.max_elements // (k * max(k, self.z.shape[1])))
        candidates, weights = self.candidates.clone(), torch.empty_like(w)
        iterations = torch.empty(len(w), dtype=torch.long, device=w.device)
        for exact in (False, True):
            for part in (self.precise == exact).nonzero().flatten().split(size):
                if method == "compiled" and self.gram is not None and not exact:
                    candidates[part], solved, iterations[part] = restricted.swap_and_solve(
                        self.gram, self.correlations, self.rows[part], self.base, self.base_rows[part], candidates[part], w[part],
                        zz[part], lam, nonneg, tol, max_iter, _resolution(self.gram),
                    )  # fmt: skip
                else:
                    gram, b, resolution = (
                        self._read_problem(part) if self.gram is not None and not exact else self._gathered_problem(part, exact)
                    )
                    solve = restricted.solve if method == "compiled" else _restricted_solve
                    solved, iterations[part] = solve(
                        gram, b.double(), zz[part].double(), w[part].double(), lam, nonneg, tol, max_iter, resolution
                    )
                weights[part] = solved.to(w.dtype).to(w.device)
        return candidates, weights, iterations

    def _read_problem(self, part: Tensor) -> tuple[Tensor, Tensor, float]:
        """G (float64) and b of the rows ``part``, read from the dictionary's Gram matrix and D z."""
        candidates = self.candidates[part]
        gram = self.gram[candidates.unsqueeze(2), candidates.unsqueeze(1)]
        return gram.double(), self.correlations[self.rows[part].unsqueeze(1), candidates], _resolution(self.gram)

    def _gathered_problem(self, part: Tensor, exact: bool) -> tuple[Tensor, Tensor, float]:
        """G (float64) and b of the rows ``part`` from their concepts, gathered and multiplied, in
        float64 if ``exact``."""
        atoms = self.dictionary[self.candidates[part]]  # (rows, k, d)
        if exact:
            atoms = atoms.double()
        gram = atoms @ atoms.transpose(1, 2)
        b = torch.bmm(atoms, self.z[self.rows[part]].to(atoms.dtype).unsqueeze(2)).squeeze(2)
        return gram.double(), b, _resolution(atoms)


def _resolution(t: Tensor) -> float:
    """The relative resolution of a Gram matrix computed in ``t``'s precision: the ridge of the exact
    steps on a sign pattern (it keeps duplicate and near-duplicate concepts factorisable)."""
    return 10 * torch.finfo(t.dtype).eps


def _compact(
    solutions: list[tuple[Tensor, Tensor, Tensor]],
    n: int,
    num_concepts: int,
    objective: Tensor,
    gap: Tensor,
    iterations: Tensor,
    rounds: Tensor,
    tol: float,
) -> SparseCodes:
    """Each row's non-zeros, largest magnitude first, padded to the widest support of the chunk."""
    width = max([1] + [int((w != 0).sum(dim=1).max()) for _, _, w in solutions if len(w)])
    indices = torch.zeros(n, width, dtype=torch.long, device=objective.device)
    values = torch.zeros(n, width, dtype=objective.dtype, device=objective.device)
    for rows, candidates, w in solutions:
        k = min(width, w.shape[1])
        order = w.abs().topk(k, dim=1).indices
        indices[rows, :k] = candidates.gather(1, order)
        values[rows, :k] = w.gather(1, order)
    return SparseCodes(
        indices=indices,
        values=values,
        num_concepts=num_concepts,
        objective=objective,
        gap=gap,
        iterations=iterations,
        rounds=rounds,
        converged=gap <= tol * objective,
    )
