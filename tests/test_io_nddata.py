"""Exposures to and from astropy NDData / CCDData."""

import logging

import numpy as np
import pytest

from gpumatch import DEFAULT_MASK_PLANES, Exposure, GaussianPsf, ImagePsf

nddata = pytest.importorskip("astropy.nddata")
from astropy import units as u  # noqa: E402
from astropy.nddata import (CCDData, InverseVariance, NDData, StdDevUncertainty,  # noqa: E402
                            VarianceUncertainty)
from astropy.wcs import WCS  # noqa: E402

from gpumatch.io.nddata import NDDataConversionError  # noqa: E402


def _arrays(shape=(30, 40), seed=3):
    rng = np.random.default_rng(seed)
    image = rng.normal(10.0, 2.0, size=shape).astype(np.float32)
    variance = rng.uniform(0.5, 3.0, size=shape).astype(np.float32)
    mask = rng.integers(0, 1 << 9, size=shape).astype(np.int32)
    return image, variance, mask


def _wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, -5.0]
    w.wcs.crpix = [20.0, 15.0]
    w.wcs.cdelt = [-5e-5, 5e-5]
    return w


def test_ccddata_round_trip_keeps_data():
    image, variance, mask = _arrays()
    # CCDData masks are boolean: integer bit planes travel as flags.
    ccd = CCDData(image, unit="electron", uncertainty=VarianceUncertainty(variance),
                  mask=mask != 0, flags=mask, wcs=_wcs(),
                  meta={"OBJECT": "m31", "LTV1": -12, "LTV2": -34})
    psf = GaussianPsf(11, 11, 2.0)
    exp = Exposure.from_nddata(ccd, psf=psf)
    assert exp.psf is psf
    assert exp.xy0 == (12, 34)
    assert exp.meta["OBJECT"] == "m31" and exp.meta["BUNIT"] == "electron"
    assert "LTV1" not in exp.meta
    np.testing.assert_array_equal(exp.image, image)
    np.testing.assert_array_equal(exp.variance, variance)
    np.testing.assert_array_equal(exp.mask, mask)
    assert exp.image.dtype == np.float32 and exp.variance.dtype == np.float32

    back = exp.to_ccddata()
    assert isinstance(back.uncertainty, VarianceUncertainty)
    assert back.unit == u.electron
    np.testing.assert_array_equal(back.data, image)
    np.testing.assert_array_equal(back.uncertainty.array, variance)
    np.testing.assert_array_equal(back.mask, mask != 0)
    np.testing.assert_array_equal(back.flags, mask)
    assert back.meta["LTV1"] == -12 and back.meta["LTV2"] == -34
    assert back.meta["MP_NO_DATA"] == 8
    np.testing.assert_allclose(back.wcs.wcs.crval, [10.0, -5.0])

    again = Exposure.from_nddata(back)
    assert again.xy0 == (12, 34)
    assert again.mask_planes == exp.mask_planes
    np.testing.assert_array_equal(again.image, image)
    np.testing.assert_array_equal(again.variance, variance)
    np.testing.assert_array_equal(again.mask, mask)
    assert again.meta == exp.meta


def test_exposure_round_trip_through_ccddata():
    image, variance, mask = _arrays(seed=7)
    planes = dict(DEFAULT_MASK_PLANES, GHOST=10)
    exp = Exposure(image.astype(np.float64), variance.astype(np.float64), mask, xy0=(-3, 5),
                   wcs=_wcs(), meta={"EXPTIME": 15.0}, mask_planes=planes)
    ccd = exp.to_ccddata(unit="adu")
    back = Exposure.from_nddata(ccd)
    assert back.xy0 == (-3, 5)
    assert back.mask_planes == planes
    assert back.bbox == exp.bbox
    np.testing.assert_array_equal(back.image, exp.image)
    np.testing.assert_array_equal(back.variance, exp.variance)
    np.testing.assert_array_equal(back.mask, exp.mask)
    assert back.meta == {"EXPTIME": 15.0, "BUNIT": "adu"}


def test_stddev_and_inverse_variance_are_converted():
    image, variance, _ = _arrays()
    std = np.sqrt(variance.astype(np.float64))
    exp = Exposure.from_nddata(NDData(image, uncertainty=StdDevUncertainty(std)))
    np.testing.assert_allclose(exp.variance, std * std, rtol=1e-6)

    ivar = 1.0 / variance.astype(np.float64)
    ivar[0, 0] = 0.0
    exp = Exposure.from_nddata(NDData(image, uncertainty=InverseVariance(ivar)))
    np.testing.assert_allclose(exp.variance.ravel()[1:], variance.ravel()[1:], rtol=1e-6)
    assert exp.variance[0, 0] == np.inf


def test_uncertainty_units_are_converted():
    image = np.ones((5, 5), dtype=np.float64)
    # Standard deviation given in mJy for data in Jy: variance 2000 mJy -> 4 Jy^2.
    nd = NDData(image, unit="Jy", uncertainty=StdDevUncertainty(np.full((5, 5), 2000.0),
                                                                 unit="mJy"))
    exp = Exposure.from_nddata(nd)
    np.testing.assert_allclose(exp.variance, 4.0)
    nd = NDData(image, unit="Jy", uncertainty=VarianceUncertainty(np.full((5, 5), 3e6),
                                                                   unit="mJy2"))
    np.testing.assert_allclose(Exposure.from_nddata(nd).variance, 3.0)
    nd = NDData(image, unit="Jy", uncertainty=InverseVariance(np.full((5, 5), 0.5e-6),
                                                               unit="1/mJy2"))
    np.testing.assert_allclose(Exposure.from_nddata(nd).variance, 2.0)


def test_boolean_mask_sets_a_plane():
    image, variance, _ = _arrays()
    bad = np.zeros(image.shape, dtype=bool)
    bad[2, 3] = bad[10, 20] = True
    exp = Exposure.from_nddata(NDData(image, uncertainty=VarianceUncertainty(variance),
                                      mask=bad))
    assert exp.mask.dtype.kind == "i"
    np.testing.assert_array_equal(exp.mask != 0, bad)
    assert exp.mask[2, 3] == exp.get_plane_bitmask("BAD")
    exp2 = Exposure.from_nddata(NDData(image, mask=bad), bool_mask_plane="SAT")
    assert exp2.mask[10, 20] == exp2.get_plane_bitmask("SAT")
    ccd = exp.to_ccddata()
    np.testing.assert_array_equal(ccd.mask, bad)


def test_integer_mask_on_nddata_and_flags_with_extra_mask():
    image, _, mask = _arrays()
    exp = Exposure.from_nddata(NDData(image, mask=mask))  # NDData keeps integer masks
    np.testing.assert_array_equal(exp.mask, mask)
    flags = np.zeros(image.shape, dtype=np.int32)
    flags[1, 1] = 1 << 3
    bad = np.zeros(image.shape, dtype=bool)
    bad[1, 1] = bad[4, 4] = True
    ccd = CCDData(image, unit="adu", mask=bad, flags=flags)
    exp = Exposure.from_nddata(ccd)
    assert exp.mask[1, 1] == 1 << 3  # flagged pixel keeps its bits
    assert exp.mask[4, 4] == exp.get_plane_bitmask("BAD")  # masked, unflagged: BAD
    assert np.count_nonzero(exp.mask) == 2


def test_missing_uncertainty_is_logged(caplog):
    image, _, _ = _arrays()
    with caplog.at_level(logging.WARNING, logger="gpumatch"):
        exp = Exposure.from_nddata(NDData(image))
    np.testing.assert_array_equal(exp.variance, 1.0)
    np.testing.assert_array_equal(exp.mask, 0)
    assert any("variance = 1" in r.getMessage() for r in caplog.records)


def test_psf_array_on_nddata_becomes_image_psf():
    image, _, _ = _arrays()
    stamp = GaussianPsf(9, 9, 1.5).compute_kernel_image(0, 0) * 3.0
    exp = Exposure.from_nddata(NDData(image, psf=stamp))
    assert isinstance(exp.psf, ImagePsf)
    np.testing.assert_allclose(exp.psf.compute_kernel_image(0, 0), stamp / 3.0)


def test_bad_inputs():
    image, variance, _ = _arrays()
    from astropy.nddata import UnknownUncertainty

    with pytest.raises(NDDataConversionError, match="UnknownUncertainty"):
        Exposure.from_nddata(NDData(image, uncertainty=UnknownUncertainty(variance)))
    with pytest.raises(NDDataConversionError, match="float64"):
        Exposure.from_nddata(NDData(image, mask=np.zeros(image.shape)))
    with pytest.raises(NDDataConversionError, match="2-d"):
        Exposure.from_nddata(NDData(np.zeros((2, 3, 4))))
    with pytest.raises(NDDataConversionError, match="NDData"):
        Exposure.from_nddata(np.zeros((3, 3)))
