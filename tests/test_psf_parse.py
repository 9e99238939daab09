"""parse_psf: reference models from strings or other packages' objects; the adapters."""

import os
import subprocess
import sys

import numpy as np
import pytest

import gpumatch
from gpumatch import DoubleGaussianPsf, GaussianPsf, ImagePsf, PsfexPsf, parse_psf
from gpumatch.psf import GalSimPsf, PiffPsf

DES_PSF = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "des",
                       "DECam_00154912_12_psfcat.psf")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gaussian_forms():
    psf = parse_psf("gaussian:fwhm=7.7,size=23")
    assert isinstance(psf, GaussianPsf)
    assert psf.sigma == pytest.approx(7.7 / 2.3548200450309493, rel=1e-12)
    assert (psf.width, psf.height) == (23, 23)
    assert psf.fwhm() == pytest.approx(7.7, rel=1e-12)
    psf = parse_psf("  Gaussian : sigma = 3.27 , size = 25 ")
    assert psf.sigma == 3.27 and psf.width == 25
    psf = parse_psf("gauss:sigma=2,width=15,height=11")
    assert (psf.width, psf.height) == (15, 11)
    # Default size: the odd number just above 6 sigma.
    assert parse_psf("gaussian:sigma=2.0").width == 13
    assert parse_psf("gaussian:fwhm=7.7").width == 21


def test_double_gaussian_forms():
    psf = parse_psf("doublegaussian:sigma1=3.27,sigma2=8.175,b=0.1,size=23")
    assert isinstance(psf, DoubleGaussianPsf)
    assert (psf.sigma1, psf.sigma2, psf.b, psf.width, psf.height) == (3.27, 8.175, 0.1, 23, 23)
    ref = DoubleGaussianPsf(23, 23, 3.27, 8.175, 0.1)
    np.testing.assert_array_equal(psf.compute_kernel_image(0, 0), ref.compute_kernel_image(0, 0))
    psf = parse_psf("double-gaussian:sigma1=2.0,size=11")
    assert psf.b == 0.0 and psf.width == 11
    assert parse_psf("doublegaussian:sigma1=3.27,sigma2=8.175,b=0.1").width == 51


@pytest.mark.parametrize("spec,why", [
    ("airy:fwhm=4", "unknown model 'airy'"),
    ("moffat:beta=3", "fwhm= is required"),
    ("moffat:fwhm=4,beta=0.5", "beta=0.5 must be > 1"),
    ("gaussian", "expected NAME:PARAMETERS"),
    ("", "expected NAME:PARAMETERS"),
    ("gaussian:fwhm=7.7,sigma=3", "exactly one of fwhm= and sigma="),
    ("gaussian:size=23", "exactly one of fwhm= and sigma="),
    ("gaussian:fwhm=abc", "'abc' is not a number"),
    ("gaussian:fwhm=-1", "must be positive"),
    ("gaussian:fwhm=7.7,size=22", "odd positive integer"),
    ("gaussian:fwhm=7.7,size=23.5", "odd positive integer"),
    ("gaussian:fwhm=7.7,colour=red", "unknown parameter 'colour'"),
    ("gaussian:fwhm=7.7,fwhm=3", "given twice"),
    ("gaussian:fwhm", "is not NAME=VALUE"),
    ("gaussian:fwhm=nan", "not finite"),
    ("doublegaussian:sigma2=8,b=0.1", "sigma1= is required"),
    ("doublegaussian:sigma1=3,b=0.1", "sigma2= is required"),
    ("doublegaussian:sigma1=3,sigma2=8,b=-1", "b=-1 must be >= 0"),
    ("psfex:", "the file name is missing"),
])
def test_bad_strings_are_one_line_errors(spec, why):
    with pytest.raises(ValueError) as info:
        parse_psf(spec)
    msg = str(info.value)
    assert "\n" not in msg
    assert why in msg
    assert repr(spec) in msg
    assert "gaussian:fwhm=F" in msg and "doublegaussian:sigma1=" in msg and "psfex:PATH" in msg


def test_psfex_and_image_forms(tmp_path):
    from astropy.io import fits

    stamp = GaussianPsf(15, 15, 2.0).compute_kernel_image(0, 0) * 7.0
    path = tmp_path / "ref.fits"
    fits.PrimaryHDU(stamp).writeto(path)
    psf = parse_psf(f"image:{path}")
    assert isinstance(psf, ImagePsf)
    np.testing.assert_allclose(psf.compute_kernel_image(3, 4), stamp / 7.0, rtol=1e-12)
    with pytest.raises(FileNotFoundError, match="missing.fits"):
        parse_psf(f"image:{tmp_path / 'missing.fits'}")
    even = tmp_path / "even.fits"
    fits.PrimaryHDU(np.ones((10, 10))).writeto(even)
    with pytest.raises(ValueError, match="even.fits.*odd square"):
        parse_psf(f"image:{even}")
    with pytest.raises(FileNotFoundError, match="nope.psf"):
        parse_psf(f"psfex:{tmp_path / 'nope.psf'}")
    if os.path.exists(DES_PSF):
        psf = parse_psf(f"psfex:{DES_PSF}")
        assert isinstance(psf, PsfexPsf) and psf.dimensions() == (25, 25)


def test_objects_pass_through_or_are_adapted():
    psf = GaussianPsf(11, 11, 2.0)
    assert parse_psf(psf) is psf
    with pytest.raises(TypeError, match="cannot use a int as a PSF model"):
        parse_psf(42)


class _FakeImage:
    def __init__(self, array):
        self.array = array


class _FakePiff:
    """Duck-typed piff.PSF: draw(x, y, chipnum=None, center=..., stamp_size=...)."""

    def __init__(self):
        self.calls = []

    def draw(self, x, y, chipnum=None, center=None, stamp_size=48, **kwargs):
        self.calls.append((x, y, chipnum, center, stamp_size))
        sigma = 1.5 + 0.001 * x
        return _FakeImage(GaussianPsf(stamp_size, stamp_size, sigma).compute_kernel_image(0, 0) * 5)

    def drawStar(self, star):  # pragma: no cover - only marks the interface
        raise NotImplementedError


def test_piff_adapter_with_a_duck_typed_model():
    fake = _FakePiff()
    psf = parse_psf(fake)
    assert isinstance(psf, PiffPsf)
    psf = PiffPsf(fake, size=17, chipnum=3)
    stamp = psf.compute_kernel_image(99.0, 10.0)
    assert fake.calls[-1] == (100.0, 11.0, 3, True, 17)  # 1-based, centred, stamp size
    np.testing.assert_allclose(stamp, GaussianPsf(17, 17, 1.6).compute_kernel_image(0, 0),
                               atol=1e-15)
    assert psf.resized(21, 21).dimensions() == (21, 21)
    with pytest.raises(FileNotFoundError, match="no.piff"):
        PiffPsf.read("no.piff")


def test_adapters_do_not_import_their_packages():
    code = ("import sys, gpumatch\n"
            "from gpumatch.psf import PiffPsf, GalSimPsf, parse_psf\n"
            "assert 'galsim' not in sys.modules and 'piff' not in sys.modules\n"
            "assert 'photutils' not in sys.modules\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_galsim_adapter():
    galsim = pytest.importorskip("galsim")
    prof = galsim.Gaussian(sigma=2.0)
    psf = parse_psf(prof)
    assert isinstance(psf, GalSimPsf)
    sampled = GalSimPsf(prof, size=21, method="no_pixel").compute_kernel_image(0, 0)
    np.testing.assert_allclose(sampled, GaussianPsf(21, 21, 2.0).compute_kernel_image(0, 0),
                               atol=1e-6)
    # With the pixel response (method="auto") the PSF is wider: sigma^2 + 1/12.
    with_pixel = GalSimPsf(prof, size=21).compute_kernel_image(0, 0)
    d = np.arange(21) - 10
    var = (with_pixel.sum(axis=0) * d * d).sum()
    assert var == pytest.approx(4.0 + 1.0 / 12.0, rel=2e-3)
    varying = GalSimPsf(lambda x, y: galsim.Gaussian(sigma=1.0 + x / 100.0), size=25,
                        method="no_pixel")
    stamps = varying.compute_kernel_images([0.0, 100.0], [0.0, 0.0])
    assert stamps.shape == (2, 25, 25)
    np.testing.assert_allclose(stamps[1], GaussianPsf(25, 25, 2.0).compute_kernel_image(0, 0),
                               atol=1e-6)


def test_galsim_des_psfex_matches_psfex_reader():
    galsim = pytest.importorskip("galsim")
    pytest.importorskip("galsim.des")

    if not os.path.exists(DES_PSF):
        pytest.skip(f"DES test data not found at {DES_PSF}")
    ours = PsfexPsf.read(DES_PSF)
    theirs = GalSimPsf(galsim.des.DES_PSFEx(DES_PSF), size=25, method="no_pixel")
    for x, y in ((100.0, 200.0), (1500.0, 3000.0)):
        np.testing.assert_allclose(theirs.compute_kernel_image(x, y),
                                   ours.compute_kernel_image(x, y), atol=1e-6)


def test_exports():
    for name in ("PsfexPsf", "GriddedPsf", "parse_psf", "GalSimPsf", "PiffPsf"):
        assert hasattr(gpumatch, name) and hasattr(gpumatch.psf, name)


def test_real_piff_model(tmp_path):
    piff = pytest.importorskip("piff")
    galsim = pytest.importorskip("galsim")
    model = piff.SimplePSF(model=piff.Gaussian(include_pixel=False), interp=piff.Mean())
    model.interp.mean = np.array([2.0, 0.0, 0.0])  # sigma 2 px, round
    model.wcs = {0: galsim.PixelScale(1.0)}
    model.pointing = None
    path = tmp_path / "model.piff"
    model.write(str(path))
    psf = parse_psf(f"piff:{path}")
    assert isinstance(psf, PiffPsf) and psf.path == str(path)
    psf = PiffPsf.read(path, size=15, chipnum=0)
    np.testing.assert_allclose(psf.compute_kernel_image(100.0, 200.0),
                               GaussianPsf(15, 15, 2.0).compute_kernel_image(0, 0), atol=1e-5)
    assert isinstance(parse_psf(model), PiffPsf)
    bad = tmp_path / "bad.piff"
    bad.write_text("nonsense")
    with pytest.raises(ValueError, match="bad.piff"):
        PiffPsf.read(bad)


def test_forms_table_drives_parsing_errors_and_help():
    """One table (FORMS) holds every string form: parse_psf dispatches on it, its
    errors list its syntaxes, and psf_forms_help() prints one line per syntax."""
    from gpumatch.psf import parse as P

    assert list(P.FORMS) == ["gaussian", "doublegaussian", "moffat", "psfex", "image", "piff",
                             "lsstimages"]
    text = P.psf_forms_help()
    lines = text.splitlines()
    assert len(lines) == 8 and lines[0].startswith("  gaussian:fwhm=F[,size=N]  ")
    for form in P.FORMS.values():
        for syntax in form.syntax.split(" | "):
            assert f"  {syntax} " in text or text.count(f"  {syntax}\n") == 1
    with pytest.raises(ValueError) as err:
        parse_psf("nosuchmodel:x=1")
    assert "unknown model 'nosuchmodel'" in str(err.value)
    assert "moffat:fwhm=F[,beta=B][,size=N] | psfex:PATH.psf" in str(err.value)
    # A new form is one registration: parsed, listed in errors and in the help.
    P.register_form("fixed", P.PsfForm("fixed:sigma=S", "a test form",
                                       lambda spec, body: GaussianPsf(5, 5, float(body[6:]))))
    try:
        psf = parse_psf("Fixed:sigma=1.5")
        assert isinstance(psf, GaussianPsf) and psf.sigma == 1.5 and psf.width == 5
        assert "fixed:sigma=S" in P.psf_forms_help()
        with pytest.raises(ValueError, match=r"\| fixed:sigma=S"):
            parse_psf("gaussian:")
    finally:
        del P.FORMS["fixed"], P._ALIASES["fixed"]
    assert parse_psf("dgauss:sigma1=2").sigma1 == 2.0
