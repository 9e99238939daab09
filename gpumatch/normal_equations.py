"""Per-candidate normal equations (docs/algorithm.md section 6, first part).

Written once for NumPy and CuPy (``xp``); the CUDA backend replaces
:func:`candidate_normal_equations` with fused kernels of the same result.
"""

from __future__ import annotations

import numpy as np

from .backends import backend_for_namespace
from .linalg import solve_symmetric_batch
from .threads import map_in_threads, piece_size

__all__ = ["candidate_design_matrices", "candidate_normal_equations", "solve_candidates",
           "good_region"]

#: Candidates processed per chunk (and the fewest per piece shared out to the
#: host threads).
_CHUNK = 64
#: Largest size in bytes of one chunk's window-patch matrices (the path for
#: bases without separable factors).
_PATCH_BYTES = 256 << 20


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


def candidate_design_matrices(templates, basis, xp=np, factors=None):
    """Basis convolutions of the template stamps on the good region.

    ``C[n, p, b] = (T_n (*) B_b)`` at good pixel ``p`` (row-major), with the
    correlation orientation of docs/algorithm.md section 5.

    Parameters
    ----------
    templates : array (n_cand, size, size)
        Exposure-PSF stamps.
    basis : array (n_basis, k, k)
        Basis images.
    factors : gpumatch.basis.SeparableBasis, optional
        The basis as sums of separable images (:func:`gpumatch.basis.alard_lupton_factors`):
        the stamps are then correlated with 1-D filters, rows then columns,
        instead of with every ``k x k`` image (same result to rounding).

    Returns
    -------
    array (n_cand, g*g, n_basis)
    """
    templates = xp.ascontiguousarray(templates, dtype=xp.float64)
    nb, k, _ = basis.shape
    if factors is not None:
        return _separable_design_matrices(templates, factors, k, xp)
    flat_basis = xp.asarray(basis, dtype=xp.float64).reshape(nb, k * k).T
    return _patches(templates, k, xp) @ flat_basis


def _toeplitz(filters, size, xp):
    """``W[r, q, f] = filters[f, r - q]`` (zero outside the filter), shape
    ``(size, g, n_filters)``: a product with ``W`` correlates lines of ``size``
    pixels with every filter at the ``g = size - k + 1`` valid offsets."""
    nf, k = filters.shape
    g = size - k + 1
    W = np.zeros((size, g, nf))
    for q in range(g):
        W[q:q + k, q, :] = filters.T
    return xp.asarray(W)


def _separable_design_matrices(templates, factors, k, xp):
    """:func:`candidate_design_matrices` through the 1-D filters of ``factors``:
    two matrix products with banded (Toeplitz) filter matrices, rows then columns."""
    n, size, _ = templates.shape
    g = size - k + 1
    filters = np.asarray(factors.filters)
    nf = len(filters)
    # Along each row: R[n, r, q, f] = sum_u T[n, r, q + u] filters[f, u].
    # Products stack by candidate, so each candidate's numbers do not depend on
    # the others in the batch (match_many equals run bit for bit).
    R = templates @ _toeplitz(filters, size, xp).reshape(size, g * nf)
    R = xp.ascontiguousarray(R.reshape(n, size, g, nf).transpose(0, 2, 3, 1))  # (n, q, f, r)
    Wy = _toeplitz(filters, size, xp)  # (r, p, e)
    ix, iy = np.asarray(factors.ix), np.asarray(factors.iy)
    C = xp.empty((n, g, g, len(ix)))
    # Down each column, for the filter pairs one Gaussian's terms use:
    # S[n, q, f, p, e] = sum_v R[n, q, f, p + v] filters[e, v].
    for fs in _filter_groups(ix, iy):
        sel = np.flatnonzero(np.isin(ix, fs))
        S = (R[:, :, fs[0]:fs[-1] + 1].reshape(n, -1, size)
             @ Wy[:, :, fs[0]:fs[-1] + 1].reshape(size, -1)).reshape(n, g, len(fs), g, len(fs))
        C[..., sel] = S[:, :, ix[sel] - fs[0], :, iy[sel] - fs[0]].transpose(1, 3, 2, 0)
    return C.reshape(n, g * g, -1) @ xp.asarray(factors.A).T


def _filter_groups(ix, iy):
    """Runs of consecutive filters whose terms pair only among themselves (one
    Gaussian each in an Alard-Lupton basis)."""
    groups, lo, hi = [], None, None
    for a, c in zip(ix, iy):
        a0, a1 = min(a, c), max(a, c)
        if lo is None or a0 > hi:
            if lo is not None:
                groups.append(list(range(lo, hi + 1)))
            lo, hi = a0, a1
        else:
            lo, hi = min(lo, a0), max(hi, a1)
    if lo is not None:
        groups.append(list(range(lo, hi + 1)))
    return groups


def candidate_normal_equations(templates, targets, basis, variance=2.0, xp=np, factors=None):
    """``M = C^T C / var`` and ``b = C^T s / var`` for every candidate.

    Parameters
    ----------
    templates, targets : array (n_cand, size, size)
        Exposure-PSF and reference-PSF stamps.
    basis : array (n_basis, k, k)
    variance : float
        Pixel variance of the fit (template + target variance; 2 for model stamps).
    factors : gpumatch.basis.SeparableBasis, optional
        Separable form of ``basis`` (see :func:`candidate_design_matrices`);
        ignored unless its images equal ``basis`` to 1e-12 of its largest value.

    Returns
    -------
    M : array (n_cand, n_basis, n_basis)
    b : array (n_cand, n_basis)
    """
    n, size, _ = templates.shape
    nb, k, _ = basis.shape
    if factors is not None and not _describes(factors, basis):
        factors = None
    good = good_region(size, k)
    M = xp.empty((n, nb, nb), dtype=xp.float64)
    b = xp.empty((n, nb), dtype=xp.float64)
    w = 1.0 / variance

    g = size - k + 1
    on_host = not backend_for_namespace(xp).on_device
    if factors is None:
        # The window-patch matrices (g^2 x k^2 per candidate) of a chunk stay
        # within _PATCH_BYTES (large kernels on padded stamps need gigabytes).
        step = int(max(1, min(_CHUNK, _PATCH_BYTES // max(1, 8 * g * g * k * k))))
    elif on_host:
        # Candidates are independent: on the host, pieces run on the host threads.
        step = piece_size(n, least=_CHUNK, most=4 * _CHUNK)
    else:
        step = _CHUNK

    def chunk(start):
        stop = min(n, start + step)
        C = candidate_design_matrices(templates[start:stop], basis, xp, factors)
        s = xp.ascontiguousarray(targets[start:stop, good, good], dtype=xp.float64)
        s = s.reshape(stop - start, -1, 1)
        Ct = C.transpose(0, 2, 1)
        M[start:stop] = (Ct @ C) * w
        b[start:stop] = (Ct @ s)[..., 0] * w

    starts = range(0, n, step)
    if on_host:
        map_in_threads(chunk, starts)
    else:
        for start in starts:
            chunk(start)
    return M, b


def _describes(factors, basis):
    """Whether ``factors`` reproduces ``basis`` (to 1e-12 of its largest value)."""
    from .backend import to_numpy

    basis = to_numpy(basis)
    images = factors.images()
    return (images.shape == basis.shape
            and float(np.abs(images - basis).max()) <= 1e-12 * float(np.abs(basis).max()))


def solve_candidates(M, b, xp=np):
    """Single-candidate kernels ``M^-1 b`` (pseudo-inverse where singular)."""
    return solve_symmetric_batch(M, b, xp)
