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

It refuses what CuPy 14.2.0 refuses (:mod:`cupy_api` holds that release's
names and parameters): implicit conversions between host and device arrays,
NumPy arrays in device operations, names and keywords CuPy lacks; scalars
are 0-d device arrays, and small device blocks are reused as soon as they are
dropped, as CuPy's memory pool does. ``GPUMATCH_FAKE_STRICT=0`` turns the
boundary and API checks off (for debugging a failure).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import os
import pathlib
import random
import subprocess
import sys
import time
import types
import weakref

import numpy as np

__all__ = ["install", "run_installed", "COUNTS"]

_TESTS = pathlib.Path(__file__).resolve().parent
_ROOT = _TESTS.parent

#: Modules whose use of CuPy is checked like the real CuPy's (``__main__`` too):
#: gpumatch, the benchmarks and the tests. NumPy, SciPy and the fake itself are not.
_CODE_UNDER_TEST = ("gpumatch", "bench_", "workloads", "test_", "random_kernels")
#: The fake's own helpers, not part of the CuPy it stands in for.
_FAKE_ONLY = {"cupy.cuda.Stream.enqueue"}

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
    import cupy_api

    version = cupy_api.load()[0]
    cupy = types.ModuleType("cupy")
    strict = os.environ.get("GPUMATCH_FAKE_STRICT", "1") != "0"

    class ndarray(np.ndarray):
        """A device array: NumPy memory that behaves, at the host/device
        boundary, like ``cupy.ndarray`` (see :func:`_strict_numpy`)."""

        @property
        def data(self):
            return types.SimpleNamespace(ptr=self.ctypes.data)

        def get(self, stream=None, order="C", out=None, blocking=True):
            COUNTS["device->host copies"] += 1
            COUNTS["device->host bytes"] += self.nbytes
            host = np.array(self.view(np.ndarray), order=order)
            if out is None:
                return host
            if type(out) is not np.ndarray or out.shape != self.shape or out.dtype != self.dtype:
                raise TypeError("out must be a numpy.ndarray of the same shape and dtype")
            out[...] = host
            return out

        def set(self, arr, stream=None):
            if type(arr) is not np.ndarray or arr.shape != self.shape:
                raise TypeError("set() takes a numpy.ndarray of the same shape")
            COUNTS["host->device copies"] += 1
            COUNTS["host->device bytes"] += arr.nbytes
            self.view(np.ndarray)[...] = arr

        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            outs = kwargs.get("out") or ()
            outs = outs if isinstance(outs, tuple) else (outs,)
            if strict:
                if any(_host_array(x) for x in inputs + outs):
                    # CuPy's ufuncs take device arrays and scalars only.
                    raise TypeError(f"Unsupported type {np.ndarray} (a NumPy array in the CuPy "
                                    f"ufunc {ufunc.__name__}; copy it with cupy.asarray first)")
                if not cupy_api.has(f"cupy.{ufunc.__name__}"):
                    raise TypeError(f"CuPy {version} has no ufunc {ufunc.__name__}")
            COUNTS["array operations"] += 1     # one kernel on a GPU
            return on_device(getattr(ufunc, method)(*unwrap(inputs), **unwrap(kwargs)))

        def __array_function__(self, func, types_, args, kwargs):
            # As CuPy: numpy.X(device array) runs cupy.X, and fails where there is none.
            module = func.__module__ or "numpy"
            qualname = "cupy" + module[len("numpy"):] + "." + func.__name__
            if strict and not cupy_api.has(qualname):
                raise TypeError(f"no implementation found for '{module}.{func.__name__}' on types "
                                f"that implement __array_function__: [<class 'cupy.ndarray'>] "
                                f"(CuPy {version} has no {qualname})")
            return device_call(qualname, func, args, kwargs)

        def __getitem__(self, key):
            # A single element is a 0-d device array in CuPy, not a NumPy scalar.
            return on_device(np.ndarray.__getitem__(self.view(np.ndarray), unwrap(key)))

        def __setitem__(self, key, value):
            if strict:
                if isinstance(value, (list, tuple)):
                    raise TypeError(f"Unsupported type {type(value)} (CuPy sets items from "
                                    "device arrays and scalars only)")
                if _host_array(value) and value.ndim:
                    raise ValueError("non-scalar numpy.ndarray cannot be used for fill "
                                     "(CuPy: copy it with cupy.asarray first)")
            np.ndarray.__setitem__(self.view(np.ndarray), unwrap(key), unwrap(value))

        # Python numbers from a device array: a copy back (and a synchronisation).
        def _to_host(self, convert):
            COUNTS["device->host copies"] += 1
            COUNTS["device->host bytes"] += self.nbytes
            return convert(self.view(np.ndarray))

        def __float__(self):
            return self._to_host(float)

        def __int__(self):
            return self._to_host(int)

        def __bool__(self):
            return self._to_host(bool)

        def __complex__(self):
            return self._to_host(complex)

        def item(self, *args):
            return self._to_host(lambda a: a.item(*args))

        def tolist(self):
            return self._to_host(np.ndarray.tolist)

        def __iter__(self):
            if self.ndim == 0:
                raise TypeError("iteration over a 0-d array")
            return (self[i] for i in range(len(self)))

        def __index__(self):
            raise TypeError("'cupy.ndarray' object cannot be interpreted as an integer")

        if strict:
            def __getattribute__(self, name):
                if name in _NUMPY_ONLY and _called_from_code_under_test():
                    raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r} "
                                         f"(CuPy {version})")
                value = np.ndarray.__getattribute__(self, name)
                if name in _METHODS and _called_from_code_under_test():
                    return _checked(f"cupy.ndarray.{name}", value)
                return value

    ndarray.__module__ = "cupy"
    _NUMPY_ONLY = {n for n in dir(np.ndarray) if not cupy_api.has(f"cupy.ndarray.{n}")}
    _NUMPY_ONLY -= {"__array_ufunc__", "__array_function__", "__array_finalize__",
                    "__array_priority__", "__class__", "__dict__", "__init_subclass__",
                    "__subclasshook__", "__reduce__", "__reduce_ex__", "__getstate__",
                    "__array_wrap__"}
    _METHODS = {n for n in dir(np.ndarray) if not n.startswith("_") and callable(
        getattr(np.ndarray, n)) and cupy_api.load()[1].get(f"cupy.ndarray.{n}")}

    def _host_array(x):
        return isinstance(x, np.ndarray) and not isinstance(x, ndarray)

    def _any_host(x):
        if isinstance(x, (list, tuple)):
            return any(_any_host(i) for i in x)
        if isinstance(x, dict):
            return any(_any_host(i) for i in x.values())
        return _host_array(x)

    def _any_device(x):
        if isinstance(x, (list, tuple)):
            return any(_any_device(i) for i in x)
        return isinstance(x, ndarray)

    def unwrap(x):
        """Plain NumPy views, so that the NumPy doing the fake's work does not
        dispatch back to the fake."""
        if isinstance(x, ndarray):
            return x.view(np.ndarray)
        if type(x) in (list, tuple):
            return type(x)(unwrap(i) for i in x)
        if type(x) is dict:
            return {k: unwrap(v) for k, v in x.items()}
        return x

    def wrap(a):
        return a.view(ndarray) if isinstance(a, np.ndarray) else a

    def on_device(result):
        """Results of NumPy functions called through the fake cupy stay 'on the
        device'; a scalar result is a 0-d device array, as in CuPy."""
        if isinstance(result, np.ndarray):
            return wrap(result)
        if isinstance(result, np.generic):
            return np.array(result).view(ndarray)
        if isinstance(result, tuple):
            items = [on_device(r) for r in result]
            return type(result)(*items) if hasattr(result, "_fields") else tuple(items)
        return result

    def _checked(qualname, fn):
        @functools.wraps(fn)
        def call(*a, **k):
            cupy_api.check_call(qualname, a, k)
            return fn(*a, **k)
        return call

    def device_call(qualname, fn, args, kwargs, host_ok=False, launches=1):
        """``fn`` as the CuPy function ``qualname``: ``launches`` operations on the device."""
        if strict:
            cupy_api.check_call(qualname, args, kwargs)
            if not host_ok and (_any_host(args) or _any_host(kwargs)):
                raise TypeError(f"{qualname}: Unsupported type {np.ndarray} (a NumPy array "
                                "where CuPy takes device arrays; copy it with cupy.asarray)")
        COUNTS["array operations"] += launches
        return on_device(fn(*unwrap(args), **unwrap(kwargs)))

    def _called_from_code_under_test(depth=2):
        name = sys._getframe(depth).f_globals.get("__name__", "")
        return name == "__main__" or name.startswith(_CODE_UNDER_TEST)

    def _strict_numpy():
        """NumPy's conversions refuse device arrays, as with CuPy, where
        ``numpy.asarray(cupy_array)`` raises instead of copying implicitly. Only
        for the code under test: NumPy, SciPy and the fake itself are left alone."""
        for name in ("asarray", "array", "asanyarray", "ascontiguousarray", "asfortranarray",
                     "require"):
            original = getattr(np, name)

            def strict_conversion(a, *args, _original=original, **kwargs):
                if _any_device(a) and _called_from_code_under_test():
                    raise TypeError("Implicit conversion to a NumPy array is not allowed. Please "
                                    "use `.get()` to construct a NumPy array explicitly.")
                return _original(a, *args, **kwargs)

            setattr(np, name, functools.wraps(original)(strict_conversion))

    if strict:
        _strict_numpy()

    def module_api(name, namespace):
        """A module whose functions are ``namespace``'s, run as CuPy's ``name.X``."""
        def attr(attr_name):
            qualname = f"{name}.{attr_name}"
            if strict and not cupy_api.has(qualname):
                raise AttributeError(f"module '{name}' has no attribute '{attr_name}' "
                                     f"(CuPy {version})")
            value = getattr(namespace, attr_name)
            if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, np.ufunc)) or (
                    callable(value) and type(value).__name__ == "_ArrayFunctionDispatcher"):
                return functools.wraps(value)(
                    lambda *a, **k: device_call(qualname, value, a, k))
            return value
        module = types.ModuleType(name)
        module.__getattr__ = attr
        return module

    def api(qualname, fn, host_ok=False, launches=1):
        """``fn`` standing in for CuPy's ``qualname`` (checked against its parameters)."""
        return functools.wraps(fn)(
            lambda *a, **k: device_call(qualname, fn, a, k, host_ok=host_ok, launches=launches))

    cupy.ndarray = ndarray

    class DevicePool:
        """Small device allocations reused as CuPy's memory pool reuses them: a
        block whose arrays are all gone goes to the next allocation of its size
        (rounded to 512 B) at once, whatever work queued on other streams still
        reads it. A kernel queued on a stream does not keep its arguments'
        blocks (see :func:`on_stream`), so code that drops device arrays a
        pending kernel uses reads what the next allocation wrote, as on a GPU.
        Stricter than CuPy in one way: streams are not recorded, so a block is
        reused at once even where CuPy would order its reuse after the work of
        the stream that freed it. Blocks are never given back (the memory stays
        valid for the fake's late-running kernels); large allocations are
        ordinary NumPy arrays."""

        LIMIT = 1 << 20

        def __init__(self):
            self.blocks = []
            self.index = {}

        def empty(self, shape, dtype, order="C"):
            shape = tuple(shape) if np.iterable(shape) else (int(shape),)
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if nbytes > self.LIMIT:
                return np.empty(shape, dtype, order=order)
            size = max(512, -(-nbytes // 512) * 512)
            for i in range(len(self.blocks)):
                # Only the pool's own reference (and getrefcount's) left: free.
                if self.blocks[i].nbytes == size and sys.getrefcount(self.blocks[i]) == 2:
                    break
            else:
                self.blocks.append(np.zeros(size, np.uint8))
                i = len(self.blocks) - 1
                self.index[id(self.blocks[i])] = i
            return np.ndarray(shape, dtype, buffer=self.blocks[i], order=order)

        def detach(self, a):
            """A stand-in for device array ``a`` that does not keep its block."""
            if not isinstance(a, ndarray):
                return a
            base = a.base
            while isinstance(base, np.ndarray) and id(base) not in self.index:
                base = base.base
            i = self.index.get(id(base))
            if i is None:
                return a
            offset = a.__array_interface__["data"][0] - self.blocks[i].ctypes.data
            spec = (a.shape, a.dtype, offset, a.strides)
            return lambda: np.ndarray(spec[0], spec[1], buffer=self.blocks[i], offset=spec[2],
                                      strides=spec[3]).view(ndarray)

    device_pool = DevicePool()

    def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
        host = _any_host(a)      # a copy to the device (always a new array, as in CuPy)
        if not host:
            return on_device(np.array(unwrap(a), dtype=dtype, order=order or "K", copy=copy))
        src = np.asarray(a)
        COUNTS["host->device copies"] += 1
        COUNTS["host->device bytes"] += src.nbytes
        src = src.astype(dtype, copy=False) if dtype is not None else src
        out = device_pool.empty(src.shape, src.dtype, "F" if order == "F" else "C")
        out[...] = src
        return wrap(out)

    cupy.asarray = _checked("cupy.asarray", asarray)
    # No kernel: a view (or a copy) and an allocation.
    cupy.ascontiguousarray = api("cupy.ascontiguousarray", np.ascontiguousarray, launches=0)

    def empty(shape, dtype=np.float64, order="C"):
        out = device_pool.empty(shape, dtype, order)
        ctypes.memset(out.ctypes.data, 77, out.nbytes)     # poisoned: never written yet
        return out

    def full(shape, fill_value, dtype=None, order="C"):
        out = device_pool.empty(shape, np.result_type(fill_value) if dtype is None else dtype,
                                order)
        out[...] = fill_value
        return out

    cupy.empty = api("cupy.empty", empty, launches=0)
    cupy.zeros = api("cupy.zeros", lambda shape, dtype=np.float64, order="C":
                     full(shape, 0, dtype, order))
    cupy.full = api("cupy.full", full)
    cupy.array_equal = api("cupy.array_equal", np.array_equal)
    cupy.__getattr__ = module_api("cupy", np).__getattr__
    for sub in ("linalg", "fft"):
        setattr(cupy, sub, module_api(f"cupy.{sub}", getattr(np, sub)))

    def cholesky(a):
        """As cuSOLVER under CuPy's default ``cupyx.errstate(linalg="ignore")``: no
        error, and a matrix that is not positive definite gets a factor that is
        finite and wrong (here its unfactored lower triangle)."""
        out = np.empty_like(a)
        for i in np.ndindex(a.shape[:-2]):
            try:
                out[i] = np.linalg.cholesky(a[i])
            except np.linalg.LinAlgError:
                out[i] = np.tril(a[i])
        return out

    cupy.linalg.cholesky = api("cupy.linalg.cholesky", cholesky)
    cupy.lib = types.SimpleNamespace(stride_tricks=module_api("cupy.lib.stride_tricks",
                                                              np.lib.stride_tricks))
    cupy.random = types.SimpleNamespace(random=api(
        "cupy.random.random", lambda size=None, dtype=np.float64:
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
        def __init__(self, block=False, disable_timing=False, interprocess=False):
            self.stream, self.position, self.time = None, 0, None

        def record(self, stream=None):
            self.stream = current_stream() if stream is None else stream
            self.stream.enqueue(lambda: setattr(self, "time", time.perf_counter()))
            self.position = self.stream.queued

        @property
        def done(self):
            return self.stream is None or self.stream.done >= self.position

        def synchronize(self):
            run_until(lambda: self.done)

    def get_elapsed_time(start, stop):
        assert start.done and stop.done, "elapsed time of events not yet completed"
        return 1e3 * (stop.time - start.time)

    class Stream:
        _current = []

        def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
            self.ptr = 0 if null else len(streams) + 1000
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

    null_stream = Stream.null = Stream(null=True)

    def current_stream():
        return Stream._current[-1] if Stream._current else null_stream

    def run_until(condition):
        while not condition():
            ready = [st for st in streams.values()
                     if st.ops and (st.ops[0][1] is None or st.ops[0][1].done)]
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
        def queued(grid, block, args, *, shared_mem=0, stream=None,
                   enable_cooperative_groups=False):
            if strict and _any_host(args):
                raise TypeError(f"Unsupported type {np.ndarray} (a NumPy array as a kernel "
                                "argument; kernels take device arrays and NumPy scalars)")
            assert stream is None, "the fake launches on the current stream only"
            COUNTS["gpumatch kernel launches"] += 1
            # As on a GPU, a queued kernel does not keep its arguments' memory.
            detached = [device_pool.detach(a) for a in args]
            current_stream().enqueue(lambda: launch(
                grid, block, tuple(d() if callable(d) else d for d in detached),
                shared_mem=shared_mem))
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
        def __init__(self, device=None):
            self.id = 0 if device is None else int(device)
            self.compute_capability = "90"

        def synchronize(self):
            run_until(lambda: all(st.done == st.queued for st in streams.values()))

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

    def empty_pinned(shape, dtype=np.float64, order="C"):
        a = np.full(shape, 55, dtype=dtype, order=order)
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
        module = module_api(f"cupyx.scipy.{sub}", getattr(scipy, sub))
        setattr(cupyx.scipy, sub, module)
        sys.modules[module.__name__] = module
    sys.modules.update({"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": cupyx.scipy})
    _install_library_errors()

    import gpumatch.backend as gb
    import gpumatch.cuda.module as cm
    import gpumatch.cuda.normal_equations as cne

    import gpumatch.backends as gbs

    gbs.cupy_status = lambda: (True, "ok")
    gb.cupy_usable = lambda: True
    if kernels == "compiled":
        import cuda_emulator

        order = int(os.environ.get("GPUMATCH_EMULATOR_ORDER", "0"))
        # GPUMATCH_FAKE_WRONG=<kernel name>: that kernel's output is made wrong
        # (tests of gpumatch's self-check).
        wrong = os.environ.get("GPUMATCH_FAKE_WRONG")

        class Launch:
            def __init__(self, fn):
                self.fn = fn

            @property
            def max_dynamic_shared_size_bytes(self):
                return self.fn.max_dynamic_shared_size_bytes

            @max_dynamic_shared_size_bytes.setter
            def max_dynamic_shared_size_bytes(self, value):
                self.fn.max_dynamic_shared_size_bytes = value

            def __call__(self, grid, block, args, **kwargs):
                def run(grid, block, args, **k):
                    self.fn(grid, block, args, order=order, **k)
                    if wrong == self.fn.name:
                        # A device that computes a wrong value: the kernel's last
                        # array argument (an output) is off by 1e-3 relative.
                        out = np.asarray([a for a in args if isinstance(a, np.ndarray)][-1])
                        np.multiply(out, 1.001, out=out)
                on_stream(run)(grid, block, args, **kwargs)

        # Private (0700) and removed when the process exits.
        sources = cuda_emulator._scratch_dir("gpumatch-rawmodule-")

        class RawModule:
            """CUDA source compiled for the CPU, ``-D`` options included: the
            kernels of ``kernels/`` (through gpumatch's own module loading) and
            the benchmarks' inline ones."""

            def __init__(self, code=None, *, path=None, options=(), backend="nvrtc",
                         translate_cucomplex=False, enable_cooperative_groups=False,
                         name_expressions=None, jitify=False):
                if code is None:
                    code = pathlib.Path(path).read_text()
                name = hashlib.sha256(code.encode()).hexdigest()[:16] + ".cu"
                if not (sources / name).exists():
                    (sources / name).write_text(code)
                self.filename = name
                self.defines = dict(o[2:].split("=", 1) for o in options if o.startswith("-D"))

            def get_function(self, name):
                return Launch(cuda_emulator.compile_kernel(self.filename, name, self.defines,
                                                           directory=sources))

        cupy.RawModule = RawModule
        _check_against_cupy(cupy, cupyx)
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
    _check_against_cupy(cupy, cupyx)


def _install_library_errors():
    """CuPy's cuSOLVER and cuBLAS errors, where CuPy keeps them
    (``cupy_backends.cuda.libs.cusolver.CUSOLVERError``, ``...cublas.CUBLASError``:
    RuntimeErrors made from the library's status, named in the message), for
    tests that make a library call fail."""
    for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
        sys.modules[name] = types.ModuleType(name)
    for lib, cls in (("cusolver", "CUSOLVERError"), ("cublas", "CUBLASError")):
        prefix = f"{lib.upper()}_STATUS_"
        status = {3: "INVALID_VALUE" if lib == "cusolver" else "ALLOC_FAILED",
                  7: "INVALID_VALUE" if lib == "cublas" else "INTERNAL_ERROR",
                  13: "EXECUTION_FAILED"}

        def __init__(self, code, _prefix=prefix, _status=status):
            self.status = code
            RuntimeError.__init__(self, _prefix + _status.get(code, str(code)))

        module = types.ModuleType(f"cupy_backends.cuda.libs.{lib}")
        setattr(module, cls, type(cls, (RuntimeError,), {"__init__": __init__}))
        sys.modules[module.__name__] = module
        setattr(sys.modules["cupy_backends.cuda.libs"], lib, module)


def _check_against_cupy(cupy, cupyx):
    """The fake offers nothing that the recorded CuPy lacks (else code could
    pass here and fail on a GPU)."""
    import cupy_api

    spaces = {"cupy": cupy, "cupy.cuda": cupy.cuda, "cupy.cuda.runtime": cupy.cuda.runtime,
              "cupy.cuda.memory": cupy.cuda.memory, "cupyx": cupyx,
              "cupy.cuda.Stream": cupy.cuda.Stream, "cupy.cuda.Event": cupy.cuda.Event,
              "cupy.cuda.Device": cupy.cuda.Device}
    extra = [f"{prefix}.{name}" for prefix, space in spaces.items()
             for name in (vars(space) if not isinstance(space, type) else space.__dict__)
             if not name.startswith("_") and not cupy_api.has(f"{prefix}.{name}")]
    extra = [e for e in extra if e not in _FAKE_ONLY]
    if extra:
        raise AssertionError(f"the fake CuPy offers what CuPy {cupy_api.load()[0]} lacks: {extra}")


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
