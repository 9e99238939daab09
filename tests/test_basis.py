"""The Alard-Lupton basis (docs/algorithm.md section 4): images, renormalisation, widths, sizes."""

import warnings

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.basis import alard_lupton_basis, basis_widths, polynomial_exponents


@pytest.mark.parametrize("k, sigmas, degrees", [
    (21, (0.7, 1.5, 3.0), (4, 2, 2)),
    (9, (0.7, 1.5, 3.0), (4, 2, 2)),
    (15, (1.0, 2.0, 4.5), (4, 2, 2)),
    (11, (1.3,), (3,)),
    (7, (0.5, 2.0), (0, 5)),
])
def test_basis_equals_independent_construction(k, sigmas, degrees, ref):
    basis = alard_lupton_basis(k, sigmas, degrees)
    expect = ref.al_basis(k, sigmas, degrees)
    n = sum((d + 1) * (d + 2) // 2 for d in degrees)
    assert basis.shape == (n, k, k) and basis.dtype == np.float64
    np.testing.assert_allclose(basis, expect, rtol=0, atol=1e-13)


def test_default_basis_sums_and_norms():
    basis = alard_lupton_basis(21, (0.7, 1.5, 3.0), (4, 2, 2))
    assert basis.shape == (27, 21, 21)
    assert abs(basis[0].sum() - 1.0) < 1e-12
    assert np.all(basis[0] > 0)
    sums = basis[1:].sum(axis=(1, 2))
    assert np.all(np.abs(sums) < 1e-12), sums
    norms = (basis[1:] ** 2).sum(axis=(1, 2))
    np.testing.assert_allclose(norms, 1.0, rtol=0, atol=1e-12)
    # Basis 0 is the normalised first Gaussian itself (not unit-norm).
    h = 10
    v, u = np.mgrid[-h:h + 1, -h:h + 1]
    g = np.exp(-(u ** 2 + v ** 2) / (2 * 0.7 ** 2))
    np.testing.assert_allclose(basis[0], g / g.sum(), rtol=1e-13)


def test_term_order_and_orientation():
    """Terms 1, x, y, x^2, xy, y^2, x^3, x^2 y, x y^2, y^3, ... with x the column."""
    k, h = 11, 5
    sig = 1.7
    basis = alard_lupton_basis(k, (sig,), (3,))
    assert len(basis) == 10
    v, u = np.mgrid[-h:h + 1, -h:h + 1].astype(float)  # u: column (x), v: row (y)
    g = np.exp(-(u ** 2 + v ** 2) / (2 * sig ** 2))
    g /= g.sum()
    b0 = g / g.sum()
    names = ["1", "x", "y", "xx", "xy", "yy", "xxx", "xxy", "xyy", "yyy"]
    exps = [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3)]
    assert polynomial_exponents(3) == exps
    for i, (name, (a, c)) in enumerate(zip(names, exps)):
        raw = g * (u / h) ** a * (v / h) ** c
        if i == 0:
            expect = raw / raw.sum()
        else:
            s = raw.sum()
            # Odd terms sum to exactly zero and are only scaled to unit norm.
            if a % 2 or c % 2:
                assert abs(s) < 1e-15
                expect = raw
            else:
                assert s > 1e-3
                expect = raw / s - b0
            expect = expect / np.sqrt((expect ** 2).sum())
        np.testing.assert_allclose(basis[i], expect, rtol=0, atol=1e-14, err_msg=name)
    # Parity: x-odd terms flip sign under a column flip, y-odd ones under a row flip.
    for i, (a, c) in enumerate(exps):
        np.testing.assert_allclose(basis[i][:, ::-1], (-1) ** a * basis[i], atol=1e-15)
        np.testing.assert_allclose(basis[i][::-1, :], (-1) ** c * basis[i], atol=1e-15)
    # Transposition swaps x and y: x <-> y, xx <-> yy, xxy <-> xyy, xxx <-> yyy.
    for i, j in [(1, 2), (3, 5), (7, 8), (6, 9)]:
        np.testing.assert_allclose(basis[i].T, basis[j], atol=1e-15)
    np.testing.assert_allclose(basis[4].T, basis[4], atol=1e-15)


def test_gaussians_in_configuration_order(ref):
    basis = alard_lupton_basis(15, (3.0, 0.8), (1, 2))
    assert len(basis) == 3 + 6
    h = 7
    v, u = np.mgrid[-h:h + 1, -h:h + 1].astype(float)
    g1 = np.exp(-(u ** 2 + v ** 2) / 18.0)
    np.testing.assert_allclose(basis[0], g1 / g1.sum(), rtol=1e-13)
    g2 = np.exp(-(u ** 2 + v ** 2) / (2 * 0.64))
    expect = g2 / g2.sum() - g1 / g1.sum()
    np.testing.assert_allclose(basis[3], expect / np.sqrt((expect ** 2).sum()), atol=1e-14)


# --- widths and kernel sizes (scaleByFwhm) -------------------------------------

def _cfg(**kw):
    kw.setdefault("scaleByFwhm", True)
    return gm.ModelPsfMatchConfig(**kw)


# Hand-computed from docs/algorithm.md section 4:
# t=2.0, r=3.7: k = sqrt(3.7^2 - 2^2) = sqrt(9.69) = 3.1128764832546763
#   widths k/2 = 1.5564382416273381, 3.1128764832546763, 6.2257529665093525
#   size int(6 * 6.2257529665) = int(37.3545) = 37
# t=2.0, r=2.1: k = sqrt(0.41) = 0.6403 -> clipped to alardMinSig 0.7;
#   first = max(0.7, 0.35) = 0.7; widths 0.7, 1.4, 2.8; size int(16.8) = 16 -> 17
# t=2.1, r=2.0: k = 0.6403 (> alardMinSigDeconv 0.4); first = max(0.4, 0.32) = 0.4;
#   widths 0.4, 0.8, 1.6; size int(9.6) = 9
# t=2.02, r=2.0: k = sqrt(0.0804) = 0.2835 -> clipped to 0.4; first = max(0.4, 0.2) = 0.4
K37 = (1.5564382416273381, 3.1128764832546763, 6.2257529665093525)


@pytest.mark.parametrize("t, r, kw, mode, widths, size", [
    (2.0, 3.7, dict(kernelSizeMax=41), "convolution", K37, 37),
    (2.0, 3.7, dict(), "convolution", K37, 35),                       # clipped to max
    (3.7, 2.0, dict(kernelSizeMax=41), "deconvolution", K37, 37),
    (2.0, 2.1, dict(kernelSizeMin=3), "convolution", (0.7, 1.4, 2.8), 17),
    (2.0, 2.1, dict(), "convolution", (0.7, 1.4, 2.8), 21),           # clipped to min
    (2.1, 2.0, dict(kernelSizeMin=3), "deconvolution", (0.4, 0.8, 1.6), 9),
    (2.02, 2.0, dict(kernelSizeMin=3), "deconvolution", (0.4, 0.8, 1.6), 9),
    (2.5, 2.5, dict(kernelSizeMin=3), "config", (0.7, 1.5, 3.0), 19),  # int(18) -> 19
    (2.5, 2.5, dict(), "config", (0.7, 1.5, 3.0), 21),
    (2.0, 3.0, dict(alardNGauss=1, alardSigGauss=(1.0,), alardDegGauss=(4,), kernelSizeMin=3),
     "convolution", (2.23606797749979,), 13),                          # int(13.416) = 13
    (2.0, 3.0, dict(alardGaussBeta=1.5, kernelSizeMin=3), "convolution",
     (1.4907119849998598, 2.23606797749979, 3.3541019662496847), 21),  # int(20.12) -> 21
])
def test_scale_by_fwhm_widths_by_hand(t, r, kw, mode, widths, size):
    choice = basis_widths(_cfg(**kw), t, r)
    assert choice.mode == mode
    np.testing.assert_allclose(choice.sigmas, widths, rtol=1e-12)
    assert choice.kernel_size == size
    assert choice.degrees == tuple(_cfg(**kw).alardDegGauss)


def test_no_scaling_uses_config():
    cfg = gm.ModelPsfMatchConfig(kernelSize=13, kernelSizeMin=3, alardSigGauss=(1.0, 2.0, 4.5))
    choice = basis_widths(cfg, 2.0, 5.0)
    assert choice.mode == "config" and choice.sigmas == (1.0, 2.0, 4.5)
    assert choice.kernel_size == 13  # kernelSize as configured, not clipped or scaled


@pytest.mark.parametrize("width, kmin, kmax, expect", [
    (0.5, 21, 35, 21),   # int(3.0) = 3 -> below min
    (3.0, 15, 35, 19),   # int(18) -> 19
    (3.2, 15, 35, 19),   # int(19.2) = 19
    (5.0, 21, 35, 31),   # int(30) -> 31
    (9.0, 21, 35, 35),   # int(54) -> 55 -> max
    (9.0, 21, 61, 55),
])
def test_kernel_size_clipping(width, kmin, kmax, expect):
    # Equal PSF sizes select "config" mode with these widths.
    cfg = _cfg(alardSigGauss=(0.7, 1.5, width), kernelSizeMin=kmin, kernelSizeMax=kmax)
    choice = basis_widths(cfg, 2.0, 2.0)
    assert choice.kernel_size == expect
    assert kmin <= choice.kernel_size <= kmax and choice.kernel_size % 2 == 1


# --- a real run: metadata ------------------------------------------------------

def _run(psf, reference, **kw):
    cfg = gm.ModelPsfMatchConfig(scaleByFwhm=True, spatialKernelOrder=0, **kw)
    exposure = gm.Exposure(np.zeros((64, 64), dtype=np.float32), psf=psf)
    return gm.ModelPsfMatchTask(cfg, backend="numpy").run(exposure, reference)


@pytest.mark.parametrize("t, r, mode", [(2.0, 3.0, "convolution"), (3.0, 2.0, "deconvolution")])
def test_metadata_of_scaled_run(t, r, mode, ref):
    res = _run(gm.GaussianPsf(21, 21, t), gm.GaussianPsf(21, 21, r))
    md = res.metadata
    # k = sqrt(9 - 4) = 2.2360679775; widths k/2, k, 2k; size int(26.83) = 26 -> 27.
    assert md["ALBasisMode"] == mode
    np.testing.assert_allclose(md["ALBasisSigGauss"],
                               [1.118033988749895, 2.23606797749979, 4.47213595499958], rtol=1e-12)
    assert md["ALKernelSize"] == 27
    assert md["ALBasisNGauss"] == 3 and list(md["ALBasisDegGauss"]) == [4, 2, 2]
    k = res.psfMatchingKernel
    assert k.dimensions == (27, 27)
    # The basis really is built with those widths.
    np.testing.assert_allclose(k.basis_images,
                               ref.al_basis(27, md["ALBasisSigGauss"], (4, 2, 2)), atol=1e-13)
    # Stamps padded for the scaled kernel: nextOdd(27 * 1.4 = 37.8) = 39.
    assert res.kernelCellSet.psf_size == 39 == md["psfSize"]


def test_metadata_config_mode_and_clipping():
    res = _run(gm.GaussianPsf(21, 21, 2.5), gm.GaussianPsf(21, 21, 2.5))
    assert res.metadata["ALBasisMode"] == "config"
    assert res.metadata["ALBasisSigGauss"] == [0.7, 1.5, 3.0]
    assert res.metadata["ALKernelSize"] == 21  # int(18) -> 19 -> kernelSizeMin 21
    res = _run(gm.GaussianPsf(21, 21, 2.0), gm.DoubleGaussianPsf(21, 21, 3.7))
    assert res.metadata["ALBasisMode"] == "convolution"
    np.testing.assert_allclose(res.metadata["ALBasisSigGauss"], K37, rtol=1e-12)
    assert res.metadata["ALKernelSize"] == 35  # 37 clipped to kernelSizeMax


def test_metadata_without_scaling_reports_config():
    cfg = gm.ModelPsfMatchConfig(kernelSize=11, kernelSizeMin=3, spatialKernelOrder=0)
    exposure = gm.Exposure(np.zeros((64, 64)), psf=gm.GaussianPsf(15, 15, 2.0))
    md = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exposure, gm.GaussianPsf(15, 15, 3.0)).metadata
    assert md["ALBasisMode"] == "config"
    assert md["ALBasisSigGauss"] == [0.7, 1.5, 3.0] and md["ALKernelSize"] == 11


class _MomentsOnly(gm.Psf):
    """A user model: its FWHM must come from adaptive moments of its stamps."""

    def __init__(self, sigma):
        self.sigma = sigma

    def compute_kernel_image(self, x, y):
        v, u = np.mgrid[-12:13, -12:13]
        g = np.exp(-(u ** 2 + v ** 2) / (2 * self.sigma ** 2))
        return g / g.sum()


def test_widths_from_measured_fwhm():
    res = _run(_MomentsOnly(2.0), _MomentsOnly(3.0))
    # A well-sampled Gaussian in a 25-pixel stamp: adaptive moments recover sigma.
    np.testing.assert_allclose(res.metadata["ALBasisSigGauss"],
                               [1.118033988749895, 2.23606797749979, 4.47213595499958], rtol=1e-6)
    assert res.metadata["ALBasisMode"] == "convolution"
    assert res.metadata["ALKernelSize"] == 27


def test_basis_images_that_keep_a_sum_are_found_and_warned_about():
    """A degree-6 term of a 0.7-pixel Gaussian in a 59-pixel kernel has a raw sum
    below SUM_EPSILON, so it is only scaled: its sum stays of order 1 and the
    kernel sum is no longer the first coefficient. Found by summing the images."""
    import gpumatch
    from gpumatch.basis import bases_with_a_sum

    with pytest.warns(gpumatch.ConditioningWarning, match=r"alardSigGauss\[0\]=0.702 \(degree 6\)"):
        basis = alard_lupton_basis(59, (0.702, 1.404), (6, 2))
    sums = basis.sum(axis=(1, 2))
    expected = [b for b in range(1, len(basis)) if abs(sums[b]) > 1e-9]
    assert bases_with_a_sum(basis) == expected and len(expected) == 4
    assert max(abs(sums[b]) for b in expected) > 0.1
    # The LSST defaults and the production basis are zero-sum: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k, s, d in ((21, (0.7, 1.5, 3.0), (4, 2, 2)), (21, (1.0, 2.0, 4.5), (4, 2, 2))):
            assert bases_with_a_sum(alard_lupton_basis(k, s, d)) == []


@pytest.mark.parametrize("k, sigmas, degrees", [(21, (1.0, 2.0, 4.5), (4, 2, 2)), (1, (1.0,), (0,)),
                                                 (11, (0.5, 3.0), (3, 1))])
def test_separable_factors_reproduce_the_basis(k, sigmas, degrees):
    from gpumatch.basis import alard_lupton_factors

    basis = alard_lupton_basis(k, sigmas, degrees)
    f = alard_lupton_factors(k, sigmas, degrees)
    assert f.filters.shape[1] == k and f.A.shape == (len(basis), len(f.ix))
    np.testing.assert_allclose(f.images(), basis, rtol=0, atol=1e-15 * np.abs(basis).max())
