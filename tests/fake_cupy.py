"""A NumPy-backed stand-in for ``cupy``/``cupyx``, for tests without a GPU.

:func:`install` puts it in ``sys.modules`` (use it in a subprocess only: it
also patches ``gpumatch.backend`` to report a usable device). Arrays are an
``ndarray`` subclass from a module named ``cupy``, so gpumatch treats them as
device arrays, and NumPy functions reached through the fake keep them so;
raw copies (``memcpyAsync``) are real ``memmove``s between the pointers
gpumatch computes.

Streams run lazily and adversarially (see :func:`install`), and the CUDA
kernels are either NumPy transcriptions (``tests/test_cuda_compile.py``) or
the sources of ``kernels/`` compiled for the CPU (:mod:`cuda_emulator`),
behind gpumatch's own module loading. Enough of the rest of CuPy is there
for ``tests/test_gpu.py`` and the benchmark scripts (events with elapsed
times, ``RawModule`` for inline sources, ``cupyx.scipy.ndimage`` and ``.linalg``, device
properties of an H100) to run end to end on a CPU; timings mean nothing.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
import types
import weakref

import numpy as np

__all__ = ["install", "run_installed", "COUNTS"]

_TESTS = pathlib.Path(__file__).resolve().parent
_ROOT = _TESTS.parent

#: What the code under test asked of the "device" since :func:`install`:
#: array operations (each a kernel launch on a GPU), gpumatch's own kernel
#: launches, and copies between host and device. A proxy for the host-side
#: launch overhead a GPU run pays, which no CPU timing can show.
COUNTS = collections.Counter()

def install(kernels="transcribed"):
    """Put a NumPy-backed stand-in for ``cupy``/``cupyx`` in ``sys.modules``.

    Arrays are an ``ndarray`` subclass from a module named ``cupy`` (so
    gpumatch treats them as device arrays) and raw copies are real
    ``memmove``s between the pointers gpumatch computes. The two CUDA kernels
    are, with ``kernels="transcribed"``, :func:`test_cuda_compile.emulate_apply_kernel` and
    :func:`~test_cuda_compile.emulate_normal_equations_kernel`, called with exactly the arguments
    (types checked) that the real launch passes; with ``kernels="compiled"``,
    the sources of ``kernels/`` themselves compiled for the CPU by
    :mod:`cuda_emulator` behind gpumatch's own module loading
    (:func:`gpumatch.cuda.module.get_kernel`, :func:`device_limits`), with
    the thread order of ``$GPUMATCH_EMULATOR_ORDER``. Streams run in the
    order of ``$GPUMATCH_FAKE_STREAM_SEED``.
    """
    cupy = types.ModuleType("cupy")

    class ndarray(np.ndarray):
        @property
        def data(self):
            return types.SimpleNamespace(ptr=self.ctypes.data)

        def get(self, *args, **kwargs):
            COUNTS["device->host copies"] += 1
            COUNTS["device->host bytes"] += self.nbytes
            return np.array(self)

        def __array_wrap__(self, arr, context=None, return_scalar=False):
            COUNTS["array operations"] += 1   # a ufunc or reduction: one kernel on a GPU
            return np.ndarray.__array_wrap__(self, arr, context, return_scalar)

    ndarray.__module__ = "cupy"

    def wrap(a):
        return a.view(ndarray) if isinstance(a, np.ndarray) else a

    cupy.ndarray = ndarray
    def asarray(a, dtype=None):
        if isinstance(a, np.ndarray) and not isinstance(a, ndarray):
            COUNTS["host->device copies"] += 1
            COUNTS["host->device bytes"] += a.nbytes
        return wrap(np.asarray(a, dtype=dtype))

    cupy.asarray = asarray
    cupy.ascontiguousarray = lambda a, dtype=None: wrap(np.ascontiguousarray(a, dtype=dtype))
    cupy.empty = lambda shape, dtype=np.float64: wrap(np.full(shape, 77, dtype=dtype))  # poisoned
    cupy.array_equal = lambda a, b, equal_nan=False: np.array_equal(a, b, equal_nan=equal_nan)

    def on_device(result):
        """Results of NumPy functions called through the fake cupy stay 'on the device'."""
        if isinstance(result, np.ndarray):
            return wrap(result)
        if isinstance(result, tuple):
            items = [on_device(r) for r in result]
            return type(result)(*items) if hasattr(result, "_fields") else tuple(items)
        return result

    def through(namespace):
        def attr(name):
            value = getattr(namespace, name)
            if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) or (
                    callable(value) and type(value).__name__ == "_ArrayFunctionDispatcher"):
                def call(*a, **k):
                    COUNTS["array operations"] += 1
                    return on_device(value(*a, **k))
                return functools.wraps(value)(call)
            return value
        return attr

    cupy.__getattr__ = through(np)
    for sub in ("linalg", "fft"):
        module = types.ModuleType(f"cupy.{sub}")
        module.__getattr__ = through(getattr(np, sub))
        setattr(cupy, sub, module)

    def cholesky(a):
        """As cuSOLVER under CuPy's default ``cupyx.errstate(linalg="ignore")``: no
        error, and a matrix that is not positive definite gets a factor that is
        finite and wrong (here its unfactored lower triangle)."""
        COUNTS["array operations"] += 1
        a = np.asarray(a)
        out = np.empty_like(a)
        for i in np.ndindex(a.shape[:-2]):
            try:
                out[i] = np.linalg.cholesky(a[i])
            except np.linalg.LinAlgError:
                out[i] = np.tril(a[i])
        return wrap(out)

    cupy.linalg.cholesky = cholesky
    cupy.lib = np.lib
    cupy.random = types.SimpleNamespace(
        random=lambda size=None, dtype=np.float64: wrap(
            np.asarray(np.random.default_rng(0).random(size), dtype=dtype)))
    cupy.__version__ = "fake"

    # Streams run lazily and adversarially: work queued on a non-default
    # stream (kernel launches, memcpyAsync) runs only when the host waits for
    # it (stream or event synchronize), in a seeded random order among the
    # streams whose next operation's event waits are met. A missing
    # wait_event, or a pinned buffer reused before the copy that reads it has
    # finished, then gives wrong results instead of passing by luck. The
    # default stream (ptr 0) runs everything at once, like CuPy's own
    # synchronous-looking array operations.
    streams = {}
    order_rng = random.Random(int(os.environ.get("GPUMATCH_FAKE_STREAM_SEED", "0")))

    class Event:
        def __init__(self, *args, **kwargs):
            self.stream, self.position, self.time = None, 0, None

        def record(self, stream=None):
            self.stream = current_stream() if stream is None else stream
            self.stream.enqueue(lambda: setattr(self, "time", time.perf_counter()))
            self.position = self.stream.queued

        def done(self):
            return self.stream is None or self.stream.done >= self.position

        def synchronize(self):
            run_until(self.done)

    def get_elapsed_time(start, stop):
        assert start.done() and stop.done(), "elapsed time of events not yet completed"
        return 1e3 * (stop.time - start.time)

    class Stream:
        _current = []

        def __init__(self, non_blocking=False, ptr=None):
            self.ptr = len(streams) + 1000 if ptr is None else ptr
            streams[self.ptr] = self
            self.ops = collections.deque()
            self.queued = self.done = 0

        def enqueue(self, fn, event=None):
            self.queued += 1
            if self.ptr == 0:
                if event is not None:
                    event.synchronize()
                if fn is not None:
                    fn()
                self.done += 1
            else:
                self.ops.append((fn, event))

        def record(self, event=None):
            event = Event() if event is None else event
            event.record(self)
            return event

        def wait_event(self, event):
            assert isinstance(event, Event)
            self.enqueue(None, event)

        def synchronize(self):
            run_until(lambda: self.done == self.queued)

        def __enter__(self):
            Stream._current.append(self)
            return self

        def __exit__(self, *args):
            Stream._current.pop()
            return False

    null_stream = Stream(ptr=0)

    def current_stream():
        return Stream._current[-1] if Stream._current else null_stream

    def run_until(condition):
        while not condition():
            ready = [st for st in streams.values()
                     if st.ops and (st.ops[0][1] is None or st.ops[0][1].done())]
            if not ready:
                raise AssertionError("deadlock: every stream with work waits on an event "
                                     "that can never complete")
            st = order_rng.choice(ready)
            fn, _ = st.ops.popleft()
            if fn is not None:
                fn()
            st.done += 1

    def memcpy_async(dst, src, size, kind, stream):
        assert stream in streams and kind in (1, 2)
        streams[stream].enqueue(lambda: ctypes.memmove(dst, src, size))

    def on_stream(launch):
        """A kernel launch queued on the current stream, as CUDA does."""
        def queued(grid, block, args, shared_mem=0):
            COUNTS["gpumatch kernel launches"] += 1
            current_stream().enqueue(lambda: launch(grid, block, args, shared_mem=shared_mem))
        return queued

    class OutOfMemoryError(MemoryError):
        def __init__(self, size, total, limit=0):
            super().__init__(f"out of memory allocating {size} bytes")

    class MemoryPool:
        def free_bytes(self):
            return 0

        def used_bytes(self):
            return 0

        def total_bytes(self):
            return 0

        def free_all_blocks(self):
            pass

    pools = (MemoryPool(), MemoryPool())
    cupy.get_default_memory_pool = lambda: pools[0]
    cupy.get_default_pinned_memory_pool = lambda: pools[1]

    # An H100's attributes (cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
    # cudaDevAttrMultiProcessorCount = 16).
    attributes = {97: 227 * 1024, 16: 132}
    class CUDARuntimeError(RuntimeError):
        pass

    runtime = types.SimpleNamespace(memcpyAsync=memcpy_async, memcpyHostToDevice=1,
                                    CUDARuntimeError=CUDARuntimeError,
                                    memcpyDeviceToHost=2, getDeviceCount=lambda: 1,
                                    cudaDevAttrMaxSharedMemoryPerBlockOptin=97,
                                    cudaDevAttrMultiProcessorCount=16,
                                    deviceGetAttribute=lambda attr, dev: attributes[attr],
                                    memGetInfo=lambda: (60 << 30, 80 << 30),
                                    getDeviceProperties=lambda dev: {
                                        "name": b"NVIDIA H100 (fake: CPU emulation)",
                                        "totalGlobalMem": 80 << 30})

    class Device:
        def __init__(self, device_id=0):
            self.id = device_id
            self.compute_capability = "90"

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    cupy.cuda = types.SimpleNamespace(
        Stream=Stream, Event=Event, runtime=runtime, get_current_stream=current_stream,
        get_elapsed_time=get_elapsed_time, Device=Device,
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError))
    cupyx = types.ModuleType("cupyx")
    # Pinned allocations are remembered (until freed), so that
    # pointerGetAttributes tells them from pageable memory as CUDA does.
    pinned = {}

    def empty_pinned(shape, dtype=np.float64):
        a = np.full(shape, 55, dtype=dtype)
        start = a.ctypes.data
        pinned[start] = start + a.nbytes
        weakref.finalize(a, pinned.pop, start, None)
        COUNTS["pinned allocations"] += 1
        return a

    def pointer_attributes(ptr):
        host = any(lo <= ptr < hi for lo, hi in list(pinned.items()))
        return types.SimpleNamespace(type=1 if host else 0, device=-1)

    runtime.pointerGetAttributes = pointer_attributes
    runtime.memoryTypeHost = 1
    cupyx.empty_pinned = empty_pinned
    import scipy.linalg
    import scipy.ndimage

    cupyx.scipy = types.ModuleType("cupyx.scipy")
    for sub in ("ndimage", "linalg"):
        module = types.ModuleType(f"cupyx.scipy.{sub}")
        module.__getattr__ = through(getattr(scipy, sub))
        setattr(cupyx.scipy, sub, module)
        sys.modules[module.__name__] = module
    sys.modules.update({"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": cupyx.scipy})

    import gpumatch.backend as gb
    import gpumatch.cuda.module as cm
    import gpumatch.cuda.normal_equations as cne

    gb._cupy_status = lambda: (cupy, "ok")
    gb.cupy_usable = lambda: True
    if kernels == "compiled":
        import cuda_emulator

        order = int(os.environ.get("GPUMATCH_EMULATOR_ORDER", "0"))

        class Launch:
            def __init__(self, fn):
                self.fn = fn

            @property
            def max_dynamic_shared_size_bytes(self):
                return self.fn.max_dynamic_shared_size_bytes

            @max_dynamic_shared_size_bytes.setter
            def max_dynamic_shared_size_bytes(self, value):
                self.fn.max_dynamic_shared_size_bytes = value

            def __call__(self, grid, block, args, shared_mem=0):
                on_stream(lambda *a, **k: self.fn(*a, order=order, **k))(
                    grid, block, args, shared_mem=shared_mem)

        def function(filename, name, defines, device_id):
            assert device_id == 0
            return Launch(cuda_emulator.compile_kernel(filename, name, dict(defines)))

        cm._function = functools.lru_cache(maxsize=None)(function)

        class RawModule:
            """Inline CUDA source (the benchmarks' own kernels), compiled for the CPU."""

            def __init__(self, code, options=()):
                d = pathlib.Path(tempfile.mkdtemp(prefix="gpumatch-rawmodule-"))
                (d / "module.cu").write_text(code)
                self.directory = d

            def get_function(self, name):
                return Launch(cuda_emulator.compile_kernel("module.cu", name,
                                                           directory=self.directory))

        cupy.RawModule = RawModule
        return
    if kernels != "transcribed":
        raise ValueError(f"kernels={kernels!r}")
    from gpumatch.cuda.apply import APPLY_BLOCK, TILE_W, apply_shared_bytes
    from gpumatch.cuda.normal_equations import ne_launch_config, ne_shared_bytes
    from test_cuda_compile import emulate_apply_kernel, emulate_normal_equations_kernel

    limits = {"max_shared_optin": 227 * 1024, "sm_count": 132, "compute_capability": "90"}
    mask_types = {"int": np.int32, "unsigned int": np.uint32, "short": np.int16,
                  "unsigned short": np.uint16, "signed char": np.int8, "unsigned char": np.uint8,
                  "long long": np.int64, "unsigned long long": np.uint64}

    def get_kernel(filename, name, defines, shared_bytes=0):
        if filename == "apply_spatial.cu":
            assert name == "gm_apply_spatial_kernel"
            k, o, rows = (int(defines[m]) for m in ("KSIZE", "SPATIAL_ORDER", "ROWS_PER_THREAD"))
            mask_t = np.dtype(mask_types[defines["MASK_T"]])
            assert shared_bytes == apply_shared_bytes(k, o, mask_t.itemsize, rows)
            assert shared_bytes <= limits["max_shared_optin"]

            def launch(grid, block, args, shared_mem=0):
                (img, var, msk, s_img, s_var, s_msk, oi, ov, om, ny, nx, rb, re, qpack, qsum,
                 supp, full, xs, ys, hx, hy, nd) = args
                assert block == (32, APPLY_BLOCK[1], 1) and shared_mem == shared_bytes
                for a in (s_img, s_var, s_msk):
                    assert type(a) is np.int64
                for a in (ny, nx, rb, re, full):
                    assert type(a) is np.int32
                for a in (xs, ys, hx, hy):
                    assert type(a) is np.float64
                assert type(nd) is mask_t.type and msk.dtype == mask_t and om.dtype == mask_t
                assert img.dtype.name == {"float": "float32", "double": "float64"}[defines["IMG_T"]]
                assert var.dtype.name == {"float": "float32", "double": "float64"}[defines["VAR_T"]]
                assert qpack.dtype == np.float32 and qsum.dtype == np.float64
                assert int(s_img) == img.strides[0] // img.itemsize and img.strides[1] == img.itemsize
                for o_ in (oi, ov, om):
                    assert o_.flags.c_contiguous
                assert grid == (-(-int(nx) // TILE_W), -(-(int(re) - int(rb)) // (8 * rows)), 1)
                packed = types.SimpleNamespace(
                    kernel_size=k, order=o, qpack=np.asarray(qpack), qsum=np.asarray(qsum),
                    support=np.asarray(supp), full_support=bool(full), x_shift=float(xs),
                    y_shift=float(ys), hx=float(hx), hy=float(hy))
                emulate_apply_kernel(np.asarray(img), np.asarray(var), np.asarray(msk), packed,
                                     nd, int(rb), int(re), rows,
                                     (np.asarray(oi), np.asarray(ov), np.asarray(om)))
            return on_stream(launch)

        if filename == "adaptive_moments.cu":
            # The kernel's NumPy twin stands in for it.
            from gpumatch.cuda.moments import AM_THREADS, am_shared_bytes
            from gpumatch.moments import adaptive_moments_batch

            def launch(grid, block, args, shared_mem=0):
                stamps, n, ny, nx, max_iter, rtol, out = args
                for a in (n, ny, nx, max_iter):
                    assert type(a) is np.int32
                assert type(rtol) is np.float64 and stamps.dtype == np.float64
                assert grid == (int(n),) and block == (AM_THREADS,)
                assert shared_mem == shared_bytes == am_shared_bytes(int(ny), int(nx))
                np.asarray(out)[...] = adaptive_moments_batch(np.asarray(stamps), int(max_iter),
                                                              float(rtol))
            return on_stream(launch)

        assert (filename, name) == ("normal_equations.cu", "gm_candidate_normal_equations")
        k, size, nb = (int(defines[m]) for m in ("NE_KSIZE", "NE_STAMP", "NE_NBASIS"))
        assert shared_bytes == ne_shared_bytes(k, size, nb)

        def launch(grid, block, args, shared_mem=0):
            templates, targets, basis, w, n, M, b = args
            assert type(w) is np.float64 and type(n) is np.int32 and grid == (int(n),)
            assert block == (ne_launch_config(k, size, nb),) and shared_mem == shared_bytes
            for a in (templates, targets, basis, M, b):
                assert a.dtype == np.float64 and a.flags.c_contiguous
            Me, be = emulate_normal_equations_kernel(np.asarray(templates), np.asarray(targets),
                                                     np.asarray(basis), float(w), block[0])
            np.asarray(M)[...] = Me
            np.asarray(b)[...] = be
        return on_stream(launch)

    cm.get_kernel = cne.get_kernel = get_kernel
    cm.device_limits = cne.device_limits = lambda: limits


def run_installed(code, kernels="compiled", env=None, timeout=600):
    """Run ``code`` in a fresh Python with the fake installed, and return its output.

    The tests, the repository root and ``benchmarks/`` are on ``sys.path``;
    ``env`` adds to the environment (``GPUMATCH_EMULATOR_ORDER``...). A
    non-zero exit fails the calling test with the end of the output.
    """
    paths = [str(_TESTS), str(_ROOT), str(_ROOT / "benchmarks")]
    prelude = f"import sys; sys.path[:0] = {paths!r}; import fake_cupy; fake_cupy.install({kernels!r})\n"
    res = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                         timeout=timeout, cwd=_ROOT, env=dict(os.environ, **(env or {})))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-4000:]
    return res.stdout
