"""GPU benchmark of ModelPsfMatchTask: one command on a lent H100/H200.

Usage (repository root, on the GPU machine):

    python3 benchmarks/bench_gpu.py --output bench_gpu.md

Workload: one 4096 x 4096 float32 exposure (image, variance, int32 mask) with
the production configuration of docs/algorithm.md section 11 (VaryingGaussianPsf 25x25
exposure PSF, reference DoubleGaussianPsf(23, 23, 3.27, 8.175, 0.1),
kernelSize 21, sigmas 1.0/2.0/4.5, degrees 4/2/2, spatial order 2).

Prints and writes (markdown, ``--output``):
* the device (name, multiprocessors, clocks) and the measured ceilings: device
  memory bandwidth (a large device-to-device copy, bytes read + written),
  pinned host<->device bandwidth, and FP32 / FP64 FMA rates (a register-only
  FMA kernel);
* per-stage medians (stamps, normal equations, spatial solve, application, whole
  run) of ``backend="cupy"`` with the exposure on the device and on the host,
  the spatial solve (and the whole run) both with the system solved on the host
  (LAPACK) and on the device (cuSOLVER), ``ModelPsfMatchTask(spatial_solve=...)``, whose
  default these numbers are to decide;
* in the same run, baselines: the NumPy backend on this machine's CPUs, and a
  straightforward CuPy implementation (im2col + matmul normal equations, and an
  application by ``cupyx.scipy.ndimage.correlate`` per spatial term plus a
  maximum filter per mask bit);
* the floor of each stage (bytes moved over bandwidth, or arithmetic over the
  FMA rate, whichever is larger) and measured / floor;
* the peak device memory of a run (CuPy memory pool), also as a multiple of the
  exposure's own size;
* the agreement of the GPU result with the NumPy backend.

Exits with a message when no GPU is usable.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import (machine_description, production_config, production_exposure,  # noqa: E402
                       production_reference)

import gpumatch  # noqa: E402
from gpumatch import Exposure, ModelPsfMatchTask  # noqa: E402
from gpumatch.backend import cupy_usable, single_threaded_blas  # noqa: E402
from gpumatch.backends import cupy_status  # noqa: E402

STAGES = [("cellSet", "stamps (cell set)"), ("normalEquations", "normal equations"),
          ("spatialSolve", "spatial solve"), ("apply", "application (image+var+mask)")]
# Where the spatial system is solved (ModelPsfMatchTask.spatial_solve), and by what.
SPATIAL_SOLVERS = {"host": "LAPACK", "device": "cuSOLVER"}

# Datasheet figures, used only when the device does not report its own.
DATASHEET = {
    "H100": {"bw": 3.35e12, "fp32": 33.5e12, "fp64": 16.75e12},   # SXM5; FMA/s
    "H200": {"bw": 4.8e12, "fp32": 33.5e12, "fp64": 16.75e12},
}

_FMA_SRC = r"""
template <typename T>
__device__ void fma_loop(T* out, int iters, T a, T b) {
    T x0 = threadIdx.x, x1 = x0 + 1, x2 = x0 + 2, x3 = x0 + 3, x4 = x0 + 4, x5 = x0 + 5,
      x6 = x0 + 6, x7 = x0 + 7;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            x0 = x0 * a + b; x1 = x1 * a + b; x2 = x2 * a + b; x3 = x3 * a + b;
            x4 = x4 * a + b; x5 = x5 * a + b; x6 = x6 * a + b; x7 = x7 * a + b;
        }
    }
    T s = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
    if (s == (T)-1.2345) out[blockIdx.x] = s;   // never true; keeps the loop alive
}
extern "C" __global__ void fma32(float* out, int iters, float a, float b) {
    fma_loop<float>(out, iters, a, b);
}
extern "C" __global__ void fma64(double* out, int iters, double a, double b) {
    fma_loop<double>(out, iters, a, b);
}
"""


def _median_ms(values):
    return 1e3 * statistics.median(values)


def _events_time(cp, fn, repeat, warmup=2):
    """Median milliseconds of ``fn()`` on the current stream, timed with events."""
    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def device_info(cp):
    rt = cp.cuda.runtime
    dev = cp.cuda.Device()
    props = rt.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])

    def attr(a):
        try:
            return int(rt.deviceGetAttribute(getattr(rt, a), dev.id))
        except Exception:
            return None

    sms = attr("cudaDevAttrMultiProcessorCount")
    clock_khz = attr("cudaDevAttrClockRate")
    mem_khz = attr("cudaDevAttrMemoryClockRate")
    bus = attr("cudaDevAttrGlobalMemoryBusWidth")
    key = "H200" if "H200" in name else "H100" if "H100" in name else None
    sheet = DATASHEET.get(key, {})
    info = {
        "name": name, "sms": sms, "cc": dev.compute_capability,
        "total_mem": int(props.get("totalGlobalMem", 0)),
        "clock_mhz": clock_khz / 1e3 if clock_khz else None,
        "bw_spec": (2.0 * mem_khz * 1e3 * bus / 8) if mem_khz and bus else sheet.get("bw"),
        "fp32_spec": (sms * 128 * clock_khz * 1e3) if sms and clock_khz else sheet.get("fp32"),
        "fp64_spec": (sms * 64 * clock_khz * 1e3) if sms and clock_khz else sheet.get("fp64"),
    }
    return info


def measure_ceilings(cp, repeat, mib=512, fma_iters=4096):
    """Measured device bandwidth, pinned PCIe bandwidths and FMA rates."""
    import cupyx

    out = {}
    n = mib * 1024 * 1024 // 4                      # mib MiB of float32
    a = cp.random.random(n, dtype=cp.float32)
    b = cp.empty_like(a)
    ms = _events_time(cp, lambda: cp.copyto(b, a), repeat)
    out["bw"] = 2 * a.nbytes / (ms * 1e-3)          # bytes read + written
    host = cupyx.empty_pinned((n,), dtype=np.float32)
    host[:] = 1.0
    stream = cp.cuda.get_current_stream()
    rt = cp.cuda.runtime
    ms = _events_time(cp, lambda: rt.memcpyAsync(a.data.ptr, host.ctypes.data, a.nbytes,
                                                 rt.memcpyHostToDevice, stream.ptr), repeat)
    out["h2d"] = a.nbytes / (ms * 1e-3)
    ms = _events_time(cp, lambda: rt.memcpyAsync(host.ctypes.data, a.data.ptr, a.nbytes,
                                                 rt.memcpyDeviceToHost, stream.ptr), repeat)
    out["d2h"] = a.nbytes / (ms * 1e-3)
    mod = cp.RawModule(code=_FMA_SRC, options=("-std=c++17",))
    sms = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrMultiProcessorCount,
                                             cp.cuda.Device().id)
    blocks, threads, iters = sms * 8, 256, fma_iters
    for name, dt in (("fp32", np.float32), ("fp64", np.float64)):
        fn = mod.get_function("fma" + name[2:])
        sink = cp.zeros(blocks, dtype=dt)
        it = iters if name == "fp32" else iters // 2
        ms = _events_time(cp, lambda: fn((blocks,), (threads,),
                                         (sink, np.int32(it), dt(0.999), dt(1e-3))), repeat)
        out[name] = blocks * threads * it * 16 * 8 / (ms * 1e-3)
    return out


def floors(md, n_pixels, ceil):
    """Floor of each stage in seconds, and what bounds it."""
    k = md["ALKernelSize"]
    nb = sum((d + 1) * (d + 2) // 2 for d in md["ALBasisDegGauss"])
    size = md["psfSize"]
    n = md["numKernelCandidates"]
    g = size - k + 1
    order = md.get("spatialOrder", 2)
    res = {}
    # Stamps: write 2 stacks of float64 stamps.
    res["cellSet"] = (2 * n * size * size * 8 / ceil["bw"], "memory")
    # Normal equations: float64 FMAs of the convolutions and of C^T C, C^T s.
    fma = n * g * g * nb * k * k + n * (nb * (nb + 1) // 2 + nb) * g * g
    byt = 2 * n * size * size * 8 + n * (nb * nb + nb) * 8
    res["normalEquations"] = max((fma / ceil["fp64"], "FP64 FMA"), (byt / ceil["bw"], "memory"))
    # Spatial solve: a (nb-1)*nkt+1 system, on the host or the device; a tiny
    # system, bound by latency (copies, launches), not by throughput.
    res["spatialSolve"] = (None, "latency")
    # Application, exact per pixel: per pixel and tap at least o FMAs to evaluate
    # K (Horner in X, the Y part shared along a row), 1 for the image and 2 for
    # the variance (k * (k * v)); bytes: image, variance, mask read and written
    # once. (The kernel adds o(o+1)/2 FMAs per tap per 4 pixels for the Y part.)
    ops = n_pixels * k * k * (order + 3)
    byt = n_pixels * (4 + 4 + 4) * 2
    res["apply"] = max((ops / ceil["fp32"], "FP32 FMA"), (byt / ceil["bw"], "memory"))
    res["apply_bytes"] = byt
    return res


# ---------------------------------------------------------------------------
# Straightforward CuPy baseline
# ---------------------------------------------------------------------------


def naive_convolve_planes(cp, image, variance, mask, kernel, box, no_data):
    """Application by cupyx.scipy.ndimage: one correlation per spatial term."""
    from cupyx.scipy import ndimage

    from gpumatch.apply import variance_terms

    ny, nx = image.shape
    k = kernel.dimensions[0]
    h = k // 2
    Q, exps, (cx, cy, hx, hy) = kernel.scaled_terms(box)
    X = (cp.arange(nx, dtype=cp.float64) + box.x0 - cx) / hx
    Y = (cp.arange(ny, dtype=cp.float64) + box.y0 - cy) / hy
    img = image.astype(cp.float32)
    var = variance.astype(cp.float32)
    num = cp.zeros((ny, nx), cp.float32)
    norm = cp.zeros((ny, nx), cp.float64)
    for (a, c), q in zip(exps, Q):
        w = cp.outer(Y ** c, X ** a)
        num += (w * ndimage.correlate(img, cp.asarray(q, cp.float32), mode="constant")).astype(
            cp.float32)
        norm += w * float(q.sum())
    exps2, V = variance_terms(Q, exps, kernel.spatial_order)
    vnum = cp.zeros((ny, nx), cp.float32)
    for (a, c), v in zip(exps2, V):
        w = cp.outer(Y ** c, X ** a)
        vnum += (w * ndimage.correlate(var, cp.asarray(v, cp.float32), mode="constant")).astype(
            cp.float32)
    out_i = (num / norm).astype(image.dtype)
    out_v = (vnum / (norm * norm)).astype(variance.dtype)
    support = cp.asarray(np.any(Q != 0, axis=0))
    out_m = cp.zeros_like(mask)
    for bit in range(8 * mask.dtype.itemsize):
        plane = ((mask >> bit) & 1).astype(cp.uint8)
        if not bool(plane.any()):
            continue
        hit = ndimage.maximum_filter(plane, footprint=support, mode="constant", cval=0)
        out_m |= hit.astype(mask.dtype) << bit
    edge = cp.ones((ny, nx), bool)
    edge[h:ny - h, h:nx - h] = False
    out_i[edge] = cp.nan
    out_v[edge] = cp.inf
    out_m[edge] = no_data
    return out_i, out_v, out_m


def naive_stages(cp, exposure, reference, config, kernel, repeat):
    """Stage medians (ms) of the straightforward CuPy implementation."""
    from gpumatch.basis import alard_lupton_basis, basis_widths
    from gpumatch.cellset import build_cell_set
    from gpumatch.normal_equations import candidate_normal_equations

    choice = basis_widths(config)
    cs, _ = build_cell_set(exposure, reference, config, choice.kernel_size, xp=cp)
    basis = alard_lupton_basis(choice.kernel_size, choice.sigmas, choice.degrees)
    ne = _events_time(cp, lambda: candidate_normal_equations(cs.templates, cs.targets, basis, 2.0,
                                                             xp=cp), repeat)
    no_data = exposure.get_plane_bitmask("NO_DATA")
    planes = (cp.asarray(exposure.image), cp.asarray(exposure.variance), cp.asarray(exposure.mask))
    ap = _events_time(cp, lambda: naive_convolve_planes(cp, *planes, kernel, exposure.bbox, no_data),
                      max(1, repeat // 3), warmup=1)
    return {"normalEquations": ne, "apply": ap}


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


def time_task(cp, task, exposure, reference, repeat, pool):
    """Per-stage and whole-run medians (ms), and the device memory one run takes
    beyond what was allocated before it (CuPy pool), and the last result."""
    task.run(exposure, reference)                    # warm-up: compiles, plans, pools
    cp.cuda.get_current_stream().synchronize()
    pool.free_all_blocks()
    base = pool.used_bytes()
    rows = {name: [] for name, _ in STAGES}
    walls = []
    peak = None
    result = None
    for i in range(repeat):
        t0 = time.perf_counter()
        result = task.run(exposure, reference)
        cp.cuda.get_current_stream().synchronize()
        walls.append(time.perf_counter() - t0)
        if i == 0:
            peak = pool.total_bytes() - base           # the pool keeps every block it took
        for name, _ in STAGES:
            rows[name].append(result.metadata["timings"][name])
        result = None if i + 1 < repeat else result
    med = {name: _median_ms(v) for name, v in rows.items()}
    med["total"] = _median_ms(walls)
    return med, peak, result


def agreement(res_gpu, res_cpu):
    """Largest relative image/variance differences, mask and edge agreement."""
    from gpumatch.backend import to_numpy

    g, c = res_gpu.psfMatchedExposure, res_cpu.psfMatchedExposure
    out = {}
    for name in ("image", "variance"):
        a = to_numpy(getattr(g, name)).astype(np.float64)
        b = to_numpy(getattr(c, name)).astype(np.float64)
        fin = np.isfinite(b)
        out[name] = float(np.max(np.abs(a[fin] - b[fin]) / np.abs(b[fin])))
        out[name + "_nonfinite_equal"] = bool(np.array_equal(~np.isfinite(a), ~fin))
    out["mask_equal"] = bool(np.array_equal(to_numpy(g.mask), to_numpy(c.mask)))
    xs = np.linspace(c.bbox.x0, c.bbox.x1, 5)
    worst = 0.0
    for x in xs:
        for y in xs:
            kn = res_cpu.psfMatchingKernel.compute_image(x, y)
            kg = res_gpu.psfMatchingKernel.compute_image(x, y)
            worst = max(worst, float(np.abs(kg - kn).max() / np.abs(kn).max()))
    out["kernel"] = worst
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096, help="exposure side in pixels")
    p.add_argument("--repeat", type=int, default=10, help="timed GPU runs (after a warm-up)")
    p.add_argument("--cpu-repeat", type=int, default=3, help="timed NumPy-backend runs")
    p.add_argument("--skip-cpu", action="store_true", help="skip the NumPy baseline")
    p.add_argument("--skip-naive", action="store_true", help="skip the straightforward CuPy baseline")
    p.add_argument("--output", help="also write the table as markdown to this path")
    p.add_argument("--smoke", action="store_true",
                   help="tiny ceiling measurements (for the test that runs this script against "
                        "the CPU emulation; the numbers mean nothing)")
    args = p.parse_args(argv)

    if not cupy_usable():
        sys.exit(f"bench_gpu: no usable GPU ({cupy_status()[1]}); this benchmark needs CuPy and "
                 "a CUDA device. Run it on the lent H100/H200 machine.")
    import cupy as cp

    pool = cp.get_default_memory_pool()
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    info = device_info(cp)
    ceil = measure_ceilings(cp, 2, mib=1, fma_iters=2) if args.smoke else measure_ceilings(cp, 20)
    config = production_config()
    reference = production_reference()
    exp_host = production_exposure(args.size)
    exp_dev = Exposure(cp.asarray(exp_host.image), cp.asarray(exp_host.variance),
                       cp.asarray(exp_host.mask), psf=exp_host.psf)
    n_pixels = args.size * args.size
    exp_bytes = sum(a.nbytes for a in (exp_host.image, exp_host.variance, exp_host.mask))

    task = ModelPsfMatchTask(config, backend="cupy")
    default_solve = task.spatial_solve
    runs = {}                                        # spatial solve -> (device-, host-resident)
    for where in SPATIAL_SOLVERS:
        task.spatial_solve = where
        runs[where] = [time_task(cp, task, exp, reference, args.repeat, pool)
                       for exp in (exp_dev, exp_host)]
    task.spatial_solve = default_solve
    (dev_med, dev_peak, res_dev), (host_med, host_peak, res_host) = runs[default_solve]
    md = res_dev.metadata
    md = dict(md, spatialOrder=config.spatialKernelOrder)

    # Kernels alone (CUDA events), device-resident inputs.
    from gpumatch.basis import alard_lupton_basis
    from gpumatch.cuda.apply import convolve_planes_cupy
    from gpumatch.cuda.normal_equations import candidate_normal_equations_cupy

    kernel = res_dev.psfMatchingKernel
    no_data = exp_dev.get_plane_bitmask("NO_DATA")
    apply_only = _events_time(cp, lambda: convolve_planes_cupy(
        exp_dev.image, exp_dev.variance, exp_dev.mask, kernel, exp_dev.bbox, no_data), args.repeat)
    cs = res_dev.kernelCellSet
    basis = alard_lupton_basis(md["ALKernelSize"], md["ALBasisSigGauss"], md["ALBasisDegGauss"])
    basis_d = cp.asarray(basis)
    ne_only = _events_time(cp, lambda: candidate_normal_equations_cupy(
        cs.templates, cs.targets, basis_d, 2.0), args.repeat)
    M_d, b_d = cs.normal_matrices, cs.normal_vectors
    solve_only = _events_time(cp, lambda: task.array_backend.solve_candidates(M_d, b_d), args.repeat)
    # The spatial system as a run leaves it (on the device), solved alone both ways.
    from gpumatch import stages

    state = stages.spatial_system(task, stages.MatchState(cell_set=cs), M_d, b_d,
                                  cs.kernel_solutions)
    sf, A_d, rhs_d = state.sf, state.A, state.rhs
    spatial_only = {}
    for where in SPATIAL_SOLVERS:
        task.spatial_solve = where
        with single_threaded_blas():                 # as in a run
            spatial_only[where] = _events_time(cp, lambda: task.array_backend.solve_spatial(
                A_d, rhs_d, len(basis), sf.n_terms, 1.0, config.conditionNumberType), args.repeat)
    task.spatial_solve = default_solve
    # Host path alone, and its plain (pageable, unpipelined) variant.
    t_staged, t_pageable = [], []
    for _ in range(max(3, args.repeat // 2)):
        t0 = time.perf_counter()
        convolve_planes_cupy(exp_host.image, exp_host.variance, exp_host.mask, kernel,
                             exp_host.bbox, no_data)
        t_staged.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        convolve_planes_cupy(exp_host.image, exp_host.variance, exp_host.mask, kernel,
                             exp_host.bbox, no_data, transfer="pageable")
        t_pageable.append(time.perf_counter() - t0)

    naive = {}
    if not args.skip_naive:
        naive = naive_stages(cp, exp_host, reference, config, res_dev.psfMatchingKernel,
                             max(3, args.repeat // 2))

    cpu_med, res_cpu = {}, None
    if not args.skip_cpu:
        cpu_task = ModelPsfMatchTask(config, backend="numpy")
        rows = {name: [] for name, _ in STAGES}
        walls = []
        for _ in range(args.cpu_repeat):
            t0 = time.perf_counter()
            res_cpu = cpu_task.run(exp_host, reference)
            walls.append(time.perf_counter() - t0)
            for name, _ in STAGES:
                rows[name].append(res_cpu.metadata["timings"][name])
        cpu_med = {name: _median_ms(v) for name, v in rows.items()}
        cpu_med["total"] = _median_ms(walls)

    fl = floors(md, n_pixels, ceil)
    fl_total = sum(v[0] for key, v in fl.items() if key in dict(STAGES) and v[0] is not None)
    pcie = max(fl["apply_bytes"] / 2 / ceil["h2d"], fl["apply_bytes"] / 2 / ceil["d2h"])

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    out(f"# gpumatch GPU benchmark, {datetime.date.today().isoformat()}")
    out()
    out(f"- device: **{info['name']}**, compute capability {info['cc']}, {info['sms']} SMs, "
        f"clock {f(info['clock_mhz'], '{:.0f}')} MHz, {info['total_mem'] / 2**30:.0f} GiB")
    out(f"- measured: device memory {ceil['bw'] / 1e12:.2f} TB/s (copy, read + write; spec "
        f"{f(info['bw_spec'] and info['bw_spec'] / 1e12)}), pinned H2D {ceil['h2d'] / 1e9:.1f} GB/s, "
        f"D2H {ceil['d2h'] / 1e9:.1f} GB/s, FP32 {ceil['fp32'] / 1e12:.1f} TFMA/s (spec "
        f"{f(info['fp32_spec'] and info['fp32_spec'] / 1e12, '{:.1f}')}), FP64 "
        f"{ceil['fp64'] / 1e12:.1f} TFMA/s")
    out(f"- host: {machine_description()}")
    out(f"- workload: {args.size}x{args.size} float32 exposure + int32 mask, VaryingGaussianPsf "
        f"25x25, reference {reference!r}; kernelSize {md['ALKernelSize']}, sigmas "
        f"{md['ALBasisSigGauss']}, degrees {md['ALBasisDegGauss']}, spatial order "
        f"{config.spatialKernelOrder}; {md['numKernelCandidates']} candidates, "
        f"{md['psfSize']}x{md['psfSize']} stamps; gpumatch {gpumatch.__version__}, CuPy "
        f"{cp.__version__}")
    out(f"- medians over {args.repeat} GPU runs after a warm-up, {args.cpu_repeat} NumPy runs; "
        "stage times are wall clock with a device synchronisation after each stage")
    out()
    out("| stage | GPU, device-resident (ms) | GPU, host-resident (ms) | floor (ms) | bound | "
        "device-resident / floor | NumPy backend, CPU (ms) | straightforward CuPy (ms) |")
    out("|---|---:|---:|---:|---|---:|---:|---:|")
    # The spatial solve and the whole run once per placement of the solve; the
    # other stages (and "whole run") from runs with the default placement.
    other = [w for w in SPATIAL_SOLVERS if w != default_solve]
    rows = [(name, label, default_solve) for name, label in STAGES if name != "spatialSolve"]
    rows[2:2] = [("spatialSolve", f"spatial solve on the {w} ({SPATIAL_SOLVERS[w]})", w)
                 for w in SPATIAL_SOLVERS]
    rows += [("total", "whole run", default_solve)]
    rows += [("total", f"whole run, spatial solve on the {w}", w) for w in other]
    for name, label, where in rows:
        dmed, hmed = runs[where][0][0], runs[where][1][0]
        if name == "total":
            fv, bound = fl_total, "sum"
        else:
            fv, bound = fl[name]
        ratio = dmed[name] / (fv * 1e3) if fv else None
        out(f"| {label} | {dmed[name]:.2f} | {hmed[name]:.2f} | "
            f"{f(fv and fv * 1e3, '{:.3g}')} | {bound} | {f(ratio, '{:.1f}')} | "
            f"{f(cpu_med.get(name), '{:.0f}')} | {f(naive.get(name))} |")
    out()
    out("| kernel alone (CUDA events, device-resident) | ms | floor (ms) | measured / floor |")
    out("|---|---:|---:|---:|")
    out(f"| fused application (image+variance+mask) | {apply_only:.3f} | {fl['apply'][0] * 1e3:.3f} "
        f"| {apply_only / (fl['apply'][0] * 1e3):.2f} |")
    out(f"| fused normal equations ({md['numKernelCandidates']} candidates) | {ne_only:.3f} | "
        f"{fl['normalEquations'][0] * 1e3:.3f} | {ne_only / (fl['normalEquations'][0] * 1e3):.2f} |")
    out(f"| single-candidate solutions (batched eigh, part of normal equations) | {solve_only:.3f} "
        f"| - | - |")
    for where, solver in SPATIAL_SOLVERS.items():
        out(f"| spatial solve alone, on the {where} ({solver}; system on the device) | "
            f"{spatial_only[where]:.3f} | - | - |")
    out(f"| application, host arrays, pinned + pipelined copies | {_median_ms(t_staged):.2f} | "
        f"{pcie * 1e3:.2f} (PCIe) | {_median_ms(t_staged) / (pcie * 1e3):.2f} |")
    out(f"| application, host arrays, plain pageable copies | {_median_ms(t_pageable):.2f} | "
        f"{pcie * 1e3:.2f} (PCIe) | {_median_ms(t_pageable) / (pcie * 1e3):.2f} |")
    out()
    dev_total = dev_peak + exp_bytes                 # the exposure itself lives on the device
    out(f"- peak device memory of one run (CuPy pool): device-resident {dev_total / 2**20:.0f} MiB "
        f"= {dev_total / exp_bytes:.1f}x the exposure's {exp_bytes / 2**20:.0f} MiB (the exposure "
        f"included); host-resident {host_peak / 2**20:.0f} MiB = {host_peak / exp_bytes:.1f}x")
    if res_cpu is not None:
        ag = agreement(res_dev, res_cpu)
        ah = agreement(res_host, res_cpu)
        out(f"- agreement with the NumPy backend (device-resident / host-resident): image max rel "
            f"{ag['image']:.1e} / {ah['image']:.1e}, variance {ag['variance']:.1e} / "
            f"{ah['variance']:.1e}, masks identical {ag['mask_equal']} / {ah['mask_equal']}, "
            f"non-finite pixels identical {ag['image_nonfinite_equal'] and ag['variance_nonfinite_equal']}"
            f" / {ah['image_nonfinite_equal'] and ah['variance_nonfinite_equal']}, kernel images "
            f"max rel {ag['kernel']:.1e}")
    out("- floors: stamps = two float64 stamp stacks written at the measured bandwidth; normal "
        "equations = float64 FMAs of the basis convolutions and C^T C at the measured FP64 rate; "
        "application = (o + 3) FP32 FMA-pipe instructions per pixel and kernel tap (exact "
        "per-pixel evaluation: Horner in X, image, variance) at the measured FP32 rate, against 24 "
        "bytes per pixel at the measured bandwidth; host-resident application = the planes' bytes "
        "over the slower pinned PCIe direction (both directions overlap); the spatial solve, a "
        f"{md['numSpatialUnknowns']}x{md['numSpatialUnknowns']} float64 system, is bound by "
        "latency and has no floor")
    out(f"- spatial solve: ModelPsfMatchTask.spatial_solve is {default_solve!r} by default (the rows "
        "that name no placement); a run's \"spatial solve\" stage assembles the system on the "
        "device and solves it, on the host (copy of the system back, LAPACK) or on the device "
        "(cuSOLVER, copy of the solution back); \"alone\" rows time only the solve")
    if args.output:
        with open(args.output, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
