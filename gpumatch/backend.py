"""Array backends by name: the user-facing side of :mod:`gpumatch.backends`."""

from __future__ import annotations

import contextlib

import numpy as np

from . import backends as _backends
from .backends import backend_for_arrays, backend_names, resolve_backend_name

__all__ = ["array_namespace", "resolve_backend", "cupy_usable", "to_numpy", "single_threaded_blas",
           "backend_names"]


def cupy_usable():
    """Whether CuPy imports and a CUDA device answers.

    Returns
    -------
    bool
        True when the ``"cupy"`` backend can be used in this process.
    """
    return _backends.cupy_status()[0]


def resolve_backend(name):
    """The registered backend name to use for ``name`` (see :func:`backend_names`).

    ``"auto"`` picks the usable backend of highest priority (CuPy when it
    imports and a device answers, else NumPy) and logs the choice.
    """
    return resolve_backend_name(name)


def array_namespace(*arrays):
    """The array module (numpy, cupy...) that holds ``arrays``, asked of the registry."""
    return backend_for_arrays(*arrays).xp


def to_numpy(a):
    """A NumPy view or copy of any backend's array."""
    if type(a) is np.ndarray:  # the common case, without a registry lookup
        return a
    return backend_for_arrays(a).to_host(a)


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
