"""Serial versus a local Dask cluster: whole files (read, match, write).

Usage: python benchmarks/bench_distributed.py [--files 8] [--size 2048] [--workers 2]

Writes ``--files`` production exposures (benchmarks/workloads.py) as FITS to a
temporary directory, then times

- serial: ``gpumatch.pipeline.match_file`` on each file in turn in this
  process (what ``gpumatch match`` does without ``--workers``), and again in a
  child process with one BLAS thread, as Dask workers run (gpumatch limits
  BLAS to one thread inside a run, so both should agree to the bit);
- dask: ``gpumatch.distributed.match_files`` on a ``LocalCluster`` of
  ``--workers`` processes with one thread each, already started (its start-up
  time is printed apart),

checks that the Dask outputs equal the serial ones, and prints the speed-ups.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import (machine_description, production_config, production_exposure,  # noqa: E402
                       production_reference)

from gpumatch import Exposure, ModelPsfMatchTask  # noqa: E402
from gpumatch.pipeline import match_file  # noqa: E402


def _difference(a, b):
    """Largest relative difference of the image planes (0.0: identical planes)."""
    ea, eb = Exposure.read_fits(a), Exposure.read_fits(b)
    if not np.array_equal(ea.mask, eb.mask):
        return float("inf")
    worst = 0.0
    for x, y in ((ea.image, eb.image), (ea.variance, eb.variance)):
        if np.array_equal(x, y, equal_nan=True):
            continue
        finite = np.isfinite(y)
        if not np.array_equal(np.isfinite(x), finite) or \
                not np.array_equal(x[~finite], y[~finite], equal_nan=True):
            return float("inf")
        a, b = x[finite].astype(np.float64), y[finite].astype(np.float64)
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    return worst


def _serial(inputs, out_dir, reference, psf, config, backend):
    """Match ``inputs`` one after the other into ``out_dir``; wall seconds."""
    os.makedirs(out_dir)
    task = ModelPsfMatchTask(config, backend=backend)
    task.run(production_exposure(256, seed=99), reference)  # warm-up: imports, FFT plans
    t0 = time.perf_counter()
    for path in inputs:
        match_file(path, reference, os.path.join(out_dir, os.path.basename(path)), psf=psf,
                   task=task)
    return time.perf_counter() - t0, task


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serial-child", nargs=2, metavar=("INPUT_DIR", "OUT_DIR"),
                   help=argparse.SUPPRESS)
    p.add_argument("--files", type=int, default=8, help="number of exposures")
    p.add_argument("--size", type=int, default=2048, help="exposure side in pixels")
    p.add_argument("--workers", type=int, default=2, help="local Dask worker processes")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy", "auto"))
    p.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    config = production_config()
    reference = production_reference()
    if args.serial_child:
        in_dir, out_dir = args.serial_child
        inputs = sorted(os.path.join(in_dir, f) for f in os.listdir(in_dir) if f.endswith(".fits"))
        psf = production_exposure(args.size).psf  # the model of every input
        wall, _ = _serial(inputs, out_dir, reference, psf, config, args.backend)
        print(wall)
        return 0

    from distributed import Client, LocalCluster

    from gpumatch.distributed import match_files

    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        in_dir = os.path.join(root, "in")
        os.makedirs(in_dir)
        inputs = []
        psf = None
        for i in range(args.files):
            exposure = production_exposure(args.size, seed=i)
            psf = exposure.psf  # the same model for every seed
            path = os.path.join(in_dir, f"exp{i:03d}.fits")
            exposure.write_fits(path)
            inputs.append(path)
        serial_dir = os.path.join(root, "serial")
        serial1_dir = os.path.join(root, "serial1")
        dask_dir = os.path.join(root, "dask")
        serial, task = _serial(inputs, serial_dir, reference, psf, config, args.backend)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--backend",
                                args.backend, "--size", str(args.size), "--serial-child",
                                in_dir, serial1_dir], env=env, capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"serial child failed:\n{child.stderr[-3000:]}")
        serial1 = float(child.stdout.strip().splitlines()[-1])

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        client.wait_for_workers(args.workers)
        client.run(lambda: __import__("gpumatch.distributed"))
        startup = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            rows = match_files(inputs, reference, dask_dir, client=client, psf=psf,
                               config=config, backend=args.backend, progress=False)
            dask_wall = time.perf_counter() - t0
        finally:
            client.close()
            cluster.close()
        bad = [r for r in rows if r["status"] != "ok"]
        if bad:
            raise SystemExit(f"{len(bad)} files failed: {bad[0]['error']}")
        diff = max(_difference(os.path.join(serial_dir, os.path.basename(p)),
                               os.path.join(dask_dir, os.path.basename(p))) for p in inputs)
        diff1 = max(_difference(os.path.join(serial1_dir, os.path.basename(p)),
                                os.path.join(dask_dir, os.path.basename(p))) for p in inputs)
        md = task.metadata

    print(f"workload: {args.files} files of {args.size}x{args.size} float32 (image, mask, "
          f"variance), VaryingGaussianPsf 25x25, reference {reference!r}")
    print(f"          kernelSize {md['ALKernelSize']}, degrees {md['ALBasisDegGauss']}, spatial "
          f"order {config.spatialKernelOrder}, {md['numKernelCandidates']} candidates per file; "
          f"read + match + atomic write per file")
    print(f"machine:  {machine_description()}")
    print(f"backend:  {md['backend']}; dask workers: {args.workers} processes x 1 thread "
          f"(cluster start-up {startup:.1f} s, not counted)")
    same1 = "identical to" if diff1 == 0.0 else f"differ by {diff1:.2g} (relative) from"
    same = ("identical to" if diff == 0.0 else
            f"differ by {diff:.2g} (relative, BLAS thread count changed the rounding) from")
    print(f"pixels:   dask outputs {same1} the serial outputs with 1 BLAS thread; "
          f"{same} those with default BLAS threads")
    print()
    rows = (("serial, default BLAS threads", serial), ("serial, 1 BLAS thread", serial1),
            (f"dask, {args.workers} local workers", dask_wall))
    print(f"| {'mode':<30} | {'wall s':>7} | {'s / file':>8} | {'speed-up vs serial':>18} "
          f"| {'vs serial 1 thread':>18} |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 10}|{'-' * 20}|{'-' * 20}|")
    for label, wall in rows:
        print(f"| {label:<30} | {wall:7.2f} | {wall / args.files:8.2f} | "
              f"{serial / wall:17.2f}x | {serial1 / wall:17.2f}x |")
    return 0 if diff1 == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
