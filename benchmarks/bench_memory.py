"""Peak memory of one production run (NumPy backend), in bytes per pixel.

Usage: python benchmarks/bench_memory.py [--size 2048] [--old PATH]

Builds the exposure, runs the task once to warm up (imports, FFT plans), then
reports the peak resident set size (``ru_maxrss``) of one full-size run,
divided by the number of pixels, beyond the interpreter and libraries
(measured before the exposure is made; so the input exposure, 12 bytes per
pixel for float32 image and variance and an int32 mask, and the output are
included), and beyond the interpreter and the input. Run one process per size.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import production_config, production_exposure, production_reference  # noqa: E402

from gpumatch import ModelPsfMatchTask  # noqa: E402


def _peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048, help="exposure side in pixels")
    p.add_argument("--old", help="an older gpumatch/apply.py whose convolve_planes to measure "
                   "instead (e.g. saved from `git show main:gpumatch/apply.py`)")
    args = p.parse_args(argv)
    if args.old:
        import importlib.util

        import gpumatch.apply

        spec = importlib.util.spec_from_file_location("gpumatch._old_apply", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        gpumatch.apply.convolve_planes = old.convolve_planes
    # A small run first: imports and FFT plans without a full-size peak.
    task = ModelPsfMatchTask(production_config(), backend="numpy")
    reference = production_reference()
    task.run(production_exposure(256), reference, on_poor_match="ignore")
    gc.collect()
    interpreter = _rss_bytes()
    exposure = production_exposure(args.size)
    gc.collect()
    before_rss, before_peak = _rss_bytes(), _peak_bytes()
    result = task.run(exposure, reference, on_poor_match="ignore")
    peak = _peak_bytes()
    npix = args.size * args.size
    base = max(before_rss, before_peak)
    print(f"{args.size}x{args.size}: interpreter and libraries {interpreter / 2**20:.0f} MiB, "
          f"with the input exposure {before_rss / 2**20:.0f} MiB (peak so far "
          f"{before_peak / 2**20:.0f} MiB), peak during the run {peak / 2**20:.0f} MiB")
    print(f"  {(peak - interpreter) / npix:.1f} bytes per pixel beyond the interpreter "
          f"(input exposure and output included); {(peak - base) / npix:.1f} beyond the "
          f"interpreter and the input")
    del result
    return 0


if __name__ == "__main__":
    sys.exit(main())
