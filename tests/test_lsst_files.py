"""LSST-native files: the afw archive (PSF, calibration, WCS), the PSF search order
of the command line, and outputs that astropy and LSST software read back."""

import os
import pickle
import shutil

import numpy as np
import pytest
from astropy.io import fits

import gpumatch as gm
from gpumatch.errors import InputWarning
from gpumatch.io.afw_archive import ARCHIVE_POINTER
from gpumatch.moments import adaptive_moments

CALEXP = os.path.join("..", "shared", "data", "lsst", "calexp_pcapsf.fits")
DES_PSF = os.path.join("..", "shared", "data", "des")
needs_calexp = pytest.mark.skipif(not os.path.exists(CALEXP),
                                  reason=f"{CALEXP} (LSST calexp test data) is absent")


# -- archives built here, with the column layout of the real files ----------------


def _index(rows, spelling):
    """An ARCHIVE_INDEX table; ``spelling`` is '_' (cat_archive) or '.' (cat.archive)."""
    cols = [fits.Column(name="id", format="1J", array=[r[0] for r in rows]),
            fits.Column(name=f"cat{spelling}archive", format="1J", array=[r[1] for r in rows]),
            fits.Column(name=f"cat{spelling}persistable", format="1J", array=[0] * len(rows)),
            fits.Column(name="row0", format="1J", array=[r[2] for r in rows]),
            fits.Column(name="nrows", format="1J", array=[1] * len(rows)),
            fits.Column(name="name", format="64A", array=[r[3] for r in rows]),
            fits.Column(name="module", format="64A", array=["lsst.afw.detection"] * len(rows))]
    hdu = fits.BinTableHDU.from_columns(cols)
    hdu.header["EXTTYPE"] = "ARCHIVE_INDEX"
    hdu.header["AR_NCAT"] = 1 + len({r[1] for r in rows})
    return hdu


def _catalog(name, **columns):
    cols = [fits.Column(name=k, format=f, array=a) for k, (f, a) in columns.items()]
    hdu = fits.BinTableHDU.from_columns(cols)
    hdu.header["EXTTYPE"] = "ARCHIVE_DATA"
    hdu.header["AR_NAME"] = name
    return hdu


def _write_lsst(path, catalogs, index_rows, spelling="_", pointers=None, image=None):
    """An LSST-layout file: primary, IMAGE/MASK/VARIANCE, then the archive."""
    image = np.zeros((40, 50), np.float32) if image is None else image
    primary = fits.PrimaryHDU()
    primary.header["AR_HDU"] = 5
    for k, v in (pointers or {"PSF_ID": 1}).items():
        primary.header[f"HIERARCH {k}" if len(k) > 8 else k] = v
    planes = []
    for name, data in (("IMAGE", image), ("MASK", np.zeros(image.shape, np.int32)),
                       ("VARIANCE", np.ones(image.shape, np.float32))):
        h = fits.ImageHDU(data)
        h.header["EXTTYPE"] = name
        h.header["LTV1"], h.header["LTV2"] = -100, -200
        planes.append(h)
    for i, cat in enumerate(catalogs, start=1):
        cat.header["AR_CATN"] = i
    fits.HDUList([primary] + planes + [_index(index_rows, spelling)] + catalogs).writeto(path)
    return path


def _gaussian_file(path, spelling="_", sigma=2.0, pointers=None, image=None):
    cats = [_catalog("GaussianPsf", dimensions_x=("1J", [21]), dimensions_y=("1J", [21]),
                     sigma=("1D", [sigma])),
            _catalog("PhotoCalib", calibrationMean=("1D", [0.25]),
                     calibrationErr=("1D", [0.01])),
            _catalog("FilterLabel", band=("8A", ["r"]), physical=("16A", ["r_03"]))]
    rows = [(1, 1, 0, "GaussianPsf"), (2, 2, 0, "PhotoCalib"), (3, 3, 0, "FilterLabel")]
    return _write_lsst(path, cats, rows, spelling,
                       pointers or {"PSF_ID": 1, "PHOTOCALIB_ID": 2}, image)


@pytest.mark.parametrize("spelling", ["_", "."])
def test_gaussian_psf_calibration_and_filter_from_archive(tmp_path, spelling):
    exp = gm.Exposure.read_fits(_gaussian_file(str(tmp_path / "g.fits"), spelling))
    assert isinstance(exp.psf, gm.GaussianPsf)
    assert (exp.psf.width, exp.psf.height, exp.psf.sigma) == (21, 21, 2.0)
    # The stamp is the analytic one: exp(-r^2 / 2 sigma^2), normalised.
    y, x = np.mgrid[-10:11, -10:11]
    g = np.exp(-(x * x + y * y) / 8.0)
    np.testing.assert_allclose(exp.psf.compute_kernel_image(130, 220), g / g.sum(), atol=1e-14)
    assert exp.psf_source == "archive (GaussianPsf)"
    assert exp.photo_calib == 0.25 and exp.filter == "r" and exp.xy0 == (100, 200)
    assert not any(ARCHIVE_POINTER.match(k) for k in exp.meta)


@pytest.mark.parametrize("spelling", ["_", "."])
def test_double_gaussian_psf_from_archive(tmp_path, spelling):
    cats = [_catalog("DoubleGaussianPsf", dimensions_x=("1J", [25]), dimensions_y=("1J", [25]),
                     sigma1=("1D", [1.5]), sigma2=("1D", [4.0]), b=("1D", [0.2]))]
    path = _write_lsst(str(tmp_path / "d.fits"), cats, [(1, 1, 0, "DoubleGaussianPsf")], spelling)
    psf = gm.Exposure.read_fits(path).psf
    assert isinstance(psf, gm.DoubleGaussianPsf)
    assert (psf.width, psf.sigma1, psf.sigma2, psf.b) == (25, 1.5, 4.0, 0.2)
    # Independent: two circular Gaussians, the second b times the first at the peak.
    y, x = np.mgrid[-12:13, -12:13]
    r2 = x * x + y * y
    want = np.exp(-r2 / (2 * 1.5 ** 2)) + 0.2 * np.exp(-r2 / (2 * 4.0 ** 2))
    np.testing.assert_allclose(psf.compute_kernel_image(0, 0), want / want.sum(), atol=1e-12)


def test_kernel_psf_with_off_centre_fixed_kernel(tmp_path):
    # A 4x3 FixedKernel whose centre is pixel (x=1, y=1): padded to 5x5 around it.
    img = np.arange(12, dtype=float).reshape(3, 4) + 1
    cats = [_catalog("KernelPsf", kernel=("1J", [2]), averagePosition=("2D", [[10.0, 20.0]])),
            _catalog("FixedKernel", dimensions=("2J", [[4, 3]]), center=("2J", [[1, 1]]),
                     image=("12D", [img.ravel()]))]
    path = _write_lsst(str(tmp_path / "k.fits"), cats,
                       [(1, 1, 0, "KernelPsf"), (2, 2, 0, "FixedKernel")])
    psf = gm.Exposure.read_fits(path).psf
    stamp = psf.compute_kernel_image(0, 0)
    assert stamp.shape == (5, 5) and psf.average_position == (10.0, 20.0)
    want = np.zeros((5, 5))
    want[1:4, 1:5] = img  # centre (1, 1) of the kernel lands on (2, 2)
    np.testing.assert_allclose(stamp, want / want.sum(), atol=1e-15)


class _Boom:
    """Unpickling this would raise: the test proves the pickle is never loaded."""

    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise AssertionError("the PiffPsf pickle was loaded")


def test_piff_psf_refused_without_unpickling(tmp_path, monkeypatch):
    blob = np.frombuffer(pickle.dumps(_Boom()), dtype=np.uint8)
    cats = [_catalog("PiffPsf", piffPsf=(f"{blob.size}B", [blob]))]
    path = _write_lsst(str(tmp_path / "piff.fits"), cats, [(1, 1, 0, "PiffPsf")])

    def no_unpickling(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    exp = gm.Exposure.read_fits(path)
    assert exp.psf is None
    problem = exp.archive.psf_problem
    assert "PiffPsf" in problem and "--psf piff:" in problem and path in problem
    assert "\n" not in problem
    from gpumatch.pipeline import exposure_psf

    with pytest.raises(gm.errors.GpumatchError, match="PiffPsf"):
        exposure_psf(exp, path)


def test_other_psf_class_named(tmp_path):
    cats = [_catalog("CoaddPsf", dummy=("1J", [0]))]
    path = _write_lsst(str(tmp_path / "c.fits"), cats, [(1, 1, 0, "CoaddPsf")])
    exp = gm.Exposure.read_fits(path)
    assert exp.psf is None and "is a CoaddPsf" in exp.archive.psf_problem


def test_broken_archive_is_one_warning(tmp_path):
    path = _gaussian_file(str(tmp_path / "g.fits"))
    with fits.open(path, mode="update") as h:
        h[0].header["AR_HDU"] = 42
    with pytest.warns(InputWarning, match="afw archive cannot be read"):
        exp = gm.Exposure.read_fits(path)
    assert exp.psf is None and exp.archive is None


def _chebyshev_independent(coeffs, lo, hi, x, y):
    """Chebyshev1Function2D by numpy's chebval2d (term order 1, x, y, x^2, xy, y^2...)."""
    from numpy.polynomial.chebyshev import chebval2d

    n = len(coeffs)
    order = int(round((np.sqrt(8 * n + 1) - 3) / 2))
    c = np.zeros((order + 1, order + 1))
    k = 0
    for total in range(order + 1):
        for j in range(total + 1):
            c[total - j, j] = coeffs[k]
            k += 1
    u = (2 * x - lo[0] - hi[0]) / (hi[0] - lo[0])
    v = (2 * y - lo[1] - hi[1]) / (hi[1] - lo[1])
    return chebval2d(u, v, c)


@needs_calexp
def test_pcapsf_of_the_real_calexp():
    exp = gm.Exposure.read_fits(CALEXP)
    assert exp.xy0 == (1868, 2100) and exp.filter == "i"
    assert exp.psf_source == "archive (PcaPsf)"
    # FLUXMAG0 -> nJy per count: 3631 Jy / FLUXMAG0.
    assert exp.photo_calib == pytest.approx(3631e9 / 104525881029524.0, rel=1e-4)
    assert exp.wcs is not None  # the FITS WCS of the IMAGE header
    # Independent evaluation straight from the tables (HDU 7: functions, 8: images).
    with fits.open(CALEXP) as h:
        funcs, comps = h[7].data, h[8].data
        x, y = 1941.0, 2127.0
        w = [_chebyshev_independent(f["coefficients"], f["min"], f["max"], x, y) for f in funcs]
        want = sum(wk * c["image"].reshape(25, 25) for wk, c in zip(w, comps))
    want = want / want.sum()
    got = exp.psf.compute_kernel_image(x, y)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    # The figures of the data README.
    yy, xx = np.mgrid[:25, :25] - 12.0
    assert abs((got * xx).sum()) < 0.005 and abs((got * yy).sum()) < 0.005
    assert (got * xx * xx).sum() == pytest.approx(5.040, abs=5e-4)
    assert (got * yy * yy).sum() == pytest.approx(5.007, abs=5e-4)
    batch = exp.psf.compute_kernel_images([x, 1880.0], [y, 2190.0])
    np.testing.assert_allclose(batch[0], got, atol=1e-15)
    assert adaptive_moments(batch[1])[2] > 0


# -- PSF search order ---------------------------------------------------------------


def test_psf_search_order(tmp_path):
    from gpumatch.pipeline import exposure_psf, read_exposure_with_psf

    sidecar = os.path.join(DES_PSF, "DECam_00154912_12_psfcat.psf")
    if not os.path.exists(sidecar):
        pytest.skip(f"{sidecar} (DES PSFEx test data) is absent")
    path = _gaussian_file(str(tmp_path / "g.fits"))
    shutil.copy(sidecar, tmp_path / "g.psf")
    # --psf first, then the archive, although a sidecar lies next to the file.
    exp = read_exposure_with_psf(path, "gaussian:sigma=3,size=21")
    assert exp.psf_source == "--psf" and exp.psf.sigma == 3
    exp = read_exposure_with_psf(path)
    assert exp.psf_source == "archive (GaussianPsf)" and exp.psf.sigma == 2
    # An archived PSF that cannot be used gives way to the sidecar.
    cats = [_catalog("CoaddPsf", dummy=("1J", [0]))]
    other = _write_lsst(str(tmp_path / "c.fits"), cats, [(1, 1, 0, "CoaddPsf")])
    shutil.copy(sidecar, tmp_path / "c.psf")
    exp = gm.Exposure.read_fits(other)
    psf, source = exposure_psf(exp, other)
    assert isinstance(psf, gm.PsfexPsf) and source == "file c.psf"


@needs_calexp
@pytest.mark.parametrize("given, source", [(None, "archive (PcaPsf)"),
                                           ("gaussian:fwhm=5.2,size=25", "--psf")])
def test_cli_round_trip_of_the_calexp(tmp_path, capsys, given, source):
    from gpumatch.cli import main

    out = str(tmp_path / "out.fits")
    argv = ["match", CALEXP, "--reference", "gaussian:fwhm=6,size=25", "-o", out]
    assert main(argv + (["--psf", given] if given else [])) == 0
    summary = capsys.readouterr().out
    assert source in summary.splitlines()[-1]
    back = gm.Exposure.read_fits(out)
    # The output's PSF is the reference, written as a GaussianPsf archive entry.
    assert isinstance(back.psf, gm.GaussianPsf) and back.psf_source == "archive (GaussianPsf)"
    assert back.psf.sigma == pytest.approx(6 / (2 * np.sqrt(2 * np.log(2))), rel=1e-12)
    assert back.photo_calib == pytest.approx(3631e9 / 104525881029524.0, rel=1e-4)
    _check_archive_consistent(out)
    with fits.open(out) as h, fits.open(CALEXP) as src:
        names = [n.strip() for n in h[h[0].header["AR_HDU"] - 1].data["name"]]
        assert sorted(names) == ["GaussianPsf", "TanWcs"]
        # The archived WCS is copied through unchanged and still found by its id.
        wcs_hdu = next(x for x in h[4:] if x.header.get("AR_NAME") == "TanWcs")
        _assert_same_rows(wcs_hdu, src[9])
        assert h[0].header["WCS_ID"] == 19


def _assert_same_rows(a, b):
    assert a.columns.names == b.columns.names and len(a.data) == len(b.data)
    for name in a.columns.names:
        x, y = a.data[name], b.data[name]
        if x.dtype.kind in "SU":
            assert [str(v).strip() for v in x] == [str(v).strip() for v in y]
        else:
            np.testing.assert_array_equal(x, y)


def _check_archive_consistent(path):
    """Every pointer card and index row of ``path`` points at something that exists."""
    with fits.open(path) as h:
        hdr = h[0].header
        start = hdr["AR_HDU"] - 1
        index = h[start]
        assert index.header["EXTTYPE"] == "ARCHIVE_INDEX"
        n_cat = index.header["AR_NCAT"]
        # After the archive only a matched exposure's provenance HDUs may follow.
        assert [x.name for x in h[start + n_cat:]] in ([], ["REFPSF", "NOISECORR"])
        for i in range(1, n_cat):
            assert h[start + i].header["AR_CATN"] == i
        col = "cat_archive" if "cat_archive" in index.columns.names else "cat.archive"
        ids = set()
        for row in index.data:
            cat = h[start + row[col]]
            assert row["row0"] + row["nrows"] <= len(cat.data)
            assert cat.header["AR_NAME"] == row["name"].strip()
            ids.add(int(row["id"]))
        for key in hdr:
            if ARCHIVE_POINTER.match(key) and key != "AR_HDU":
                assert hdr[key] in ids, key


# -- outputs ------------------------------------------------------------------------


@needs_calexp
def test_unchanged_exposure_writes_its_archive_as_it_came(tmp_path):
    exp = gm.Exposure.read_fits(CALEXP)
    out = exp.write_fits(str(tmp_path / "same.fits"))
    _check_archive_consistent(out)
    with fits.open(out) as h, fits.open(CALEXP) as src:
        assert len(h) == len(src) == 10
        for i in range(4, 10):
            _assert_same_rows(h[i], src[i])
    back = gm.Exposure.read_fits(out)
    np.testing.assert_array_equal(back.psf.compute_kernel_image(1941, 2127),
                                  exp.psf.compute_kernel_image(1941, 2127))


@needs_calexp
def test_other_reference_models_are_written_as_a_kernel_psf_stamp(tmp_path):
    exp = gm.Exposure.read_fits(CALEXP)
    y, x = np.mgrid[-7:8, -7:8]
    stamp = np.exp(-(x * x / 6.0 + y * y / 3.0))
    exp.psf = gm.ImagePsf(stamp)
    out = exp.write_fits(str(tmp_path / "k.fits"))
    _check_archive_consistent(out)
    back = gm.Exposure.read_fits(out)
    assert back.psf_source == "archive (KernelPsf)"
    np.testing.assert_allclose(back.psf.compute_kernel_image(0, 0), stamp / stamp.sum(),
                               atol=1e-15)


def test_no_archive_pointer_without_its_archive(tmp_path):
    meta = {"PSF_ID": 1, "SKYWCS_ID": 3, "PHOTOCALIB_ID": 4, "EXPINFO_V": 2,
            "ARCHIVE_ID_DETECTOR": 5, "AR_HDU": 5, "OBSID": 7}
    exp = gm.Exposure(np.ones((5, 6)), meta=meta, psf=gm.GaussianPsf(5, 5, 1.0))
    out = exp.write_fits(str(tmp_path / "plain.fits"))
    with fits.open(out) as h:
        assert len(h) == 4 and h[0].header["OBSID"] == 7
        assert not [k for k in h[0].header if ARCHIVE_POINTER.match(k)]


@needs_calexp
def test_dropping_the_archive_drops_its_pointers(tmp_path):
    exp = gm.Exposure.read_fits(CALEXP)
    exp.archive = None
    out = exp.write_fits(str(tmp_path / "noarch.fits"))
    with fits.open(out) as h:
        assert len(h) == 4
        assert not [k for k in h[0].header if ARCHIVE_POINTER.match(k)]
        assert h[0].header["FLUXMAG0"] == 104525881029524.0  # the calibration stays


def _planes_exposure():
    rng = np.random.default_rng(5)
    planes = {"BAD": 0, "SAT": 1, "DETECTED_NEGATIVE": 6, "NO_DATA": 8, "VERY_LONG_PLANE": 12}
    mask = rng.integers(0, 2 ** 13, size=(30, 40)).astype(np.int32)
    return gm.Exposure(rng.normal(size=(30, 40)).astype(np.float32),
                       rng.uniform(1, 2, size=(30, 40)).astype(np.float32), mask,
                       xy0=(7, -3), meta={"BUNIT": "adu", "LONGKEYWORD": 3},
                       mask_planes=planes)


def test_ccddata_reads_variance_as_variance_and_the_mask_bits(tmp_path):
    from astropy.nddata import CCDData, VarianceUncertainty

    exp = _planes_exposure()
    out = exp.write_fits(str(tmp_path / "o.fits"))
    ccd = CCDData.read(out, hdu_uncertainty="VARIANCE", hdu_mask="MASK", hdu_flags="MASK")
    assert isinstance(ccd.uncertainty, VarianceUncertainty)
    np.testing.assert_array_equal(ccd.uncertainty.array, exp.variance)
    np.testing.assert_array_equal(ccd.flags, exp.mask)
    np.testing.assert_array_equal(ccd.mask, exp.mask != 0)
    assert str(ccd.unit) == "adu"


def test_to_ccddata_write_round_trip(tmp_path):
    from astropy.nddata import CCDData

    exp = _planes_exposure()
    path = str(tmp_path / "ccd.fits")
    exp.to_ccddata().write(path, hdu_flags="FLAGS")
    back = gm.Exposure.from_nddata(CCDData.read(path, hdu_flags="FLAGS"))
    np.testing.assert_array_equal(back.mask, exp.mask)
    np.testing.assert_array_equal(back.variance, exp.variance)
    assert back.xy0 == exp.xy0 and back.mask_planes == exp.mask_planes
    assert back.meta["LONGKEYWORD"] == 3


@pytest.mark.parametrize("name, compress", [("o.fits.fz", None), ("o.fits", True)])
def test_compressed_output_is_lossless(tmp_path, name, compress):
    exp = _planes_exposure()
    out = exp.write_fits(str(tmp_path / name), compress=compress)
    with fits.open(out) as h:
        assert [type(x).__name__ for x in h[1:4]] == ["CompImageHDU"] * 3
    back = gm.Exposure.read_fits(out)
    np.testing.assert_array_equal(back.mask, exp.mask)
    np.testing.assert_array_equal(back.variance, exp.variance)
    np.testing.assert_array_equal(back.image, exp.image)
    assert back.xy0 == exp.xy0 and back.mask_planes == exp.mask_planes
    # Random bits do not compress: the point is only that compression is lossless.
    plain = exp.write_fits(str(tmp_path / "plain.fits"))
    assert os.path.getsize(plain) > 0


@needs_calexp
def test_compressed_calexp_output_keeps_its_archive(tmp_path):
    exp = gm.Exposure.read_fits(CALEXP)
    out = exp.write_fits(str(tmp_path / "c.fits.fz"))
    _check_archive_consistent(out)
    assert os.path.getsize(out) < os.path.getsize(CALEXP)
    back = gm.Exposure.read_fits(out)
    np.testing.assert_array_equal(back.mask, exp.mask)
    np.testing.assert_array_equal(back.variance, exp.variance)
    assert back.psf_source == "archive (PcaPsf)"


def test_wcs_only_in_the_archive_is_said_once(tmp_path, recwarn):
    cats = [_catalog("GaussianPsf", dimensions_x=("1J", [11]), dimensions_y=("1J", [11]),
                     sigma=("1D", [1.0])),
            _catalog("TanWcs", crval=("2D", [[80.0, -10.0]]))]
    path = _write_lsst(str(tmp_path / "w.fits"), cats,
                       [(1, 1, 0, "GaussianPsf"), (2, 2, 0, "TanWcs")],
                       pointers={"PSF_ID": 1, "WCS_ID": 2, "FLUXMAG0": 1e12})
    exp = gm.Exposure.read_fits(path)
    said = [w for w in recwarn if issubclass(w.category, InputWarning)]
    assert len(said) == 1 and "only in the afw archive" in str(said[0].message)
    assert exp.wcs is None
    assert exp.photo_calib == pytest.approx(3.631e12 / 1e12, rel=1e-4)
    # Written back, the archived WCS keeps its id and its pointer.
    out = exp.write_fits(str(tmp_path / "w_out.fits"))
    _check_archive_consistent(out)
    assert fits.getheader(out)["WCS_ID"] == 2


def test_origin_in_linear_alternate_wcs_only_unit_per_plane_and_msk_cards(tmp_path):
    planes = []
    for name, data in (("IMAGE", np.zeros((4, 5), np.float32)),
                       ("MASK", np.zeros((4, 5), np.int32)),
                       ("VARIANCE", np.ones((4, 5), np.float32))):
        h = fits.ImageHDU(data, name=name)
        # No LTV cards and no WCSNAMEA: only the linear pixel alternate WCS.
        for k, v in (("CTYPE1A", "LINEAR"), ("CTYPE2A", "LINEAR"), ("CRPIX1A", 1.0),
                     ("CRPIX2A", 1.0), ("CRVAL1A", 1868.0), ("CRVAL2A", 2100.0),
                     ("CUNIT1A", "pixel"), ("CUNIT2A", "pixel"), ("BUNIT", "nJy")):
            h.header[k] = v
        if name == "MASK":
            h.header["MSKN0000"] = "NO_DATA"
            h.header["MSKM0000"] = 256
            h.header["MSKN0001"] = "TWO_BITS"
            h.header["MSKM0001"] = 3
        planes.append(h)
    path = str(tmp_path / "vi.fits")
    fits.HDUList([fits.PrimaryHDU()] + planes).writeto(path)
    with pytest.warns(InputWarning, match="MSKN0001='TWO_BITS' have no one-bit MSKM"):
        exp = gm.Exposure.read_fits(path)
    assert exp.xy0 == (1868, 2100) and exp.meta["BUNIT"] == "nJy"
    assert exp.mask_planes == {"NO_DATA": 8}


def test_compress_with_a_cluster_is_refused_before_any_work(tmp_path, capsys):
    from gpumatch.cli import main

    rc = main(["match", "in.fits", "--reference", "gaussian:fwhm=6,size=25", "--output-dir",
               str(tmp_path / "out"), "--workers", "1", "--compress"])
    assert rc == 2 and "--compress is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
