"""The spatial system: assembly and float64 solve (SPEC section 6)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .backend import to_numpy
from .errors import SolutionError
from .linalg import solve_symmetric_many

log = logging.getLogger("gpumatch")

__all__ = ["assemble_spatial_system", "solve_spatial_system", "solve_spatial_systems",
           "SpatialSolution", "SPATIAL_SOLVES", "check_spatial_solve"]

#: Where the GPU backend may solve the spatial system.
SPATIAL_SOLVES = ("host", "device")


def check_spatial_solve(where):
    """``where`` if it names a place to solve the spatial system, else ValueError."""
    if where not in SPATIAL_SOLVES:
        raise ValueError(f"spatial_solve={where!r} is not one of {SPATIAL_SOLVES}: 'host' solves "
                         "the spatial system with LAPACK, 'device' with cuSOLVER on the GPU")
    return where


def assemble_spatial_system(M, b, P, xp=np):
    """Sum the candidates' normal equations into the spatial system.

    Unknowns: ``a0`` (constant coefficient of basis 0), then ``n_terms``
    coefficients for each basis ``1 .. nb-1``.

    Parameters
    ----------
    M : array (n_cand, nb, nb)
    b : array (n_cand, nb)
    P : array (n_cand, n_terms)
        Spatial functions at each candidate's position.

    Returns
    -------
    A : array (nt, nt), rhs : array (nt,) with ``nt = (nb - 1) n_terms + 1``.
    """
    nc, nb, _ = M.shape
    nkt = P.shape[1]
    nt = (nb - 1) * nkt + 1
    A = xp.empty((nt, nt), dtype=xp.float64)
    rhs = xp.empty(nt, dtype=xp.float64)
    A[0, 0] = M[:, 0, 0].sum()
    row0 = xp.einsum("na,nj->aj", M[:, 0, 1:], P).reshape(-1)
    A[0, 1:] = row0
    A[1:, 0] = row0
    # Block (m1, m2) = sum_n M[n, m1, m2] P_n P_n^T: one GEMM over candidates.
    PP = (P[:, :, None] * P[:, None, :]).reshape(nc, nkt * nkt)
    blocks = (M[:, 1:, 1:].reshape(nc, -1).T @ PP).reshape(nb - 1, nb - 1, nkt, nkt)
    A[1:, 1:] = blocks.transpose(0, 2, 1, 3).reshape(nt - 1, nt - 1)
    rhs[0] = b[:, 0].sum()
    rhs[1:] = (b[:, 1:].T @ P).reshape(-1)
    return A, rhs


@dataclass
class SpatialSolution:
    """Spatial coefficients and solve diagnostics."""

    coefficients: np.ndarray  # (nb, n_terms); row 0 is [kernelSum, 0, ...]
    condition_number: float
    method: str
    rank: int
    n_unknowns: int


def _to_solution(sol, nb, nkt, kernel_sum):
    """The :class:`SpatialSolution` of the spatial system's solution ``sol``.

    ``kernel_sum`` is put in for ``a0`` and multiplies the other coefficients.

    Raises
    ------
    SolutionError
        If any coefficient is NaN or infinite.
    """
    bad = np.flatnonzero(~np.isfinite(sol.x))
    if bad.size:
        i = int(bad[0])
        where = "a0 (basis 0)" if i == 0 else f"basis {(i - 1) // nkt + 1}, spatial term {(i - 1) % nkt}"
        raise SolutionError(
            f"the spatial kernel solution has a non-finite coefficient ({sol.x[i]}) at index {i} "
            f"[{where}]; spatial condition number {sol.condition_number:.3g} "
            f"({sol.method}). Check the PSF models for NaNs, or lower spatialKernelOrder"
        )
    # kernelSum is a multiplicative factor on the whole kernel: a0 is replaced
    # by it and the other coefficients are scaled by it, so the normalised
    # kernel (and the matched image) does not depend on it (issue 2), and
    # kernelSum = 1 is exactly "replace a0 by 1" (SPEC section 6).
    coeffs = np.zeros((nb, nkt))
    coeffs[0, 0] = kernel_sum
    coeffs[1:] = kernel_sum * sol.x[1:].reshape(nb - 1, nkt)
    return SpatialSolution(coeffs, sol.condition_number, sol.method, sol.rank, len(sol.x))


def solve_spatial_system(A, rhs, nb, nkt, kernel_sum, condition_type="EIGENVALUE", xp=np):
    """Solve the spatial system in float64 and put ``kernel_sum`` in for ``a0``.

    The coefficients of bases ``1 .. nb-1`` are multiplied by ``kernel_sum``,
    so the kernel is ``kernel_sum`` times the fitted kernel with ``a0 = 1``.
    ``xp`` is where it is solved: ``numpy`` (the host, system by system) or
    ``cupy`` (the device, :func:`~gpumatch.linalg.solve_symmetric_many`
    batched); ``A`` and ``rhs`` may live on either.

    Raises
    ------
    SolutionError
        If any coefficient is NaN or infinite.
    """
    (sol,) = solve_spatial_systems([A], [rhs], nb, nkt, [kernel_sum], condition_type, xp)
    if isinstance(sol, SolutionError):
        raise sol
    return sol


def solve_spatial_systems(As, rhss, nb, nkt, kernel_sums, condition_type="EIGENVALUE", xp=np):
    """Solve many spatial systems of one size in one batched float64 call.

    The batched form of :func:`solve_spatial_system`, with the same results
    (:func:`~gpumatch.linalg.solve_symmetric_many`).

    Parameters
    ----------
    As : sequence of arrays (nt, nt)
    rhss : sequence of arrays (nt,)
    nb, nkt : int
        Basis images and spatial terms (``nt = (nb - 1) nkt + 1``).
    kernel_sums : sequence of float
        One per system.
    condition_type : {"EIGENVALUE", "SVD"}
    xp : module
        Where to solve: ``numpy`` (the host) or ``cupy`` (the device).

    Returns
    -------
    list
        One :class:`SpatialSolution` per system, or the
        :class:`~gpumatch.errors.SolutionError` that the single solve raises.
    """
    if not len(As):
        return []
    put = to_numpy if xp is np else xp.asarray
    A = xp.stack([put(a) for a in As])
    rhs = xp.stack([put(r) for r in rhss])
    out = []
    for sol, kernel_sum in zip(solve_symmetric_many(A, rhs, condition_type, xp=xp), kernel_sums):
        try:
            out.append(_to_solution(sol, nb, nkt, kernel_sum))
        except SolutionError as exc:
            out.append(exc)
    return out
