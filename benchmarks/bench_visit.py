"""Visit benchmark of gpumatch.match_many: a whole camera visit on one device.

Usage (repository root):

    python3 benchmarks/bench_visit.py --output bench_visit.md          # GPU: the issue's benchmark
    python3 benchmarks/bench_visit.py --backend numpy --exposures 4 --pool 2 --repeat 1   # CPU smoke

Workload: a synthetic camera visit of ``--exposures`` (default 189) exposures of
4096 columns x 4004 rows (``--shape NY NX``), each a noisy float32 image and
variance plane and an int32 mask, with the production configuration of docs/algorithm.md
section 11 (``workloads.production_config()``: kernelSize 21, sigmas
1.0/2.0/4.5, degrees 4/2/2, spatial order 2) and reference
(``workloads.production_reference()``: DoubleGaussianPsf(23, 23, 3.27, 8.175,
0.1)). Every exposure has its own spatially varying PSF: a 25x25
``VaryingGaussianPsf`` whose coefficients are those of
``workloads.production_exposure`` varied slightly per detector (deterministic
from the detector index).

Memory stays bounded: 189 distinct 4096x4004 exposures would take 37 GB, so
``--pool P`` (default 8) distinct pixel planes are made and the visit's
exposures cycle through them (exposure ``j`` uses the planes of ``j % P`` and
its own PSF); a generator feeds them to :func:`gpumatch.match_many`, and each
result is consumed (its timings read) and dropped as it is yielded.

Modes:

* host-resident: NumPy planes in, results back in host memory
  (``--backend``, default ``cupy`` when a GPU is usable, else ``numpy``);
* host-resident, pinned planes (CuPy only): the same NumPy planes in pinned
  host memory, as ``match_many`` reads files into on the GPU: they go to the
  device with no host staging copy;
* device-resident (CuPy only): the pool's planes as CuPy arrays, results stay
  on the device.

For each mode: one warm-up call of ``--warmup`` exposures (default: the pool
size), then ``--repeat`` timed visits (default 3); prints the median, min and
max wall time of the visit, exposures per second, the per-stage times summed
over the visit from each result's ``metadata["timings"]`` (cellSet,
normalEquations, spatialSolve, apply, quality) and their shares of the wall
time. For the host-resident mode on the GPU it also times a pure pinned-memory
copy of every plane of the visit in both directions (host->device of image,
variance and mask; device->host of the three matched planes; CUDA events,
synchronised) and reports it as a share of the host-resident wall time, plus
the host-side pageable->pinned staging copy the pipelined application makes.
Finally the issue's targets (host-resident visit < 4 s, device-resident < 2 s,
on the GPU) and whether they are met. ``--output FILE`` writes the same report
as markdown (date, device, command line).

``--time-budget S`` bounds the timed part (for a single device call, see
``benchmarks/gpu_session.sh``): each mode gets an equal share of it (at
least a quarter of it, when an earlier mode overran), no run starts after a
mode's share, and a
run still going then stops after its next result; its visit time is then
extrapolated from the exposures done (an upper estimate) and marked so.

Exits with a message when ``--backend cupy`` is asked for and no GPU is usable.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import shlex
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import machine_description, production_config, production_reference  # noqa: E402

import gpumatch  # noqa: E402
from gpumatch import Box, Exposure, VaryingGaussianPsf  # noqa: E402
from gpumatch.backend import cupy_usable  # noqa: E402
from gpumatch.backends import cupy_status  # noqa: E402

STAGES = [("cellSet", "stamps (cell set)"), ("normalEquations", "normal equations"),
          ("spatialSolve", "spatial solve"), ("apply", "application (image+var+mask)"),
          ("quality", "matched-PSF quality")]

#: The issue's targets for a 189-exposure 4096x4004 visit on one GPU (seconds).
TARGETS = {"host": 4.0, "pinned": 4.0, "device": 2.0}
VISIT_EXPOSURES = 189
VISIT_SHAPE = (4004, 4096)

# The PSF coefficients of workloads.production_exposure, varied per detector.
_SIGMA = (1.9, 0.12, -0.08, 0.05, 0.03, -0.04)
_G1 = (0.02, 0.03, -0.01)
_G2 = (-0.01, 0.0, 0.02)


# ---------------------------------------------------------------------------
# The synthetic visit
# ---------------------------------------------------------------------------


def detector_psf(index, nx, ny):
    """The PSF of detector ``index``: production coefficients varied slightly.

    Deterministic from ``index``: the constant size changes by up to +-5 %, the
    other size terms by up to +-20 % of themselves, and each shear coefficient
    by up to +-0.01 (sizes stay positive and shears well below 1 over the
    detector).
    """
    rng = np.random.default_rng(10_000 + index)
    sigma = [_SIGMA[0] * (1 + 0.05 * rng.uniform(-1, 1))]
    sigma += [c * (1 + 0.2 * rng.uniform(-1, 1)) for c in _SIGMA[1:]]
    g1 = [c + 0.01 * rng.uniform(-1, 1) for c in _G1]
    g2 = [c + 0.01 * rng.uniform(-1, 1) for c in _G2]
    return VaryingGaussianPsf(25, 25, Box(0, 0, nx, ny), sigma=sigma, g1=g1, g2=g2)


def make_planes(index, ny, nx):
    """Noisy float32 image and variance and an int32 mask (sparse bit 3) for pool slot ``index``."""
    rng = np.random.default_rng(index)
    image = rng.standard_normal((ny, nx), dtype=np.float32)
    image *= np.float32(10.0)
    image += np.float32(100.0)
    variance = np.full((ny, nx), 100.0, dtype=np.float32)
    mask = (rng.random((ny, nx), dtype=np.float32) < 1e-3).astype(np.int32) << 3
    return image, variance, mask


def visit(pool, psfs, n):
    """Generator of the visit's ``n`` exposures: planes cycle through ``pool``, PSFs do not."""
    for j in range(n):
        image, variance, mask = pool[j % len(pool)]
        yield Exposure(image, variance, mask, psf=psfs[j], id=j)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def run_visit(pool, psfs, n, reference, config, backend, batch_size, sync, stop_at=None):
    """One visit through ``match_many``.

    Each result's timings are read and the result dropped before the next one
    is asked for, so at most one batch is alive at a time. With ``stop_at`` (a
    ``time.perf_counter()`` value) the visit stops after the first result
    that arrives later than that.

    Returns
    -------
    wall : float
        Seconds from the call to the last result (device synchronised).
    sums : dict
        Per-stage seconds summed over the results.
    count : int
        Results received (``n`` unless stopped early).
    """
    sums = {name: 0.0 for name, _ in STAGES}
    count = 0
    t0 = time.perf_counter()
    results = gpumatch.match_many(visit(pool, psfs, n), reference, config, backend=backend,
                                  batch_size=batch_size)
    for result in results:
        timings = result.metadata["timings"]
        for name in sums:
            sums[name] += timings.get(name, 0.0)
        count += 1
        del result, timings
        if stop_at is not None and count < n and time.perf_counter() > stop_at:
            break
    results.close()
    sync()
    wall = time.perf_counter() - t0
    if count != n and (stop_at is None or count == 0):
        raise RuntimeError(f"match_many yielded {count} results for {n} exposures")
    return wall, sums, count


def time_mode(label, pool, psfs, args, reference, config, backend, sync, log, deadline=None):
    """Warm-up, then ``args.repeat`` timed visits.

    With a ``deadline`` (``time.perf_counter()`` value, from ``--time-budget``)
    no run starts after it, and a run still going at the deadline stops after
    its next result; such a partial run's visit time is extrapolated from the
    exposures it finished (``wall * N / count``) and reported as such.
    """
    n_warm = min(args.exposures, args.warmup if args.warmup is not None else len(pool))
    if n_warm > 0:
        t0 = time.perf_counter()
        run_visit(pool, psfs, n_warm, reference, config, backend, args.batch_size, sync)
        log(f"  [{label}] warm-up of {n_warm} exposures: {time.perf_counter() - t0:.2f} s")
    n = args.exposures
    runs = []
    for i in range(args.repeat):
        if i > 0 and deadline is not None and time.perf_counter() > deadline:
            log(f"  [{label}] time budget spent: stopping after {i} runs")
            break
        wall, sums, count = run_visit(pool, psfs, n, reference, config, backend,
                                      args.batch_size, sync, stop_at=deadline)
        f = n / count
        runs.append({"visit": wall * f, "wall": wall, "count": count,
                     "stages": {k: v * f for k, v in sums.items()}})
        log(f"  [{label}] run {i + 1}/{args.repeat}: {wall:.3f} s for {count} of {n} exposures"
            + ("" if count == n else f" (time budget spent; visit extrapolated: {wall * f:.3f} s)"))
        if count < n:
            break
    # The median run itself (the lower median for an even count), so that its
    # wall time minus its stages is what it spent outside them.
    visits = [r["visit"] for r in runs]
    median = statistics.median_low(visits)
    chosen = runs[visits.index(median)]
    return {"walls": visits, "median": median, "stages": chosen["stages"],
            "partial": [(r["count"], r["wall"]) for r in runs if r["count"] < n]}


def pinned_copy(planes):
    """Copies of host ``planes`` in pinned memory (as match_many reads files into);
    no pageable fallback, so that what is timed as pinned is pinned."""
    import cupyx

    out = [cupyx.empty_pinned(p.shape, p.dtype) for p in planes]
    for dst, src in zip(out, planes):
        np.copyto(dst, src)
    return out


def time_copies(cp, pool, n):
    """Pure pinned-memory copies of every plane of an ``n``-exposure visit, both ways.

    Host->device: image, variance and mask of each exposure from pinned host
    buffers; device->host: the three matched planes (same dtypes) into pinned
    host buffers. One stream, CUDA events around each direction, synchronised.
    Also times the host-side pageable->pinned staging copy of the input planes
    (as many host threads as gpumatch's staging pool uses).

    Returns
    -------
    dict
        Seconds ``h2d``, ``d2h``, ``staging`` and ``bytes`` per direction.
    """
    import cupyx

    rt = cp.cuda.runtime
    planes = pool[0]
    pinned = pinned_copy(planes)
    back = [cupyx.empty_pinned(p.shape, p.dtype) for p in planes]
    dev = [cp.empty(p.shape, p.dtype) for p in planes]
    stream = cp.cuda.Stream(non_blocking=True)

    def copies(direction, count):
        for _ in range(count):
            for h_in, h_out, d in zip(pinned, back, dev):
                if direction == "h2d":
                    rt.memcpyAsync(d.data.ptr, h_in.ctypes.data, d.nbytes,
                                   rt.memcpyHostToDevice, stream.ptr)
                else:
                    rt.memcpyAsync(h_out.ctypes.data, d.data.ptr, d.nbytes,
                                   rt.memcpyDeviceToHost, stream.ptr)

    out = {"bytes": n * sum(p.nbytes for p in planes)}
    for direction in ("h2d", "d2h"):
        copies(direction, 1)                          # warm-up: one exposure
        stream.synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        copies(direction, n)
        stop.record(stream)
        stop.synchronize()
        out[direction] = cp.cuda.get_elapsed_time(start, stop) * 1e-3
    # Host staging: pageable NumPy planes -> pinned buffers, as _host_staged does.
    workers = max(1, min(3, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        t0 = time.perf_counter()
        for j in range(n):
            src = pool[j % len(pool)]
            list(ex.map(np.copyto, pinned, src))
        out["staging"] = time.perf_counter() - t0
    for buffers in (pinned, back, dev):   # release them before the pools are trimmed
        buffers.clear()
    cp.get_default_memory_pool().free_all_blocks()
    cp.get_default_pinned_memory_pool().free_all_blocks()
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exposures", type=int, default=VISIT_EXPOSURES,
                   help="exposures in the visit (default 189)")
    p.add_argument("--pool", type=int, default=8,
                   help="distinct pixel planes the visit cycles through (default 8)")
    p.add_argument("--shape", type=int, nargs=2, metavar=("NY", "NX"), default=list(VISIT_SHAPE),
                   help="rows and columns of each exposure (default 4004 4096)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None,
                   help="default: cupy when a GPU is usable, else numpy")
    p.add_argument("--repeat", type=int, default=3, help="timed visits per mode (default 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="exposures in the warm-up call before each mode (default: the pool size)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="match_many's batch_size (default: its own choice)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the timed modes together (warm-ups included): the "
                        "host-resident mode gets half when the device-resident one follows, "
                        "which gets the rest (at least a quarter); no run starts after a "
                        "mode's share, and a run still going then stops after its next "
                        "result and its visit time is extrapolated")
    p.add_argument("--skip-device", action="store_true", help="skip the device-resident mode")
    p.add_argument("--skip-pinned", action="store_true",
                   help="skip the host-resident mode with pinned input planes")
    p.add_argument("--output", help="also write the report as markdown to this path")
    args = p.parse_args(argv)
    if args.exposures < 1 or args.pool < 1 or args.repeat < 1:
        p.error("--exposures, --pool and --repeat must be positive")
    ny, nx = args.shape
    backend = args.backend or ("cupy" if cupy_usable() else "numpy")
    if backend == "cupy" and not cupy_usable():
        sys.exit(f"bench_visit: --backend cupy needs a usable GPU ({cupy_status()[1]}); run it "
                 "on the lent H100/H200 machine, or pass --backend numpy for a CPU run.")

    cp = None
    if backend == "cupy":
        import cupy as cp

    def sync():
        if cp is not None:
            cp.cuda.get_current_stream().synchronize()

    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)
        if args.output:               # rewritten every line: a killed run keeps what it printed
            with open(args.output, "w") as fh:
                fh.write("\n".join(lines) + "\n")

    def log(s):
        print(s, flush=True)

    config = production_config()
    reference = production_reference()
    pool_n = min(args.pool, args.exposures)
    t0 = time.perf_counter()
    pool = [make_planes(i, ny, nx) for i in range(pool_n)]
    psfs = [detector_psf(j, nx, ny) for j in range(args.exposures)]
    log(f"  built a pool of {pool_n} exposures in {time.perf_counter() - t0:.1f} s")
    exp_bytes = sum(a.nbytes for a in pool[0])

    if cp is not None:
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        device = f"{name} (CuPy {cp.__version__})"
    else:
        device = "none: NumPy backend on the CPU"

    cmd = shlex.join(["python3"] + [os.path.relpath(sys.argv[0])] + sys.argv[1:]) \
        if argv is None else shlex.join(["bench_visit"] + list(argv))
    out(f"# gpumatch visit benchmark, {datetime.date.today().isoformat()}")
    out()
    out(f"- command: `{cmd}`")
    out(f"- device: **{device}**")
    out(f"- host: {machine_description()}")
    out(f"- workload: synthetic camera visit of {args.exposures} exposures of {nx} columns x "
        f"{ny} rows (float32 image + float32 variance + int32 mask, "
        f"{exp_bytes / 1e6:.0f} MB per exposure, {args.exposures * exp_bytes / 1e9:.2f} GB for "
        f"the visit), the pixel planes cycling through a pool of {pool_n} distinct exposures, "
        f"each exposure with its own VaryingGaussianPsf 25x25 (production coefficients varied "
        f"per detector); reference {reference!r}; production configuration (kernelSize "
        f"{config.kernelSize}, sigmas {config.alardSigGauss}, degrees {config.alardDegGauss}, "
        f"spatial order {config.spatialKernelOrder})")
    out(f"- `gpumatch.match_many(..., backend={backend!r}, batch_size="
        f"{args.batch_size if args.batch_size is not None else 'default'})`, results consumed "
        f"and dropped as yielded; per mode one warm-up call of "
        f"{min(args.exposures, args.warmup if args.warmup is not None else pool_n)} exposures, "
        f"then the median of {args.repeat} timed visits")

    # The copies first: quick, and measured even if a later step is cut short.
    copies = time_copies(cp, pool, args.exposures) if cp is not None else None
    if copies is not None:
        log(f"  copies of the visit's planes: host->device {copies['h2d']:.3f} s, device->host "
            f"{copies['d2h']:.3f} s, host staging {copies['staging']:.3f} s")

    started = time.perf_counter()
    budget = args.time_budget
    # GPU modes after the first: host-resident with pinned planes, device-resident.
    later = [] if cp is None else [m for m, skip in (("pinned", args.skip_pinned),
                                                     ("device", args.skip_device)) if not skip]
    share = 1.0 / (1 + len(later))

    def deadline(position):
        """End of mode ``position``'s share of the budget; at least a quarter of the
        budget from now (an earlier mode may overrun: it stops only between results)."""
        if budget is None:
            return None
        end = started + share * (position + 1) * budget
        return end if position == 0 else max(end, time.perf_counter() + 0.25 * budget)

    modes = []
    res = time_mode("host-resident", pool, psfs, args, reference, config, backend, sync, log,
                    deadline=deadline(0))
    modes.append(("host", f"host-resident ({backend})", res))
    if cp is not None:
        pool_mem = cp.get_default_memory_pool()
        res["pool_bytes"] = pool_mem.total_bytes()
    dev_res = None
    for position, mode in enumerate(later, 1):
        if mode == "pinned":
            mode_pool = [tuple(pinned_copy(planes)) for planes in pool]
            label = f"host-resident, pinned planes ({backend})"
        else:
            mode_pool = [tuple(cp.asarray(a) for a in planes) for planes in pool]
            label = f"device-resident ({backend})"
        sync()
        r = time_mode(label.split(" (")[0], mode_pool, psfs, args, reference, config, backend,
                      sync, log, deadline=deadline(position))
        r["pool_bytes"] = pool_mem.total_bytes()
        modes.append((mode, label, r))
        if mode == "device":
            dev_res = r
        del mode_pool
        pool_mem.free_all_blocks()
        cp.get_default_pinned_memory_pool().free_all_blocks()

    scale = VISIT_EXPOSURES / args.exposures
    full = args.exposures == VISIT_EXPOSURES and (ny, nx) == VISIT_SHAPE
    out()
    out("| mode | visit wall, median (s) | min (s) | max (s) | runs | exposures / s | "
        "s / exposure | target (189 x 4096x4004) | met |")
    out("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for key, label, r in modes:
        med = r["median"]
        if backend != "cupy":
            met = "n/a (GPU target; CPU run)"
        elif not full:
            met = f"n/a (not the full visit; x{scale:.1f} exposures: {med * scale:.2f} s)" \
                if (ny, nx) == VISIT_SHAPE else "n/a (not the full visit)"
        else:
            met = "**yes**" if med < TARGETS[key] else "no"
        if r["partial"] and backend == "cupy":
            met += " (extrapolated)"
        out(f"| {label} | {med:.3f} | {min(r['walls']):.3f} | {max(r['walls']):.3f} | "
            f"{len(r['walls'])} | {args.exposures / med:.2f} | {med / args.exposures:.3f} | "
            f"< {TARGETS[key]:g} s | {met} |")
    out()
    head = "| stage (summed over the visit) |"
    rule = "|---|"
    for _, label, _ in modes:
        head += f" {label} (s) | share |"
        rule += "---:|---:|"
    out(head)
    out(rule)
    for name, label in STAGES + [("other", "other (outside the stages)")]:
        row = f"| {label} |"
        for _, _, r in modes:
            v = (r["median"] - sum(r["stages"].values())) if name == "other" else r["stages"][name]
            row += f" {v:.3f} | {100 * v / r['median']:.1f} % |"
        out(row)
    row = "| visit wall (median) |"
    for _, _, r in modes:
        row += f" {r['median']:.3f} | 100 % |"
    out(row)
    out()
    for _, label, r in modes:
        for count, wall in r["partial"]:
            out(f"- **{label}: a run was cut short by --time-budget** after {count} of "
                f"{args.exposures} exposures ({wall:.3f} s); its visit time and stage times are "
                f"extrapolated by {args.exposures}/{count}, an upper estimate (the wall time "
                f"already includes the batched stages of exposures not yet yielded)")
    out("- wall times: median (the lower one for an even number of runs) of the timed visits; "
        "stage times: the sums over that median run of each result's "
        "`metadata[\"timings\"]` (match_many shares a batch's normal-equation and batched "
        "spatial-solve time evenly among its exposures); \"other\" is the rest of that run's "
        "wall time (reading the inputs, batching, the generator, consuming the results)")
    if copies is not None:
        host_med = modes[0][2]["median"]
        both = copies["h2d"] + copies["d2h"]
        gb = copies["bytes"] / 1e9
        out(f"- host<->device copies, host-resident mode: a pure pinned-memory copy of every "
            f"plane of the visit takes {copies['h2d']:.3f} s host->device ({gb:.1f} GB, "
            f"{gb / copies['h2d']:.1f} GB/s) + {copies['d2h']:.3f} s device->host "
            f"({gb / copies['d2h']:.1f} GB/s) = {both:.3f} s, **{100 * both / host_med:.1f} %** "
            f"of the host-resident wall time (the pipelined application overlaps copies with "
            f"computation, so this is copy-engine busy time, not necessarily added wall time); "
            f"the host-side pageable->pinned staging copy of the input planes adds "
            f"{copies['staging']:.3f} s of host memcpy ({100 * copies['staging'] / host_med:.1f} %; "
            f"none for planes already in pinned memory)")
        pinned = [r for key, _, r in modes if key == "pinned"]
        if pinned:
            saved = host_med - pinned[0]["median"]
            out(f"- pageable minus pinned input planes, host-resident: {saved:.3f} s "
                f"({100 * saved / host_med:.1f} % of the pageable host-resident time)")
        if dev_res is not None:
            extra = host_med - dev_res["median"]
            out(f"- host-resident minus device-resident wall time: {extra:.3f} s "
                f"({100 * extra / host_med:.1f} % of the host-resident time)")
        for key, label, r in modes:
            out(f"- CuPy memory pool after the {label} runs: {r['pool_bytes'] / 2**30:.1f} GiB")
    else:
        out("- host<->device copies: none (NumPy backend: everything stays in host memory)")
    out(f"- targets: host-resident < "
        f"{TARGETS['host']:g} s (pageable or pinned input planes), device-resident < "
        f"{TARGETS['device']:g} s"
        + ("" if backend == "cupy" else "; this is a CPU run, so they do not apply"))

    if args.output:
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
