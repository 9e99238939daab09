"""Array backends: NumPy on the CPU, CuPy on a CUDA device."""

from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np

log = logging.getLogger("gpumatch")

__all__ = ["array_namespace", "resolve_backend", "cupy_usable", "to_numpy", "single_threaded_blas"]

BACKENDS = ("numpy", "cupy", "auto")


@functools.lru_cache(maxsize=None)
def _cupy_status():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return None, f"cupy does not import ({exc.__class__.__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return None, "no CUDA device is visible"
        cupy.zeros(1).sum().item()
    except Exception as exc:
        return None, f"no usable CUDA device ({exc.__class__.__name__}: {exc})"
    return cupy, "ok"


def cupy_usable():
    """True when CuPy imports and a CUDA device answers."""
    return _cupy_status()[0] is not None


def resolve_backend(name):
    """Return ``"numpy"`` or ``"cupy"`` for a requested backend name.

    ``"auto"`` picks cupy when it imports and a device is usable, else numpy,
    and logs the choice.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    if name == "numpy":
        return "numpy"
    cp, why = _cupy_status()
    if name == "cupy":
        if cp is None:
            raise RuntimeError(
                f"backend='cupy' was requested but {why}; install the 'cupy' extra on a "
                "machine with an NVIDIA GPU, or use backend='numpy'"
            )
        return "cupy"
    chosen = "cupy" if cp is not None else "numpy"
    log.info("backend='auto' chose %s%s", chosen, "" if cp is not None else f" ({why})")
    return chosen


def array_namespace(*arrays):
    """The array module (numpy or cupy) that holds ``arrays``."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy

            return cupy
    return np


def to_numpy(a):
    """A NumPy view/copy of a NumPy or CuPy array."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


@contextlib.contextmanager
def single_threaded_blas():
    """Run the enclosed code with one BLAS thread.

    gpumatch's matrix work is many small products, which one thread does
    fastest; idle BLAS threads would otherwise spin and slow the multi-threaded
    FFTs of the application, and the thread count would change the rounding
    (so results would depend on the machine's core count).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency
        yield
        return
    # The limit reaches only the BLAS libraries already loaded: SciPy's own
    # (loaded with scipy.linalg) would otherwise run multi-threaded in a
    # process's first run and round differently from later runs.
    import scipy.linalg  # noqa: F401

    with threadpool_limits(limits=1, user_api="blas"):
        yield
