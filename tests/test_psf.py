"""PSF models: analytic values, centring, moments, resizing, user subclasses."""

import logging
import math

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.moments import SIGMA_TO_FWHM, adaptive_moments, shear_from_moments


def _analytic_double(width, height, s1, s2, b):
    y, x = np.mgrid[0:height, 0:width].astype(float)
    r2 = (x - width // 2) ** 2 + (y - height // 2) ** 2
    img = np.exp(-r2 / (2 * s1 ** 2))
    if b:
        img = img + b * np.exp(-r2 / (2 * s2 ** 2))
    return img / img.sum()


@pytest.mark.parametrize("width, height, sigma", [(11, 11, 2.0), (21, 21, 3.0), (15, 9, 1.7)])
def test_gaussian_psf_values_sum_and_centre(width, height, sigma, ref):
    psf = gm.GaussianPsf(width, height, sigma)
    img = psf.compute_kernel_image(123.4, -56.7)
    assert img.shape == (height, width)
    assert abs(img.sum() - 1.0) < 1e-14
    np.testing.assert_allclose(img, ref.gaussian_stamp(width, height, sigma), rtol=1e-12, atol=0)
    assert np.unravel_index(np.argmax(img), img.shape) == (height // 2, width // 2)
    # Centred: the flux-weighted centroid is the middle pixel.
    y, x = np.mgrid[0:height, 0:width]
    assert abs((img * x).sum() - width // 2) < 1e-12
    assert abs((img * y).sum() - height // 2) < 1e-12
    assert psf.dimensions() == (width, height)


def test_double_gaussian_matches_formula():
    psf = gm.DoubleGaussianPsf(23, 23, 3.270, 8.175, 0.1)
    assert (psf.sigma1, psf.sigma2, psf.b) == (3.270, 8.175, 0.1)
    img = psf.compute_kernel_image(0.0, 0.0)
    np.testing.assert_allclose(img, _analytic_double(23, 23, 3.270, 8.175, 0.1), rtol=1e-12)
    assert abs(img.sum() - 1.0) < 1e-14
    np.testing.assert_allclose(img, img[::-1, ::-1], rtol=1e-14)
    np.testing.assert_allclose(img, img.T, rtol=1e-14)


def test_double_gaussian_with_b_zero_is_a_gaussian():
    dg = gm.DoubleGaussianPsf(11, 11, 2.0)
    g = gm.GaussianPsf(11, 11, 2.0)
    np.testing.assert_allclose(dg.compute_kernel_image(5, 5), g.compute_kernel_image(5, 5),
                               rtol=1e-14)
    assert dg.sigma2 == 0.0 and dg.b == 0.0
    ixx, iyy, ixy = dg.compute_shape()
    assert (ixx, iyy, ixy) == (4.0, 4.0, 0.0)
    assert abs(dg.fwhm() - 2.0 * 2 * math.sqrt(2 * math.log(2))) < 1e-12


def test_double_gaussian_shape_from_adaptive_moments():
    # With a wing the second moments are measured; they must lie between the two.
    psf = gm.DoubleGaussianPsf(41, 41, 2.0, 5.0, 0.1)
    ixx, iyy, ixy = psf.compute_shape()
    _, _, axx, ayy, axy = adaptive_moments(psf.compute_kernel_image(0, 0))
    assert abs(ixx - axx) < 1e-9 and abs(iyy - ayy) < 1e-9 and abs(ixy) < 1e-9
    assert 4.0 < ixx < 25.0


@pytest.mark.parametrize("cls", [gm.GaussianPsf, gm.DoubleGaussianPsf])
def test_analytic_resize_rerenders(cls, ref):
    psf = cls(11, 11, 2.5)
    big = psf.resized(31, 31)
    assert isinstance(big, cls)
    img = big.compute_kernel_image(10, 10)
    assert img.shape == (31, 31)
    # Re-rendered at the new size, not zero-padded: the outer ring is non-zero.
    np.testing.assert_allclose(img, ref.gaussian_stamp(31, 31, 2.5), rtol=1e-12)
    assert img[0, 15] > 0
    small = psf.resized(7, 7).compute_kernel_image(0, 0)
    np.testing.assert_allclose(small, ref.gaussian_stamp(7, 7, 2.5), rtol=1e-12)


def test_even_or_bad_sizes_rejected():
    with pytest.raises(ValueError, match="odd"):
        gm.GaussianPsf(10, 11, 2.0)
    with pytest.raises(ValueError, match="odd"):
        gm.DoubleGaussianPsf(11, 12, 2.0)
    with pytest.raises(ValueError, match="sigma"):
        gm.GaussianPsf(11, 11, 0.0)
    with pytest.raises(ValueError, match="odd"):
        gm.ImagePsf(np.ones((10, 10)))


# --- VaryingGaussianPsf ------------------------------------------------------

SIGMA = (2.5, 0.3, -0.2, 0.1, 0.05, -0.05)
G1 = (0.05, 0.03, -0.02)
G2 = (-0.04, 0.01, 0.02, 0.01)
BBOX = (100, -50, 1099, 749)


def _poly(coeffs, u, v):
    # Terms 1, u, v, u^2, uv, v^2, u^3, ... (the model's documented order).
    terms = []
    n = 0
    while len(terms) < len(coeffs):
        for c in range(n + 1):
            terms.append(u ** (n - c) * v ** c)
        n += 1
    return sum(a * t for a, t in zip(coeffs, terms))


@pytest.mark.parametrize("x, y", [(100, -50), (1099, 749), (599.5, 349.5), (223, 650),
                                  (40, 800), (1010.25, -10.75)])
def test_varying_gaussian_adaptive_moments_equal_analytic(x, y):
    psf = gm.VaryingGaussianPsf(41, 41, BBOX, SIGMA, G1, G2)
    stamp = psf.compute_kernel_image(x, y)
    assert stamp.shape == (41, 41) and abs(stamp.sum() - 1) < 1e-13
    xc, yc, ixx, iyy, ixy = adaptive_moments(stamp)
    assert abs(xc - 20) < 1e-9 and abs(yc - 20) < 1e-9
    # Analytic: determinant radius = sigma(u, v), reduced shear = (g1(u, v), g2(u, v)).
    u = (2 * x - (BBOX[0] + BBOX[2])) / (BBOX[2] - BBOX[0])
    v = (2 * y - (BBOX[1] + BBOX[3])) / (BBOX[3] - BBOX[1])
    s, g1, g2 = _poly(SIGMA, u, v), _poly(G1, u, v), _poly(G2, u, v)
    assert abs((ixx * iyy - ixy ** 2) ** 0.25 - s) < 1e-8
    e1, e2 = shear_from_moments(ixx, iyy, ixy)
    assert abs(e1 - g1) < 1e-8 and abs(e2 - g2) < 1e-8
    # The model's own moments agree with both.
    mxx, myy, mxy = (float(m[0]) for m in psf.moments([x], [y]))
    np.testing.assert_allclose([ixx, iyy, ixy], [mxx, myy, mxy], rtol=1e-8, atol=1e-10)
    assert abs(psf.determinant_radius(x, y) - s) < 1e-12
    assert abs(psf.fwhm(x, y) - s * SIGMA_TO_FWHM) < 1e-11


def test_varying_gaussian_batch_equals_single(ref):
    psf = gm.VaryingGaussianPsf(25, 25, BBOX, SIGMA, G1, G2)
    xs = np.array([100.0, 300.0, 1099.0])
    ys = np.array([-50.0, 500.0, 749.0])
    batch = psf.compute_kernel_images(xs, ys)
    assert batch.shape == (3, 25, 25)
    for i in range(3):
        np.testing.assert_allclose(batch[i], psf.compute_kernel_image(xs[i], ys[i]), rtol=1e-14)
    # A round, constant model equals a plain Gaussian.
    flat = gm.VaryingGaussianPsf(25, 25, BBOX, (2.2,))
    np.testing.assert_allclose(flat.compute_kernel_image(7, 8), ref.gaussian_stamp(25, 25, 2.2),
                               rtol=1e-12)
    assert flat.average_position == (599.5, 349.5)


def test_varying_gaussian_rejects_bad_shape():
    psf = gm.VaryingGaussianPsf(21, 21, (0, 0, 99, 99), (2.0, 3.0))
    with pytest.raises(ValueError, match="size"):
        psf.compute_kernel_image(-200, 0)  # sigma = 2 + 3 u < 0 there


# --- ImagePsf ------------------------------------------------------------------


def test_image_psf_normalises_and_copies():
    arr = np.arange(1, 26, dtype=float).reshape(5, 5)
    psf = gm.ImagePsf(arr)
    arr[2, 2] = 1e6  # the model keeps its own copy
    img = psf.compute_kernel_image(0, 0)
    np.testing.assert_allclose(img, np.arange(1, 26).reshape(5, 5) / 325.0, rtol=1e-15)
    img[0, 0] = -1  # and hands out copies
    assert psf.compute_kernel_image(3, 3)[0, 0] == pytest.approx(1 / 325.0)
    stack = psf.compute_kernel_images([1, 2, 3], [4, 5, 6])
    assert stack.shape == (3, 5, 5)


def test_image_psf_resize_pads_and_crops(caplog, ref):
    stamp = ref.gaussian_stamp(9, 9, 1.5)
    psf = gm.ImagePsf(stamp)
    with caplog.at_level(logging.WARNING, logger="gpumatch"):
        padded = psf.resized(13, 13).compute_kernel_image(0, 0)
    assert any(r.name == "gpumatch" and r.levelno == logging.WARNING for r in caplog.records)
    assert padded.shape == (13, 13)
    expect = np.zeros((13, 13))
    expect[2:11, 2:11] = stamp
    np.testing.assert_allclose(padded, expect, rtol=1e-14, atol=0)
    cropped = psf.resized(5, 5).compute_kernel_image(0, 0)
    core = stamp[2:7, 2:7]
    np.testing.assert_allclose(cropped, core / core.sum(), rtol=1e-14)
    assert abs(cropped.sum() - 1) < 1e-14


def test_image_psf_rejects_bad_arrays():
    with pytest.raises(ValueError, match="NaN"):
        gm.ImagePsf(np.full((5, 5), np.nan))
    with pytest.raises(ValueError, match="positive"):
        gm.ImagePsf(np.zeros((5, 5)))
    with pytest.raises(ValueError):
        gm.ImagePsf(np.ones((5, 7)))


# --- user subclasses -------------------------------------------------------------


class UserGaussian(gm.Psf):
    """Implements only compute_kernel_image (a circular Gaussian, 11x11)."""

    def __init__(self, sigma, size=11):
        self.sigma = sigma
        self.size = size
        self.calls = 0

    def compute_kernel_image(self, x, y):
        self.calls += 1
        h = self.size // 2
        yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
        g = np.exp(-(xx ** 2 + yy ** 2) / (2 * self.sigma ** 2))
        return g / g.sum()


def test_user_psf_defaults():
    psf = UserGaussian(2.0)
    assert psf.dimensions() == (11, 11)
    assert psf.dimensions(5.0, 7.0) == (11, 11)
    stack = np.asarray(psf.compute_kernel_images([1, 2], [3, 4]))
    assert stack.shape == (2, 11, 11)
    # Second moments by adaptive moments: a sampled sigma-2 Gaussian in 11x11
    # (truncation at 2.75 sigma changes the measured size only slightly).
    ixx, iyy, ixy = psf.compute_shape()
    assert abs(ixx - iyy) < 1e-10 and abs(ixy) < 1e-10
    assert abs(math.sqrt(ixx) - 2.0) < 0.02
    assert abs(psf.fwhm() - math.sqrt(ixx) * SIGMA_TO_FWHM) < 1e-9
    resized = psf.resized(15, 15).compute_kernel_image(0, 0)
    assert resized.shape == (15, 15)
    np.testing.assert_allclose(resized[2:13, 2:13], psf.compute_kernel_image(0, 0), rtol=1e-14)
    assert resized[:2].sum() == 0 and resized[:, 13:].sum() == 0


def test_base_psf_requires_compute_kernel_image():
    with pytest.raises(NotImplementedError, match="compute_kernel_image"):
        gm.Psf().compute_kernel_image(0, 0)


def test_user_psf_runs_through_task(sec10, ref):
    """A Psf subclass with only compute_kernel_image works end to end and gives
    exactly the result of the equivalent built-in model."""
    image = sec10.exposure.image
    user = UserGaussian(2.0)
    task = gm.ModelPsfMatchTask(sec10.config(), backend="numpy")
    res_user = task.run(gm.Exposure(image, psf=user), UserGaussian(3.7))
    # Built-in equivalents: the exposure PSF is only zero-padded into the
    # stamps; the reference is resized, which re-renders analytic models but
    # zero-pads image and user models, so the equivalent is an ImagePsf.
    res_builtin = task.run(gm.Exposure(image, psf=gm.GaussianPsf(11, 11, 2.0)),
                           gm.ImagePsf(ref.gaussian_stamp(11, 11, 3.7)))
    assert user.calls > 0
    ku, kb = res_user.psfMatchingKernel, res_builtin.psfMatchingKernel
    for x, y in [(0, 0), (127.5, 127.5), (255, 31)]:
        np.testing.assert_allclose(ku.compute_image(x, y), kb.compute_image(x, y), rtol=1e-9,
                                   atol=1e-12)
    out_u = res_user.psfMatchedExposure.image
    out_b = res_builtin.psfMatchedExposure.image
    np.testing.assert_array_equal(np.isnan(out_u), np.isnan(out_b))
    good = ~np.isnan(out_b)
    np.testing.assert_allclose(out_u[good], out_b[good], rtol=1e-6)
    # The output PSF is the reference zero-padded to the 13-pixel stamps.
    out_psf = res_user.psfMatchedExposure.psf
    assert out_psf is res_user.referencePsfModel
    stamp = out_psf.compute_kernel_image(10, 10)
    assert stamp.shape == (13, 13)
    np.testing.assert_allclose(stamp, ref.center_in(ref.gaussian_stamp(11, 11, 3.7), 13),
                               rtol=1e-13, atol=0)


def test_fixed_size_models_share_the_boilerplate():
    """The analytic models get size checks, repr, resizing and the single-stamp
    call from FixedSizePsf, with the reprs and stamps they had before."""
    from gpumatch.psf.base import FixedSizePsf

    g = gm.GaussianPsf(7, 9, 1.5)
    assert repr(g) == "GaussianPsf(7, 9, sigma=1.5)"
    assert repr(gm.DoubleGaussianPsf(5, 5, 1.0, 2.0, 0.1)) == \
        "DoubleGaussianPsf(5, 5, sigma1=1.0, sigma2=2.0, b=0.1)"
    assert repr(gm.MoffatPsf(11, 11, 3.0)) == "MoffatPsf(11, 11, fwhm=3.0, beta=3.0)"
    v = gm.VaryingGaussianPsf(9, 9, (0, 0, 99, 99), (2.0, 0.1))
    assert repr(v) == ("VaryingGaussianPsf(9, 9, bbox=(0.0, 0.0, 99.0, 99.0), sigma=(2.0, 0.1), "
                       "g1=(0.0,), g2=(0.0,))")
    for psf in (g, v, gm.MoffatPsf(11, 11, 3.0, 2.5)):
        assert isinstance(psf, FixedSizePsf) and psf.renders_on_device
        big = psf.resized(15, 13)
        assert type(big) is type(psf) and big.dimensions() == (15, 13)
        assert big._parameters() == psf._parameters()
        np.testing.assert_array_equal(psf.compute_kernel_image(3.0, 4.0),
                                      psf.compute_kernel_images([3.0], [4.0])[0])
    # An exact analytic stamp: the Gaussian's pixel values before normalisation.
    yy, xx = np.mgrid[-4:5, -3:4]
    want = np.exp(-(xx ** 2 + yy ** 2) / (2 * 1.5 ** 2))
    np.testing.assert_allclose(g.compute_kernel_image(0, 0), want / want.sum(), rtol=1e-14)
    with pytest.raises(ValueError, match="odd and positive, got 8x9"):
        gm.GaussianPsf(8, 9, 1.0)
    assert not gm.ImagePsf(gm.GaussianPsf(7, 7, 1.0).compute_kernel_image(0, 0)).renders_on_device
    assert gm.Psf.renders_on_device is False
