"""The backend self-check (gpumatch/selftest.py) and ``gpumatch selftest``.

NumPy is checked against brute-force answers here; the CuPy path runs behind
the fake CuPy (the CUDA sources compiled for the CPU), once as it is and once
with the normal-equations kernel made to return a value 1e-3 off, which the
check must catch: ``auto`` falls back to NumPy with a BackendWarning, an
explicit ``cupy`` raises.
"""

from __future__ import annotations

import numpy as np
import pytest

from fake_cupy import run_installed
from gpumatch.cli import main
from gpumatch.selftest import SelfCheckReport, StageAgreement, _relative, run_self_check
from gpumatch.task import ModelPsfMatchTask

WRONG = {"GPUMATCH_FAKE_WRONG": "gm_candidate_normal_equations"}


def test_numpy_meets_the_brute_force_answers():
    report = run_self_check(ModelPsfMatchTask, "numpy", "small")
    assert report.passed, report.table()
    by = {a.quantity: a.difference for a in report.agreements}
    # Independent answers: SVD least squares on the stacked design matrix, and the
    # normalised kernel summed over each pixel's footprint.
    assert by["kernel = least-squares optimum"] < 1e-8
    assert by["image = brute-force sum at 256 pixels"] < 1e-6
    assert "agrees" in report.summary()


def test_relative_difference_refuses_moved_non_finite_pixels():
    a = np.array([1.0, np.nan, 2.0])
    assert _relative(a, a.copy()) == 0.0
    assert np.isnan(_relative(a, np.array([1.0, 2.0, np.nan])))  # NaN moved: never passes
    assert not StageAgreement("s", "q", _relative(a, np.array([1.0, np.nan, np.inf]))).passed
    assert _relative(np.array([1.0, 2.0]), np.array([1.0, 2.00002])) == pytest.approx(2e-5 / 2.00002)
    report = SelfCheckReport("cupy", "dev", "small", [StageAgreement("s", "q", 2e-5)], {})
    assert not report.passed and "DISAGREES" in report.summary() and "2e-05" in report.summary()


def test_cli_selftest_numpy(capsys):
    assert main(["selftest", "--backend", "numpy", "--case", "small"]) == 0
    out = capsys.readouterr().out
    assert "least-squares optimum" in out and "agrees" in out and "FAIL" not in out


_AUTO = """
import warnings
import gpumatch.selftest as st
from gpumatch import ModelPsfMatchTask
from gpumatch.errors import BackendWarning
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    task = ModelPsfMatchTask(backend="auto")
    again = ModelPsfMatchTask(backend="auto")
print("BACKEND", task.backend, again.backend)
print("CHECKS", len(st._CHECKED))
print("WARNINGS", [str(w.message) for w in caught if issubclass(w.category, BackendWarning)])
try:
    ModelPsfMatchTask(backend="cupy")
    print("EXPLICIT ok")
except st.SelfCheckError as exc:
    print("EXPLICIT raised", exc)
from gpumatch.cli import main
print("CLI", main(["selftest", "--backend", "cupy", "--case", "small"]))
"""


def test_gpu_backend_that_agrees_is_used():
    out = run_installed(_AUTO)
    assert "BACKEND cupy cupy" in out
    assert "CHECKS 1" in out  # once per process, not per task
    assert "WARNINGS []" in out
    assert "EXPLICIT ok" in out
    assert "CLI 0" in out and "normalEquations" in out and "FAIL" not in out


def test_gpu_backend_that_disagrees_falls_back_or_raises():
    out = run_installed(_AUTO, env=WRONG)
    assert "BACKEND numpy numpy" in out
    # The warning names the stage and the figure (1e-3 relative in b).
    warning = next(line for line in out.splitlines() if line.startswith("WARNINGS"))
    assert "DISAGREES" in warning and "normalEquations b: 0.001" in warning
    assert "using backend 'numpy' instead" in warning
    assert "EXPLICIT raised" in out and "gpumatch selftest --backend cupy" in out
    assert "CLI 1" in out and "FAIL" in out


def test_self_check_can_be_switched_off():
    out = run_installed(_AUTO, env=dict(WRONG, GPUMATCH_SELF_CHECK="0"))
    assert "BACKEND cupy cupy" in out and "CHECKS 0" in out and "EXPLICIT ok" in out
