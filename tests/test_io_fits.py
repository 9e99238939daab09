"""Exposures in FITS files: LSST multi-extension layout, plain images, atomic writes."""

import logging
import os

import numpy as np
import pytest

from gpumatch import DEFAULT_MASK_PLANES, Exposure
from gpumatch.io.fits import FitsFormatError

fits = pytest.importorskip("astropy.io.fits")
from astropy.wcs import WCS  # noqa: E402

DES_HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "des",
                          "DECam_00154912_12_header.fits")


def _simple_wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [25.5, 20.5]
    w.wcs.cd = [[-7.5e-5, 1e-6], [1.2e-6, 7.5e-5]]
    return w


def _exposure(dtype=np.float32, mask_dtype=np.int32, wcs=None, xy0=(100, -20)):
    rng = np.random.default_rng(42)
    image = rng.normal(100.0, 5.0, size=(40, 50)).astype(dtype)
    image[3, 4] = np.nan
    image[5, 6] = np.inf
    image[7, 8] = -np.inf
    variance = rng.uniform(1.0, 2.0, size=image.shape).astype(dtype)
    planes = dict(DEFAULT_MASK_PLANES, STREAK=12)
    mask = rng.integers(0, 1 << 13, size=image.shape).astype(mask_dtype)
    meta = {"OBJECT": "field 7", "EXPTIME": 30.5, "NIGHT": 20240101, "PHOTOMET": True,
            "LONGKEYWORDNAME": 1.25, "SEEINGS": [0.8, 0.9], "NANVALUE": float("nan"),
            "LONGSTR": "x" * 150, "UNDEF": None}
    return Exposure(image, variance, mask, xy0=xy0, wcs=wcs if wcs is not None else _simple_wcs(),
                    filter="r", id=1234, visit_info={"exptime": 30.5, "airmass": 1.2},
                    photo_calib=0.5, meta=meta, mask_planes=planes)


def _same_bits(a, b):
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype,mask_dtype", [(np.float32, np.int32), (np.float64, np.int64),
                                              (np.float64, np.uint16)])
def test_round_trip_bit_identical(tmp_path, dtype, mask_dtype):
    exp = _exposure(dtype, mask_dtype)
    path = tmp_path / "exp.fits"
    assert exp.write_fits(path) == os.fspath(path)
    back = Exposure.read_fits(path)
    assert _same_bits(back.image, exp.image)  # NaN and +-inf included
    assert _same_bits(back.variance, exp.variance)
    assert _same_bits(back.mask, exp.mask)
    assert back.xy0 == (100, -20)
    assert back.bbox == exp.bbox
    assert back.mask_planes == exp.mask_planes
    assert back.filter == "r" and back.id == 1234 and back.photo_calib == 0.5
    assert back.visit_info == {"exptime": 30.5, "airmass": 1.2}
    meta = dict(back.meta)
    assert np.isnan(meta.pop("NANVALUE"))
    expected = {k: v for k, v in exp.meta.items() if k != "NANVALUE"}
    assert meta == expected
    x, y = np.array([0.0, 12.3, 49.0]), np.array([0.0, 7.7, 39.0])
    np.testing.assert_array_equal(back.wcs.all_pix2world(x, y, 0), exp.wcs.all_pix2world(x, y, 0))
    # Writing what was read gives the same file contents.
    path2 = tmp_path / "exp2.fits"
    back.write_fits(path2)
    again = Exposure.read_fits(path2)
    assert _same_bits(again.image, exp.image) and again.meta.keys() == back.meta.keys()


def test_read_into_given_arrays(tmp_path):
    """``empty`` gives the arrays the planes are read into (a GPU reader passes a
    pinned-memory allocator); the values are those of a plain read."""
    exp = _exposure(np.float64, np.int16)
    path = tmp_path / "exp.fits"
    exp.write_fits(path)
    given = []

    def empty(shape, dtype):
        given.append(np.empty(shape, dtype))
        return given[-1]

    back = Exposure.read_fits(path, empty=empty)
    plain = Exposure.read_fits(path)
    assert [a.dtype for a in given] == [np.dtype(np.float64), np.dtype(np.float64),
                                       np.dtype(np.int16)]
    assert all(a.dtype.isnative for a in given)
    assert back.image is given[0] and back.variance is given[1] and back.mask is given[2]
    for plane in ("image", "variance", "mask"):
        assert _same_bits(getattr(back, plane), getattr(plain, plane))
        assert _same_bits(getattr(back, plane), getattr(exp, plane))


def test_lsst_layout(tmp_path):
    exp = _exposure()
    path = tmp_path / "exp.fits"
    exp.write_fits(path)
    with fits.open(path) as hdul:
        assert len(hdul) == 4
        assert hdul[0].data is None
        assert [h.name for h in hdul[1:]] == ["IMAGE", "MASK", "VARIANCE"]
        for h in hdul[1:]:
            assert h.header["EXTTYPE"] == h.name
            assert h.header["LTV1"] == -100 and h.header["LTV2"] == 20
            assert h.header["CTYPE1"] == "RA---TAN"
        mask_header = hdul["MASK"].header
        assert mask_header["MP_BAD"] == 0 and mask_header["MP_NO_DATA"] == 8
        assert mask_header["MP_STREAK"] == 12
        assert hdul["MASK"].data.dtype.kind == "i"
        assert hdul[0].header["OBJECT"] == "field 7"
        assert hdul[0].header["FILTER"] == "r"
        assert hdul["IMAGE"].header["BITPIX"] == -32


def test_des_tpv_wcs_round_trip(tmp_path):
    if not os.path.exists(DES_HEADER):
        pytest.skip(f"DES test data not found at {DES_HEADER} (../shared/data/des)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wcs = WCS(fits.getheader(DES_HEADER))
    exp = _exposure(wcs=wcs, xy0=(0, 0))
    exp.write_fits(tmp_path / "des.fits")
    back = Exposure.read_fits(tmp_path / "des.fits")
    x = np.array([0.0, 1023.5, 2047.0])
    y = np.array([0.0, 2047.5, 4095.0])
    np.testing.assert_allclose(back.wcs.all_pix2world(x, y, 0), wcs.all_pix2world(x, y, 0),
                               rtol=0, atol=1e-12)
    with fits.open(tmp_path / "des.fits") as hdul:
        header = hdul["IMAGE"].header
        assert header["CTYPE1"] == "RA---TPV"  # the distortion is kept, not dropped
        assert any(k.startswith("PV1_") for k in header)


def test_plain_image_defaults_logged(tmp_path, caplog):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(30, 20)).astype(np.float32)
    hdu = fits.PrimaryHDU(data)
    hdu.header["OBJECT"] = "plain"
    hdu.header["LTV1"] = -5
    hdu.header["LTV2"] = -7
    for card in _simple_wcs().to_header().cards:
        hdu.header[card.keyword] = card.value
    path = tmp_path / "plain.fits"
    hdu.writeto(path)
    with caplog.at_level(logging.INFO, logger="gpumatch"):
        exp = Exposure.read_fits(path)
    assert _same_bits(exp.image, data)
    np.testing.assert_array_equal(exp.variance, np.ones_like(data))
    assert exp.variance.dtype == np.float32
    np.testing.assert_array_equal(exp.mask, 0)
    assert exp.xy0 == (5, 7)
    assert exp.meta["OBJECT"] == "plain"
    assert "CRVAL1" not in exp.meta and "NAXIS1" not in exp.meta  # WCS/structure not in meta
    assert exp.wcs is not None and exp.wcs.wcs.crval[0] == pytest.approx(150.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "gpumatch"]
    assert any("plain.fits" in m and "variance = 1" in m and "mask = 0" in m for m in lines)

    var = np.full(data.shape, 4.0)
    mask = np.zeros(data.shape, dtype=np.int32)
    mask[2, 3] = 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpumatch"):
        exp2 = Exposure.read_fits(path, variance=var, mask=mask)
    assert not any("variance = 1" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(exp2.variance, 4.0)
    assert exp2.mask[2, 3] == 1
    exp3 = Exposure.read_fits(path, variance=2.5)
    np.testing.assert_array_equal(exp3.variance, 2.5)


def test_plain_image_in_extension(tmp_path):
    data = np.arange(12 * 9, dtype=np.int16).reshape(12, 9)
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, name="SCI")])
    hdul[0].header["TELESCOP"] = "test"
    hdul[1].header["GAIN"] = 4.0
    path = tmp_path / "ext.fits"
    hdul.writeto(path)
    exp = Exposure.read_fits(path)
    np.testing.assert_array_equal(exp.image, data)
    assert exp.image.dtype.kind == "f"
    assert exp.meta["TELESCOP"] == "test" and exp.meta["GAIN"] == 4.0


def test_overwrite(tmp_path):
    path = tmp_path / "exp.fits"
    exp = _exposure()
    exp.write_fits(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError) as info:
        exp.write_fits(path)
    assert str(path) in str(info.value) and "overwrite=True" in str(info.value)
    assert path.read_bytes() == before
    exp2 = Exposure(np.zeros((5, 5), dtype=np.float32))
    exp2.write_fits(path, overwrite=True)
    assert Exposure.read_fits(path).shape == (5, 5)
    assert sorted(os.listdir(tmp_path)) == ["exp.fits"]


def _failing_writeto(monkeypatch):
    original = fits.HDUList.writeto

    def broken(self, fileobj, *args, **kwargs):
        with open(fileobj, "wb") as fh:  # half a file, then the disk "fills up"
            fh.write(b"SIMPLE  =                    T" + b" " * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fits.HDUList, "writeto", broken)
    return original


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    _failing_writeto(monkeypatch)
    path = tmp_path / "new.fits"
    with pytest.raises(OSError, match="No space left"):
        _exposure().write_fits(path)
    assert os.listdir(tmp_path) == []


def test_atomic_write_failure_keeps_existing(tmp_path, monkeypatch):
    path = tmp_path / "old.fits"
    _exposure().write_fits(path)
    before = path.read_bytes()
    _failing_writeto(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        Exposure(np.zeros((3, 3))).write_fits(path, overwrite=True)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["old.fits"]


def test_write_to_missing_directory(tmp_path):
    path = tmp_path / "nodir" / "exp.fits"
    with pytest.raises(FileNotFoundError) as info:
        _exposure().write_fits(path)
    assert "does not exist" in str(info.value) and "nodir" in str(info.value)


def _one_line(exc):
    text = str(exc)
    assert "\n" not in text
    return text


def test_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.fits"
    with pytest.raises(FileNotFoundError) as info:
        Exposure.read_fits(missing)
    assert str(missing) in _one_line(info.value)

    text = tmp_path / "notfits.fits"
    text.write_text("this is not a FITS file\n" * 10)
    with pytest.raises(FitsFormatError) as info:
        Exposure.read_fits(text)
    assert str(text) in _one_line(info.value)

    table = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column(name="A", format="E", array=np.zeros(3))])]).writeto(table)
    with pytest.raises(FitsFormatError) as info:
        Exposure.read_fits(table)
    msg = _one_line(info.value)
    assert str(table) in msg and "no 2-d image" in msg


def test_truncated_file(tmp_path):
    full = tmp_path / "full.fits"
    Exposure(np.ones((200, 200))).write_fits(full)
    cut = tmp_path / "cut.fits"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 4])
    with pytest.raises(FitsFormatError) as info:
        Exposure.read_fits(cut)
    msg = _one_line(info.value)
    assert "cut.fits" in msg and "truncated" in msg


def test_header_only_des_file_is_rejected():
    if not os.path.exists(DES_HEADER):
        pytest.skip(f"DES test data not found at {DES_HEADER} (../shared/data/des)")
    with pytest.raises(FitsFormatError) as info:
        Exposure.read_fits(DES_HEADER)
    assert "DECam_00154912_12_header.fits" in _one_line(info.value)


def test_missing_extension_and_shape_mismatch(tmp_path):
    path = tmp_path / "exp.fits"
    _exposure().write_fits(path)
    with fits.open(path) as hdul:
        no_var = fits.HDUList([hdul[0].copy(), hdul["IMAGE"].copy(), hdul["MASK"].copy()])
        no_var.writeto(tmp_path / "novar.fits")
        bad = fits.HDUList([hdul[0].copy(), hdul["IMAGE"].copy(), hdul["MASK"].copy(),
                            fits.ImageHDU(np.ones((10, 10), dtype=np.float32), name="VARIANCE")])
        bad[3].header["EXTTYPE"] = "VARIANCE"
        bad.writeto(tmp_path / "badshape.fits")
    with pytest.raises(FitsFormatError) as info:
        Exposure.read_fits(tmp_path / "novar.fits")
    msg = _one_line(info.value)
    assert "novar.fits" in msg and "VARIANCE" in msg and "variance=" in msg
    # The missing plane can be supplied.
    exp = Exposure.read_fits(tmp_path / "novar.fits", variance=np.ones((40, 50)))
    assert exp.variance.shape == (40, 50)

    with pytest.raises(FitsFormatError) as info:
        Exposure.read_fits(tmp_path / "badshape.fits")
    msg = _one_line(info.value)
    assert "badshape.fits" in msg and "(10, 10)" in msg and "(40, 50)" in msg

    with pytest.raises(FitsFormatError) as info:
        Exposure.read_fits(tmp_path / "novar.fits", variance=np.ones((3, 3)))
    assert "(3, 3)" in _one_line(info.value)


def test_read_does_not_leave_files(tmp_path):
    path = tmp_path / "exp.fits"
    _exposure().write_fits(path)
    Exposure.read_fits(path)
    assert os.listdir(tmp_path) == ["exp.fits"]


def test_layout_keywords_in_meta_do_not_corrupt_the_file(tmp_path):
    meta = {"BITPIX": 8, "NAXIS": 0, "EXTNAME": "X", "CTYPE1": "RA---TAN", "MP_BAD": 3,
            "LTV1": 99, "ZD": 47.7, "DATE-OBS": "2012-11-24T03:37:25"}
    exp = Exposure(np.arange(12, dtype=np.float32).reshape(3, 4), meta=meta, xy0=(2, 3))
    exp.write_fits(tmp_path / "m.fits")
    back = Exposure.read_fits(tmp_path / "m.fits")
    assert back.xy0 == (2, 3) and back.mask_planes["BAD"] == 0
    assert back.meta == {"ZD": 47.7, "DATE-OBS": "2012-11-24T03:37:25"}
    np.testing.assert_array_equal(back.image, exp.image)


def test_psf_given_as_string(tmp_path):
    Exposure(np.zeros((8, 8), dtype=np.float32)).write_fits(tmp_path / "e.fits")
    exp = Exposure.read_fits(tmp_path / "e.fits", psf="gaussian:sigma=2,size=11")
    assert exp.psf.sigma == 2.0 and exp.psf.width == 11
