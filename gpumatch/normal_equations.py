"""Per-candidate normal equations (docs/algorithm.md section 6, first part).

Written once for NumPy and CuPy (``xp``); the CUDA backend replaces
:func:`candidate_normal_equations` with fused kernels of the same result.
"""

from __future__ import annotations

import numpy as np

from .linalg import solve_symmetric_batch

__all__ = ["candidate_design_matrices", "candidate_normal_equations", "solve_candidates",
           "good_region"]

#: Candidates processed per chunk, bounding the memory of the patch matrices.
_CHUNK = 128


def good_region(psf_size, kernel_size):
    """Slice of the stamp pixels whose kernel footprint lies inside the stamp."""
    h = kernel_size // 2
    return slice(h, psf_size - h)


def _patches(stamps, k, xp):
    """Every ``k x k`` window of every stamp: ``(n, g*g, k*k)``, ``g = size - k + 1``."""
    n, size, _ = stamps.shape
    g = size - k + 1
    s0, s1, s2 = stamps.strides
    win = xp.lib.stride_tricks.as_strided(stamps, shape=(n, g, g, k, k),
                                          strides=(s0, s1, s2, s1, s2))
    return win.reshape(n, g * g, k * k)


def candidate_design_matrices(templates, basis, xp=np):
    """Basis convolutions of the template stamps on the good region.

    ``C[n, p, b] = (T_n (*) B_b)`` at good pixel ``p`` (row-major), with the
    correlation orientation of docs/algorithm.md section 5.

    Returns
    -------
    array (n_cand, g*g, n_basis)
    """
    templates = xp.ascontiguousarray(templates, dtype=xp.float64)
    nb, k, _ = basis.shape
    flat_basis = xp.asarray(basis, dtype=xp.float64).reshape(nb, k * k).T
    return _patches(templates, k, xp) @ flat_basis


def candidate_normal_equations(templates, targets, basis, variance=2.0, xp=np):
    """``M = C^T C / var`` and ``b = C^T s / var`` for every candidate.

    Parameters
    ----------
    templates, targets : array (n_cand, size, size)
        Exposure-PSF and reference-PSF stamps.
    basis : array (n_basis, k, k)
    variance : float
        Pixel variance of the fit (template + target variance; 2 for model stamps).

    Returns
    -------
    M : array (n_cand, n_basis, n_basis)
    b : array (n_cand, n_basis)
    """
    n, size, _ = templates.shape
    nb, k, _ = basis.shape
    good = good_region(size, k)
    M = xp.empty((n, nb, nb), dtype=xp.float64)
    b = xp.empty((n, nb), dtype=xp.float64)
    w = 1.0 / variance
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        C = candidate_design_matrices(templates[start:stop], basis, xp)
        s = xp.ascontiguousarray(targets[start:stop, good, good], dtype=xp.float64)
        s = s.reshape(stop - start, -1, 1)
        Ct = C.transpose(0, 2, 1)
        M[start:stop] = (Ct @ C) * w
        b[start:stop] = (Ct @ s)[..., 0] * w
    return M, b


def solve_candidates(M, b, xp=np):
    """Single-candidate kernels ``M^-1 b`` (pseudo-inverse where singular)."""
    return solve_symmetric_batch(M, b, xp)
