"""docs/algorithm.md section 9: every error, with a helpful message, and nothing modified."""

import re

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.cellset import cell_centres
from gpumatch.linalg import SymmetricSolution


@pytest.fixture
def run_fails(sec10, unchanged):
    """Run the task expecting ``exc``/``match``; check the exposure afterwards."""

    def check(exc, match, exposure=None, reference=None, kernelSum=1.0, **cfg):
        exposure = sec10.exposure if exposure is None else exposure
        snap = unchanged.snapshot(exposure)
        task = gm.ModelPsfMatchTask(sec10.config(**cfg), backend="numpy")
        with pytest.raises(exc, match=match) as info:
            task.run(exposure, sec10.reference if reference is None else reference,
                     kernelSum=kernelSum)
        unchanged.check(exposure, snap)
        assert isinstance(info.value, gm.GpumatchError) or exc in (TypeError, ValueError)
        return str(info.value)

    return check


def test_no_psf(sec10, run_fails):
    exp = gm.Exposure(sec10.exposure.image, sec10.exposure.variance, sec10.exposure.mask)
    msg = run_fails(RuntimeError, r"no PSF", exposure=exp)
    assert "psf" in msg
    with pytest.raises(gm.MissingPsfError):
        gm.ModelPsfMatchTask(sec10.config(), backend="numpy").buildCellSet(exp, sec10.reference)


def test_insufficient_area():
    # A cell-set region is the bbox grown by one cell on every side, so through
    # run() it always holds at least 2 x 2 cells; the check itself is tested here.
    with pytest.raises(gm.InsufficientAreaError, match=r"insufficient area.*sizeCellX"):
        cell_centres(gm.Box(0, 0, 127, 500), 128, 128)
    with pytest.raises(ValueError, match="insufficient area"):
        cell_centres(gm.Box(0, 0, 500, 40), 128, 41)


def test_kernel_too_big_names_three_remedies(run_fails):
    msg = run_fails(gm.KernelTooLargeError, "kernelSize=11", doAutoPadPsf=False, kernelSize=11)
    # 11-pixel stamps: the largest usable kernel is 9; the padding needed is 2.
    assert "kernelSize=9" in msg
    assert "doAutoPadPsf" in msg
    assert re.search(r"padPsfBy.*\b2\b", msg)


def test_kernel_too_big_with_padding_too_small(run_fails):
    msg = run_fails(ValueError, "kernelSize=15", doAutoPadPsf=False, padPsfBy=2, kernelSize=15)
    assert "kernelSize=11" in msg and re.search(r"padPsfBy.*\b4\b", msg)


def test_odd_pad_psf_by(run_fails):
    run_fails(ValueError, r"padPsfBy=3.*even", doAutoPadPsf=False, padPsfBy=3)


@pytest.mark.parametrize("size", [8, 10, 1, 2, -3])
def test_even_or_too_small_kernel_size(size):
    with pytest.raises(gm.ConfigError, match=r"kernelSize.*odd integer >= 3"):
        gm.ModelPsfMatchConfig(kernelSize=size)


@pytest.mark.parametrize("changes, name", [
    (dict(alardNGauss=2), "alardSigGauss"),
    (dict(alardSigGauss=(1.0, 2.0)), "alardSigGauss"),
    (dict(alardDegGauss=(4, 2, 2, 2)), "alardDegGauss"),
    (dict(alardNGauss=4, alardSigGauss=(1, 2, 3, 4)), "alardDegGauss"),
])
def test_list_lengths(changes, name):
    with pytest.raises(gm.ConfigError, match=name) as info:
        gm.ModelPsfMatchConfig(**changes)
    assert "alardNGauss" in str(info.value)


# --- PSFs that cannot be evaluated at a cell centre ----------------------------------

class _BadAt(gm.Psf):
    """A Gaussian that misbehaves at one parent position (or everywhere)."""

    def __init__(self, mode, where=None, size=11, sigma=2.0):
        self.mode, self.where, self.size, self.sigma = mode, where, size, sigma
        self.calls = []

    def _good(self, n):
        h = n // 2
        v, u = np.mgrid[-h:h + 1, -h:h + 1]
        g = np.exp(-(u ** 2 + v ** 2) / (2 * self.sigma ** 2))
        return g / g.sum()

    def compute_kernel_image(self, x, y):
        self.calls.append((x, y))
        if self.where is not None and (x, y) != self.where:
            return self._good(self.size)
        if self.mode == "raise":
            raise ArithmeticError("model blew up")
        if self.mode == "nan":
            out = self._good(self.size)
            out[3, 4] = np.nan
            return out
        if self.mode == "even":
            return np.full((10, 10), 0.01)
        if self.mode == "empty":
            return np.zeros((0, 0))
        raise AssertionError(self.mode)


# Cell centres of the 256x256 setup: -64, 64, 192, 320 in x and y.
@pytest.mark.parametrize("mode, words", [
    ("raise", r"could not be evaluated.*ArithmeticError"),
    ("nan", r"NaN"),
    ("even", r"even"),
    ("empty", r"empty"),
])
def test_exposure_psf_fails_at_a_cell_centre(sec10, run_fails, mode, words):
    exp = gm.Exposure(sec10.exposure.image, psf=_BadAt(mode, where=(192.0, -64.0)))
    msg = run_fails(gm.PsfEvaluationError, words, exposure=exp)
    assert "x=192" in msg and "y=-64" in msg, msg
    assert "exposure PSF" in msg
    assert isinstance(gm.PsfEvaluationError("x"), RuntimeError)


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_reference_psf_fails_at_a_cell_centre(run_fails, mode):
    msg = run_fails(gm.PsfEvaluationError, "reference PSF",
                    reference=_BadAt(mode, where=(320.0, 320.0), size=13, sigma=3.7))
    assert "x=320" in msg and "y=320" in msg


def test_psf_failing_everywhere(sec10, run_fails):
    exp = gm.Exposure(sec10.exposure.image, psf=_BadAt("raise"))
    msg = run_fails(gm.PsfEvaluationError, "could not be evaluated", exposure=exp)
    assert "x=-64" in msg and "y=-64" in msg   # the first cell centre


# --- FWHM estimation with jittered retries -------------------------------------------

class _FailsAtAverage(_BadAt):
    """Raises exactly at its average position, fine 1 px away."""

    def __init__(self, always=False, **kw):
        super().__init__("raise", **kw)
        self.average_position = (100.0, 150.0)
        self.always = always

    def compute_kernel_image(self, x, y):
        self.calls.append((x, y))
        if self.always or (x, y) == self.average_position:
            raise ArithmeticError("no PSF here")
        return self._good(self.size)


def test_fwhm_retries_jittered_positions(sec10):
    psf = _FailsAtAverage()
    exp = gm.Exposure(sec10.exposure.image, psf=psf)
    task = gm.ModelPsfMatchTask(sec10.config(scaleByFwhm=True, kernelSizeMin=3), backend="numpy")
    res = task.run(exp, gm.GaussianPsf(21, 21, 3.7))
    assert psf.calls[0] == (100.0, 150.0)
    x, y = psf.calls[1]
    assert (x, y) != (100.0, 150.0) and abs(x - 100) <= 2 and abs(y - 150) <= 2
    assert res.metadata["ALBasisMode"] == "convolution"


def test_fwhm_always_failing_raises(sec10, run_fails):
    psf = _FailsAtAverage(always=True)
    exp = gm.Exposure(sec10.exposure.image, psf=psf)
    msg = run_fails(gm.PsfEvaluationError, "FWHM", exposure=exp, scaleByFwhm=True)
    assert "x=100" in msg and "y=150" in msg
    assert "ArithmeticError" in msg or "no PSF here" in msg
    # The average position and 4 jittered ones (within 2 px), from a fixed seed.
    tried = list(psf.calls)
    assert len(tried) == 5 and tried[0] == (100.0, 150.0)
    assert len(set(tried)) == 5
    for x, y in tried:
        assert abs(x - 100) <= 2 and abs(y - 150) <= 2
    psf.calls.clear()
    run_fails(gm.PsfEvaluationError, "FWHM", exposure=exp, scaleByFwhm=True)
    assert psf.calls == tried


# --- NaN solution ----------------------------------------------------------------------

def test_nan_solution(sec10, run_fails, monkeypatch):
    import gpumatch.spatial_solve as ss

    real = ss.solve_symmetric_many

    def poisoned(A, b, condition_type="EIGENVALUE", **kwargs):
        out = []
        for sol in real(A, b, condition_type, **kwargs):
            x = sol.x.copy()
            x[5] = np.nan
            out.append(SymmetricSolution(x, sol.method, sol.condition_number, sol.rank))
        return out

    monkeypatch.setattr(ss, "solve_symmetric_many", poisoned)
    msg = run_fails(gm.SolutionError, r"non-finite", spatialKernelOrder=2)
    # Index 5 with 6 spatial terms: basis 1, spatial term 4.
    assert "index 5" in msg and "basis 1" in msg and "spatial term 4" in msg
    assert re.search(r"condition number [0-9.e+]+", msg)
    assert isinstance(gm.SolutionError("x"), RuntimeError)


# --- other bad inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), "one"])
def test_bad_kernel_sum(run_fails, value):
    run_fails(ValueError, "kernelSum", kernelSum=value)


def test_reference_must_be_a_psf(run_fails):
    run_fails(TypeError, "referencePsfModel", reference=np.ones((11, 11)))


def test_exposure_validation():
    with pytest.raises(ValueError, match="variance"):
        gm.Exposure(np.zeros((5, 5)), variance=np.ones((5, 4)))
    with pytest.raises(ValueError, match="mask"):
        gm.Exposure(np.zeros((5, 5)), mask=np.zeros((5, 5)))   # float mask
    with pytest.raises(ValueError, match="2-d"):
        gm.Exposure(np.zeros(5))
    with pytest.raises(ValueError, match="xy0"):
        gm.Exposure(np.zeros((5, 5)), xy0=(1,))


def test_spatial_solve_option(sec10):
    """A misspelt place is an error on any backend; the NumPy backend solves on
    the host whatever is asked (the option is the GPU backend's) and says so."""
    for bad in ("gpu", "cpu", 1):
        with pytest.raises(ValueError, match="is not one of \\('host', 'device'\\)"):
            gm.ModelPsfMatchTask(sec10.config(), backend="numpy", spatial_solve=bad)
    task = gm.ModelPsfMatchTask(sec10.config(), backend="numpy", spatial_solve="device")
    assert task.spatial_solve == "host"
    with pytest.raises(ValueError, match="spatial_solve='GPU'"):
        task.spatial_solve = "GPU"
    result = task.run(sec10.exposure, sec10.reference)
    assert result.metadata["spatialSolveOn"] == "host"
    with pytest.raises(ValueError, match="spatial_solve='cuda'"):
        gm.match_many([sec10.exposure], sec10.reference, sec10.config(), backend="numpy",
                      spatial_solve="cuda")


def test_data_changing_notices_are_warnings(tmp_path, caplog):
    """What changes a user's data or result reaches warnings.warn as an InputWarning
    (so notebooks see it and filters can escalate it) and the gpumatch log."""
    import logging
    import warnings

    from astropy.io import fits
    from astropy.nddata import NDData

    from gpumatch.io.fits import read_exposure
    from gpumatch.io.nddata import exposure_from_nddata

    image = np.arange(25.0).reshape(5, 5)
    fits.writeto(tmp_path / "plain.fits", image)
    cases = [
        (lambda: exposure_from_nddata(NDData(image)), "using variance = 1"),
        (lambda: read_exposure(tmp_path / "plain.fits"), "plain image without"),
        (lambda: gm.Psf.resized(gm.GaussianPsf(5, 5, 1.0), 7, 7), "zero-padding/cropping"),
        (lambda: gm.ImagePsf(gm.GaussianPsf(5, 5, 1.0).compute_kernel_image(0, 0)).resized(3, 3),
         "ImagePsf resized from 5x5 to 3x3"),
    ]
    for call, text in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gpumatch"):
            with pytest.warns(gm.InputWarning, match=re.escape(text)):
                call()
        assert any(text in r.getMessage() for r in caplog.records)
        with warnings.catch_warnings():
            warnings.simplefilter("error", gm.InputWarning)
            with pytest.raises(gm.InputWarning):
                call()
