"""The example command: the reference's documented example on fake data."""

import os

import numpy as np
import pytest

from gpumatch import DoubleGaussianPsf
from gpumatch.cli import main
from gpumatch.example import make_fake_exposure, run_example, star_quality


def test_fake_exposure_layout():
    exposure, positions = make_fake_exposure()
    assert exposure.image.shape == (384, 384)
    assert len(positions) == 9
    # Stars at the centres of the 128-pixel cells, with the exposure PSF.
    np.testing.assert_array_equal(np.unique(positions[:, 0]), [64, 192, 320])
    assert exposure.psf.sigma1 == 2.0 and exposure.psf.width == 21
    img = np.asarray(exposure.image, float)
    for x, y in positions.astype(int):
        assert img[y, x] == img[y - 12:y + 13, x - 12:x + 13].max()


def test_example_matches_reference():
    result, lines = run_example(backend="numpy")
    md = result.metadata
    assert md["numUsedCandidates"] == 25  # (384 + 2 * 128) / 128 = 5 cells a side
    assert md["spatialKernelSum"] == pytest.approx(1.0, abs=1e-9)
    assert md["matchedPsfRelL2Max"] < 1e-3
    # Stars in the matched image have the reference width (sigma 3 px).
    rel, sig = star_quality(result.psfMatchedExposure, make_fake_exposure()[1],
                            DoubleGaussianPsf(21, 21, 3.0))
    np.testing.assert_allclose(sig, 3.0, rtol=2e-3)
    assert rel.max() < 5e-3
    text = "\n".join(lines)
    for key in ("solve time", "apply time", "kernel sum", "condition no.", "candidates",
                "matched stars vs reference"):
        assert key in text


def test_example_command_prints_report(capsys):
    assert main(["example", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "kernel sum    : 1.000000" in out
    assert "25 used of 25" in out


def test_example_debug_saves_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["example", "--backend", "numpy", "--debug", str(tmp_path)]) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["cells.png", "kernel_basis.png", "kernel_mosaic.png", "residual_map.png",
                     "spatial_coefficients.png"]
    for n in names:
        with open(tmp_path / n, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
