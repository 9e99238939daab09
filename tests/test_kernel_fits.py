"""Spatial kernels on disk: write, read back bit-identical, apply again identically."""

import os

import numpy as np
import pytest

import gpumatch
from gpumatch import (Exposure, GaussianPsf, ModelPsfMatchConfig, ModelPsfMatchTask,
                      SpatialKernel, VaryingGaussianPsf, apply_kernel)
from gpumatch.io.fits import FitsFormatError

fits = pytest.importorskip("astropy.io.fits")


def _solve(model_type="chebyshev1", order=1, xy0=(30, -40)):
    box = (xy0[0], xy0[1], xy0[0] + 255, xy0[1] + 191)
    psf = VaryingGaussianPsf(15, 15, box, sigma=(1.7, 0.15, -0.1), g1=(0.02, 0.01),
                             g2=(0.0, 0.0, 0.02))
    rng = np.random.default_rng(11)
    image = rng.normal(size=(192, 256))
    image[50, 60] = np.nan
    mask = rng.integers(0, 16, size=image.shape).astype(np.int32)
    exposure = Exposure(image, rng.uniform(1, 2, size=image.shape), mask, xy0=xy0, psf=psf)
    config = ModelPsfMatchConfig(kernelSize=11, kernelSizeMin=11, spatialKernelOrder=order,
                                 spatialModelType=model_type)
    result = ModelPsfMatchTask(config, backend="numpy").run(exposure, GaussianPsf(17, 17, 2.6),
                                                            kernelSum=1.3)
    return exposure, config, result


def _same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("model_type,order", [("chebyshev1", 1), ("polynomial", 2)])
def test_round_trip_and_identical_application(tmp_path, model_type, order):
    exposure, config, result = _solve(model_type, order)
    kernel = result.psfMatchingKernel
    path = tmp_path / "kernel.fits"
    assert kernel.write_fits(path, config=config) == os.fspath(path)
    back = SpatialKernel.read_fits(path)
    assert _same_bits(back.basis_images, kernel.basis_images)
    assert _same_bits(back.spatial_coefficients, kernel.spatial_coefficients)
    assert back.spatial_model_type == model_type and back.spatial_order == order
    assert back.spatial_functions.region == kernel.spatial_functions.region
    assert back.dimensions == (11, 11)
    assert back.kernel_sum == 1.3
    assert back.config == config.to_dict()
    assert ModelPsfMatchConfig.from_dict(back.config) == config
    for x, y in ((30.0, -40.0), (200.5, 100.25)):
        assert _same_bits(back.compute_image(x, y), kernel.compute_image(x, y))
    again = apply_kernel(exposure, back, psf=result.referencePsfModel)
    first = apply_kernel(exposure, kernel, psf=result.referencePsfModel)
    for plane in ("image", "variance", "mask"):
        assert _same_bits(getattr(again, plane), getattr(first, plane))
        assert _same_bits(getattr(again, plane), getattr(result.psfMatchedExposure, plane))


def test_layout_and_no_config(tmp_path):
    _, _, result = _solve()
    kernel = result.psfMatchingKernel
    path = tmp_path / "k.fits"
    kernel.write_fits(path)
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "BASIS", "COEFFS"]
        h = hdul[0].header
        assert h["GMKIND"] == "SPATIAL_KERNEL" and h["SPMODEL"] == "chebyshev1"
        assert h["SPORDER"] == 1 and h["KSIZE"] == 11 and h["NBASIS"] == 27
        region = kernel.spatial_functions.region
        assert (h["REGX0"], h["REGY0"], h["REGW"], h["REGH"]) == (
            region.x0, region.y0, region.width, region.height)
        assert hdul["BASIS"].data.shape == (27, 11, 11)
        assert hdul["COEFFS"].data.shape == (27, 3)
        assert hdul["BASIS"].header["BITPIX"] == -64
    assert SpatialKernel.read_fits(path).config is None


def test_constant_kernel_round_trip(tmp_path):
    image = np.outer(np.hanning(7), np.hanning(7))
    kernel = SpatialKernel.constant(image)
    kernel.write_fits(tmp_path / "c.fits", config={"note": "hand made", "sigmas": (1.0, 2.0)})
    back = SpatialKernel.read_fits(tmp_path / "c.fits")
    assert _same_bits(back.compute_image(5, 5), kernel.compute_image(5, 5))
    assert back.config == {"note": "hand made", "sigmas": [1.0, 2.0]}


def test_overwrite_and_atomic_failure(tmp_path, monkeypatch):
    _, _, result = _solve()
    kernel = result.psfMatchingKernel
    path = tmp_path / "k.fits"
    kernel.write_fits(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        kernel.write_fits(path)
    assert path.read_bytes() == before

    def broken(self, fileobj, *args, **kwargs):
        with open(fileobj, "wb") as fh:
            fh.write(b"partial")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fits.HDUList, "writeto", broken)
    with pytest.raises(OSError, match="Input/output error"):
        kernel.write_fits(path, overwrite=True)
    assert path.read_bytes() == before
    with pytest.raises(OSError):
        kernel.write_fits(tmp_path / "new.fits")
    assert sorted(os.listdir(tmp_path)) == ["k.fits"]


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.fits"):
        SpatialKernel.read_fits(tmp_path / "absent.fits")
    exposure_file = tmp_path / "exposure.fits"
    Exposure(np.zeros((4, 4))).write_fits(exposure_file)
    with pytest.raises(FitsFormatError) as info:
        SpatialKernel.read_fits(exposure_file)
    assert "exposure.fits is not a gpumatch kernel file" in str(info.value)
    _, _, result = _solve()
    good = tmp_path / "k.fits"
    result.psfMatchingKernel.write_fits(good)
    with fits.open(good) as hdul:
        fits.HDUList([hdul[0].copy(), hdul["BASIS"].copy()]).writeto(tmp_path / "cut.fits")
        broken = fits.HDUList([h.copy() for h in hdul])
        broken["COEFFS"].data = broken["COEFFS"].data[:, :2].copy()
        broken.writeto(tmp_path / "shape.fits")
    with pytest.raises(FitsFormatError, match="cut.fits.*COEFFS"):
        SpatialKernel.read_fits(tmp_path / "cut.fits")
    with pytest.raises(FitsFormatError, match="shape.fits.*coefficients"):
        SpatialKernel.read_fits(tmp_path / "shape.fits")


def test_exported():
    assert callable(gpumatch.SpatialKernel.read_fits)
    assert callable(gpumatch.SpatialKernel.write_fits)
