"""Random inputs shared by the tests: a strongly varying spatial kernel and
noisy image, variance and mask planes (application), and symmetric systems of
every kind the spatial solve meets."""

import types

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.spatial import SpatialFunctions


def random_kernel(rng, k, model_type, order, region, support=None, scale=None):
    """A spatial kernel whose basis images do not sum to zero.

    So the kernel sum, and with it the normalisation, varies across the image.
    ``support`` (bool ``k x k``) zeroes basis pixels; ``scale`` (pixels) makes
    raw-coordinate "polynomial" terms O(1) (default: the region's extent).
    """
    h = k // 2
    v, u = np.mgrid[-h:h + 1, -h:h + 1]
    nb = 4
    basis = np.empty((nb, k, k))
    basis[0] = np.exp(-(u ** 2 + v ** 2) / (2 * 1.5 ** 2))
    for b in range(1, nb):
        basis[b] = rng.normal(0.0, 0.05, (k, k)) + 0.3 * np.exp(
            -((u - rng.integers(-h, h + 1)) ** 2 + (v - rng.integers(-h, h + 1)) ** 2) / 2.0)
    if support is not None:
        basis *= support
    basis[0] /= basis[0].sum()
    nkt = (order + 1) * (order + 2) // 2
    coeffs = rng.uniform(-0.5, 0.5, (nb, nkt))
    coeffs[0] = 0.0
    coeffs[0, 0] = 1.0
    coeffs[1:, 0] = rng.uniform(0.2, 0.4, nb - 1)
    if model_type == "polynomial":
        if scale is None:
            scale = max(region.width, region.height) + abs(region.x0) + abs(region.y0)
        expo = [(n - c, c) for n in range(order + 1) for c in range(n + 1)]
        coeffs = coeffs / np.array([float(scale) ** (a + c) for a, c in expo])
    return gm.SpatialKernel(basis, SpatialFunctions(model_type, order, region), coeffs)


def random_planes(rng, shape, img_dtype=np.float32, var_dtype=np.float32, mask_dtype=np.int32):
    """Image (100 +- 10), variance (5 .. 15) and a mask with one of bits 0-7 set
    on 3 % of the pixels."""
    image = rng.normal(100.0, 10.0, shape).astype(img_dtype)
    variance = rng.uniform(5.0, 15.0, shape).astype(var_dtype)
    mask = np.zeros(shape, dtype=mask_dtype)
    hit = rng.random(shape) < 0.03
    mask[hit] = (1 << rng.integers(0, 8, hit.sum())).astype(mask_dtype)
    return image, variance, mask


def random_symmetric_systems(rng, m=14):
    """Five symmetric systems ``A (5, m, m)``, ``b (5, m)``, one of each kind, and
    what a solve must find, known by construction.

    0. positive definite, eigenvalues in [1, 10]: Cholesky;
    1. the same with unknowns spanning 16 orders of magnitude (like raw-pixel
       "polynomial" spatial terms): invertible, Cholesky after equilibration;
    2. positive semi-definite of rank ``m // 2`` with a unit diagonal (so the
       equilibration is the identity): the pseudo-inverse, whose answer is the
       minimum-norm solution ``pinv(A) b``;
    3. indefinite (two negative eigenvalues) but invertible: Cholesky fails, so
       the pseudo-inverse, which keeps every eigenvalue (rank ``m``) and gives
       the exact solution;
    4. zero: the pseudo-inverse, rank 0, ``x = 0``.

    Returns
    -------
    SimpleNamespace
        ``A``, ``b``, ``x`` (the solutions), ``weights`` (per system and
        unknown: compare ``x * weights``), ``methods``, ``ranks`` and ``conds``
        (|eigenvalue| ratio; None where it is at rounding level).
    """
    def with_eigenvalues(lam):
        q, _ = np.linalg.qr(rng.normal(size=(m, m)))
        a = (q * lam) @ q.T
        return 0.5 * (a + a.T)

    r = m // 2
    lam = [rng.uniform(1.0, 10.0, m), rng.uniform(1.0, 10.0, m),
           np.r_[rng.uniform(1.0, 10.0, r), np.zeros(m - r)],
           np.r_[-rng.uniform(1.0, 10.0, 2), rng.uniform(1.0, 10.0, m - 2)], np.zeros(m)]
    A = np.stack([with_eigenvalues(v) for v in lam])
    scales = 10.0 ** np.linspace(-8.0, 8.0, m)
    A[1] *= scales[:, None] * scales[None, :]
    d = 1.0 / np.sqrt(np.diag(A[2]))
    A[2] *= d[:, None] * d[None, :]
    x = rng.normal(size=(5, m))
    x[1] /= scales
    x[4] = 0.0
    b = np.einsum("nij,nj->ni", A, x)
    b[4] = rng.normal(size=m)
    x[2] = np.linalg.pinv(A[2], hermitian=True) @ b[2]
    weights = np.ones((5, m))
    weights[1] = scales
    return types.SimpleNamespace(
        A=A, b=b, x=x, weights=weights,
        methods=["cholesky", "cholesky", "eigen-pseudo-inverse", "eigen-pseudo-inverse",
                 "eigen-pseudo-inverse"],
        ranks=[m, m, r, m, 0],
        conds=[lam[0].max() / lam[0].min(), None, None,
               np.abs(lam[3]).max() / np.abs(lam[3]).min(), np.inf])


def assert_symmetric_solutions(got, systems, rtol=1e-12):
    """``got`` (SymmetricSolutions) solves ``systems`` (:func:`random_symmetric_systems`):
    methods and ranks exactly, condition numbers to 1e-10 (at least 1e14 where
    they are at rounding level), solutions to ``rtol`` of their largest
    element (1e-8 for the badly scaled system, in the scaled unknowns)."""
    assert [g.method for g in got] == systems.methods
    assert [g.rank for g in got] == systems.ranks
    for i, g in enumerate(got):
        want = systems.conds[i]
        if want is None:
            assert g.condition_number > 1e14, (i, g.condition_number)
        else:
            assert g.condition_number == pytest.approx(want, rel=1e-10), i
        tol = 1e-8 if i == 1 else rtol
        w = systems.weights[i]
        scale = max(np.abs(systems.x[i] * w).max(), 1.0 if i == 4 else 0.0)
        np.testing.assert_allclose(g.x * w, systems.x[i] * w, rtol=0, atol=tol * scale,
                                   err_msg=f"system {i} ({g.method})")
