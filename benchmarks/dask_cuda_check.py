"""gpumatch.distributed.match_files on a dask-cuda cluster, checked against NumPy.

Usage: python benchmarks/dask_cuda_check.py [--cpu] [--files 4] [--size 512] [--dir DIR]

Writes ``--files`` small synthetic exposures as FITS, starts
``dask_cuda.LocalCUDACluster(n_workers=1)`` (``--cpu``: a ``distributed.LocalCluster``
of 2 processes) and a Client, matches the files with ``backend="auto"``, and checks
that every row of the returned list and of the JSON summary has status "ok" and
backend "cupy" ("numpy" with ``--cpu``), that the planes agree with a serial NumPy
run (finite pixels to 1e-5 relative, identical masks and non-finite patterns), and
that a second run skips every complete output. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from importlib import metadata

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpumatch as gm  # noqa: E402
from gpumatch import Box  # noqa: E402
from gpumatch.distributed import SUMMARY_NAME, match_files  # noqa: E402
from gpumatch.pipeline import match_file  # noqa: E402

REFERENCE = "gaussian:sigma=2.6,size=21"
PACKAGES = ("dask", "distributed", "dask-cuda", "rapids-dask-dependency", "tornado", "bokeh",
            "cuda-core", "nvidia-ml-py", "numba-cuda", "cupy-cuda13x", "numpy", "astropy")


def config():
    """A small matching configuration that runs in seconds."""
    return gm.ModelPsfMatchConfig(kernelSize=11, alardNGauss=2, alardSigGauss=(1.0, 2.0),
                                  alardDegGauss=(2, 1), spatialKernelOrder=1)


def psf_model(size):
    """The spatially varying PSF of every input exposure."""
    return gm.VaryingGaussianPsf(15, 15, Box(0, 0, size, size),
                                 sigma=(1.6, 0.12, -0.08, 0.05, 0.03, -0.04),
                                 g1=(0.02, 0.03, -0.01), g2=(-0.01, 0.0, 0.02))


def write_inputs(directory, n, size):
    """Write ``n`` noisy ``size`` x ``size`` exposures (a few NaN pixels each); their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        image = rng.normal(100.0, 10.0, (size, size)).astype(np.float32)
        image[rng.integers(0, size, 3), rng.integers(0, size, 3)] = np.nan
        variance = np.full((size, size), 100.0, dtype=np.float32)
        mask = (rng.random((size, size)) < 2e-3).astype(np.int32) << 3
        path = os.path.join(directory, f"exp{i:02d}.fits")
        gm.Exposure(image, variance, mask, meta={"INDEX": i}).write_fits(path)
        paths.append(path)
    return paths


def version(name):
    """The installed version of distribution ``name``, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirement_problems(names):
    """Unmet ``Requires-Dist`` entries of the packages ``names`` (empty when consistent)."""
    from packaging.requirements import Requirement

    problems = [f"{name} is not installed" for name in names if version(name) is None]
    for name in names:
        for spec in map(Requirement, (version(name) and metadata.requires(name)) or []):
            if spec.marker is not None and not spec.marker.evaluate({"extra": ""}):
                continue
            have = version(spec.name)
            if have is None or not spec.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {spec}: have {have}")
    return problems


def compare(got_path, want_path):
    """Differences of two matched exposures as strings (empty when they agree); worst rel. diff."""
    got, want = gm.Exposure.read_fits(got_path), gm.Exposure.read_fits(want_path)
    errors, worst = [], 0.0
    if not np.array_equal(got.mask, want.mask):
        errors.append(f"masks differ at {int((got.mask != want.mask).sum())} pixels")
    for plane in ("image", "variance"):
        g = np.asarray(getattr(got, plane), np.float64)
        w = np.asarray(getattr(want, plane), np.float64)
        for test in (np.isnan, np.isposinf, np.isneginf):
            if not np.array_equal(test(g), test(w)):
                errors.append(f"{plane}: {test.__name__} patterns differ")
        fin = np.isfinite(w) & np.isfinite(g)
        scale = float(np.abs(w[fin]).max(initial=0.0))
        diff = np.abs(g[fin] - w[fin])
        worst = max(worst, float((diff / np.maximum(np.abs(w[fin]), 1e-6 * scale)).max(initial=0.0)))
        bad = int((diff > 1e-5 * np.abs(w[fin]) + 1e-6 * scale).sum())
        if bad:
            errors.append(f"{plane}: {bad} finite pixels differ beyond rtol 1e-5")
    return errors, worst


def check_rows(rows, summary_path, status, backend, n):
    """Failures of the returned rows and the JSON summary (each file ``status`` on ``backend``)."""
    with open(summary_path) as fh:
        files = json.load(fh)["files"]
    errors = []
    for what, table in (("result", rows), ("summary", files)):
        if len(table) != n:
            errors.append(f"{what}: {len(table)} rows, {n} expected")
        for r in table:
            if r["status"] != status or r.get("backend") != backend:
                errors.append(f"{what}: {os.path.basename(r['input'])}: status {r['status']}, "
                              f"backend {r.get('backend')} (want {status}, {backend}); "
                              f"{r.get('error')}")
    return errors


def start_cluster(cpu):
    """A (cluster, client) pair: a dask-cuda cluster of one GPU worker, or 2 CPU processes."""
    from distributed import Client

    if cpu:
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
    else:
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(n_workers=1)
    return cluster, Client(cluster)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="distributed.LocalCluster, backend numpy")
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--size", type=int, default=512, help="exposure side in pixels")
    p.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    expected = "numpy" if args.cpu else "cupy"
    print("versions:", ", ".join(f"{name} {version(name) or '-'}" for name in PACKAGES))
    carried = ("distributed", "dask") if args.cpu else \
        ("dask-cuda", "rapids-dask-dependency", "distributed", "dask", "bokeh")
    failures = [f"requirement: {x}" for x in requirement_problems(carried)]
    times = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        size, psf, cfg = args.size, psf_model(args.size), config()
        paths = write_inputs(os.path.join(root, "in"), args.files, size)
        out, serial = os.path.join(root, "dask"), os.path.join(root, "serial")
        t0 = time.perf_counter()
        cluster, client = start_cluster(args.cpu)
        try:
            client.wait_for_workers(1)
            times["cluster start"] = time.perf_counter() - t0
            env = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
            print(f"cluster: {type(cluster).__name__}, workers (CUDA_VISIBLE_DEVICES): {env}")
            for label, status in (("dask run", "ok"), ("dask rerun", "skipped")):
                t0 = time.perf_counter()
                rows = match_files(paths, REFERENCE, out, client=client, psf=psf, config=cfg,
                                   backend="auto", progress=False)
                times[label] = time.perf_counter() - t0
                failures += [f"{label}: {e}" for e in check_rows(
                    rows, os.path.join(out, SUMMARY_NAME), status, expected, len(paths))]
        finally:
            client.close()
            cluster.close()
        os.makedirs(serial)
        t0 = time.perf_counter()
        worst = 0.0
        for path in paths:
            name = os.path.basename(path)
            match_file(path, REFERENCE, os.path.join(serial, name), psf=psf, config=cfg,
                       backend="numpy")
            if not os.path.exists(os.path.join(out, name)):
                failures.append(f"{name}: no Dask output")
                continue
            errors, diff = compare(os.path.join(out, name), os.path.join(serial, name))
            failures += [f"{name}: {e}" for e in errors]
            worst = max(worst, diff)
        times["serial numpy"] = time.perf_counter() - t0
    print(f"{args.files} files of {size}x{size}, backend auto -> {expected} expected; worst "
          f"relative difference to serial numpy (finite pixels): {worst:.2e}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    for f in failures:
        print("FAIL", f)
    print("dask_cuda_check:", "FAILED" if failures else "PASSED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
