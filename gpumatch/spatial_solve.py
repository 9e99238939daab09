"""The spatial system: assembly and float64 solve (docs/algorithm.md section 6)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .backends import backend_for_namespace
from .backends.base import SPATIAL_SOLVES, check_spatial_solve
from .errors import SolutionError
from .linalg import solve_symmetric_many

log = logging.getLogger("gpumatch")

__all__ = ["assemble_spatial_system", "solve_spatial_system", "solve_spatial_systems",
           "SpatialSolution", "SPATIAL_SOLVES", "check_spatial_solve", "in_model_unknowns"]



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
    """Spatial coefficients and solve diagnostics.

    ``condition_number`` is that of the spatial system of docs/algorithm.md
    section 6 in the model's own spatial functions;
    ``equilibrated_condition_number`` that of the diagonally equilibrated
    system that was factorised (in :meth:`SpatialFunctions.solve_functions`),
    which says how well the kernel is determined; ``method`` is
    ``"cholesky"`` or ``"eigen-pseudo-inverse"`` and ``reason`` says why.
    """

    coefficients: np.ndarray  # (nb, n_terms); row 0 is [kernelSum, 0, ...]
    condition_number: float
    method: str
    rank: int
    n_unknowns: int
    equilibrated_condition_number: float = float("nan")
    reason: str = ""


def _to_solution(sol, nb, nkt, kernel_sum, to_model=None):
    """The :class:`SpatialSolution` of the spatial system's solution ``sol``.

    ``kernel_sum`` is put in for ``a0`` and multiplies the other coefficients;
    ``to_model`` (``R``, see :meth:`SpatialFunctions.from_solve_functions`)
    turns each basis's coefficients ``c`` into the model's, ``c R``.

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
    # kernel (and the matched image) does not depend on it, and
    # kernelSum = 1 is exactly "replace a0 by 1" (docs/algorithm.md section 6).
    coeffs = np.zeros((nb, nkt))
    coeffs[0, 0] = kernel_sum
    c = sol.x[1:].reshape(nb - 1, nkt)
    coeffs[1:] = kernel_sum * (c if to_model is None else c @ to_model)
    return SpatialSolution(coeffs, sol.condition_number, sol.method, sol.rank, len(sol.x),
                           sol.equilibrated_condition_number, sol.reason)


def in_model_unknowns(A, to_model, nb, nkt, xp=np):
    """Spatial systems ``A (n, nt, nt)`` in the solve functions' unknowns, rewritten in
    the model's (``to_model`` = ``R`` with ``a = c R``): ``K^T A K`` with
    ``u_solve = K u_model``, block by block. Used for the condition number the
    model's own system has (docs/algorithm.md section 6)."""
    G = xp.asarray(np.linalg.inv(to_model))      # c = a G
    n, nt = A.shape[0], A.shape[1]
    out = xp.empty_like(A)
    out[:, 0, 0] = A[:, 0, 0]
    row = (A[:, 0, 1:].reshape(n, nb - 1, nkt) @ G.T).reshape(n, nt - 1)
    out[:, 0, 1:] = row
    out[:, 1:, 0] = row
    A4 = A[:, 1:, 1:].reshape(n, nb - 1, nkt, nb - 1, nkt)
    out[:, 1:, 1:] = xp.einsum("ik,nakbj,lj->naibl", G, A4, G).reshape(n, nt - 1, nt - 1)
    return out


def solve_spatial_system(A, rhs, nb, nkt, kernel_sum, condition_type="EIGENVALUE", xp=np,
                         to_model=None):
    """Solve the spatial system in float64 and put ``kernel_sum`` in for ``a0``.

    The coefficients of bases ``1 .. nb-1`` are multiplied by ``kernel_sum``,
    so the kernel is ``kernel_sum`` times the fitted kernel with ``a0 = 1``.
    ``xp`` is where it is solved: ``numpy`` (the host, system by system) or
    ``cupy`` (the device, :func:`~gpumatch.linalg.solve_symmetric_many`
    batched); ``A`` and ``rhs`` may live on either. ``to_model``: the system is
    in the unknowns of :meth:`SpatialFunctions.solve_functions` and
    ``to_model`` (:meth:`~SpatialFunctions.from_solve_functions`) turns its
    solution into the model's coefficients; None: it is in the model's.

    Raises
    ------
    SolutionError
        If any coefficient is NaN or infinite.
    """
    (sol,) = solve_spatial_systems([A], [rhs], nb, nkt, [kernel_sum], condition_type, xp,
                                   [to_model])
    if isinstance(sol, SolutionError):
        raise sol
    return sol


def solve_spatial_systems(As, rhss, nb, nkt, kernel_sums, condition_type="EIGENVALUE", xp=np,
                          to_models=None):
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
    to_models : sequence, optional
        One ``to_model`` (see :func:`solve_spatial_system`) or None per system.

    Returns
    -------
    list
        One :class:`SpatialSolution` per system, or the
        :class:`~gpumatch.errors.SolutionError` that the single solve raises.
    """
    if not len(As):
        return []
    put = backend_for_namespace(xp).asarray
    A = xp.stack([put(a) for a in As])
    rhs = xp.stack([put(r) for r in rhss])
    to_models = [None] * len(As) if to_models is None else list(to_models)
    model_A = None
    if any(R is not None for R in to_models):
        model_A = xp.stack([a[0] if R is None else in_model_unknowns(a, R, nb, nkt, xp)[0]
                            for a, R in zip(A[:, None], to_models)])
    out = []
    solved = solve_symmetric_many(A, rhs, condition_type, xp=xp, condition_of=model_A)
    for sol, kernel_sum, R in zip(solved, kernel_sums, to_models):
        try:
            out.append(_to_solution(sol, nb, nkt, kernel_sum, R))
        except SolutionError as exc:
            out.append(exc)
    return out
