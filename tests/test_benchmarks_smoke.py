"""The GPU benchmark scripts run end to end, against the fake CuPy.

GPU time is scarce: a benchmark that crashes on its first use wastes a
session's device call. These tests run ``benchmarks/bench_gpu.py`` and
``benchmarks/bench_visit.py`` at tiny sizes against ``tests/fake_cupy/``
(the CUDA sources compiled for the CPU, lazy streams) and check that every
table is written and that the GPU path agreed with the NumPy backend. The
timings they print mean nothing.
"""

from __future__ import annotations

import shutil

import pytest

from fake_cupy import run_installed

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no host C++ compiler for the CUDA emulation")


def _run(script, args):
    return run_installed(f"import {script}; sys.exit({script}.main({args!r}))")


def test_bench_gpu_runs(tmp_path):
    out = tmp_path / "bench_gpu.md"
    stdout = _run("bench_gpu", ["--size", "192", "--repeat", "2", "--cpu-repeat", "1", "--smoke",
                                "--output", str(out)])
    text = out.read_text()
    assert text.strip() in stdout
    for row in ("| stamps (cell set) |", "| normal equations |",
                "| spatial solve on the host (LAPACK) |",
                "| spatial solve on the device (cuSOLVER) |",
                "| application (image+var+mask) |", "| whole run |",
                "| whole run, spatial solve on the ",
                "| spatial solve alone, on the host (LAPACK; system on the device) |",
                "| spatial solve alone, on the device (cuSOLVER; system on the device) |",
                "| fused application (image+variance+mask) |",
                "| application, host arrays, pinned + pipelined copies |"):
        assert row in text, row
    assert "masks identical True / True" in text
    assert "non-finite pixels identical True / True" in text


def test_bench_visit_runs(tmp_path):
    out = tmp_path / "bench_visit.md"
    _run("bench_visit", ["--backend", "cupy", "--exposures", "5", "--pool", "2", "--shape", "160",
                         "200", "--repeat", "1", "--warmup", "1", "--output", str(out)])
    text = out.read_text()
    for row in ("| host-resident (cupy) |", "| host-resident, pinned planes (cupy) |",
                "| device-resident (cupy) |", "| application (image+var+mask) |",
                "host<->device copies", "pageable minus pinned input planes"):
        assert row in text, row
