"""docs/algorithm.md section 10 (the reference's own tests) and section 8 (metadata, logging).

Setup throughout: 256x256 exposure, exposure PSF DoubleGaussianPsf(11, 11, 2.0),
reference DoubleGaussianPsf(11, 11, 3.7), kernelSize = kernelSizeMin = 9,
scaleByFwhm = False (see the ``sec10`` fixture in conftest.py).
"""

import logging
import re

import numpy as np
import pytest

import gpumatch as gm

POSITIONS = [(0.0, 0.0), (127.5, 127.5), (255.0, 0.0), (40.0, 200.0), (255.0, 255.0),
             (-100.0, 300.0)]


def _run(sec10, reference=None, kernelSum=1.0, **cfg):
    task = gm.ModelPsfMatchTask(sec10.config(**cfg), backend="numpy")
    return task.run(sec10.exposure, sec10.reference if reference is None else reference,
                    kernelSum=kernelSum)


def test_setup_is_the_reference_setup(sec10):
    assert sec10.exposure.image.shape == (256, 256)
    assert 256 == 2 * sec10.config().sizeCellX
    psf = sec10.exposure.psf
    assert (psf.sigma1, psf.dimensions()) == (2.0, (11, 11))
    assert (sec10.reference.sigma1, sec10.reference.dimensions()) == (3.7, (11, 11))
    cfg = sec10.config()
    assert (cfg.kernelSize, cfg.kernelSizeMin, cfg.scaleByFwhm) == (9, 9, False)


def test_kernel_too_big_raises(sec10, unchanged):
    snap = unchanged.snapshot(sec10.exposure)
    with pytest.raises(ValueError, match="kernelSize") as info:
        _run(sec10, doAutoPadPsf=False, kernelSize=11)
    assert isinstance(info.value, gm.KernelTooLargeError)
    unchanged.check(sec10.exposure, snap)


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("kernel_sum", [0.5, 1.0, 2.7])
def test_kernel_sum(sec10, order, kernel_sum):
    res = _run(sec10, kernelSum=kernel_sum, spatialKernelOrder=order)
    kernel = res.psfMatchingKernel
    for x, y in POSITIONS:
        assert round(kernel.compute_image(x, y).sum() - kernel_sum, 7) == 0, (x, y)
    assert res.metadata["spatialKernelSum"] == pytest.approx(kernel_sum, abs=1e-7)
    assert kernel.kernel_sum == kernel_sum
    if order == 1:
        # Order 1 really varies, yet the sum is the same everywhere.
        assert np.abs(kernel.compute_image(0, 0) - kernel.compute_image(255, 255)).max() > 1e-6


def test_no_auto_padding_keeps_exposure_psf_size(sec10):
    reference = gm.DoubleGaussianPsf(13, 13, 3.7)
    res = _run(sec10, reference=reference, doAutoPadPsf=False)
    for psf in (res.referencePsfModel, res.psfMatchedExposure.psf):
        assert psf.dimensions() == (11, 11)
        assert psf.compute_kernel_image(100, 100).shape == (11, 11)
        assert psf.sigma1 == 3.7
    assert res.psfMatchedExposure.psf is res.referencePsfModel
    assert res.kernelCellSet.psf_size == 11


def test_auto_padding_output_psf_width(sec10, ref):
    res = _run(sec10)  # doAutoPadPsf=True by default
    assert ref.next_odd(9 * 1.4) == 13
    psf = res.psfMatchedExposure.psf
    assert psf.dimensions() == (13, 13)
    assert psf.compute_kernel_image(3, 4).shape == (13, 13)
    assert psf.sigma1 == 3.7
    assert res.metadata["psfSize"] == 13 and res.metadata["psfPadding"] == 2


@pytest.mark.parametrize("pad", [0, 2, 4])
def test_pad_psf_by_even(sec10, pad):
    res = _run(sec10, doAutoPadPsf=False, padPsfBy=pad)
    width = 11 + pad
    assert res.psfMatchedExposure.psf.dimensions() == (width, width)
    assert res.referencePsfModel.compute_kernel_image(0, 0).shape == (width, width)
    assert res.kernelCellSet.psf_size == width


@pytest.mark.parametrize("pad", [1, 3, 5])
def test_pad_psf_by_odd_raises(sec10, pad, unchanged):
    snap = unchanged.snapshot(sec10.exposure)
    with pytest.raises(ValueError, match="padPsfBy"):
        _run(sec10, doAutoPadPsf=False, padPsfBy=pad)
    unchanged.check(sec10.exposure, snap)


def test_visit_info_carried_unchanged(sec10):
    before = sec10.exposure.visit_info
    copy = type(before)(before.exposure_time, before.date)
    res = _run(sec10)
    out = res.psfMatchedExposure
    assert out.visit_info is before
    assert out.visit_info == copy
    assert out.visit_info.exposure_time == 30.0 and out.visit_info.date == "2024-01-01T00:00:00"


# --- section 8: metadata and logging ---------------------------------------------

def test_metadata(sec10):
    res = _run(sec10, spatialKernelOrder=1)
    md = res.metadata
    for key in ("spatialConditionNum", "spatialKernelSum", "ALBasisNGauss", "ALBasisDegGauss",
                "ALBasisSigGauss", "ALKernelSize", "ALBasisMode"):
        assert key in md, key
    assert md["ALBasisNGauss"] == 3 and list(md["ALBasisDegGauss"]) == [4, 2, 2]
    assert list(md["ALBasisSigGauss"]) == [0.7, 1.5, 3.0]
    assert md["ALKernelSize"] == 9 and md["ALBasisMode"] == "config"
    assert md["numKernelCandidates"] == 16 == md["numUsedCandidates"]
    assert md["numRejectedCandidates"] == 0
    assert md["spatialKernelSum"] == pytest.approx(1.0, abs=1e-12)
    assert md["spatialConditionNum"] > 1.0


def _records(caplog, level):
    return [r for r in caplog.records if r.name == "gpumatch" and r.levelno == level]


def test_logs_kernel_sum_and_condition_number(sec10, caplog):
    caplog.set_level(logging.INFO, logger="gpumatch")
    res = _run(sec10, kernelSum=2.7)
    md = res.metadata
    number = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    found = False
    for r in _records(caplog, logging.INFO):
        msg = r.getMessage()
        ks = re.search(r"kernel sum\D*?" + number, msg)
        cn = re.search(r"condition number\D*?" + number, msg)
        if ks and cn:
            assert float(ks.group(1)) == pytest.approx(2.7, rel=1e-5)
            assert float(cn.group(1)) == pytest.approx(md["spatialConditionNum"], rel=1e-3)
            found = True
    assert found, [r.getMessage() for r in caplog.records]


def _warnings(caplog, word):
    return [r.getMessage() for r in _records(caplog, logging.WARNING) if word in r.getMessage()]


def test_logs_above_max_condition_number(sec10, caplog):
    """Above maxSpatialConditionNumber the raw condition number is logged (INFO);
    the warning (a ConditioningWarning) is decided on the equilibrated system
    alone (tests/test_verdict.py), whatever maxSpatialConditionNumber says: raw
    numbers of 5e12 are routine for Alard-Lupton bases with excellent matches."""
    caplog.set_level(logging.INFO, logger="gpumatch")
    with pytest.warns(gm.ConditioningWarning) as strict:
        res = _run(sec10, spatialKernelOrder=1, maxSpatialConditionNumber=1.0)
    assert res.metadata["spatialConditionNum"] > 1.0
    above = [r.getMessage() for r in _records(caplog, logging.INFO)
             if "maxSpatialConditionNumber" in r.getMessage()]
    assert len(above) == 1 and "equilibrated" in above[0], above
    caplog.clear()
    with pytest.warns(gm.ConditioningWarning) as lax:
        _run(sec10, spatialKernelOrder=1, maxSpatialConditionNumber=1e300)
    assert not [r for r in caplog.records if "maxSpatialConditionNumber" in r.getMessage()]
    # The section 10 setup (9x9 kernel, 3x3-pixel good regions) leaves directions of
    # the spatial system undetermined: warned about at any maxSpatialConditionNumber.
    assert [str(w.message) for w in strict] == [str(w.message) for w in lax]
    assert res.metadata["spatialSolveRank"] < res.metadata["numSpatialUnknowns"]


@pytest.mark.parametrize("order, expect", [
    (1, None),                    # 3 terms, 16 candidates > 2 x 3
    (2, None),                    # 6 terms, 16 > 12
    (3, "poorly constrained"),    # 10 terms, 10 <= 16 <= 20
    (5, "under-constrained"),     # 21 terms > 16 candidates
])
def test_warns_for_weakly_constrained_spatial_model(sec10, caplog, order, expect):
    caplog.set_level(logging.INFO, logger="gpumatch")
    res = _run(sec10, spatialKernelOrder=order, maxSpatialConditionNumber=1e300)
    assert res.metadata["numUsedCandidates"] == 16
    for word in ("poorly constrained", "under-constrained"):
        msgs = _warnings(caplog, word)
        if word == expect:
            assert len(msgs) == 1, msgs
        else:
            assert not msgs, msgs
    assert np.all(np.isfinite(res.psfMatchingKernel.spatial_coefficients))


def test_logger_name():
    assert logging.getLogger("gpumatch").handlers  # a NullHandler is installed
    import gpumatch.task
    assert gpumatch.task.log.name == "gpumatch"
