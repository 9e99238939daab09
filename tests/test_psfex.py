"""PSFEx models: reading, resampling to image pixels, coordinates, the DES known answer."""

import os

import numpy as np
import pytest

import gpumatch
from gpumatch import PsfexPsf
from gpumatch.errors import PsfEvaluationError
from gpumatch.moments import adaptive_moments, determinant_radius, shear_from_moments

fits = pytest.importorskip("astropy.io.fits")

DES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "des")
DES_PSF = os.path.join(DES_DIR, "DECam_00154912_12_psfcat.psf")
DES_INVALID = os.path.join(DES_DIR, "invalid_psfcat.psf")
# The star of GalSim's test, in SExtractor (1-based) coordinates, and its measured
# adaptive-moment size and shear (../shared/data/des/README.md).
STAR = (1195.64, 1276.63)
STAR_SIGMA, STAR_G1, STAR_G2 = 1.8067, 0.0221, -0.1309

needs_des = pytest.mark.skipif(not os.path.exists(DES_PSF),
                               reason=f"DES PSFEx test data not found at {DES_PSF} "
                                      "(expected ../shared/data/des beside the repository)")


def _gauss(n, sigma, dx=0.0, dy=0.0):
    d = np.arange(n) - n // 2
    g = np.exp(-0.5 * (((d[None, :] - dx) ** 2 + (d[:, None] - dy) ** 2) / sigma ** 2))
    return g / g.sum()


def write_psfex(path, components, samp, degree, polzero=(1000.0, 2000.0),
                polscal=(500.0, 1000.0), psfaxis3=None, names=("X_IMAGE", "Y_IMAGE")):
    """A minimal PSFEx file as PSFEx writes it."""
    comps = np.asarray(components, dtype=np.float32)
    nt, ny, nx = comps.shape
    col = fits.Column(name="PSF_MASK", format=f"{comps.size}E", dim=f"({nx}, {ny}, {nt})",
                      array=comps[None])
    table = fits.BinTableHDU.from_columns([col], name="PSF_DATA")
    h = table.header
    h["POLNAXIS"] = 2
    h["POLGRP1"], h["POLNAME1"], h["POLZERO1"], h["POLSCAL1"] = 1, names[0], polzero[0], polscal[0]
    h["POLGRP2"], h["POLNAME2"], h["POLZERO2"], h["POLSCAL2"] = 1, names[1], polzero[1], polscal[1]
    h["POLNGRP"] = 1
    h["POLDEG1"] = degree
    h["PSF_FWHM"] = 3.0
    h["PSF_SAMP"] = samp
    h["PSFNAXIS"] = 3
    h["PSFAXIS1"], h["PSFAXIS2"] = nx, ny
    h["PSFAXIS3"] = nt if psfaxis3 is None else psfaxis3
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    return path


def _moments(stamp):
    xc, yc, ixx, iyy, ixy = adaptive_moments(stamp)
    return xc, yc, determinant_radius(ixx, iyy, ixy), shear_from_moments(ixx, iyy, ixy)


@needs_des
def test_des_known_answer():
    psf = PsfexPsf.read(DES_PSF)
    assert psf.dimensions() == (25, 25)
    # Parent (0-based) position of the star; the model is drawn centred on its
    # sub-pixel position, sampled (no extra pixel convolution).
    x, y = STAR[0] - 1.0, STAR[1] - 1.0
    stamp = psf.compute_image(x, y)
    assert stamp.array.shape == (25, 25)
    assert stamp.array.sum() == pytest.approx(1.0, abs=1e-12)
    xc, yc, sigma, (g1, g2) = _moments(stamp.array)
    assert xc + stamp.x0 == pytest.approx(x, abs=0.03)
    assert yc + stamp.y0 == pytest.approx(y, abs=0.03)
    assert sigma == pytest.approx(STAR_SIGMA, rel=0.015)
    assert g1 == pytest.approx(STAR_G1, abs=0.01)
    assert g2 == pytest.approx(STAR_G2, abs=0.01)
    # Values of this implementation (GalSim's DES_PSFEx agrees to 1e-7 per pixel).
    assert sigma == pytest.approx(1.80015, abs=2e-4)
    assert (g1, g2) == pytest.approx((0.01686, -0.12561), abs=2e-4)


@needs_des
def test_des_model_varies_across_the_chip():
    psf = PsfexPsf.read(DES_PSF)
    xs, ys = np.meshgrid(np.linspace(0, 2047, 5), np.linspace(0, 4095, 9))
    stamps = psf.compute_kernel_images(xs.ravel(), ys.ravel())
    assert stamps.shape == (45, 25, 25)
    np.testing.assert_allclose(stamps.sum(axis=(1, 2)), 1.0, atol=1e-12)
    d = np.arange(25) - 12
    xc = (stamps * d[None, None, :]).sum(axis=(1, 2))
    ixx = (stamps * (d[None, None, :] - xc[:, None, None]) ** 2).sum(axis=(1, 2))
    # Unweighted second moments over the chip (README: Ixx about 5.45 to 6.47 px^2).
    assert 5.3 < ixx.min() < 5.6 and 6.1 < ixx.max() < 6.6
    # Batched evaluation equals one-at-a-time.
    for i in (0, 17, 44):
        np.testing.assert_allclose(psf.compute_kernel_image(xs.ravel()[i], ys.ravel()[i]),
                                   stamps[i], rtol=0, atol=1e-15)
    # The centred stamps have their (adaptive) centroid on the middle pixel.
    for i in (0, 22, 44):
        cx, cy, _, _ = _moments(stamps[i])
        assert abs(cx - 12) < 0.03 and abs(cy - 12) < 0.03
    assert psf.average_position == pytest.approx((1023.312829971, 2047.293772697))


@needs_des
def test_des_against_galsim():
    galsim = pytest.importorskip("galsim")
    pytest.importorskip("galsim.des")

    psf = PsfexPsf.read(DES_PSF)
    pos = galsim.PositionD(*STAR)
    ref = galsim.des.DES_PSFEx(DES_PSF).getPSF(pos)
    image = galsim.ImageD(25, 25, scale=1.0)
    image.setCenter(int(round(pos.x)), int(round(pos.y)))
    ref.drawImage(image=image, method="no_pixel", center=pos)
    stamp = psf.compute_image(STAR[0] - 1, STAR[1] - 1)
    assert stamp.x0 + 1 == image.bounds.xmin and stamp.y0 + 1 == image.bounds.ymin
    np.testing.assert_allclose(stamp.array, image.array / image.array.sum(), rtol=0, atol=1e-6)


@needs_des
def test_invalid_des_file_is_a_clear_error():
    with pytest.raises(ValueError) as info:
        PsfexPsf.read(DES_INVALID)
    msg = str(info.value)
    assert "invalid_psfcat.psf" in msg and "PSFAXIS3" in msg and "\n" not in msg


def test_missing_and_non_psfex_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.psf"):
        PsfexPsf.read(tmp_path / "nothere.psf")
    text = tmp_path / "text.psf"
    text.write_text("not a fits file\n")
    with pytest.raises(ValueError, match="text.psf"):
        PsfexPsf.read(text)
    image = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((5, 5))).writeto(image)
    with pytest.raises(ValueError, match="image.fits.*PSF_DATA"):
        PsfexPsf.read(image)
    comps = np.stack([_gauss(21, 3.0)] * 3)
    other = write_psfex(tmp_path / "mag.psf", comps, 1.0, 1, names=("MAG_AUTO", "Y_IMAGE"))
    with pytest.raises(ValueError, match="MAG_AUTO"):
        PsfexPsf.read(other)


def test_sampling_and_polynomial_order(tmp_path):
    # 41 samples every 0.5 px: the core is a Gaussian of 4 samples = 2.0 image px.
    n = 41
    base = _gauss(n, 4.0)
    rng = np.random.default_rng(5)
    comps = [base] + [0.02 * rng.normal(size=(n, n)) * base for _ in range(5)]
    path = write_psfex(tmp_path / "synth.psf", comps, 0.5, 2)
    psf = PsfexPsf.read(path)
    assert psf.dimensions() == (21, 21)  # ceil(41 * 0.5) made odd
    # Terms in PSFEx order 1, X, X^2, Y, XY, Y^2 with X = (x + 1 - 1000) / 500.
    x, y = 1249.0, 1499.0
    X, Y = (x + 1 - 1000.0) / 500.0, (y + 1 - 2000.0) / 1000.0
    np.testing.assert_allclose(psf.coefficients([x], [y])[0], [1, X, X * X, Y, X * Y, Y * Y])
    expected = sum(c * t for c, t in zip(comps, [1, X, X * X, Y, X * Y, Y * Y]))
    np.testing.assert_allclose(psf.sampled_images([x], [y])[0], expected, rtol=1e-6, atol=1e-9)
    # At POLZERO the model is the pure Gaussian: sigma 4 samples x 0.5 = 2.0 px.
    center = psf.compute_kernel_image(999.0, 1999.0)
    _, _, sigma, (g1, g2) = _moments(center)
    assert sigma == pytest.approx(2.0, rel=2e-3)
    assert abs(g1) < 1e-6 and abs(g2) < 1e-6


def test_subpixel_centring_and_origin_offset(tmp_path):
    comps = np.stack([_gauss(31, 2.2, 0.0, 0.0), np.zeros((31, 31)), np.zeros((31, 31))])
    comps[1] = 0.3 * _gauss(31, 3.0)  # size grows with x
    path = write_psfex(tmp_path / "lin.psf", comps, 1.0, 1)
    psf = PsfexPsf.read(path)
    for x, y in ((1000.3, 2000.8), (1200.5, 1800.0), (950.0, 2100.0)):
        stamp = psf.compute_image(x, y)
        xc, yc, _, _ = _moments(stamp.array)
        # Lanczos-3 resampling (as PSFEx and GalSim do) biases centroids by < 0.02 px.
        assert xc + stamp.x0 == pytest.approx(x, abs=0.02)
        assert yc + stamp.y0 == pytest.approx(y, abs=0.02)
        assert stamp.array.sum() == pytest.approx(1.0, abs=1e-12)
    # At a whole pixel the sub-pixel stamp is the centred kernel image.
    stamp = psf.compute_image(1100.0, 1900.0)
    np.testing.assert_allclose(stamp.array, psf.compute_kernel_image(1100.0, 1900.0),
                               rtol=0, atol=1e-15)
    assert (stamp.x0, stamp.y0) == (1100 - 15, 1900 - 15)
    # SExtractor coordinates = parent + offset: offset (0, 0) shifts the model by one pixel,
    # and image_xy0 = (x0, y0) means offset (1 - x0, 1 - y0).
    shifted = PsfexPsf.read(path, offset=(0.0, 0.0))
    np.testing.assert_allclose(shifted.compute_kernel_image(1101.0, 1901.0),
                               psf.compute_kernel_image(1100.0, 1900.0), atol=1e-15)
    cut = PsfexPsf.read(path, image_xy0=(500, 600))
    assert cut.offset == (-499.0, -599.0)
    np.testing.assert_allclose(cut.compute_kernel_image(1600.0, 2500.0),
                               psf.compute_kernel_image(1100.0, 1900.0), atol=1e-15)
    with pytest.raises(ValueError, match="not both"):
        PsfexPsf.read(path, offset=(1, 1), image_xy0=(0, 0))
    # Re-rendering at another size keeps the model.
    big = psf.resized(41, 41)
    assert big.dimensions() == (41, 41)
    np.testing.assert_allclose(big.compute_kernel_image(1100.0, 1900.0)[5:-5, 5:-5],
                               psf.compute_kernel_image(1100.0, 1900.0), atol=1e-6)


def test_bad_positions_raise(tmp_path):
    comps = np.stack([_gauss(21, 2.0), -5.0 * _gauss(21, 2.0), np.zeros((21, 21))])
    psf = PsfexPsf.read(write_psfex(tmp_path / "neg.psf", comps, 1.0, 1))
    with pytest.raises(PsfEvaluationError, match="no positive flux"):
        psf.compute_kernel_image(2000.0, 2000.0)  # X = 2: 1 - 10 < 0
    with pytest.raises(PsfEvaluationError, match="not finite"):
        psf.compute_kernel_images([1.0, np.nan], [1.0, 2.0])


@needs_des
def test_task_runs_on_a_psfex_exposure():
    psf = PsfexPsf.read(DES_PSF)
    rng = np.random.default_rng(2)
    exposure = gpumatch.Exposure(rng.normal(size=(256, 256)), psf=psf, xy0=(1000, 2000))
    task = gpumatch.ModelPsfMatchTask(gpumatch.ModelPsfMatchConfig(spatialKernelOrder=1),
                                      backend="numpy")
    result = task.run(exposure, gpumatch.GaussianPsf(25, 25, 2.6))
    assert result.psfMatchingKernel.sum_at(1128.0, 2128.0) == pytest.approx(1.0, abs=1e-9)
    res = task.diagnostic(result.kernelCellSet, result.psfMatchingKernel)
    assert res["relative_l2_max"] < 0.02
