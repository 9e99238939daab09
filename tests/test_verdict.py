"""The verdict on every result (gpumatch.verdict): good, poor, failed, and what each does.

Cases, each with numbers worked out independently of the code under test:
- good: ``gpumatch example``'s data (Gaussian sigma 2 -> 3) and an identity match;
- poor: the README snippet's PSFs (varying Gaussian -> LSST production double
  Gaussian, 21-pixel kernel, widths 1/2/4.5) on a smaller exposure;
- poor by deconvolution: sigma 3 -> sigma 2 (FWHM = 2 sqrt(2 ln 2) sigma);
- failed: an exposure no larger than the kernel and its edges, an all-NaN input.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.cli import EXIT_FAILED, EXIT_OK, EXIT_POOR, EXIT_USAGE, build_parser, main
from gpumatch.config import ModelPsfMatchConfig
from gpumatch.example import make_fake_exposure
from gpumatch.verdict import (conditioning_threat, match_verdict,
                              valid_pixel_count)

FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))  # FWHM / sigma of a Gaussian


def gpumatch_warnings(caught):
    return [w for w in caught if issubclass(w.category, gm.GpumatchWarning)]


def run_recording(task, exposure, reference, **kw):
    """``task.run`` with every warning recorded (none is filtered away)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = task.run(exposure, reference, **kw)
    return result, gpumatch_warnings(caught)


def example_run(**config):
    """``gpumatch example``'s exposure (sigma 2.0) and reference (sigma 3.0), NumPy."""
    exposure, _ = make_fake_exposure()
    task = gm.ModelPsfMatchTask(ModelPsfMatchConfig(**config), backend="numpy")
    return run_recording(task, exposure, gm.DoubleGaussianPsf(21, 21, 3.0))


def noise_exposure(n, psf, seed=1, fill=None):
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 1.0, (n, n)).astype(np.float32) if fill is None \
        else np.full((n, n), fill, np.float32)
    return gm.Exposure(image, variance=np.ones((n, n), np.float32), psf=psf)


def gaussian_run(exposure_sigma, reference_sigma):
    """LSST's defaults matching a 384x384 noise exposure of a Gaussian PSF to a
    Gaussian reference (widths in pixels), NumPy, every warning recorded."""
    task = gm.ModelPsfMatchTask(backend="numpy")
    return run_recording(task, noise_exposure(384, gm.GaussianPsf(21, 21, exposure_sigma)),
                         gm.GaussianPsf(21, 21, reference_sigma))


def readme_case(on_poor_match="warn", **config):
    """The README snippet's PSFs and configuration on a 512x256 exposure."""
    box = gm.Box(0, 0, 512, 256)
    psf = gm.VaryingGaussianPsf(25, 25, box, sigma=(1.9, 0.1, -0.05), g1=(0.02,), g2=(-0.01,))
    image = np.random.default_rng(0).normal(100.0, 10.0, (256, 512)).astype(np.float32)
    exposure = gm.Exposure(image, variance=np.full_like(image, 100.0), psf=psf)
    reference = gm.DoubleGaussianPsf(23, 23, sigma1=3.27, sigma2=8.175, b=0.1)
    values = dict(kernelSize=21, alardSigGauss=(1.0, 2.0, 4.5))
    values.update(config)
    task = gm.ModelPsfMatchTask(ModelPsfMatchConfig(**values), backend="numpy")
    return exposure, reference, task


def solved_matrix_condition(result):
    """Condition number of the equilibrated spatial system, by SVD (not eigvalsh)."""
    A = np.asarray(result.kernelCellSet.spatial_matrix)
    d = 1.0 / np.sqrt(np.diag(A))
    return np.linalg.cond(A * d[:, None] * d[None, :])


# -- good ---------------------------------------------------------------------------


def test_example_match_is_good_and_warns_nothing():
    result, caught = example_run()
    md = result.metadata
    assert md["matchQuality"] == "good"
    assert md["matchedPsfRelL2Max"] < 1e-3 and abs(md["matchedPsfFwhmRatioWorst"] - 1) < 1e-3
    assert f"{md['matchedPsfRelL2Max']:.3g}" in md["matchQualityReason"]
    assert "maxMatchedPsfResidual=0.01" in md["matchQualityReason"]
    # The raw condition number is far above maxSpatialConditionNumber (the old rule
    # warned), the equilibrated one (checked by SVD) leaves the solution intact.
    assert md["spatialConditionNum"] > 1e12 > ModelPsfMatchConfig().maxSpatialConditionNumber
    assert md["spatialConditionNumEquilibrated"] == pytest.approx(
        solved_matrix_condition(result), rel=1e-2)
    assert md["spatialSolveRank"] == md["numSpatialUnknowns"]
    assert caught == [], [str(w.message) for w in caught]
    # Every interior pixel is valid: (384 - 2 * 10)^2.
    assert md["numValidPixels"] == (384 - 20) ** 2


def test_identity_match_is_good_and_warns_nothing():
    result, caught = gaussian_run(2.0, 2.0)
    md = result.metadata
    assert md["matchQuality"] == "good"
    assert md["matchedPsfFwhmRatioWorst"] == pytest.approx(1.0, abs=1e-3)
    assert caught == [], [str(w.message) for w in caught]


# -- poor ---------------------------------------------------------------------------


def test_readme_case_is_poor_with_the_numbers_and_the_fix(caplog):
    exposure, reference, task = readme_case()
    caplog.set_level(logging.WARNING, logger="gpumatch")
    with pytest.warns(gm.PoorMatchWarning, match="poor match") as caught:
        result = task.run(exposure, reference)
    md = result.metadata
    assert md["matchQuality"] == "poor"
    # The README snippet's match misses by ~20% and a FWHM ~10% too small.
    assert md["matchedPsfRelL2Max"] > 0.1 and md["matchedPsfFwhmRatioWorst"] < 0.95
    reason = md["matchQualityReason"]
    assert f"{md['matchedPsfRelL2Max']:.3g}" in reason
    assert f"{md['matchedPsfFwhmRatioWorst']:.4f}" in reason
    assert "kernelSize=21" in reason and "4.5 px" in reason and "for_psfs" in reason
    assert "deconvolution" not in reason
    assert reason in str(caught[0].message)
    # The same line in the log.
    assert [r for r in caplog.records if reason in r.getMessage()]
    # The output is there all the same.
    assert np.isfinite(np.asarray(result.psfMatchedExposure.image)).sum() == md["numValidPixels"]


def test_thresholds_come_from_the_configuration():
    """The same match judged under other thresholds (no rerun: match_verdict on its metadata)."""
    exposure, reference, task = readme_case()
    result = task.run(exposure, reference, on_poor_match="ignore")
    md = result.metadata
    image = result.psfMatchedExposure.image
    res, ratio = md["matchedPsfRelL2Max"], md["matchedPsfFwhmRatioWorst"]
    loose = ModelPsfMatchConfig(maxMatchedPsfResidual=res * 1.01,
                                maxFwhmError=abs(ratio - 1) * 1.01)
    assert match_verdict(md, loose, image)[0] == "good"
    # Just below either threshold: poor, and the reason names that threshold's value.
    for tight in (loose.copy(maxMatchedPsfResidual=res * 0.99),
                  loose.copy(maxFwhmError=abs(ratio - 1) * 0.99)):
        quality, reason, _ = match_verdict(md, tight, image)
        assert quality == "poor"
        assert f"maxMatchedPsfResidual={tight.maxMatchedPsfResidual:g}" in reason
        assert f"maxFwhmError={tight.maxFwhmError:g}" in reason


def test_deconvolution_is_poor_and_says_so():
    result, caught = gaussian_run(3.0, 2.0)
    md = result.metadata
    assert md["matchQuality"] == "poor"
    reason = md["matchQualityReason"]
    assert reason.startswith("deconvolution")
    # FWHM of the reference (sigma 2) and of the exposure PSF (sigma 3), analytically;
    # the stamps are sampled at pixel centres, hence the 1% tolerance on the printed number.
    ref_fwhm = float(reason.split("reference (FWHM ")[1].split(" px")[0])
    exp_fwhm = float(reason.split("FWHM up to ")[1].split(" px")[0])
    assert ref_fwhm == pytest.approx(2.0 * FWHM, rel=1e-2)
    assert exp_fwhm == pytest.approx(3.0 * FWHM, rel=1e-2)
    np.testing.assert_allclose(md["candidateFwhmExposure"], 3.0 * FWHM, rtol=1e-2)
    assert f"of {md['numKernelCandidates']} candidates" in reason
    assert f"{md['matchedPsfRelL2Max']:.3g}" in reason
    assert any(issubclass(w.category, gm.PoorMatchWarning) and "deconvolution" in str(w.message)
               for w in caught)


# -- failed -------------------------------------------------------------------------


def test_exposure_no_larger_than_the_kernel_fails():
    config = ModelPsfMatchConfig(kernelSize=41, sizeCellX=32, sizeCellY=32)
    task = gm.ModelPsfMatchTask(config, backend="numpy")
    result, caught = run_recording(task, noise_exposure(40, gm.GaussianPsf(15, 15, 1.6)),
                                   gm.GaussianPsf(21, 21, 2.5))
    md = result.metadata
    assert np.isnan(np.asarray(result.psfMatchedExposure.image)).all()
    assert md["matchQuality"] == "failed" and md["numValidPixels"] == 0
    assert "40x40" in md["matchQualityReason"] and "41x41" in md["matchQualityReason"]
    assert any(issubclass(w.category, gm.PoorMatchWarning) and "failed match" in str(w.message)
               for w in caught)


def test_all_nan_input_fails():
    config = ModelPsfMatchConfig(sizeCellX=32, sizeCellY=32)
    task = gm.ModelPsfMatchTask(config, backend="numpy")
    result = task.run(noise_exposure(96, gm.GaussianPsf(15, 15, 1.6), fill=np.nan),
                      gm.GaussianPsf(21, 21, 2.5), on_poor_match="ignore")
    md = result.metadata
    assert md["matchQuality"] == "failed" and md["numValidPixels"] == 0
    # The PSF match itself is fine; the pixels are not.
    assert md["matchedPsfRelL2Max"] < 0.01
    assert f"{(96 - 20) ** 2} interior pixels is NaN" in md["matchQualityReason"]


def test_valid_pixel_count_by_hand():
    image = np.zeros((10, 12))
    image[0, :] = np.nan            # edge: never counted
    image[[2, 3, 5], [4, 4, 9]] = np.nan
    image[4, 6] = np.inf
    # kernel 3: interior 8 x 10 = 80 pixels, 4 of them not finite.
    assert valid_pixel_count(image, 3) == (76, 80)
    assert valid_pixel_count(image, 11) == (0, 0)     # 10 - 2 * 5 = 0 rows
    assert valid_pixel_count(np.zeros((11, 11)), 11) == (1, 1)


# -- on_poor_match --------------------------------------------------------------------


def test_on_poor_match_raise_carries_the_result():
    exposure, reference, task = readme_case()
    with pytest.raises(gm.PoorMatchError, match="poor match: the kernel does not reach") as info:
        task.run(exposure, reference, on_poor_match="raise")
    assert isinstance(info.value, gm.GpumatchError)
    result = info.value.result
    assert result.metadata["matchQuality"] == "poor"
    assert result.psfMatchedExposure.image.shape == (256, 512)


def test_on_poor_match_ignore_is_silent_and_bad_value_refused():
    exposure, reference, task = readme_case()
    result, caught = run_recording(task, exposure, reference, on_poor_match="ignore")
    assert result.metadata["matchQuality"] == "poor"
    assert not [w for w in caught if issubclass(w.category, gm.PoorMatchWarning)]
    with pytest.raises(ValueError, match="on_poor_match='loud'"):
        task.run(exposure, reference, on_poor_match="loud")
    with pytest.raises(ValueError, match="on_poor_match"):
        gm.match_many([exposure], reference, on_poor_match="loud")


def test_match_many_gives_the_same_verdicts_and_obeys_on_poor_match():
    exposure, reference, task = readme_case()
    poor = task.run(exposure, reference, on_poor_match="ignore").metadata
    with pytest.warns(gm.PoorMatchWarning):
        (many,) = gm.match_many([exposure], reference, config=task.config, backend="numpy")
    for key in ("matchQuality", "matchQualityReason", "numValidPixels",
                "spatialConditionNumEquilibrated"):
        assert many.metadata[key] == poor[key], key
    # "raise" with on_error="yield": the error in the poor exposure's place, the others go on.
    got = list(gm.match_many([exposure, exposure], reference, config=task.config,
                             backend="numpy", on_poor_match="raise", on_error="yield"))
    assert [type(g) for g in got] == [gm.PoorMatchError] * 2
    assert got[0].result.metadata["matchQualityReason"] == poor["matchQualityReason"]
    # Ignored: the results themselves.
    (quiet,) = gm.match_many([exposure], reference, config=task.config, backend="numpy",
                             on_poor_match="ignore")
    assert quiet.metadata["matchQuality"] == "poor"


# -- conditioning ---------------------------------------------------------------------


def test_conditioning_threat_rule():
    n = 157
    assert conditioning_threat(1e12, n, n) is None                # gpumatch example
    assert conditioning_threat(0.99 / (n * np.finfo(float).eps), n, n) is None
    why = conditioning_threat(1.01 / (n * np.finfo(float).eps), n, n)
    assert why is not None and f"rank {n} of {n}" in why
    assert "rank 150 of 157" in conditioning_threat(1e10, 150, 157)
    assert conditioning_threat(float("inf"), n, n) is not None
    # The solve's equilibrated condition number, which the rule reads.
    from gpumatch.linalg import solve_symmetric

    diagonal = solve_symmetric(np.diag([4.0, 9.0]), np.ones(2))
    assert diagonal.equilibrated_condition_number == pytest.approx(1.0)   # scaled away
    singular = solve_symmetric(np.array([[1.0, 1.0], [1.0, 1.0]]), np.ones(2))
    assert math.isinf(singular.equilibrated_condition_number)


def test_conditioning_warning_fires_on_an_undetermined_system():
    # Spatial order 5 (21 terms per basis function) from 25 candidates: directions of
    # the spatial system are not determined by the candidates.
    result, caught = example_run(spatialKernelOrder=5)
    md = result.metadata
    cond = [w for w in caught if issubclass(w.category, gm.ConditioningWarning)]
    assert len(cond) == 1
    A = np.asarray(result.kernelCellSet.spatial_matrix)
    d = 1.0 / np.sqrt(np.diag(A))
    lam = np.linalg.eigvalsh(A * d[:, None] * d[None, :])
    n = len(lam)
    independent_rank = int((lam > n * np.finfo(float).eps * lam.max()).sum())
    assert independent_rank < n == md["numSpatialUnknowns"]
    assert f"rank {md['spatialSolveRank']} of {n}" in str(cond[0].message)


# -- the command line -----------------------------------------------------------------


def write_stars(path, n=256, sigma=1.6):
    y, x = np.mgrid[0:n, 0:n].astype(float)
    image = np.random.default_rng(0).normal(0.0, 1.0, (n, n))
    for sx, sy in [(n / 3, n / 3), (2 * n / 3, n / 2)]:
        g = np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * sigma ** 2))
        image += 2e4 * g / g.sum()
    gm.Exposure(image.astype(np.float32), np.ones((n, n), np.float32)).write_fits(str(path))
    return str(path)


def cli(capsys, *args):
    code = main([str(a) for a in args] + ["--backend", "numpy"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


MATCH = ("--psf", "gaussian:sigma=1.6,size=15", "--reference", "gaussian:fwhm=6,size=21")


def row_status(stdout, name):
    return [ln.split()[1] for ln in stdout.splitlines() if ln.split() and ln.split()[0] == name]


def test_cli_exit_codes_good_poor_unusable_failed(tmp_path, capsys):
    good = write_stars(tmp_path / "good.fits")
    out = tmp_path / "out"
    code, stdout, stderr = cli(capsys, "match", good, *MATCH, "--output-dir", out)
    assert code == EXIT_OK == 0, stderr
    assert row_status(stdout, "good.fits") == ["ok"]
    assert gm.Exposure.read_fits(str(out / "good.fits")).meta["GPM_QUAL"] == "good"
    # A 7-pixel kernel cannot take sigma 1.6 to 2.55: poor, written, exit 3.
    code, stdout, stderr = cli(capsys, "match", good, *MATCH, "-o", tmp_path / "poor.fits",
                               "--set", "kernelSize=7")
    assert code == EXIT_POOR == 3, stderr
    assert row_status(stdout, "good.fits") == ["POOR"]
    lines = [ln for ln in stdout.splitlines() if ln.startswith(f"POOR {good}: ")]
    assert len(lines) == 1 and "kernelSize=7" in lines[0] and "FAILED" not in stdout
    assert "1 of 1 matches are poor" in stderr
    assert gm.Exposure.read_fits(str(tmp_path / "poor.fits")).meta["GPM_QUAL"] == "poor"
    # An exposure no larger than the kernel: UNUSABLE (not FAILED), written, exit 3;
    # with an input that fails with an error beside it: exit 1.
    tiny = write_stars(tmp_path / "tiny.fits", n=40, sigma=1.6)
    small = ("--set", "kernelSize=41", "--set", "sizeCellX=32", "--set", "sizeCellY=32")
    code, stdout, stderr = cli(capsys, "match", tiny, *MATCH, *small, "--output-dir",
                               tmp_path / "o2")
    assert code == EXIT_POOR, stderr
    assert row_status(stdout, "tiny.fits") == ["UNUSABLE"]
    assert any(ln.startswith(f"UNUSABLE {tiny}: no valid output pixel") for ln in
               stdout.splitlines())
    assert os.path.exists(tmp_path / "o2" / "tiny.fits")
    code, stdout, stderr = cli(capsys, "match", tiny, tmp_path / "missing.fits", *MATCH, *small,
                               "--output-dir", tmp_path / "o3")
    assert code == EXIT_FAILED == 1
    assert row_status(stdout, "tiny.fits") == ["UNUSABLE"]
    assert row_status(stdout, "missing.fits") == ["FAILED"]
    # A bad configuration: nothing matched, exit 2.
    code, _, stderr = cli(capsys, "match", good, *MATCH, "-o", tmp_path / "x.fits",
                          "--set", "maxFwhmError=0")
    assert code == EXIT_USAGE == 2 and "maxFwhmError" in stderr


def test_cli_help_lists_the_exit_codes():
    text = build_parser().format_help()
    for code in ("0  every match is good", "1  at least one input failed", "2  bad command",
                 "3  no errors, but at least one match is POOR"):
        assert code in text, text


def test_worker_rows_carry_the_verdict_and_resume_keeps_it(tmp_path):
    """What ``--workers``/``--scheduler`` run on each file (no cluster needed)."""
    from gpumatch.cli import _exit_code
    from gpumatch.distributed import format_summary, match_one

    good = write_stars(tmp_path / "a.fits")
    out = str(tmp_path / "a_out.fits")
    config = ModelPsfMatchConfig(kernelSize=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = match_one(good, MATCH[3], out, psf=MATCH[1], config=config, backend="numpy")
    assert not gpumatch_warnings(caught)  # said in the row, not by the worker
    assert row["status"] == "ok" and row["verdict"] == "poor" and "kernelSize=7" in \
        row["verdict_reason"]
    again = match_one(good, MATCH[3], out, psf=MATCH[1], config=config, backend="numpy")
    assert again["status"] == "skipped" and again["verdict"] == "poor"
    table = format_summary([row, again])
    assert row_status(table, "a.fits") == ["POOR", "POOR"]
    assert _exit_code([row, again]) == EXIT_POOR
    assert _exit_code([dict(row, verdict="good"), again | {"status": "failed"}]) == EXIT_FAILED
