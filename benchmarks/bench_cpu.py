"""Stage-by-stage timing of ModelPsfMatchTask on the NumPy backend.

Usage: python benchmarks/bench_cpu.py [--size 2048] [--repeat 5] [--baseline] [--old PATH]

Prints the workload, the machine and the median (and min/max) of each stage
over the repeats: cell set (PSF stamps), normal equations, spatial solve and
application (image, variance and mask, exactly per pixel).

``--baseline`` adds, measured in the same run and interleaved with gpumatch's
runs, what a user might do by hand: one constant matching kernel from
photutils (``photutils.psf_matching.make_kernel`` of the exposure PSF at the
centre and the reference, TopHatWindow(0.35)) applied to image and variance
with ``scipy.signal.fftconvolve`` (``pip install photutils``), and the ratio
of gpumatch's whole run to it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import (machine_description, production_config, production_exposure,  # noqa: E402
                       production_reference)

from gpumatch import ModelPsfMatchTask  # noqa: E402

STAGES = [("cellSet", "cell set (stamps)"), ("normalEquations", "normal equations"),
          ("spatialSolve", "spatial solve"), ("apply", "apply (image+var+mask)"),
          ("quality", "matched-PSF quality")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048, help="exposure side in pixels")
    p.add_argument("--repeat", type=int, default=5, help="timed runs (after one warm-up)")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy", "auto"))
    p.add_argument("--baseline", action="store_true",
                   help="also time a constant photutils kernel + scipy.signal.fftconvolve")
    p.add_argument("--old", help="an older gpumatch/apply.py (e.g. saved from `git show "
                   "main:gpumatch/apply.py`) whose application is timed too, interleaved")
    args = p.parse_args(argv)
    swap = _application_swapper(args.old) if args.old else None

    exposure = production_exposure(args.size)
    reference = production_reference()
    config = production_config()
    task = ModelPsfMatchTask(config, backend=args.backend)
    # The verdict is printed below, not warned once per run.
    task.run(exposure, reference, on_poor_match="ignore")  # warm-up: imports, FFT plans
    baseline = constant_kernel_baseline(exposure, reference) if args.baseline else None
    rows = {name: [] for name, _ in STAGES}
    walls, base_walls, old_walls, old_apply = [], [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = task.run(exposure, reference, on_poor_match="ignore")
        walls.append(time.perf_counter() - t0)
        for name, _ in STAGES:
            rows[name].append(result.metadata["timings"][name])
        if baseline is not None:
            t0 = time.perf_counter()
            baseline()
            base_walls.append(time.perf_counter() - t0)
        if swap is not None:
            with swap():
                t0 = time.perf_counter()
                old = task.run(exposure, reference, on_poor_match="ignore")
                old_walls.append(time.perf_counter() - t0)
                old_apply.append(old.metadata["timings"]["apply"])
    md = result.metadata
    print(f"workload: {args.size}x{args.size} float32 exposure, VaryingGaussianPsf 25x25, reference "
          f"{reference!r}")
    print(f"          kernelSize {md['ALKernelSize']}, sigmas {md['ALBasisSigGauss']}, degrees "
          f"{md['ALBasisDegGauss']}, spatial order {config.spatialKernelOrder}, "
          f"{md['numKernelCandidates']} candidates, {md['psfSize']}x{md['psfSize']} stamps")
    print(f"machine:  {machine_description()}")
    print(f"backend:  {md['backend']}, {args.repeat} runs after a warm-up")
    print(f"verdict:  {md['matchQuality']}: {md['matchQualityReason']} (equilibrated condition "
          f"number {md['spatialConditionNumEquilibrated']:.3g})")
    print()
    print(f"| {'stage':<24} | {'median ms':>9} | {'min ms':>8} | {'max ms':>8} |")
    print(f"|{'-' * 26}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    for name, label in STAGES + [("total", "whole run")]:
        v = np.array(walls if name == "total" else rows[name]) * 1e3
        print(f"| {label:<24} | {np.median(v):9.1f} | {v.min():8.1f} | {v.max():8.1f} |")
    if base_walls:
        v = np.array(base_walls) * 1e3
        print(f"| {'constant-kernel baseline':<24} | {np.median(v):9.1f} | {v.min():8.1f} "
              f"| {v.max():8.1f} |")
        print(f"\nwhole run / baseline (medians): {np.median(walls) / np.median(base_walls):.2f}x "
              "(baseline: photutils make_kernel + scipy.signal.fftconvolve of image and "
              "variance, one kernel for the whole exposure, mask not propagated)")
    if old_walls:
        v, a = np.array(old_walls) * 1e3, np.array(old_apply) * 1e3
        print(f"| {'whole run, old apply':<24} | {np.median(v):9.1f} | {v.min():8.1f} "
              f"| {v.max():8.1f} |")
        print(f"| {'apply, old':<24} | {np.median(a):9.1f} | {a.min():8.1f} | {a.max():8.1f} |")
    print(f"\nload average after the runs: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


def _application_swapper(path):
    """A context manager under which the task applies kernels with the
    ``convolve_planes`` of another apply.py (old and new interleaved in one
    process, so both see the same load)."""
    import contextlib
    import importlib.util

    import gpumatch.apply

    spec = importlib.util.spec_from_file_location("gpumatch._old_apply", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)

    @contextlib.contextmanager
    def swap():
        new = gpumatch.apply.convolve_planes
        gpumatch.apply.convolve_planes = old.convolve_planes
        try:
            yield
        finally:
            gpumatch.apply.convolve_planes = new

    return swap


def constant_kernel_baseline(exposure, reference):
    """What a user might do by hand, as a function to time: one photutils
    matching kernel from the PSFs at the exposure centre, applied to image and
    variance (kernel squared) with FFT convolutions."""
    import scipy.signal
    from photutils.psf_matching import TopHatWindow, make_kernel

    cx, cy = exposure.bbox.center
    source = exposure.psf.compute_kernel_image(cx, cy)
    target = reference.compute_kernel_image(cx, cy)
    n = max(source.shape[0], target.shape[0])
    source = np.pad(source, (n - source.shape[0]) // 2)
    target = np.pad(target, (n - target.shape[0]) // 2)
    image, variance = exposure.image, exposure.variance

    def run():
        kernel = make_kernel(source, target, window=TopHatWindow(0.35))
        return (scipy.signal.fftconvolve(image, kernel.astype(image.dtype), mode="same"),
                scipy.signal.fftconvolve(variance, (kernel ** 2).astype(variance.dtype),
                                         mode="same"))

    run()  # warm-up
    return run


if __name__ == "__main__":
    sys.exit(main())
