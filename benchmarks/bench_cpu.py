"""Stage-by-stage timing of ModelPsfMatchTask on the NumPy backend.

Usage: python benchmarks/bench_cpu.py [--size 2048] [--repeat 5]

Prints the workload, the machine and the median (and min/max) of each stage
over the repeats: cell set (PSF stamps), normal equations, spatial solve and
application (image, variance and mask, exactly per pixel).
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
    args = p.parse_args(argv)

    exposure = production_exposure(args.size)
    reference = production_reference()
    config = production_config()
    task = ModelPsfMatchTask(config, backend=args.backend)
    # The verdict is printed below, not warned once per run.
    task.run(exposure, reference, on_poor_match="ignore")  # warm-up: imports, FFT plans
    rows = {name: [] for name, _ in STAGES}
    walls = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = task.run(exposure, reference, on_poor_match="ignore")
        walls.append(time.perf_counter() - t0)
        for name, _ in STAGES:
            rows[name].append(result.metadata["timings"][name])
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
