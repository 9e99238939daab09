"""Shared fixtures and independent reference computations for the core tests.

Everything here is written from docs/algorithm.md alone, independently of the
gpumatch implementation, so the tests compare gpumatch with a second,
deliberately simple computation (explicit loops, analytic formulas).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import types

import numpy as np
import pytest

import gpumatch as gm


def pytest_configure(config):
    """The CUDA emulator's compiled libraries go to a private directory made for this
    test run (0700, unpredictable name) and removed at its end; the fake-CuPy
    subprocesses inherit it. Set GPUMATCH_EMULATOR_CACHE to a private directory of
    your own to keep them across runs."""
    if not os.environ.get("GPUMATCH_EMULATOR_CACHE"):
        run_dir = tempfile.mkdtemp(prefix="gpumatch-emulator-run-")
        os.environ["GPUMATCH_EMULATOR_CACHE"] = run_dir
        config._gpumatch_emulator_run_dir = run_dir


def pytest_unconfigure(config):
    run_dir = getattr(config, "_gpumatch_emulator_run_dir", None)
    if run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.environ.pop("GPUMATCH_EMULATOR_CACHE", None)

# --------------------------------------------------------------------------
# Independent reference computations (docs/algorithm.md sections 3-7)
# --------------------------------------------------------------------------


def next_odd(v):
    """docs/algorithm.md section 3: ceil(v), plus 1 if that is even."""
    n = math.ceil(v)
    return n + 1 if n % 2 == 0 else n


def term_exponents(order):
    """(a, c) of x^a y^c in the order 1, x, y, x^2, xy, y^2, x^3, x^2 y, ..."""
    out = []
    for n in range(order + 1):
        for c in range(n + 1):
            out.append((n - c, c))
    return out


def gaussian_stamp(width, height, sigma, xc=None, yc=None):
    """Circular Gaussian sampled at pixel centres, normalised to sum 1."""
    xc = width // 2 if xc is None else xc
    yc = height // 2 if yc is None else yc
    y, x = np.mgrid[0:height, 0:width].astype(float)
    g = np.exp(-((x - xc) ** 2 + (y - yc) ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def elliptical_stamp(size, ixx, iyy, ixy):
    """Elliptical Gaussian with covariance [[ixx, ixy], [ixy, iyy]], sum 1."""
    h = size // 2
    y, x = np.mgrid[-h:h + 1, -h:h + 1].astype(float)
    inv = np.linalg.inv(np.array([[ixx, ixy], [ixy, iyy]]))
    q = inv[0, 0] * x * x + 2 * inv[0, 1] * x * y + inv[1, 1] * y * y
    g = np.exp(-0.5 * q)
    return g / g.sum()


def center_in(stamp, size):
    """Place an odd stamp centred in a size x size zero array (size >= stamp)."""
    h, w = stamp.shape
    out = np.zeros((size, size))
    oy, ox = (size - h) // 2, (size - w) // 2
    out[oy:oy + h, ox:ox + w] = stamp
    return out


def correlate_valid(image, kernel):
    """docs/algorithm.md section 5, brute force: out[y, x] = sum_{j,i} in[y-h+j, x-h+i] K[j, i].

    Only outputs whose footprint lies inside ``image`` (the good region),
    returned as an array of shape (ny - 2h, nx - 2h); out[0, 0] is input pixel (h, h).
    """
    k = kernel.shape[0]
    h = k // 2
    ny, nx = image.shape
    out = np.zeros((ny - 2 * h, nx - 2 * h))
    for y in range(h, ny - h):
        for x in range(h, nx - h):
            acc = 0.0
            for j in range(k):
                for i in range(k):
                    acc += image[y - h + j, x - h + i] * kernel[j, i]
            out[y - h, x - h] = acc
    return out


def correlate_valid_fast(image, kernel):
    """Same as :func:`correlate_valid`, summing shifted copies (one per kernel pixel)."""
    k = kernel.shape[0]
    h = k // 2
    ny, nx = image.shape
    out = np.zeros((ny - 2 * h, nx - 2 * h))
    for j in range(k):
        for i in range(k):
            out += kernel[j, i] * image[j:j + ny - 2 * h, i:i + nx - 2 * h]
    return out


def al_basis(kernel_size, sigmas, degrees):
    """docs/algorithm.md section 4, written out term by term."""
    h = kernel_size // 2
    raw = []
    for sigma, deg in zip(sigmas, degrees):
        g = np.zeros((kernel_size, kernel_size))
        for j in range(kernel_size):
            for i in range(kernel_size):
                u, v = i - h, j - h
                g[j, i] = math.exp(-(u * u + v * v) / (2.0 * sigma * sigma))
        g /= g.sum()
        for a, c in term_exponents(deg):
            img = np.zeros_like(g)
            for j in range(kernel_size):
                for i in range(kernel_size):
                    img[j, i] = g[j, i] * ((i - h) / h) ** a * ((j - h) / h) ** c
            raw.append(img)
    out = [raw[0] / raw[0].sum()]
    for img in raw[1:]:
        s = img.sum()
        if abs(s) > 1.1920929e-07:
            img = img / s - out[0]
        img = img / math.sqrt((img ** 2).sum())
        out.append(img)
    return np.array(out)


def spatial_terms(model_type, order, region, x, y):
    """docs/algorithm.md section 6 spatial functions p_j(x, y) at one parent position."""
    if model_type == "polynomial":
        tx, ty = float(x), float(y)

        def fx(n):
            return tx ** n

        def fy(n):
            return ty ** n
    else:
        xmin, xmax = region.x0 - 0.5, region.x1 + 0.5
        ymin, ymax = region.y0 - 0.5, region.y1 + 0.5
        tx = (x - (xmin + xmax) / 2.0) * 2.0 / (xmax - xmin)
        ty = (y - (ymin + ymax) / 2.0) * 2.0 / (ymax - ymin)

        def cheb(t, n):
            t0, t1 = 1.0, t
            if n == 0:
                return t0
            for _ in range(n - 1):
                t0, t1 = t1, 2 * t * t1 - t0
            return t1

        def fx(n):
            return cheb(tx, n)

        def fy(n):
            return cheb(ty, n)
    return np.array([fx(a) * fy(c) for a, c in term_exponents(order)])


def kernel_image(basis, coeffs, model_type, order, region, x, y):
    """K(x, y) = sum_b (sum_j a_bj p_j(x, y)) B_b from raw coefficients."""
    p = spatial_terms(model_type, order, region, x, y)
    return np.einsum("b,bij->ij", coeffs @ p, basis)


def slow_spatial_system(M, b, P):
    """docs/algorithm.md section 6 assembly with explicit loops over candidates and blocks."""
    nc, nb, _ = M.shape
    nkt = P.shape[1]
    nt = (nb - 1) * nkt + 1
    A = np.zeros((nt, nt))
    r = np.zeros(nt)
    for n in range(nc):
        p = P[n]
        A[0, 0] += M[n, 0, 0]
        r[0] += b[n, 0]
        for m in range(1, nb):
            s = 1 + (m - 1) * nkt
            for j in range(nkt):
                A[0, s + j] += M[n, 0, m] * p[j]
                A[s + j, 0] += M[n, m, 0] * p[j]
        for m1 in range(1, nb):
            s1 = 1 + (m1 - 1) * nkt
            for j in range(nkt):
                r[s1 + j] += b[n, m1] * p[j]
            for m2 in range(1, nb):
                s2 = 1 + (m2 - 1) * nkt
                for j1 in range(nkt):
                    for j2 in range(nkt):
                        A[s1 + j1, s2 + j2] += M[n, m1, m2] * p[j1] * p[j2]
    return A, r


def rel_l2(a, b):
    return float(np.sqrt(((a - b) ** 2).sum() / (b ** 2).sum()))


@pytest.fixture(scope="session")
def ref():
    """The independent reference computations above, as a namespace."""
    return types.SimpleNamespace(
        next_odd=next_odd, term_exponents=term_exponents, gaussian_stamp=gaussian_stamp,
        elliptical_stamp=elliptical_stamp, center_in=center_in,
        correlate_valid=correlate_valid, correlate_valid_fast=correlate_valid_fast,
        al_basis=al_basis, spatial_terms=spatial_terms, kernel_image=kernel_image,
        slow_spatial_system=slow_spatial_system, rel_l2=rel_l2,
    )


# --------------------------------------------------------------------------
# The reference's own test setup (docs/algorithm.md section 10)
# --------------------------------------------------------------------------


class VisitInfo:
    """A stand-in for an LSST VisitInfo: any object must be carried through."""

    def __init__(self, exposure_time, date):
        self.exposure_time = exposure_time
        self.date = date

    def __eq__(self, other):
        return (isinstance(other, VisitInfo) and self.exposure_time == other.exposure_time
                and self.date == other.date)


def sec10_config(**changes):
    """kernelSize 9, kernelSizeMin 9, scaleByFwhm False; everything else default."""
    fields = dict(kernelSize=9, kernelSizeMin=9, scaleByFwhm=False)
    fields.update(changes)
    return gm.ModelPsfMatchConfig(**fields)


def make_sec10_exposure(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 5.0, size=(256, 256)).astype(np.float32)
    variance = rng.uniform(20.0, 30.0, size=(256, 256)).astype(np.float32)
    mask = np.zeros((256, 256), dtype=np.int32)
    mask[rng.integers(0, 256, 40), rng.integers(0, 256, 40)] = 1 << 3
    return gm.Exposure(
        image, variance, mask, psf=gm.DoubleGaussianPsf(11, 11, 2.0),
        wcs={"CRVAL1": 150.0, "CRVAL2": 2.2}, photo_calib=27.0, filter="r",
        visit_info=VisitInfo(30.0, "2024-01-01T00:00:00"), id=12345,
    )


@pytest.fixture
def sec10():
    """Namespace with the docs/algorithm.md section 10 exposure, reference and config factory."""
    return types.SimpleNamespace(
        exposure=make_sec10_exposure(),
        reference=gm.DoubleGaussianPsf(11, 11, 3.7),
        config=sec10_config,
    )


def snapshot(exposure):
    """Deep copies of everything run() must leave alone."""
    return dict(
        image=np.array(exposure.image, copy=True), variance=np.array(exposure.variance, copy=True),
        mask=np.array(exposure.mask, copy=True), xy0=exposure.xy0, psf=exposure.psf,
        meta=dict(exposure.meta), mask_planes=dict(exposure.mask_planes),
        visit_info=exposure.visit_info, wcs=exposure.wcs,
    )


def assert_unchanged(exposure, snap):
    np.testing.assert_array_equal(exposure.image, snap["image"])
    np.testing.assert_array_equal(exposure.variance, snap["variance"])
    np.testing.assert_array_equal(exposure.mask, snap["mask"])
    assert exposure.image.dtype == snap["image"].dtype
    assert exposure.variance.dtype == snap["variance"].dtype
    assert exposure.mask.dtype == snap["mask"].dtype
    assert exposure.xy0 == snap["xy0"]
    assert exposure.psf is snap["psf"]
    assert exposure.meta == snap["meta"]
    assert exposure.mask_planes == snap["mask_planes"]
    assert exposure.visit_info is snap["visit_info"]
    assert exposure.wcs is snap["wcs"]


@pytest.fixture
def unchanged():
    """``(snapshot, assert_unchanged)`` helpers."""
    return types.SimpleNamespace(snapshot=snapshot, check=assert_unchanged)
