"""Symmetric solves that survive rank deficiency, and condition numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    return np.abs(eigvals).max(axis=-1) * n * np.finfo(np.float64).eps


def condition_number(A, kind="EIGENVALUE", eigvals=None):
    """Ratio of largest to smallest |eigenvalue| ("EIGENVALUE") or singular value ("SVD").

    ``A`` may be one matrix ``(m, m)`` (a float is returned) or a stack
    ``(n, m, m)`` (an array of ``n`` floats; one stacked LAPACK call).
    """
    A = np.asarray(A, dtype=np.float64)
    if kind == "SVD":
        s = np.linalg.svd(A, compute_uv=False)
    else:
        s = np.abs(np.linalg.eigvalsh(A) if eigvals is None else eigvals)
    smax, smin = s.max(axis=-1), s.min(axis=-1)
    # inf for a zero matrix and wherever the smallest value is not positive.
    cond = np.divide(smax, smin, out=np.full(np.shape(smax), np.inf),
                     where=(smax != 0) & (smin > 0))
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


def solve_symmetric_many(A, b, condition_type="EIGENVALUE"):
    """:func:`solve_symmetric` for a stack of systems ``A (n, m, m)``, ``b (n, m)``.

    The condition numbers and eigen-decompositions (the cost) are one stacked
    LAPACK call each, which NumPy makes matrix by matrix, so every system is
    solved exactly (bitwise) as it would be alone.

    Returns
    -------
    list of SymmetricSolution
        One per system.
    """
    import scipy.linalg

    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not len(A):
        return []
    m = A.shape[-1]
    conds = condition_number(A, condition_type)
    diag = np.diagonal(A, axis1=1, axis2=2)
    d = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
    As = A * d[:, :, None] * d[:, None, :]
    bs = b * d
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


def solve_symmetric_batch(M, b, xp=np):
    """Batched version of :func:`solve_symmetric` for ``(n, m, m)`` systems.

    Returns only the solutions ``(n, m)``.
    """
    M = xp.asarray(M, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    lam, vec = xp.linalg.eigh(M)
    n = M.shape[-1]
    tol = xp.abs(lam).max(axis=-1, keepdims=True) * n * np.finfo(np.float64).eps
    keep = xp.abs(lam) > tol
    inv = xp.where(keep, 1.0 / xp.where(keep, lam, 1.0), 0.0)
    # For full-rank systems this equals the exact solution to rounding; the
    # single-candidate kernels are diagnostics, so one path serves both cases.
    proj = xp.einsum("nji,nj->ni", vec, b)
    return xp.einsum("nij,nj->ni", vec, inv * proj)
