"""Symmetric solves that survive rank deficiency, and condition numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import array_namespace, to_numpy

__all__ = ["SymmetricSolution", "solve_symmetric", "solve_symmetric_many", "solve_symmetric_batch",
           "condition_number"]


@dataclass
class SymmetricSolution:
    """Solution of ``A x = b`` and how it was found."""

    x: np.ndarray
    method: str  # "cholesky", "lu" or "eigen-pseudo-inverse"
    condition_number: float
    rank: int


def _rank_tolerance(eigvals, n):
    """``n eps max|lambda|`` of each eigenvalue set (last axis)."""
    return abs(eigvals).max(axis=-1) * n * np.finfo(np.float64).eps


def condition_number(A, kind="EIGENVALUE", eigvals=None, xp=None):
    """Ratio of largest to smallest |eigenvalue| ("EIGENVALUE") or singular value ("SVD").

    ``A`` may be one matrix ``(m, m)`` (a float is returned) or a stack
    ``(n, m, m)`` (an array of ``n`` floats, in ``xp``; one stacked LAPACK or
    cuSOLVER call). ``xp`` defaults to the namespace of ``A``.
    """
    xp = array_namespace(A) if xp is None else xp
    A = xp.asarray(A, dtype=xp.float64)
    if kind == "SVD":
        s = xp.linalg.svd(A, compute_uv=False)
    else:
        s = abs(xp.linalg.eigvalsh(A) if eigvals is None else eigvals)
    smax, smin = s.max(axis=-1), s.min(axis=-1)
    # inf for a zero matrix and wherever the smallest value is not positive.
    ok = (smax != 0) & (smin > 0)
    cond = xp.where(ok, smax / xp.where(ok, smin, 1.0), xp.inf)
    return float(cond) if A.ndim == 2 else cond


def solve_symmetric(A, b, condition_type="EIGENVALUE"):
    """Solve symmetric ``A x = b`` in float64.

    An exact factorisation (Cholesky, else LU) is used when ``A`` is
    numerically invertible; otherwise an eigen-decomposition pseudo-inverse
    inverts only the eigenvalues above ``n eps max|lambda|``.

    Both the rank decision and the solve work on the Jacobi-equilibrated
    matrix ``D A D`` (``D = diag(A)^-1/2``), so that unknowns of very
    different scales (for example raw-pixel "polynomial" spatial terms, whose
    columns span many orders of magnitude) do not make an invertible matrix
    look singular. The reported condition number is that of ``A`` itself.
    """
    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return solve_symmetric_many(A[None], b[None], condition_type)[0]


def _equilibrate(A, b, xp):
    """``d = diag(A)^-1/2`` (1 where the diagonal is not positive), ``D A D`` and ``D b``."""
    diag = xp.diagonal(A, axis1=1, axis2=2)
    d = xp.where(diag > 0, 1.0 / xp.sqrt(xp.where(diag > 0, diag, 1.0)), 1.0)
    return d, A * d[:, :, None] * d[:, None, :], b * d


def solve_symmetric_many(A, b, condition_type="EIGENVALUE", xp=None, batched=None):
    """:func:`solve_symmetric` for a stack of systems ``A (n, m, m)``, ``b (n, m)``.

    On the host (``xp`` NumPy, not ``batched``) the condition numbers and
    eigenvalues (the cost) are one stacked LAPACK call each, which NumPy makes
    matrix by matrix, and each system is then factorised alone, so every
    system is solved exactly (bitwise) as it would be alone.

    ``batched`` solves the whole stack with stacked factorisations and chooses
    each system's method afterwards (:func:`_solve_batched`): the same
    decisions, condition numbers and ranks, and solutions equal to rounding;
    it is how a device (``xp`` CuPy) solves, and with NumPy it tests that
    algorithm against the host path.

    Parameters
    ----------
    A : array (n, m, m)
    b : array (n, m)
    condition_type : {"EIGENVALUE", "SVD"}
    xp : module, optional
        Where to solve: ``numpy`` (the host) or ``cupy`` (the device). Default:
        the namespace of ``A``. Arrays are copied there as needed.
    batched : bool, optional
        Default: True for CuPy, False for NumPy (which alone has the
        system-by-system path).

    Returns
    -------
    list of SymmetricSolution
        One per system, ``x`` a NumPy array.
    """
    xp = array_namespace(A) if xp is None else xp
    if batched is None:
        batched = xp is not np
    if batched:
        return _solve_batched(A, b, condition_type, xp)
    if xp is not np:
        raise ValueError("only NumPy solves system by system; use batched=True with "
                         f"{xp.__name__}")
    import scipy.linalg

    A = np.asarray(to_numpy(A), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    if not len(A):
        return []
    m = A.shape[-1]
    conds = condition_number(A, condition_type)
    d, As, bs = _equilibrate(A, b, np)
    # Eigenvalues alone decide the rank (a third of the cost of eigenvectors,
    # which only a rank-deficient system needs).
    lam = np.linalg.eigvalsh(As)
    tol = _rank_tolerance(lam, m)
    out = []
    for i in range(len(A)):
        cond = float(conds[i])
        if int((np.abs(lam[i]) > tol[i]).sum()) == m:
            try:
                y = scipy.linalg.cho_solve(scipy.linalg.cho_factor(As[i], lower=True), bs[i])
                method = "cholesky"
            except np.linalg.LinAlgError:
                y = scipy.linalg.solve(As[i], bs[i], assume_a="sym")
                method = "lu"
            if np.all(np.isfinite(y)):
                out.append(SymmetricSolution(y * d[i], method, cond, m))
                continue
        lam_i, vec = np.linalg.eigh(As[i])
        keep = np.abs(lam_i) > _rank_tolerance(lam_i, m)
        inv = np.where(keep, 1.0 / np.where(keep, lam_i, 1.0), 0.0)
        y = vec @ (inv * (vec.T @ bs[i]))
        out.append(SymmetricSolution(y * d[i], "eigen-pseudo-inverse", cond, int(keep.sum())))
    return out


# A solve is accepted when its normwise backward error |A y - b| / (|A| |y| + |b|)
# (infinity norms) is below this: a factorisation that worked gives ~m eps
# (1e-14 for m ~ 160) whatever the conditioning, one that failed gives O(1).
_BACKWARD_ERROR_MAX = 1e-8


def _per_system(fn, xp, *arrays):
    """``fn`` on each system of the stacks ``arrays``; NaN where it raises."""
    out = []
    for parts in zip(*arrays):
        try:
            out.append(fn(*parts))
        except np.linalg.LinAlgError:
            out.append(xp.full_like(parts[-1], xp.nan))
    return xp.stack(out)


def _stacked(fn, xp, *arrays):
    """``fn(*arrays)`` on stacks, NaN for the systems where it fails.

    NumPy (and CuPy told to raise by ``cupyx.errstate(linalg="raise")``)
    refuses a whole stack when one system fails; then the systems are done
    one by one. CuPy by default does not check and leaves invalid values,
    which the backward error catches.
    """
    try:
        return fn(*arrays)
    except np.linalg.LinAlgError:
        return _per_system(fn, xp, *arrays)


def _solve_lower(L, B, trans, xp):
    """``L^-1 B`` (``trans="N"``) or ``L^-T B`` (``"T"``) for stacks of lower-triangular
    ``L (n, m, m)`` and ``B (n, m)``."""
    if xp is np:
        from scipy.linalg import solve_triangular
    else:
        from cupyx.scipy.linalg import solve_triangular

    def solve(Li, Bi):
        return solve_triangular(Li, Bi, trans=trans, lower=True, check_finite=False)

    try:
        return solve(L, B[..., None])[..., 0]
    except ValueError:  # SciPy refusing a singular L (a LinAlgError), or a SciPy (< 1.15)
        # or CuPy (< 14) without stacks: a call per system
        return _per_system(solve, xp, L, B)


def _backward_stable(As, bs, y, xp):
    """Per system: ``y`` finite and a backward-stable solution of ``As y = bs``."""
    r = xp.einsum("nij,nj->ni", As, y) - bs
    size = abs(As).sum(axis=-1).max(axis=-1) * abs(y).max(axis=-1) + abs(bs).max(axis=-1)
    return xp.isfinite(y).all(axis=-1) & (abs(r).max(axis=-1) <= _BACKWARD_ERROR_MAX * size)


def _solve_batched(A, b, condition_type, xp):
    """The stacked form of the host path, with at most two copies to the host.

    Every system is factorised by Cholesky (one stacked call); then one copy
    brings back the solutions, condition numbers, ranks and whether each
    factorisation worked, as a backward error tells. Only the systems whose
    Cholesky did not (rare: the spatial system is positive semi-definite by
    construction) go through :func:`_solve_fallback`, with one more copy.
    In exact arithmetic every decision is the host path's.
    """
    A = xp.asarray(A, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    if not len(A):
        return []
    m = A.shape[-1]
    conds = condition_number(A, condition_type, xp=xp)
    d, As, bs = _equilibrate(A, b, xp)
    lam = xp.linalg.eigvalsh(As)
    rank = (abs(lam) > _rank_tolerance(lam, m)[:, None]).sum(axis=-1)
    L = _stacked(xp.linalg.cholesky, xp, As)
    y = _solve_lower(L, _solve_lower(L, bs, "N", xp), "T", xp)
    x, (conds, rank, worked) = _to_host(y * d, (conds, rank, _backward_stable(As, bs, y, xp)), xp)
    rank, worked = rank.astype(int), worked > 0
    full = rank == m
    methods = np.where(full & worked, "cholesky", "eigen-pseudo-inverse").astype(object)
    redo = np.flatnonzero(~(full & worked))
    if redo.size:
        at = xp.asarray(redo)
        x[redo], rank[redo], lu = _solve_fallback(As[at], bs[at], d[at], full[redo], xp)
        methods[redo[lu]] = "lu"
    return [SymmetricSolution(x[i], methods[i], float(conds[i]), int(rank[i]))
            for i in range(len(x))]


def _solve_fallback(As, bs, d, full, xp):
    """Equilibrated systems solved by LU where ``full`` (host bools) says, by the
    eigen pseudo-inverse elsewhere and where LU is not finite; one copy to the host.

    Returns
    -------
    x : ndarray (n, m)
    rank : ndarray (n,) of int
        ``m`` for LU, else the number of eigenvalues kept.
    lu : ndarray (n,) of bool
    """
    y, rank = _pseudo_inverse_solve(As, bs, xp)
    lu = xp.zeros(len(As), dtype=bool)
    if full.any():
        y_lu = _stacked(xp.linalg.solve, xp, As, bs[..., None])[..., 0]
        lu = xp.asarray(full) & xp.isfinite(y_lu).all(axis=-1)
        y = xp.where(lu[:, None], y_lu, y)
        rank = xp.where(lu, As.shape[-1], rank)
    x, (rank, lu) = _to_host(y * d, (rank, lu), xp)
    return x, rank.astype(int), lu > 0


def _to_host(y, columns, xp):
    """``y (n, m)`` and per-system ``columns`` (each ``(n,)``) in one copy to the host.

    Returns
    -------
    tuple
        ``(y, [column, ...])``, NumPy float64.
    """
    host = to_numpy(xp.concatenate(
        [y, xp.stack([c.astype(xp.float64) for c in columns], axis=1)], axis=1))
    m = y.shape[-1]
    return host[:, :m], [host[:, m + i] for i in range(len(columns))]


def _pseudo_inverse_solve(M, b, xp):
    """Eigen-decomposition pseudo-inverse solutions ``(n, m)`` of stacked symmetric
    systems, inverting the eigenvalues above ``m eps max|lambda|``, and how many
    that is (the rank, ``(n,)``)."""
    lam, vec = xp.linalg.eigh(M)
    keep = abs(lam) > _rank_tolerance(lam, M.shape[-1])[:, None]
    inv = xp.where(keep, 1.0 / xp.where(keep, lam, 1.0), 0.0)
    proj = xp.einsum("nji,nj->ni", vec, b)
    return xp.einsum("nij,nj->ni", vec, inv * proj), keep.sum(axis=-1)


def solve_symmetric_batch(M, b, xp=np):
    """Batched version of :func:`solve_symmetric` for ``(n, m, m)`` systems.

    Returns only the solutions ``(n, m)``.
    """
    # For full-rank systems this equals the exact solution to rounding; the
    # single-candidate kernels are diagnostics, so one path serves both cases.
    return _pseudo_inverse_solve(xp.asarray(M, dtype=xp.float64), xp.asarray(b, dtype=xp.float64),
                                 xp)[0]
