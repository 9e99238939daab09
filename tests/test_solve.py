"""Solving (docs/algorithm.md sections 5 and 6): normal equations, spatial system, kernels."""

import types

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.backend import single_threaded_blas
from gpumatch.linalg import condition_number, solve_symmetric, solve_symmetric_many
from gpumatch.normal_equations import candidate_normal_equations
from gpumatch.spatial import SpatialFunctions
from gpumatch.spatial_solve import assemble_spatial_system, solve_spatial_system
from random_kernels import assert_symmetric_solutions, random_symmetric_systems


def _matched_residuals(result, exposure_psf, reference_stamp_at, ref):
    """Relative L2 of (exposure PSF stamp (*) normalised kernel) vs reference, per cell.

    Everything but the kernel is recomputed here from the PSF models.
    """
    kernel = result.psfMatchingKernel
    k = kernel.dimensions[0]
    cs = result.kernelCellSet
    size = cs.psf_size
    h = k // 2
    out = []
    for x, y in zip(cs.xs, cs.ys):
        K = kernel.compute_image(x, y)
        K = K / K.sum()
        stamp = exposure_psf.compute_kernel_image(x, y)
        template = ref.center_in(stamp / stamp.sum(), size)
        matched = ref.correlate_valid_fast(template, K)
        target = reference_stamp_at(x, y)[h:size - h, h:size - h]
        out.append(ref.rel_l2(matched, target))
    return np.array(out)


def test_shifted_copy_correlation_helper_matches_loop(ref):
    rng = np.random.default_rng(3)
    img, ker = rng.normal(size=(9, 11)), rng.normal(size=(5, 5))
    np.testing.assert_allclose(ref.correlate_valid_fast(img, ker), ref.correlate_valid(img, ker),
                               rtol=1e-13)


# --- matching quality with the default configuration ----------------------------

def test_gaussian_to_wider_gaussian_default_config(ref):
    exposure = gm.Exposure(np.zeros((256, 256), np.float32), psf=gm.GaussianPsf(21, 21, 2.0))
    task = gm.ModelPsfMatchTask(backend="numpy")
    res = task.run(exposure, gm.GaussianPsf(21, 21, 3.0))
    assert res.kernelCellSet.psf_size == 31          # nextOdd(21 * 1.4)
    assert res.psfMatchingKernel.dimensions == (21, 21)
    assert len(res.kernelCellSet) == 16
    target = ref.gaussian_stamp(31, 31, 3.0)
    rel = _matched_residuals(res, exposure.psf, lambda x, y: target, ref)
    assert rel.max() < 1e-3, rel
    # Without the kernel the stamps differ by order unity: the test can fail.
    raw = ref.rel_l2(ref.center_in(ref.gaussian_stamp(21, 21, 2.0), 31)[10:21, 10:21],
                     target[10:21, 10:21])
    assert raw > 0.5
    # gpumatch's own diagnostic reports the same numbers.
    diag = task.diagnostic(res.kernelCellSet, res.psfMatchingKernel)
    np.testing.assert_allclose(diag["relative_l2"], rel, rtol=1e-9)


# Size 2.0 .. 2.3 px across the region (cells reach one cell beyond the
# exposure) and a varying ellipticity of up to ~0.008.
VARYING = dict(sigma=(2.15, 0.05, 0.05), g1=(0.0, 0.005), g2=(0.0, 0.0, 0.005))


def _gauss_ref_at(size, sigma, ref):
    stamp = ref.gaussian_stamp(size, size, sigma)
    return lambda x, y: stamp


@pytest.mark.parametrize("shape", [(256, 256), (256, 384)])
def test_spatially_varying_psf_default_config(shape, ref):
    ny, nx = shape
    psf = gm.VaryingGaussianPsf(21, 21, (0, 0, nx - 1, ny - 1), **VARYING)
    exposure = gm.Exposure(np.zeros(shape, np.float32), psf=psf)
    res = gm.ModelPsfMatchTask(backend="numpy").run(exposure, gm.GaussianPsf(21, 21, 3.0))
    sizes = [psf.determinant_radius(x, y) for x, y in zip(res.kernelCellSet.xs,
                                                           res.kernelCellSet.ys)]
    assert max(sizes) - min(sizes) > 0.25  # the PSF really varies
    rel = _matched_residuals(res, psf, _gauss_ref_at(31, 3.0, ref), ref)
    assert len(rel) == (nx // 128 + 2) * (ny // 128 + 2)
    assert rel.max() < 1e-3, rel


def test_xy0_parent_coordinates_varying_psf(ref):
    x0, y0 = 1000, 2000
    psf = gm.VaryingGaussianPsf(21, 21, (x0, y0, x0 + 255, y0 + 255), **VARYING)
    exposure = gm.Exposure(np.zeros((256, 256), np.float32), xy0=(x0, y0), psf=psf)
    res = gm.ModelPsfMatchTask(backend="numpy").run(exposure, gm.GaussianPsf(21, 21, 3.0))
    cs = res.kernelCellSet
    assert cs.xs.min() == x0 - 128 + 64 and cs.ys.max() == y0 + 256 + 64
    rel = _matched_residuals(res, psf, _gauss_ref_at(31, 3.0, ref), ref)
    assert rel.max() < 1e-3, rel
    # Evaluating at array-index positions instead would be wrong by far.
    wrong = gm.VaryingGaussianPsf(21, 21, (0, 0, 255, 255), **VARYING)
    k = res.psfMatchingKernel.compute_image(x0 + 0.0, y0 + 255.0)
    bad = ref.rel_l2(ref.correlate_valid_fast(ref.center_in(wrong.compute_kernel_image(x0, y0 + 255.0),
                                                        31), k / k.sum()),
                     ref.gaussian_stamp(31, 31, 3.0)[10:21, 10:21])
    good = ref.rel_l2(ref.correlate_valid_fast(ref.center_in(psf.compute_kernel_image(x0, y0 + 255.0),
                                                         31), k / k.sum()),
                      ref.gaussian_stamp(31, 31, 3.0)[10:21, 10:21])
    assert good < 1e-3 < bad


# --- exact recovery of a known spatial kernel ------------------------------------
#
# The reference PSF at (x, y) is built here as the exposure PSF correlated
# (docs/algorithm.md section 5) with a known kernel K_true(x, y) = B0 + sum_b c_b(x, y) B_b
# whose coefficients are Chebyshev polynomials of the spatial order over R.
# The exposure PSF is zero outside the central pixels so that no flux leaves
# the stamp; then the least-squares fit is exact (a0 = 1) and every spatial
# model of that order, Chebyshev or raw-pixel polynomial, must return K_true.

STAMP = 25
SMALL_BASIS = dict(alardNGauss=2, alardSigGauss=(1.0, 2.5), alardDegGauss=(2, 1))


class _Truncated(gm.Psf):
    def __init__(self, inner, keep):
        self.inner = inner
        self.keep = keep

    def compute_kernel_image(self, x, y):
        stamp = np.array(self.inner.compute_kernel_image(x, y))
        n = stamp.shape[0]
        lo, hi = n // 2 - self.keep, n // 2 + self.keep + 1
        out = np.zeros_like(stamp)
        out[lo:hi, lo:hi] = stamp[lo:hi, lo:hi]
        return out / out.sum()


class _KnownKernelTarget(gm.Psf):
    def __init__(self, template_psf, basis, coeffs, order, region, ref):
        self.t, self.basis, self.coeffs = template_psf, basis, coeffs
        self.order, self.region, self.ref = order, region, ref

    def true_kernel(self, x, y):
        return self.ref.kernel_image(self.basis, self.coeffs, "chebyshev1", self.order,
                                     self.region, x, y)

    def compute_kernel_image(self, x, y):
        K = self.true_kernel(x, y)
        h = K.shape[0] // 2
        padded = np.zeros((STAMP + 2 * h, STAMP + 2 * h))
        padded[h:h + STAMP, h:h + STAMP] = self.t.compute_kernel_image(x, y)
        return self.ref.correlate_valid_fast(padded, K)


def _known_kernel_problem(ref, order, shape=(192, 192), xy0=(0, 0), config=SMALL_BASIS,
                          kernel_size=11, seed=0, cell=64):
    ny, nx = shape
    x0, y0 = xy0
    cfg = gm.ModelPsfMatchConfig(kernelSize=kernel_size, kernelSizeMin=3, sizeCellX=cell,
                                 sizeCellY=cell, spatialKernelOrder=order, **config)
    basis = ref.al_basis(kernel_size, cfg.alardSigGauss, cfg.alardDegGauss)
    region = gm.Box(x0, y0, nx, ny).grown(cell, cell)
    nkt = (order + 1) * (order + 2) // 2
    rng = np.random.default_rng(seed)
    coeffs = rng.normal(0.0, 0.02, (len(basis), nkt))
    coeffs[0] = 0.0
    coeffs[0, 0] = 1.0
    template = _Truncated(gm.VaryingGaussianPsf(
        STAMP, STAMP, (x0, y0, x0 + nx - 1, y0 + ny - 1), (1.6, 0.1, 0.05), (0.02,), (0.0, 0.03)),
        keep=STAMP // 2 - kernel_size // 2)
    target = _KnownKernelTarget(template, basis, coeffs, order, region, ref)
    exposure = gm.Exposure(np.zeros(shape, np.float32), xy0=xy0, psf=template)
    return cfg, exposure, target, coeffs, region


def _positions(exposure, cs):
    b = exposure.bbox
    pts = [(b.x0, b.y0), (b.x1, b.y1), (b.x0, b.y1), (b.x1, b.y0), b.center,
           (b.x0 + 0.3 * b.width, b.y0 + 0.7 * b.height)]
    return pts + list(zip(cs.xs, cs.ys))


@pytest.mark.parametrize("model_type", ["chebyshev1", "polynomial"])
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_known_kernel_recovered_every_order_and_type(order, model_type, ref):
    cfg, exposure, target, coeffs, region = _known_kernel_problem(ref, order)
    cfg = cfg.copy(spatialModelType=model_type)
    res = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exposure, target)
    kernel = res.psfMatchingKernel
    assert kernel.spatial_order == order and kernel.spatial_model_type == model_type
    nkt = (order + 1) * (order + 2) // 2
    assert kernel.spatial_coefficients.shape == (9, nkt)
    assert res.metadata["numSpatialUnknowns"] == 8 * nkt + 1
    for x, y in _positions(exposure, res.kernelCellSet):
        truth = target.true_kernel(x, y)
        got = kernel.compute_image(x, y)
        assert np.abs(got - truth).max() < 1e-9 * np.abs(truth).max(), (x, y)
        # The stored coefficients mean what docs/algorithm.md section 6 says they mean.
        mine = ref.kernel_image(kernel.basis_images, kernel.spatial_coefficients, model_type,
                                order, region, x, y)
        np.testing.assert_allclose(got, mine, rtol=0, atol=1e-12 * np.abs(truth).max())
    if model_type == "chebyshev1":
        # Same parametrisation as the truth: the coefficients themselves agree.
        np.testing.assert_allclose(kernel.spatial_coefficients, coeffs, rtol=0, atol=1e-10)
    assert res.metadata["spatialSolveMethod"] == "cholesky"


def test_known_kernel_default_basis(ref):
    cfg, exposure, target, coeffs, region = _known_kernel_problem(ref, 2, config={})
    for model_type in ("chebyshev1", "polynomial"):
        res = gm.ModelPsfMatchTask(cfg.copy(spatialModelType=model_type),
                                   backend="numpy").run(exposure, target)
        for x, y in _positions(exposure, res.kernelCellSet):
            truth = target.true_kernel(x, y)
            err = np.abs(res.psfMatchingKernel.compute_image(x, y) - truth).max()
            assert err < 1e-6 * np.abs(truth).max(), (model_type, x, y, err)


def test_known_kernel_nonzero_xy0_and_non_square(ref):
    cfg, exposure, target, coeffs, region = _known_kernel_problem(
        ref, 2, shape=(128, 320), xy0=(-517, 3021))
    res = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exposure, target)
    cs = res.kernelCellSet
    # R = bbox grown by 64: 448 x 256 -> 7 x 4 cells, centres in parent pixels.
    assert (cs.n_cells_x, cs.n_cells_y) == (7, 4)
    assert cs.xs.min() == -517 - 64 + 32 and cs.ys.min() == 3021 - 64 + 32
    assert cs.xs.max() == -517 - 64 + 6 * 64 + 32 and cs.ys.max() == 3021 - 64 + 3 * 64 + 32
    for x, y in _positions(exposure, cs):
        truth = target.true_kernel(x, y)
        got = res.psfMatchingKernel.compute_image(x, y)
        assert np.abs(got - truth).max() < 1e-9 * np.abs(truth).max(), (x, y)
    np.testing.assert_allclose(res.psfMatchingKernel.spatial_coefficients, coeffs, atol=1e-10)


def test_translation_invariance_of_parent_coordinates():
    """Shifting xy0 and the PSF model together leaves the kernel (at corresponding
    parent positions) and the matched image unchanged."""
    rng = np.random.default_rng(5)
    image = rng.normal(10.0, 1.0, (96, 160)).astype(np.float32)
    out = []
    for x0, y0 in [(0, 0), (4000, -1500)]:
        psf = gm.VaryingGaussianPsf(15, 15, (x0, y0, x0 + 159, y0 + 95), (2.0, 0.1, -0.05),
                                    (0.01,), (0.0, 0.01))
        cfg = gm.ModelPsfMatchConfig(kernelSize=11, kernelSizeMin=3, sizeCellX=48, sizeCellY=48)
        res = gm.ModelPsfMatchTask(cfg, backend="numpy").run(
            gm.Exposure(image, xy0=(x0, y0), psf=psf), gm.GaussianPsf(15, 15, 2.8))
        out.append((res, x0, y0))
    (ra, xa, ya), (rb, xb, yb) = out
    for dx, dy in [(0, 0), (159, 95), (37.5, 80.25)]:
        ka = ra.psfMatchingKernel.compute_image(xa + dx, ya + dy)
        kb = rb.psfMatchingKernel.compute_image(xb + dx, yb + dy)
        np.testing.assert_allclose(ka, kb, rtol=0, atol=1e-9 * np.abs(ka).max())
    ia, ib = ra.psfMatchedExposure.image, rb.psfMatchedExposure.image
    np.testing.assert_array_equal(np.isnan(ia), np.isnan(ib))
    good = np.isfinite(ia)
    np.testing.assert_allclose(ia[good], ib[good], rtol=1e-5)


def test_transposed_problem_gives_transposed_kernel():
    """x is the column, y the row: transposing the exposure and the PSF variation
    transposes the kernel (the AL basis is closed under transposition)."""
    ny, nx = 96, 160
    # A small, well-conditioned basis, so that rounding does not hide the symmetry.
    common = dict(kernelSize=11, kernelSizeMin=3, sizeCellX=48, sizeCellY=48, **SMALL_BASIS)
    cfg = gm.ModelPsfMatchConfig(**common)
    # sigma = 2 + 0.1 u - 0.05 v; transposed: 2 - 0.05 u + 0.1 v.  Transposing
    # swaps ixx and iyy, so g1 changes sign and g2 is kept.
    psf = gm.VaryingGaussianPsf(15, 15, (0, 0, nx - 1, ny - 1), (2.0, 0.1, -0.05),
                                (0.01, 0.01), (0.0, 0.0, 0.01))
    psf_t = gm.VaryingGaussianPsf(15, 15, (0, 0, ny - 1, nx - 1), (2.0, -0.05, 0.1),
                                  (-0.01, 0.0, -0.01), (0.0, 0.01, 0.0))
    task = gm.ModelPsfMatchTask(cfg, backend="numpy")
    ra = task.run(gm.Exposure(np.zeros((ny, nx)), psf=psf), gm.GaussianPsf(15, 15, 2.8))
    rb = task.run(gm.Exposure(np.zeros((nx, ny)), psf=psf_t), gm.GaussianPsf(15, 15, 2.8))
    np.testing.assert_allclose(psf_t.compute_kernel_image(30, 100),
                               psf.compute_kernel_image(100, 30).T, rtol=1e-12)
    for x, y in [(0, 0), (100, 30), (159, 95), (-20, 140)]:
        ka = ra.psfMatchingKernel.compute_image(x, y)
        kb = rb.psfMatchingKernel.compute_image(y, x)
        np.testing.assert_allclose(kb, ka.T, rtol=0, atol=1e-10 * np.abs(ka).max())


# --- the rank-deficient case -------------------------------------------------------

def test_rank_deficient_reference_setup_has_no_nan(sec10, ref):
    """docs/algorithm.md section 10 setup: 13-pixel stamps and a 9-pixel kernel leave 5 x 5 = 25
    good pixels per candidate for 27 basis functions."""
    for model_type in ("chebyshev1", "polynomial"):
        task = gm.ModelPsfMatchTask(sec10.config(spatialModelType=model_type), backend="numpy")
        res = task.run(sec10.exposure, sec10.reference)
        md = res.metadata
        good = (res.kernelCellSet.psf_size - 2 * (9 // 2)) ** 2
        assert good == 25 < res.psfMatchingKernel.n_basis == 27
        assert md["spatialSolveMethod"] == "eigen-pseudo-inverse"
        assert md["spatialSolveRank"] < md["numSpatialUnknowns"]
        assert np.all(np.isfinite(res.psfMatchingKernel.spatial_coefficients))
        assert np.all(np.isfinite(res.kernelCellSet.kernel_solutions))
        img = res.psfMatchedExposure.image
        assert np.all(np.isfinite(img[4:-4, 4:-4]))
        # Still a useful kernel: the matched PSF is close to the reference.
        target = ref.gaussian_stamp(13, 13, 3.7)
        rel = _matched_residuals(res, sec10.exposure.psf, lambda x, y: target, ref)
        assert rel.max() < 0.02, rel


# --- the exact least-squares optimum of an ill-conditioned, invertible system ---------
#
# The production basis (docs/algorithm.md section 11) over 1536 x 896 pixels at xy0 = (700, -300)
# with an elliptical PSF whose size varies by +-18 % and whose ellipticity reaches
# 0.09: the raw "polynomial" system has condition numbers of 1e21 (order 2) and
# 1e29 (order 3), the equilibrated Chebyshev one 2e11. A rank cut on its small
# but real eigenvalues moved the matched PSF by 2e-5 (order 3); the least-squares
# optimum is computed here independently, from the stacked design matrix.

PRODUCTION_BASIS = dict(kernelSize=21, alardSigGauss=(1.0, 2.0, 4.5), alardDegGauss=(4, 2, 2))


def _elliptical_varying_exposure():
    nx, ny, x0, y0 = 1536, 896, 700, -300
    psf = gm.VaryingGaussianPsf(25, 25, (x0, y0, x0 + nx - 1, y0 + ny - 1),
                                sigma=(2.0, 0.15, -0.1, 0.05, 0.03, -0.04),
                                g1=(0.03, 0.04, -0.02), g2=(-0.02, 0.01, 0.03))
    return gm.Exposure(np.zeros((ny, nx), np.float32), xy0=(x0, y0), psf=psf)


def _matched_psfs(templates, kernels):
    """Each template stamp correlated with its normalised kernel, on the good region."""
    from numpy.lib.stride_tricks import sliding_window_view

    k = kernels.shape[-1]
    kernels = kernels / kernels.sum(axis=(1, 2), keepdims=True)
    return np.einsum("nyxji,nji->nyx", sliding_window_view(templates, (k, k), axis=(1, 2)),
                     kernels)


def _least_squares_kernels(res, ref):
    """Kernels at the candidates from the exact least-squares solution of the stacked
    problem (docs/algorithm.md section 6: rows C_b p_j(x_c, y_c) of every candidate, weight 1/2),
    by pivoted QR, then a0 replaced by 1.

    The spatial functions are the Chebyshev ones of the region (ref.spatial_terms):
    they span exactly the kernels the raw polynomials of the same order span, so the
    optimum is the same, and QR of the raw-coordinate design matrix is itself
    inaccurate here (gelsy and gelsd differ by 2e-2 at order 3)."""
    import scipy.linalg
    from numpy.lib.stride_tricks import sliding_window_view

    cs, kernel = res.kernelCellSet, res.psfMatchingKernel
    basis = kernel.basis_images
    nb, k, _ = basis.shape
    h = k // 2
    order, region = kernel.spatial_order, cs.region
    C = np.einsum("nyxji,bji->nyxb", sliding_window_view(cs.templates, (k, k), axis=(1, 2)),
                  basis).reshape(len(cs), -1, nb)
    s = cs.targets[:, h:-h, h:-h].reshape(-1)
    P = np.array([ref.spatial_terms("chebyshev1", order, region, x, y)
                  for x, y in zip(cs.xs, cs.ys)])
    rows = np.concatenate([C[:, :, :1], (C[:, :, 1:, None] * P[:, None, None, :]).reshape(
        len(cs), C.shape[1], -1)], axis=2).reshape(len(s), -1)
    w = np.sqrt(0.5)
    u = scipy.linalg.lstsq(rows * w, s * w, lapack_driver="gelsy")[0]
    coeffs = np.zeros((nb, P.shape[1]))
    coeffs[0, 0] = 1.0
    coeffs[1:] = u[1:].reshape(nb - 1, -1)
    return np.einsum("bj,nj,bkl->nkl", coeffs, P, basis)


@pytest.mark.parametrize("case, order", [("convolution", 2), ("convolution", 3),
                                         ("deconvolution", 2)])
def test_spatial_solve_is_the_least_squares_optimum(case, order, ref):
    """Both spatial models give the matched PSF of the exact least-squares kernel to
    1e-6, and each other's to 1e-6; Cholesky solves the raw-polynomial system
    although its condition number is 1e21 or more."""
    exposure = _elliptical_varying_exposure()
    sigma = 3.0 if case == "convolution" else 1.8
    results = {}
    for model_type in ("polynomial", "chebyshev1"):
        cfg = gm.ModelPsfMatchConfig(spatialModelType=model_type, spatialKernelOrder=order,
                                     **PRODUCTION_BASIS)
        res = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exposure, gm.GaussianPsf(25, 25,
                                                                                      sigma))
        md = res.metadata
        assert md["spatialSolveMethod"] == "cholesky", md["spatialSolveReason"]
        assert md["spatialSolveRank"] == md["numSpatialUnknowns"]
        assert md["spatialSolveReason"].startswith("Cholesky of the equilibrated system:")
        assert 1e8 < md["spatialConditionNumEquilibrated"] < 1e13
        results[model_type] = res
    cs = results["polynomial"].kernelCellSet
    radii = [exposure.psf.determinant_radius(x, y) for x, y in zip(cs.xs, cs.ys)]
    assert max(radii) / min(radii) > 1.3                 # strongly varying
    if case == "deconvolution":
        assert np.median(radii) > 1.1 * sigma            # narrower than most of the PSFs
    assert results["polynomial"].metadata["spatialConditionNum"] > 1e20
    want = _matched_psfs(cs.templates, _least_squares_kernels(results["chebyshev1"], ref))
    got = {m: _matched_psfs(r.kernelCellSet.templates,
                            r.psfMatchingKernel.compute_images(cs.xs, cs.ys))
           for m, r in results.items()}
    for model_type, matched in got.items():
        assert ref.rel_l2(matched, want) < 1e-6, model_type
    assert ref.rel_l2(got["polynomial"], got["chebyshev1"]) < 1e-6
    # The polynomial coefficients mean what docs/algorithm.md section 6 says they mean.
    kernel = results["polynomial"].psfMatchingKernel
    for x, y in [(cs.xs[0], cs.ys[0]), (1400.5, 100.25), (cs.xs[-1], cs.ys[-1])]:
        mine = ref.kernel_image(kernel.basis_images, kernel.spatial_coefficients, "polynomial",
                                order, cs.region, x, y)
        np.testing.assert_allclose(kernel.compute_image(x, y), mine, rtol=0,
                                   atol=1e-9 * np.abs(mine).max())


def test_host_and_batched_spatial_solves_agree_on_an_ill_conditioned_system():
    """The device's stacked algorithm (run with NumPy) and the host's, on the
    production system of order 3: same decision, solutions to 1e-9."""
    cfg = gm.ModelPsfMatchConfig(spatialModelType="polynomial", spatialKernelOrder=3,
                                 **PRODUCTION_BASIS)
    task = gm.ModelPsfMatchTask(cfg, backend="numpy")
    cs = task.buildCellSet(_elliptical_varying_exposure(), gm.GaussianPsf(25, 25, 3.0)).kernelCellSet
    from gpumatch.basis import alard_lupton_basis

    basis = alard_lupton_basis(21, (1.0, 2.0, 4.5), (4, 2, 2))
    M, b = candidate_normal_equations(cs.templates, cs.targets, basis)
    from gpumatch import stages

    state = stages.spatial_system(task, stages.MatchState(cell_set=cs), M, b, None)
    A, rhs = state.A, state.rhs
    with single_threaded_blas():
        host, = solve_symmetric_many(A[None], rhs[None])
        batched, = solve_symmetric_many(A[None], rhs[None], batched=True)
    assert host.method == batched.method == "cholesky" and host.rank == batched.rank == len(rhs)
    np.testing.assert_allclose(batched.x, host.x, rtol=0, atol=1e-9 * np.abs(host.x).max())
    assert batched.equilibrated_condition_number == pytest.approx(
        host.equilibrated_condition_number, rel=1e-6)


def test_condition_number_is_that_of_the_models_own_system(ref):
    """The polynomial model is solved in Chebyshev functions; the condition number
    reported is still that of its own system (docs/algorithm.md section 6), assembled here with
    raw-coordinate terms and a slow loop."""
    cfg, exposure, target, coeffs, region = _known_kernel_problem(ref, 1, shape=(96, 128),
                                                                  cell=48)
    res = gm.ModelPsfMatchTask(cfg.copy(spatialModelType="polynomial"), backend="numpy").run(
        exposure, target)
    cs = res.kernelCellSet
    P = np.array([ref.spatial_terms("polynomial", 1, region, x, y) for x, y in zip(cs.xs, cs.ys)])
    A, r = ref.slow_spatial_system(cs.normal_matrices, cs.normal_vectors, P)
    lam = np.linalg.eigvalsh(A)
    assert res.metadata["spatialConditionNum"] == pytest.approx(lam.max() / lam.min(), rel=1e-6)
    d = 1 / np.sqrt(np.diag(A))
    lam_raw = np.linalg.eigvalsh(A * d[:, None] * d[None, :])
    # The equilibrated system solved (Chebyshev) is better conditioned than the raw one's.
    assert res.metadata["spatialConditionNumEquilibrated"] < lam_raw.max() / lam_raw.min()
    # And the raw system's own solution is the kernel found (a well-conditioned case).
    x = np.linalg.solve(A, r)
    np.testing.assert_allclose(res.psfMatchingKernel.spatial_coefficients[1:],
                               x[1:].reshape(-1, 3), rtol=1e-7, atol=1e-12)


# --- linear algebra ----------------------------------------------------------------

def _random_spd(n, rank, rng, scales=None):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.zeros(n)
    lam[:rank] = rng.uniform(1.0, 10.0, rank)
    A = (q * lam) @ q.T
    A = 0.5 * (A + A.T)
    if scales is not None:
        A = A * scales[:, None] * scales[None, :]
    return A


def test_solve_symmetric_invertible():
    rng = np.random.default_rng(0)
    A = _random_spd(12, 12, rng)
    b = rng.normal(size=12)
    sol = solve_symmetric(A, b)
    assert sol.method == "cholesky" and sol.rank == 12
    np.testing.assert_allclose(sol.x, np.linalg.solve(A, b), rtol=1e-10)
    lam = np.linalg.eigvalsh(A)
    assert sol.condition_number == pytest.approx(lam.max() / lam.min(), rel=1e-8)


def test_solve_symmetric_badly_scaled_but_invertible():
    # Unknowns spanning 16 orders of magnitude (like raw-pixel polynomial terms):
    # the matrix is invertible and the exact solution must be found.
    rng = np.random.default_rng(1)
    scales = 10.0 ** np.linspace(-8, 8, 10)
    A0 = _random_spd(10, 10, rng)
    A = A0 * scales[:, None] * scales[None, :]
    x_true = rng.normal(size=10) / scales
    sol = solve_symmetric(A, A @ x_true)
    assert sol.method == "cholesky" and sol.rank == 10
    np.testing.assert_allclose(sol.x * scales, x_true * scales, rtol=1e-8, atol=1e-8)


def test_solve_symmetric_rank_deficient():
    rng = np.random.default_rng(2)
    A = _random_spd(10, 6, rng)
    x0 = rng.normal(size=10)
    b = A @ x0                      # consistent
    sol = solve_symmetric(A, b)
    assert sol.method == "eigen-pseudo-inverse" and sol.rank == 6
    assert np.all(np.isfinite(sol.x))
    np.testing.assert_allclose(A @ sol.x, b, atol=1e-10)
    # Unit diagonal makes the equilibration trivial: the minimum-norm solution.
    d = 1 / np.sqrt(np.diag(A))
    An = A * d[:, None] * d[None, :]
    sol = solve_symmetric(An, An @ x0)
    np.testing.assert_allclose(sol.x, np.linalg.pinv(An) @ (An @ x0), atol=1e-10)
    # Zero matrix: no NaN.
    sol = solve_symmetric(np.zeros((4, 4)), np.ones(4))
    assert np.all(np.isfinite(sol.x)) and sol.rank == 0


@pytest.mark.parametrize("kind", ["EIGENVALUE", "SVD"])
@pytest.mark.parametrize("m", [14, 157])
def test_batched_solve_matches_host_path(kind, m):
    """The stacked algorithm of the device, run with NumPy (stacked Cholesky and
    triangular solves, eigh), against the host path (LAPACK system by system)
    and against the answers known by construction, with every kind of system in
    one stack (so each takes its own branch) and each alone."""
    with single_threaded_blas():     # as in a run; threaded BLAS is slow on these sizes
        systems = random_symmetric_systems(np.random.default_rng(m), m)
        host = solve_symmetric_many(systems.A, systems.b, kind)
        batched = solve_symmetric_many(systems.A, systems.b, kind, batched=True)
        alone = [solve_symmetric_many(A[None], b[None], kind, batched=True)[0]
                 for A, b in zip(systems.A, systems.b)]
    assert_symmetric_solutions(host, systems)
    assert_symmetric_solutions(batched, systems)
    assert_symmetric_solutions(alone, systems)
    with pytest.raises(ValueError, match="batched"):
        solve_symmetric_many(systems.A, systems.b, kind, xp=types.SimpleNamespace(__name__="cupy"),
                             batched=False)


def test_condition_number_types():
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    lam = np.array([-3.0, 0.5, 1.0, 2.0, 7.0, 40.0])
    A = (q * lam) @ q.T
    A = 0.5 * (A + A.T)
    assert condition_number(A, "EIGENVALUE") == pytest.approx(40.0 / 0.5, rel=1e-10)
    assert condition_number(A, "SVD") == pytest.approx(40.0 / 0.5, rel=1e-10)
    B = rng.normal(size=(5, 5))
    s = np.linalg.svd(B, compute_uv=False)
    assert condition_number(B, "SVD") == pytest.approx(s.max() / s.min(), rel=1e-10)


# --- per-candidate normal equations: brute force ------------------------------------

def _brute_normal_equations(T, S, basis, var=2.0):
    k = basis.shape[1]
    h = k // 2
    n = T.shape[0]
    rows, data = [], []
    for y in range(h, n - h):
        for x in range(h, n - h):
            row = []
            for B in basis:
                acc = 0.0
                for j in range(k):
                    for i in range(k):
                        acc += T[y - h + j, x - h + i] * B[j, i]
                row.append(acc)
            rows.append(row)
            data.append(S[y, x])
    C = np.array(rows)
    s = np.array(data)
    return C.T @ C / var, C.T @ s / var, C


def test_normal_equations_brute_force_random():
    rng = np.random.default_rng(7)
    T = rng.normal(size=(2, 11, 11))
    S = rng.normal(size=(2, 11, 11))
    basis = rng.normal(size=(4, 5, 5))   # asymmetric: catches any flip
    M, b = candidate_normal_equations(T, S, basis, variance=2.0)
    for i in range(2):
        Mb, bb, C = _brute_normal_equations(T[i], S[i], basis)
        assert C.shape == ((11 - 4) ** 2, 4)
        np.testing.assert_allclose(M[i], Mb, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b[i], bb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k, sigmas, degrees", [(7, (1.0, 2.0), (2, 1)),
                                                 (9, (0.8, 1.5, 3.0), (4, 2, 0))])
def test_separable_normal_equations_brute_force(k, sigmas, degrees):
    from gpumatch.basis import alard_lupton_basis, alard_lupton_factors

    rng = np.random.default_rng(11)
    T = rng.normal(size=(3, 15, 15))
    S = rng.normal(size=(3, 15, 15))
    basis = alard_lupton_basis(k, sigmas, degrees)
    M, b = candidate_normal_equations(T, S, basis, variance=2.0,
                                      factors=alard_lupton_factors(k, sigmas, degrees))
    for i in range(3):
        Mb, bb, _ = _brute_normal_equations(T[i], S[i], basis)
        np.testing.assert_allclose(M[i], Mb, rtol=1e-12, atol=1e-12 * np.abs(Mb).max())
        np.testing.assert_allclose(b[i], bb, rtol=1e-12, atol=1e-12 * np.abs(bb).max())
    # Factors of another basis are not used: the result is that of the images.
    other = alard_lupton_factors(k, sigmas[::-1], degrees)
    M2, b2 = candidate_normal_equations(T, S, basis, variance=2.0, factors=other)
    M3, b3 = candidate_normal_equations(T, S, basis, variance=2.0)
    assert np.array_equal(M2, M3) and np.array_equal(b2, b3)


def test_normal_equations_of_a_run_brute_force():
    psf = gm.VaryingGaussianPsf(11, 11, (0, 0, 63, 63), (2.0, 0.2), (0.05,), (0.0, 0.05))
    cfg = gm.ModelPsfMatchConfig(kernelSize=7, kernelSizeMin=3, sizeCellX=64, sizeCellY=64,
                                 spatialKernelOrder=1, alardDegGauss=(2, 1, 1))
    res = gm.ModelPsfMatchTask(cfg, backend="numpy").run(
        gm.Exposure(np.zeros((64, 64)), psf=psf), gm.GaussianPsf(11, 11, 2.5))
    cs = res.kernelCellSet
    basis = res.psfMatchingKernel.basis_images
    for i in (0, len(cs) - 1):
        Mb, bb, _ = _brute_normal_equations(cs.templates[i], cs.targets[i], basis)
        np.testing.assert_allclose(cs.normal_matrices[i], Mb, rtol=1e-11, atol=1e-15)
        np.testing.assert_allclose(cs.normal_vectors[i], bb, rtol=1e-11, atol=1e-15)
        # Single-candidate kernels solve M a = b.
        a = cs.kernel_solutions[i]
        np.testing.assert_allclose(Mb @ a, bb, rtol=0, atol=1e-10 * np.abs(bb).max())
        expect = np.linalg.solve(Mb, bb)
        cond = np.linalg.cond(Mb)
        np.testing.assert_allclose(a, expect, rtol=0, atol=cond * 1e-14 * np.abs(expect).max())
        assert np.allclose(cs.candidates[i].kernel_solution, cs.kernel_solutions[i])


# --- the spatial system: slow loop -------------------------------------------------

def test_spatial_functions_match_spec(ref):
    region = gm.Box(-128, -64, 512, 384)
    rng = np.random.default_rng(8)
    xs = rng.uniform(-200, 500, 9)
    ys = rng.uniform(-100, 400, 9)
    for model_type in ("chebyshev1", "polynomial"):
        for order in range(5):
            sf = SpatialFunctions(model_type, order, region)
            got = sf.evaluate(xs, ys)
            assert got.shape == (9, (order + 1) * (order + 2) // 2)
            for n in range(9):
                np.testing.assert_allclose(
                    got[n], ref.spatial_terms(model_type, order, region, xs[n], ys[n]),
                    rtol=1e-12, atol=1e-12)
    # Chebyshev arguments map the real box [x0 - 0.5, x1 + 0.5] onto [-1, 1].
    sf = SpatialFunctions("chebyshev1", 1, region)
    np.testing.assert_allclose(sf.evaluate([region.x0 - 0.5, region.x1 + 0.5],
                                           [region.y0 - 0.5, region.y1 + 0.5]),
                               [[1, -1, -1], [1, 1, 1]], atol=1e-14)


def test_assembly_against_slow_loop_random(ref):
    rng = np.random.default_rng(9)
    nc, nb, nkt = 7, 5, 6
    X = rng.normal(size=(nc, nb, nb))
    M = X @ X.transpose(0, 2, 1)
    b = rng.normal(size=(nc, nb))
    P = rng.normal(size=(nc, nkt))
    A, r = assemble_spatial_system(M, b, P)
    As, rs = ref.slow_spatial_system(M, b, P)
    assert A.shape == (1 + (nb - 1) * nkt,) * 2
    np.testing.assert_allclose(A, As, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r, rs, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(A, A.T)


def test_spatial_system_of_a_run_against_slow_loop(ref):
    cfg, exposure, target, coeffs, region = _known_kernel_problem(ref, 1, shape=(96, 128),
                                                                  cell=48)
    cfg = cfg.copy(conditionNumberType="EIGENVALUE")
    res = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exposure, target)
    cs = res.kernelCellSet
    assert cs.region == region
    P = np.array([ref.spatial_terms("chebyshev1", 1, region, x, y) for x, y in zip(cs.xs, cs.ys)])
    A, r = ref.slow_spatial_system(cs.normal_matrices, cs.normal_vectors, P)
    A2, r2 = assemble_spatial_system(cs.normal_matrices, cs.normal_vectors, P)
    np.testing.assert_allclose(A2, A, rtol=1e-12, atol=1e-14 * np.abs(A).max())
    np.testing.assert_allclose(r2, r, rtol=1e-12, atol=1e-14 * np.abs(r).max())
    # An independent float64 solve of the slow system gives the same kernel.
    x = np.linalg.solve(A, r)
    assert abs(x[0] - 1.0) < 1e-9           # exact problem: fitted kernel sum is 1
    np.testing.assert_allclose(res.psfMatchingKernel.spatial_coefficients[1:],
                               x[1:].reshape(-1, 3), rtol=0, atol=1e-10)
    lam = np.linalg.eigvalsh(A)
    assert res.metadata["spatialConditionNum"] == pytest.approx(lam.max() / lam.min(), rel=1e-6)
    res_svd = gm.ModelPsfMatchTask(cfg.copy(conditionNumberType="SVD"), backend="numpy").run(
        exposure, target)
    s = np.linalg.svd(A, compute_uv=False)
    assert res_svd.metadata["spatialConditionNum"] == pytest.approx(s.max() / s.min(), rel=1e-6)


def test_solve_spatial_system_replaces_a0():
    rng = np.random.default_rng(10)
    nb, nkt = 4, 3
    nt = (nb - 1) * nkt + 1
    A = _random_spd(nt, nt, rng)
    x = rng.normal(size=nt)
    sol = solve_spatial_system(A, A @ x, nb, nkt, 1.0)
    assert sol.coefficients.shape == (nb, nkt)
    assert sol.coefficients[0, 0] == 1.0 and np.all(sol.coefficients[0, 1:] == 0)
    np.testing.assert_allclose(sol.coefficients[1:], x[1:].reshape(nb - 1, nkt), rtol=1e-9)
    assert sol.n_unknowns == nt and sol.method == "cholesky"


# --- the kernel object -----------------------------------------------------------------

def test_kernel_object(sec10):
    res = gm.ModelPsfMatchTask(sec10.config(spatialKernelOrder=1), backend="numpy").run(
        sec10.exposure, sec10.reference, kernelSum=1.3)
    k = res.psfMatchingKernel
    assert k.dimensions == (9, 9) and k.kernel_sum == 1.3
    assert k.basis_images.shape == (27, 9, 9)
    assert k.spatial_coefficients.shape == (27, 3)
    xs = np.array([-50.0, 0.0, 100.5, 255.0, 400.0])
    ys = np.array([10.0, 255.0, 0.0, 128.0, -30.0])
    batch = k.compute_images(xs, ys)
    for i in range(5):
        single = k.compute_image(xs[i], ys[i])
        np.testing.assert_allclose(batch[i], single, rtol=1e-13)
        assert abs(single.sum() - 1.3) < 1e-12
        assert abs(k.compute_image(xs[i], ys[i], normalize=True).sum() - 1.0) < 1e-12
        np.testing.assert_allclose(k.compute_image(xs[i], ys[i], normalize=True) * 1.3, single,
                                   rtol=1e-12, atol=1e-15)
        assert abs(k.sum_at(xs[i], ys[i]) - 1.3) < 1e-12
    # The kernel really varies across the exposure (spatial order 1).
    assert np.abs(k.compute_image(0, 0) - k.compute_image(255, 255)).max() > 0


_FIRST_RUN_SCRIPT = r"""
import sys
import numpy as np
import gpumatch as gm
assert "scipy.linalg" not in sys.modules   # as in a user's fresh process
cfg = gm.ModelPsfMatchConfig()
bbox = gm.Box(100, 200, 256, 256)
rng = np.random.default_rng(1)
exp = gm.Exposure(rng.normal(0.0, 1.0, (256, 256)).astype(np.float32),
                  psf=gm.GaussianPsf(15, 15, 1.6), xy0=(100, 200))
ref = gm.GaussianPsf(21, 21, 2.55)
task = gm.ModelPsfMatchTask(cfg, backend="numpy")
first, second = (task.run(exp, ref).psfMatchingKernel.spatial_coefficients for _ in range(2))
print(np.array_equal(first, second), np.abs(first - second).max())
"""


def test_first_run_of_a_process_rounds_like_the_next():
    """The BLAS thread limit of a run also reaches SciPy's BLAS when a process's first
    run is what loads it: the first run's kernel is bitwise the second's (a
    multi-threaded BLAS sums in another order)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-c", _FIRST_RUN_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[0] == "True", res.stdout


def test_patch_matrices_are_chunked_to_their_memory_bound(monkeypatch):
    import gpumatch.normal_equations as ne

    rng = np.random.default_rng(5)
    T = rng.normal(size=(7, 13, 13))
    S = rng.normal(size=(7, 13, 13))
    basis = rng.normal(size=(3, 5, 5))   # no separable factors: the window-patch path
    want = candidate_normal_equations(T, S, basis)
    sizes = []
    real = ne.candidate_design_matrices

    def spy(templates, *args, **kwargs):
        sizes.append(len(templates))
        return real(templates, *args, **kwargs)

    monkeypatch.setattr(ne, "candidate_design_matrices", spy)
    monkeypatch.setattr(ne, "_PATCH_BYTES", 2 * 8 * 9 * 9 * 25)   # two candidates' patches
    got = candidate_normal_equations(T, S, basis)
    assert sorted(sizes) == [1, 2, 2, 2]
    for a, b in zip(got, want):
        assert np.array_equal(a, b)
