"""Symmetric solves that survive rank deficiency, and condition numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SymmetricSolution", "solve_symmetric", "solve_symmetric_batch", "condition_number"]


@dataclass
class SymmetricSolution:
    """Solution of ``A x = b`` and how it was found."""

    x: np.ndarray
    method: str  # "cholesky", "lu" or "eigen-pseudo-inverse"
    condition_number: float
    rank: int


def _rank_tolerance(eigvals, n):
    return np.abs(eigvals).max() * n * np.finfo(np.float64).eps


def condition_number(A, kind="EIGENVALUE", eigvals=None):
    """Ratio of largest to smallest |eigenvalue| ("EIGENVALUE") or singular value ("SVD")."""
    A = np.asarray(A, dtype=np.float64)
    if kind == "SVD":
        s = np.linalg.svd(A, compute_uv=False)
    else:
        s = np.abs(np.linalg.eigvalsh(A) if eigvals is None else eigvals)
    smax, smin = s.max(), s.min()
    if smax == 0:
        return float("inf")
    return float(smax / smin) if smin > 0 else float("inf")


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
    import scipy.linalg

    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = A.shape[0]
    cond = condition_number(A, condition_type)
    diag = np.diag(A)
    d = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
    As = A * d[:, None] * d[None, :]
    bs = b * d
    lam, vec = np.linalg.eigh(As)
    tol = _rank_tolerance(lam, n)
    keep = np.abs(lam) > tol
    rank = int(keep.sum())
    if rank == n:
        try:
            y = scipy.linalg.cho_solve(scipy.linalg.cho_factor(As, lower=True), bs)
            method = "cholesky"
        except np.linalg.LinAlgError:
            y = scipy.linalg.solve(As, bs, assume_a="sym")
            method = "lu"
        if np.all(np.isfinite(y)):
            return SymmetricSolution(y * d, method, cond, rank)
    inv = np.where(keep, 1.0 / np.where(keep, lam, 1.0), 0.0)
    y = vec @ (inv * (vec.T @ bs))
    return SymmetricSolution(y * d, "eigen-pseudo-inverse", cond, rank)


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
