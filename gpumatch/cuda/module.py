"""Loading and caching the CUDA C++ kernels of ``kernels/*.cu``.

The sources ship as the package ``gpumatch.kernels`` (``pyproject.toml`` maps the
top-level ``kernels/`` directory onto it); in a plain source checkout that is
not installed, the directory next to the package is used instead.

Every kernel is specialised at compile time through ``-D`` macros (kernel size,
spatial order, stamp size, dtypes...), so one source gives one module per
configuration. Modules are compiled by NVRTC through :class:`cupy.RawModule`,
which targets the current device (``-arch=sm_XY`` of its compute capability,
capped at the newest architecture NVRTC knows) and keeps the cubin in CuPy's
on-disk kernel cache, and are kept here per (file, macros, device).

Nothing in this module needs CuPy until a kernel is requested, so the helpers
that list and read the sources work on any machine (the compile test uses them).
"""

from __future__ import annotations

import functools
import importlib.resources
import pathlib
import threading

import numpy as np

__all__ = ["kernel_dir", "kernel_files", "kernel_source", "get_kernel", "COMPILE_OPTIONS",
           "ctype_name", "device_limits"]

#: NVRTC options common to every module (CuPy adds the architecture, and
#: ``-ftz=true`` which the kernels are written to tolerate).
COMPILE_OPTIONS = ("-std=c++17",)

_CTYPES = {
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
    np.dtype(np.int8): "signed char",
    np.dtype(np.uint8): "unsigned char",
    np.dtype(np.int16): "short",
    np.dtype(np.uint16): "unsigned short",
    np.dtype(np.int32): "int",
    np.dtype(np.uint32): "unsigned int",
    np.dtype(np.int64): "long long",
    np.dtype(np.uint64): "unsigned long long",
}

_lock = threading.Lock()


def ctype_name(dtype):
    """The C type of a NumPy/CuPy dtype, for the ``*_T`` macros of the kernels."""
    try:
        return _CTYPES[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise TypeError(f"no CUDA kernel type for dtype {np.dtype(dtype)}") from None


def kernel_dir():
    """Directory (a ``Traversable``) holding the ``*.cu`` sources."""
    try:
        d = importlib.resources.files("gpumatch.kernels")
        if d.joinpath("apply_spatial.cu").is_file():
            return d
    except (ModuleNotFoundError, TypeError):
        pass
    return pathlib.Path(__file__).resolve().parents[2] / "kernels"


def kernel_files():
    """Names of every CUDA source shipped in ``gpumatch.kernels``."""
    return sorted(p.name for p in kernel_dir().iterdir() if p.name.endswith(".cu"))


@functools.cache
def kernel_source(filename):
    """Text of one kernel source file."""
    return kernel_dir().joinpath(filename).read_text(encoding="utf-8")


def _options(defines):
    return COMPILE_OPTIONS + tuple(f"-D{k}={v}" for k, v in defines)


@functools.lru_cache(maxsize=128)
def _function(filename, name, defines, device_id):
    import cupy

    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=kernel_source(filename), options=_options(defines))
        return module.get_function(name)


def get_kernel(filename, name, defines, shared_bytes=0):
    """The compiled kernel ``name`` of ``filename`` for macros ``defines``.

    Parameters
    ----------
    filename : str
        Source in ``kernels/``.
    name : str
        ``extern "C"`` kernel name.
    defines : dict
        Macro name to value (``-DNAME=VALUE``).
    shared_bytes : int
        Dynamic shared memory the launch will use; above 48 KiB the kernel's
        limit is raised (once per kernel and device).

    Returns
    -------
    cupy.RawKernel
    """
    import cupy

    dev = cupy.cuda.Device().id
    key = tuple(sorted((str(k), str(v)) for k, v in defines.items()))
    fn = _function(filename, name, key, dev)
    if shared_bytes > 48 * 1024:
        # Asked of the function itself, so a kernel recompiled after leaving
        # the cache gets its limit raised again.
        with _lock:
            if fn.max_dynamic_shared_size_bytes < shared_bytes:
                fn.max_dynamic_shared_size_bytes = int(shared_bytes)
    return fn


@functools.cache
def _device_limits(device_id):
    import cupy

    rt = cupy.cuda.runtime
    return {
        "max_shared_optin": int(rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                                      device_id)),
        "sm_count": int(rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, device_id)),
        "compute_capability": cupy.cuda.Device(device_id).compute_capability,
    }


def device_limits():
    """Shared-memory opt-in limit, multiprocessor count and compute capability."""
    import cupy

    return _device_limits(cupy.cuda.Device().id)
