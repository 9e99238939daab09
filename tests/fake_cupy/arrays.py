"""The fake's device array and its host/device boundary: ``cupy.ndarray`` (an
``ndarray`` subclass from a module named ``cupy``), NumPy functions run as
CuPy's, CuPy's namespaces (``cupy.linalg``, ``cupy.fft``, ``cupyx.scipy``...)
and, when strict, NumPy's conversions refusing device arrays."""

from __future__ import annotations

import functools
import sys
import types

import numpy as np

#: Modules whose use of CuPy is checked like the real CuPy's (``__main__`` too):
#: gpumatch, the benchmarks and the tests. NumPy, SciPy and the fake itself are not.
CODE_UNDER_TEST = ("gpumatch", "bench_", "workloads", "test_", "random_kernels")


def install(ctx):
    """Define the device array and the boundary helpers on ``ctx`` and ``ctx.cupy``."""
    cupy, cupy_api, version, strict, COUNTS = (ctx.cupy, ctx.cupy_api, ctx.version, ctx.strict,
                                               ctx.COUNTS)
    _CODE_UNDER_TEST = CODE_UNDER_TEST

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
    import scipy.linalg
    import scipy.ndimage

    cupyx = ctx.cupyx
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    for sub in ("ndimage", "linalg"):
        module = module_api(f"cupyx.scipy.{sub}", getattr(scipy, sub))
        setattr(cupyx.scipy, sub, module)
        sys.modules[module.__name__] = module
    ctx.__dict__.update(ndarray=ndarray, unwrap=unwrap, wrap=wrap, on_device=on_device,
                        _any_host=_any_host, _checked=_checked, api=api, module_api=module_api)
