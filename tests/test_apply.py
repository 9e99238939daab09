"""Applying the kernel (docs/algorithm.md section 7) against a brute-force per-pixel reference."""

import numpy as np
import pytest

import gpumatch as gm
import gpumatch.apply as apply_mod
from gpumatch.apply import RANGE_FACTOR, convolve_planes, out_of_range
from random_kernels import random_kernel, random_planes

NO_DATA = 1 << 8


def _brute_force(image, variance, mask, basis, coeffs, model_type, order, region, xy0,
                 no_data, kernel_ref):
    """Explicit loop over output pixels; the kernel is evaluated (from the raw
    coefficients, with the test's own spatial functions) and normalised at every
    pixel's parent position."""
    ny, nx = image.shape
    k = basis.shape[1]
    h = k // 2
    img = np.asarray(image, dtype=np.float64)
    var = np.asarray(variance, dtype=np.float64)
    out_i = np.full((ny, nx), np.nan)
    out_v = np.full((ny, nx), np.inf)
    out_m = np.full((ny, nx), no_data, dtype=np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        for y in range(h, ny - h):
            for x in range(h, nx - h):
                K = kernel_ref(basis, coeffs, model_type, order, region, x + xy0[0], y + xy0[1])
                Kh = K / K.sum()
                out_i[y, x] = (img[y - h:y + h + 1, x - h:x + h + 1] * Kh).sum()
                out_v[y, x] = (var[y - h:y + h + 1, x - h:x + h + 1] * Kh * Kh).sum()
                bits = 0
                for j, i in zip(*np.nonzero(K)):
                    bits |= int(mask[y - h + j, x - h + i])
                out_m[y, x] = bits
    return out_i, out_v, out_m


def _brute_force_vectorised(image, basis, coeffs, model_type, order, region, xy0, ref,
                            square=False):
    """Same per-pixel definition, vectorised over pixels (for larger images);
    ``square``: with the squared normalised kernel (variance)."""
    ny, nx = image.shape
    k = basis.shape[1]
    h = k // 2
    yy, xx = np.mgrid[h:ny - h, h:nx - h]
    P = np.array([ref.spatial_terms(model_type, order, region, x + xy0[0], y + xy0[1])
                  for x, y in zip(xx.ravel(), yy.ravel())])
    K = np.einsum("nj,bj,bkl->nkl", P, coeffs, basis)
    K /= K.sum(axis=(1, 2), keepdims=True)
    if square:
        K *= K
    out = np.full((ny, nx), np.nan)
    acc = np.zeros(xx.size)
    img = np.asarray(image, dtype=np.float64)
    for j in range(k):
        for i in range(k):
            acc += K[:, j, i] * img[j:j + ny - 2 * h, i:i + nx - 2 * h].ravel()
    out[h:ny - h, h:nx - h] = acc.reshape(xx.shape)
    return out


def _planes(rng, shape, nan_at=(), inf_at=(), var_nan_at=(), var_inf_at=()):
    image, variance, mask = random_planes(rng, shape)
    for y, x in nan_at:
        image[y, x] = np.nan
    for y, x in inf_at:
        image[y, x] = np.inf
    for y, x in var_nan_at:
        variance[y, x] = np.nan
    for y, x in var_inf_at:
        variance[y, x] = np.inf
    return image, variance, mask


CASES = [
    # model type, order, xy0, shape (ny, nx), kernel size
    ("chebyshev1", 2, (-13, 27), (60, 75), 7),
    ("polynomial", 3, (40, -7), (61, 58), 5),
    ("chebyshev1", 0, (0, 0), (33, 40), 9),
]


@pytest.mark.parametrize("model_type, order, xy0, shape, k", CASES)
def test_against_brute_force(model_type, order, xy0, shape, k, ref):
    rng = np.random.default_rng(100 + 10 * order + k)
    ny, nx = shape
    box = gm.Box(xy0[0], xy0[1], nx, ny)
    region = box.grown(17, 11)
    kernel = random_kernel(rng, k, model_type, order, region, scale=max(shape))
    basis, coeffs = kernel.basis_images, kernel.spatial_coefficients
    image, variance, mask = _planes(rng, shape)
    out_i, out_v, out_m = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    assert out_i.dtype == np.float32 and out_v.dtype == np.float32 and out_m.dtype == np.int32
    bi, bv, bm = _brute_force(image, variance, mask, basis, coeffs, model_type, order, region,
                              xy0, NO_DATA, ref.kernel_image)
    h = k // 2
    inner = (slice(h, ny - h), slice(h, nx - h))
    np.testing.assert_allclose(out_i[inner], bi[inner], rtol=1e-5, atol=0)
    np.testing.assert_allclose(out_v[inner], bv[inner], rtol=1e-5, atol=0)
    np.testing.assert_array_equal(out_m, bm)
    # Edges: NaN, +inf, NO_DATA only.
    edge = np.ones(shape, bool)
    edge[inner] = False
    assert np.all(np.isnan(out_i[edge])) and np.all(out_v[edge] == np.inf)
    assert np.all(out_m[edge] == NO_DATA)
    assert np.all(np.isfinite(out_i[inner])) and np.all(np.isfinite(out_v[inner]))
    # The kernel varies strongly, in shape and in sum, so a constant kernel fails.
    if order > 0:
        b = box
        ka = kernel.compute_image(b.x0, b.y0, normalize=True)
        kb = kernel.compute_image(b.x1, b.y1, normalize=True)
        assert np.abs(ka - kb).max() > 0.2 * np.abs(ka).max()
        sa, sb = kernel.sum_at(b.x0, b.y0), kernel.sum_at(b.x1, b.y1)
        assert abs(sa - sb) > 0.05 * abs(sa)


def test_kernel_evaluation_agrees_with_spec_formula(ref):
    rng = np.random.default_rng(11)
    region = gm.Box(-30, 17, 90, 70)
    for model_type, order in [("chebyshev1", 2), ("polynomial", 3)]:
        kernel = random_kernel(rng, 7, model_type, order, region, scale=100.0)
        basis, coeffs = kernel.basis_images, kernel.spatial_coefficients
        for x, y in [(-30, 17), (59, 86), (10.5, 40.25)]:
            mine = ref.kernel_image(basis, coeffs, model_type, order, region, x, y)
            np.testing.assert_allclose(kernel.compute_image(x, y), mine, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(kernel.compute_image(x, y, normalize=True),
                                       mine / mine.sum(), rtol=1e-12, atol=1e-14)


def _multi_tile_case(rng, shape, k):
    """A random strongly varying Chebyshev kernel over a box at xy0 = (250, 1000)
    grown by 64 pixels, and random planes of ``shape`` (several FFT tiles)."""
    xy0 = (250, 1000)
    box = gm.Box(xy0[0], xy0[1], shape[1], shape[0])
    region = box.grown(64, 64)
    kernel = random_kernel(rng, k, "chebyshev1", 2, region)
    return xy0, box, region, kernel, _planes(rng, shape)


@pytest.mark.parametrize("shape, k", [((150, 131), 21), ((97, 260), 7)])
def test_large_multi_tile_against_brute_force(shape, k, ref):
    rng = np.random.default_rng(12)
    ny, nx = shape
    xy0, box, region, kernel, (image, variance, mask) = _multi_tile_case(rng, shape, k)
    basis, coeffs = kernel.basis_images, kernel.spatial_coefficients
    out_i, _, _ = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    bi = _brute_force_vectorised(image, basis, coeffs, "chebyshev1", 2, region, xy0, ref)
    h = k // 2
    inner = (slice(h, ny - h), slice(h, nx - h))
    np.testing.assert_allclose(out_i[inner], bi[inner], rtol=1e-5, atol=0)


# --- mask --------------------------------------------------------------------------

def _holey_support(k):
    """Corners cut off and a few interior holes: the footprint is not the box."""
    h = k // 2
    v, u = np.mgrid[-h:h + 1, -h:h + 1]
    s = (u ** 2 + v ** 2 <= h * h + 1).astype(float)
    s[h, h + 1] = 0
    s[h - 2, h] = 0
    s[h + 1, h - 1] = 0
    return s


def test_mask_or_over_partial_footprint(ref):
    rng = np.random.default_rng(13)
    k, shape, xy0 = 7, (40, 45), (5, -9)
    box = gm.Box(xy0[0], xy0[1], shape[1], shape[0])
    region = box.grown(10, 10)
    support = _holey_support(k)
    kernel = random_kernel(rng, k, "chebyshev1", 1, region, support=support)
    basis, coeffs = kernel.basis_images, kernel.spatial_coefficients
    image, variance, mask = _planes(rng, shape)
    out_i, out_v, out_m = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    bi, bv, bm = _brute_force(image, variance, mask, basis, coeffs, "chebyshev1", 1, region,
                              xy0, NO_DATA, ref.kernel_image)
    np.testing.assert_array_equal(out_m, bm)
    h = k // 2
    inner = (slice(h, shape[0] - h), slice(h, shape[1] - h))
    np.testing.assert_allclose(out_i[inner], bi[inner], rtol=1e-5)
    # A single flagged pixel reaches exactly the outputs whose footprint holds it.
    single = np.zeros(shape, np.int32)
    py, px = 20, 22
    single[py, px] = 1 << 5
    _, _, m = convolve_planes(image, variance, single, kernel, box, NO_DATA)
    expect = np.zeros(shape, bool)
    for j, i in zip(*np.nonzero(support)):
        expect[py + h - j, px + h - i] = True   # out[y, x] reads in[y - h + j, x - h + i]
    got = m[inner] == (1 << 5)
    np.testing.assert_array_equal(got, expect[inner])
    assert expect.sum() == support.sum() < k * k


def test_mask_bits_other_than_no_data_kept_and_custom_planes():
    rng = np.random.default_rng(14)
    planes = dict(gm.DEFAULT_MASK_PLANES)
    planes["NO_DATA"] = 12
    planes["MY_PLANE"] = 9
    shape = (30, 30)
    image = rng.normal(size=shape)
    mask = np.zeros(shape, np.int32)
    mask[15, 15] = (1 << 9) | (1 << 0)
    mask[0, 0] = 1 << 3      # at the edge: must not survive there
    exposure = gm.Exposure(image, mask=mask, mask_planes=planes, psf=gm.GaussianPsf(5, 5, 1.0))
    kernel = gm.SpatialKernel.constant(np.ones((5, 5)))
    out = gm.apply_kernel(exposure, kernel, backend="numpy")
    assert out.mask_planes == planes
    assert np.all(out.mask[:2] == 1 << 12) and np.all(out.mask[:, -2:] == 1 << 12)
    assert np.all(out.mask[13:18, 13:18] == ((1 << 9) | 1))
    assert out.mask[12, 15] == 0 and out.mask[15, 18] == 0


# --- non-finite inputs ------------------------------------------------------------------

def test_nan_spreads_over_the_box_and_inf_gives_brute_force(ref):
    rng = np.random.default_rng(15)
    k, shape, xy0 = 5, (36, 41), (-3, 8)
    h = k // 2
    box = gm.Box(xy0[0], xy0[1], shape[1], shape[0])
    region = box.grown(9, 9)
    for support in (None, _holey_support(k)):
        kernel = random_kernel(rng, k, "chebyshev1", 2, region, support=support)
        basis, coeffs = kernel.basis_images, kernel.spatial_coefficients
        image, variance, mask = _planes(
            rng, shape, nan_at=[(10, 10), (0, 40), (35, 3), (20, 2)], inf_at=[(25, 30), (3, 3)],
            var_nan_at=[(30, 12)], var_inf_at=[(12, 33), (10, 10)])
        out_i, out_v, out_m = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
        bi, bv, bm = _brute_force(image, variance, mask, basis, coeffs, "chebyshev1", 2,
                                  region, xy0, NO_DATA, ref.kernel_image)
        inner = (slice(h, shape[0] - h), slice(h, shape[1] - h))
        # NaN outputs: exactly those whose k x k box covers a NaN input.
        nan_box = np.zeros(shape, bool)
        for y, x in [(10, 10), (0, 40), (35, 3), (20, 2)]:
            nan_box[max(0, y - h):y + h + 1, max(0, x - h):x + h + 1] = True
        if support is None:
            np.testing.assert_array_equal(np.isnan(out_i[inner]), nan_box[inner])
        else:
            # Also where the kernel is zero: NaN * 0 is NaN. (Here +inf * 0 adds more.)
            assert np.all(np.isnan(out_i[inner][nan_box[inner]]))
        np.testing.assert_array_equal(np.isnan(out_i[inner]), np.isnan(bi[inner]))
        np.testing.assert_array_equal(np.isnan(out_v[inner]), np.isnan(bv[inner]))
        # Infinite outputs (with their signs) and finite ones as the brute force.
        np.testing.assert_array_equal(np.isinf(out_i[inner]), np.isinf(bi[inner]))
        np.testing.assert_array_equal(np.isinf(out_v[inner]), np.isinf(bv[inner]))
        assert np.isinf(bi[inner]).sum() > 0 and np.isinf(bv[inner]).sum() > 0
        np.testing.assert_allclose(out_i[inner], bi[inner], rtol=1e-5, equal_nan=True)
        np.testing.assert_allclose(out_v[inner], bv[inner], rtol=1e-5, equal_nan=True)
        # Pixels far from every bad input are ordinary numbers.
        assert np.isfinite(out_i[30, 12]) and np.isfinite(out_v[25, 30])
        np.testing.assert_array_equal(out_m, bm)


# --- huge finite inputs (docs/algorithm.md section 7: exact for every finite input) ----------

def _footprints(shape, points, h):
    """Interior outputs whose k x k box covers any of ``points`` (array pixels)."""
    near = np.zeros(shape, bool)
    for y, x in points:
        near[max(0, y - h):y + h + 1, max(0, x - h):x + h + 1] = True
    return near[h:shape[0] - h, h:shape[1] - h]


def test_huge_finite_pixels_change_only_their_footprint(ref):
    """A -1e30 sentinel, a 3e38 pixel and 1e30 / 3e38 variances on a multi-tile
    image with a 21x21 kernel: every output equals the float64 brute force (the
    FFTs alone were off by up to 9e10 relative outside the footprints and gave
    19,000 negative variances), and only the outputs covering a huge value see it."""
    rng = np.random.default_rng(21)
    shape, k = (150, 131), 21
    ny, nx = shape
    h = k // 2
    xy0, box, region, kernel, (image, variance, mask) = _multi_tile_case(rng, shape, k)
    basis, coeffs = kernel.basis_images, kernel.spatial_coefficients
    img_pts, var_pts = [(40, 30), (100, 90)], [(70, 50), (20, 100)]
    image[img_pts[0]], image[img_pts[1]] = -1e30, 3e38
    variance[var_pts[0]], variance[var_pts[1]] = 1e30, 3e38
    out_i, out_v, _ = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    inner = (slice(h, ny - h), slice(h, nx - h))
    for out, square, pts in ((out_i, False, img_pts), (out_v, True, var_pts)):
        brute = _brute_force_vectorised(image if not square else variance, basis, coeffs,
                                        "chebyshev1", 2, region, xy0, ref, square=square)[inner]
        got = out[inner].astype(np.float64)
        near = _footprints(shape, pts, h)
        assert (~near).sum() > 10000
        np.testing.assert_allclose(got[~near], brute[~near], rtol=1e-5, atol=0)
        # Inside, the huge value is there (by direct sums, not dropped).
        np.testing.assert_allclose(got[near], brute[near], rtol=1e-5, atol=0)
        assert np.abs(got[near]).min() > 1e20
    assert np.all(out_v[inner] > 0)


def test_sentinel_column_and_zero_variance_region(ref):
    """A whole bad column of -1e30 (many direct outputs), a pixel of 1e10 (bright
    but within range: it stays in the FFTs and must still be exact), and a
    variance plane that is 0 over half the image with one 1e30 pixel: no
    negative variance, brute force everywhere."""
    rng = np.random.default_rng(22)
    k, shape, xy0 = 7, (60, 75), (-13, 27)
    h = k // 2
    box = gm.Box(xy0[0], xy0[1], shape[1], shape[0])
    region = box.grown(17, 11)
    kernel = random_kernel(rng, k, "chebyshev1", 2, region)
    basis, coeffs = kernel.basis_images, kernel.spatial_coefficients
    image, variance, mask = _planes(rng, shape)
    image[:, 40] = -1e30
    image[10, 10] = 1e10
    variance[:, :37] = 0.0
    variance[50, 20] = 1e30
    assert out_of_range(np.where(np.isfinite(image), image, 0.0)[:, :30]) is None
    out_i, out_v, out_m = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    bi, bv, bm = _brute_force(image, variance, mask, basis, coeffs, "chebyshev1", 2, region,
                              xy0, NO_DATA, ref.kernel_image)
    inner = (slice(h, shape[0] - h), slice(h, shape[1] - h))
    near = _footprints(shape, [(y, 40) for y in range(shape[0])], h)
    assert near.sum() == 54 * k and (~near).sum() > 3000
    np.testing.assert_allclose(out_i[inner], bi[inner], rtol=1e-5, atol=0)
    assert np.all(out_i[inner][near] < -1e20) and np.all(np.abs(out_i[inner][~near]) < 1e10)
    # Where the exact variance is 0, FFT rounding (here up to 1.5e-11 of the
    # typical output; 471 of these outputs were negative before) is left on the
    # positive side only.
    assert np.all(out_v[inner] >= 0)
    zero = bv[inner] == 0
    assert zero.sum() > 1000
    tiny = 1e-9 * np.median(bv[inner][~zero])
    assert np.all(out_v[inner][zero] < tiny)
    np.testing.assert_allclose(out_v[inner], bv[inner], rtol=1e-5, atol=tiny)
    np.testing.assert_array_equal(out_m, bm)


def test_out_of_range_threshold_follows_the_data():
    rng = np.random.default_rng(23)
    plane = rng.normal(0.0, 3.0, (200, 300))
    assert out_of_range(plane) is None
    typical = np.quantile(np.abs(plane), 0.25)
    plane[5, 7] = 0.5 * RANGE_FACTOR * typical       # bright, in range
    assert out_of_range(plane) is None
    plane[9, 11] = -3.0 * RANGE_FACTOR * typical     # out of range
    plane[1, 2] = np.inf
    plane[3, 4] = np.nan
    special = out_of_range(plane)
    assert set(zip(*np.nonzero(special))) == {(9, 11), (1, 2), (3, 4)}
    # Scale-free: the same plane in other units flags the same pixels.
    np.testing.assert_array_equal(out_of_range(plane * 1e-6), special)
    assert out_of_range(np.zeros((20, 20))) is None
    # Sentinels on 70 % of the plane (a mostly masked exposure): still exactly them.
    bad = rng.random(plane.shape) < 0.7
    plane = np.where(bad, -1e30, rng.normal(0.0, 3.0, plane.shape))
    np.testing.assert_array_equal(out_of_range(plane), bad)


def test_exposure_smaller_than_kernel_is_all_edge():
    image = np.ones((4, 6), np.float32)
    kernel = gm.SpatialKernel.constant(np.ones((7, 7)))
    out_i, out_v, out_m = convolve_planes(image, image.copy(), np.zeros((4, 6), np.int32),
                                          kernel, gm.Box(0, 0, 6, 4), NO_DATA)
    assert np.all(np.isnan(out_i)) and np.all(out_v == np.inf) and np.all(out_m == NO_DATA)


# --- through the task ----------------------------------------------------------------------

def test_task_output_is_brute_force_application(sec10, ref):
    """The matched exposure equals the per-pixel normalised application of the
    returned kernel (checked on a sub-grid of pixels, all edges, mask everywhere)."""
    exp = sec10.exposure
    res = gm.ModelPsfMatchTask(sec10.config(spatialKernelOrder=1), backend="numpy").run(
        exp, sec10.reference)
    out = res.psfMatchedExposure
    k = res.psfMatchingKernel
    h = 4
    img = exp.image.astype(np.float64)
    var = exp.variance.astype(np.float64)
    for y in list(range(h, 256 - h, 37)) + [h, 255 - h]:
        for x in list(range(h, 256 - h, 29)) + [h, 255 - h]:
            K = k.compute_image(x, y, normalize=True)
            patch = img[y - h:y + h + 1, x - h:x + h + 1]
            assert out.image[y, x] == pytest.approx((patch * K).sum(), rel=1e-5)
            vpatch = var[y - h:y + h + 1, x - h:x + h + 1]
            assert out.variance[y, x] == pytest.approx((vpatch * K * K).sum(), rel=1e-5)
    edge = np.ones((256, 256), bool)
    edge[h:-h, h:-h] = False
    assert np.all(np.isnan(out.image[edge])) and np.all(np.isposinf(out.variance[edge]))
    assert np.all(out.mask[edge] == exp.get_plane_bitmask("NO_DATA"))
    # Mask: the 9x9 AL kernel has no exact zeros, so the OR runs over the box.
    support = k.compute_image(100, 100) != 0
    assert support.all()
    flagged = exp.mask != 0
    dil = np.zeros_like(flagged)
    for j in range(9):
        for i in range(9):
            dil[h:-h, h:-h] |= flagged[j:j + 248, i:i + 248]
    expect = np.where(dil, 1 << 3, 0)
    np.testing.assert_array_equal(out.mask[h:-h, h:-h], expect[h:-h, h:-h])


def test_kernel_sum_does_not_change_normalised_output(sec10):
    exp = sec10.exposure
    results = {}
    for ks in (0.5, 2.7):
        task = gm.ModelPsfMatchTask(sec10.config(spatialKernelOrder=1), backend="numpy")
        results[ks] = task.run(exp, sec10.reference, kernelSum=ks)
    a, b = results[0.5], results[2.7]
    assert a.psfMatchingKernel.compute_image(50, 70).sum() == pytest.approx(0.5, abs=1e-10)
    assert b.psfMatchingKernel.compute_image(50, 70).sum() == pytest.approx(2.7, abs=1e-10)
    for x, y in [(0, 0), (128, 200), (255, 255)]:
        np.testing.assert_allclose(a.psfMatchingKernel.compute_image(x, y, normalize=True),
                                   b.psfMatchingKernel.compute_image(x, y, normalize=True),
                                   rtol=1e-9, atol=1e-12)
    ia, ib = a.psfMatchedExposure.image, b.psfMatchedExposure.image
    np.testing.assert_array_equal(np.isnan(ia), np.isnan(ib))
    good = np.isfinite(ia)
    np.testing.assert_allclose(ia[good], ib[good], rtol=1e-6)
    va, vb = a.psfMatchedExposure.variance, b.psfMatchedExposure.variance
    np.testing.assert_allclose(va[good], vb[good], rtol=1e-6)
    np.testing.assert_array_equal(a.psfMatchedExposure.mask, b.psfMatchedExposure.mask)
    # Flux is conserved by the normalised kernel: the mean level stays ~100.
    assert abs(np.nanmean(ia) - np.mean(exp.image)) < 0.1


def test_run_leaves_input_unchanged_and_carries_metadata(sec10, unchanged):
    exp = sec10.exposure
    snap = unchanged.snapshot(exp)
    res = gm.ModelPsfMatchTask(sec10.config(), backend="numpy").run(exp, sec10.reference)
    unchanged.check(exp, snap)
    out = res.psfMatchedExposure
    assert out is not exp and out.image is not exp.image
    assert out.bbox == exp.bbox and out.xy0 == exp.xy0
    assert out.wcs is exp.wcs and out.photo_calib is exp.photo_calib
    assert out.filter == exp.filter and out.id == exp.id and out.visit_info is exp.visit_info
    assert out.image.dtype == exp.image.dtype and out.mask.dtype == exp.mask.dtype
    assert out.psf is res.referencePsfModel


def test_apply_kernel_function(ref):
    rng = np.random.default_rng(16)
    image = rng.normal(size=(40, 50))
    psf = gm.GaussianPsf(5, 5, 1.0)
    exposure = gm.Exposure(image, xy0=(3, 4), psf=psf, filter="g", id=7)
    K = ref.gaussian_stamp(5, 5, 1.2)
    out = gm.apply_kernel(exposure, gm.SpatialKernel.constant(3.0 * K), backend="numpy")
    assert out.psf is psf and out.filter == "g" and out.id == 7 and out.xy0 == (3, 4)
    np.testing.assert_allclose(out.image[2:-2, 2:-2], ref.correlate_valid(image, K), rtol=1e-10)
    np.testing.assert_allclose(out.variance[2:-2, 2:-2], np.full((36, 46), (K ** 2).sum()),
                               rtol=1e-10)
    other = gm.GaussianPsf(5, 5, 2.0)
    assert gm.apply_kernel(exposure, gm.SpatialKernel.constant(K), psf=other,
                           backend="numpy").psf is other


# --- float32 tiles and threads (docs/algorithm.md section 7.5) ------------------------------

@pytest.fixture
def small_tiles(monkeypatch):
    """64-pixel tiles (nine per plane, three bands) for the mixed-precision case,
    whatever size the tile chooser prefers for so small a plane."""
    monkeypatch.setattr(apply_mod, "choose_tile", lambda n_out_y, n_out_x, k: 64)


def _mixed_precision_case(rng):
    """A multi-tile image (11x11 kernel varying strongly in shape and sum) with a
    -1e30 sentinel, NaN, +inf and a 1e6 star (whose tiles must go to float64),
    and a variance plane with a 1e30 pixel, a NaN and a zero region."""
    shape, k, xy0 = (150, 170), 11, (-40, 900)
    ny, nx = shape
    box = gm.Box(xy0[0], xy0[1], nx, ny)
    region = box.grown(20, 20)
    kernel = random_kernel(rng, k, "chebyshev1", 2, region)
    image, variance, mask = _planes(rng, shape, nan_at=[(20, 30)], inf_at=[(120, 40)],
                                    var_nan_at=[(90, 150)])
    image[60, 100] = -1e30
    yy, xx = np.mgrid[:ny, :nx]
    image += (1e6 * np.exp(-((yy - 110) ** 2 + (xx - 130) ** 2) / 8.0)).astype(image.dtype)
    variance[100, 20] = 1e30
    variance[:30, 120:] = 0.0
    return shape, k, xy0, box, region, kernel, image, variance, mask


def _mask_brute_force(mask, kernel, k, no_data):
    """OR over the taps where any term kernel is non-zero, shifted plane by plane."""
    ny, nx = mask.shape
    h = k // 2
    support = np.any(kernel.basis_images != 0, axis=0)
    out = np.full(mask.shape, no_data, dtype=mask.dtype)
    acc = np.zeros((ny - 2 * h, nx - 2 * h), dtype=mask.dtype)
    for j, i in zip(*np.nonzero(support)):
        acc |= mask[j:j + ny - 2 * h, i:i + nx - 2 * h]
    out[h:ny - h, h:nx - h] = acc
    return out


def test_float32_tiles_against_float64_brute_force(ref, caplog, small_tiles):
    """Most tiles are transformed in float32, those near the star and the zero
    variances in float64; every output matches the float64 per-pixel brute force
    at 1e-5, NaN and infinities included, and the mask is the brute-force OR."""
    rng = np.random.default_rng(31)
    shape, k, xy0, box, region, kernel, image, variance, mask = _mixed_precision_case(rng)
    ny, nx = shape
    h = k // 2
    basis, coeffs = kernel.basis_images, kernel.spatial_coefficients
    with caplog.at_level("DEBUG", logger="gpumatch"):
        out_i, out_v, out_m = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    counts = {}
    for rec in caplog.records:
        words = rec.getMessage().split()
        if words[2:4] == ["of", words[3]] and words[-1] == "float32":
            counts[words[0].rstrip(":")] = (int(words[1]), int(words[3]))
    for plane in ("image", "variance"):
        n32, n = counts[plane]
        assert 0 < n32 < n, (plane, n32, n)
    inner = (slice(h, ny - h), slice(h, nx - h))
    for out, plane, square in ((out_i, image, False), (out_v, variance, True)):
        with np.errstate(invalid="ignore", over="ignore"):
            brute = _brute_force_vectorised(plane, basis, coeffs, "chebyshev1", 2, region, xy0,
                                            ref, square=square)[inner]
        got = out[inner].astype(np.float64)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(brute))
        # Where the exact variance is 0, float64 FFT rounding is left (as in
        # test_sentinel_column_and_zero_variance_region), far below 1e-9 of typical.
        tiny = 1e-9 * np.nanmedian(np.abs(brute)) if square else 0.0
        assert (brute == 0).sum() > 100 if square else True
        np.testing.assert_allclose(got, brute, rtol=1e-5, atol=tiny, equal_nan=True)
    assert np.nanmin(out_v[inner]) >= 0
    np.testing.assert_array_equal(out_m, _mask_brute_force(mask, kernel, k, NO_DATA))


def test_float32_everywhere_would_miss_the_star(ref, monkeypatch, small_tiles):
    """The tile test matters: with every tile forced to float32 the outputs far
    from the 1e6 star but on its tiles are off by more than 1e-5."""
    rng = np.random.default_rng(31)
    shape, k, xy0, box, region, kernel, image, variance, mask = _mixed_precision_case(rng)
    h = k // 2
    image = np.where(np.isfinite(image) & (np.abs(image) < 1e20), image, 100.0)
    monkeypatch.setattr(apply_mod, "F32_TARGET", np.inf)
    out_i, _, _ = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    inner = (slice(h, shape[0] - h), slice(h, shape[1] - h))
    brute = _brute_force_vectorised(image, kernel.basis_images, kernel.spatial_coefficients,
                                    "chebyshev1", 2, region, xy0, ref)[inner]
    rel = np.abs(out_i[inner] - brute) / np.abs(brute)
    assert rel.max() > 1e-5


def test_results_do_not_depend_on_the_number_of_threads(monkeypatch, small_tiles):
    rng = np.random.default_rng(32)
    _, _, _, box, _, kernel, image, variance, mask = _mixed_precision_case(rng)
    outs = []
    for threads in ("1", "2", "3", "8"):   # 8: two threads inside each transform
        monkeypatch.setenv("GPUMATCH_THREADS", threads)
        outs.append(convolve_planes(image, variance, mask, kernel, box, NO_DATA))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)


def test_float64_tiles_of_a_float32_plane_subtract_the_offset_exactly(small_tiles):
    """A float32 plane whose offset (about 100.37) needs more bits than a 1e6 star
    keeps: the star's tiles are float64, and their input minus the offset must be
    taken in float64 (in float32 the outputs there were off by 1.2e-6)."""
    rng = np.random.default_rng(3)
    ny, nx, k = 120, 130, 11
    box = gm.Box(0, 0, nx, ny)
    kernel = random_kernel(rng, k, "chebyshev1", 2, box.grown(20, 20))
    image = (100.37 + rng.normal(0, 1, (ny, nx))).astype(np.float32)
    yy, xx = np.mgrid[:ny, :nx]
    image += (1e6 * np.exp(-((yy - 60) ** 2 + (xx - 65) ** 2) / 8.0)).astype(np.float32)
    variance = np.full((ny, nx), 100.0, np.float32)
    out, _, _ = convolve_planes(image, variance, np.zeros((ny, nx), np.int32), kernel, box,
                                NO_DATA)
    h = k // 2
    iy, ix = (a.ravel() for a in np.mgrid[h:ny - h:3, h:nx - h:3])
    want = apply_mod.direct_convolve_pixels(image.astype(np.float64), kernel, box, iy, ix, False)
    assert np.max(np.abs(out[iy, ix] - want) / np.abs(want)) < 2e-7
