"""Array backends and their registry.

A backend (:class:`~gpumatch.backends.base.Backend`) is registered under a
name with :func:`register_backend`; ``ModelPsfMatchTask(backend=name)``,
:func:`gpumatch.match_many`, the command line's ``--backend`` and
:func:`gpumatch.backend.array_namespace` all read this one registry. The
implementation is named as ``"module:attribute"`` and imported only when the
backend is used, so registering CuPy imports nothing. Other packages add
backends through the ``gpumatch.backends`` entry-point group (the entry point's
value is the factory, ``"module:Class"``).

Adding a backend is one module (a :class:`Backend` subclass) and one
:func:`register_backend` line.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from collections.abc import Callable

from .base import Backend

log = logging.getLogger("gpumatch")

__all__ = ["Backend", "register_backend", "unregister_backend", "backend_names", "get_backend",
           "resolve_backend_name", "backend_for_namespace", "backend_for_arrays", "backend_status",
           "cupy_status", "ENTRY_POINT_GROUP"]

#: The entry-point group through which other packages register backends.
ENTRY_POINT_GROUP = "gpumatch.backends"


@dataclass
class _Entry:
    name: str
    factory: object  # a callable, or "module:attribute" imported on first use
    available: Callable[[], tuple] | None
    array_module: str
    priority: int | None

    def load(self):
        if isinstance(self.factory, str):
            module, _, attr = self.factory.partition(":")
            self.factory = getattr(importlib.import_module(module), attr)
        return self.factory

    def status(self):
        """``(usable, why)``."""
        return (True, "ok") if self.available is None else self.available()


_REGISTRY: dict = {}


def register_backend(name, factory, *, available=None, array_module="numpy", priority=None):
    """Register a backend under ``name``.

    Parameters
    ----------
    name : str
        What ``ModelPsfMatchTask(backend=...)`` and ``--backend`` accept.
    factory : callable or str
        Makes the :class:`Backend` (called with ``spatial_solve=``); a string
        ``"module:attribute"`` is imported when the backend is first used.
    available : callable, optional
        Returns ``(usable, why)``: whether the backend can run here, and why
        not. Default: always usable.
    array_module : str
        Top-level module name of its arrays' type (``"numpy"``, ``"cupy"``):
        how an array is traced back to its backend without importing it.
        The first backend registered for a module answers for its arrays.
    priority : int, optional
        ``backend="auto"`` takes the usable backend of highest priority;
        None: never chosen by ``"auto"``.
    """
    if not name or name == "auto":
        raise ValueError(f"backend name {name!r} is reserved")
    _REGISTRY[name] = _Entry(name, factory, available, array_module, priority)


def unregister_backend(name):
    """Remove the backend registered under ``name`` (nothing if none is)."""
    _REGISTRY.pop(name, None)


def _load_entry_points():
    try:
        from importlib.metadata import entry_points

        found = entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # a broken installed distribution must not break gpumatch
        log.debug("reading entry points %s failed: %s", ENTRY_POINT_GROUP, exc)
        return
    for ep in found:
        if ep.name not in _REGISTRY:
            register_backend(ep.name, ep.value)


@functools.lru_cache(maxsize=1)
def _entry_points_loaded():
    _load_entry_points()
    return True


def _entries():
    _entry_points_loaded()
    return _REGISTRY


def backend_names():
    """``"auto"`` and the registered names (the command line's choices)."""
    return ("auto", *_entries())


def backend_status(name):
    """``(usable, why)`` of a registered backend."""
    entry = _entries().get(name)
    if entry is None:
        return False, f"it is not one of {backend_names()}"
    return entry.status()


@functools.cache
def cupy_status():
    """``(usable, why)`` for CuPy: it imports and a CUDA device answers."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return False, f"cupy does not import ({exc.__class__.__name__}: {exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "no CUDA device is visible"
        cupy.zeros(1).sum().item()
    except Exception as exc:
        return False, f"no usable CUDA device ({exc.__class__.__name__}: {exc})"
    return True, "ok"


def resolve_backend_name(name):
    """The registered name to use for ``name`` (``"auto"``: the usable one of highest
    priority, logged).

    Raises
    ------
    ValueError
        ``name`` is not registered.
    RuntimeError
        It is registered but cannot run here (the message says why).
    """
    entries = _entries()
    if name == "auto":
        ranked = sorted((e for e in entries.values() if e.priority is not None),
                        key=lambda e: -e.priority)
        why_not = []
        for entry in ranked:
            ok, why = entry.status()
            if ok:
                log.info("backend='auto' chose %s%s", entry.name,
                         "".join(f" ({w})" for w in why_not))
                return entry.name
            why_not.append(why)
        raise RuntimeError("backend='auto' found no usable backend: " + "; ".join(why_not))
    entry = entries.get(name)
    if entry is None:
        raise ValueError(f"backend={name!r} is not one of {backend_names()}")
    ok, why = entry.status()
    if not ok:
        raise RuntimeError(
            f"backend={name!r} was requested but {why}; "
            + ("install the 'cupy' extra on a machine with an NVIDIA GPU, "
               if entry.array_module == "cupy" else "")
            + "or use backend='numpy'")
    return name


def get_backend(name, **options):
    """A new :class:`Backend` for a registered ``name`` (or ``name`` itself if it is one)."""
    if isinstance(name, Backend):
        return name
    entry = _entries().get(name)
    if entry is None:
        raise ValueError(f"backend={name!r} is not one of {backend_names()}")
    return entry.load()(**options)


def _entry_for_module(module_name):
    for entry in _entries().values():
        if entry.array_module == module_name:
            return entry
    raise ValueError(f"no gpumatch backend is registered for arrays of {module_name!r}")


def backend_for_namespace(xp):
    """The backend whose arrays are ``xp``'s (``xp`` a module such as numpy or cupy).

    Raises
    ------
    ValueError
        No backend is registered for ``xp``.
    """
    name = getattr(xp, "__name__", "").partition(".")[0]
    return _entry_for_module(name).load().for_namespace(xp)


def backend_for_arrays(*arrays):
    """The backend that owns the first of ``arrays`` not on the host (NumPy's if none)."""
    for a in arrays:
        module = type(a).__module__.partition(".")[0]
        if module != "numpy":
            try:
                entry = _entry_for_module(module)
            except ValueError:
                continue  # lists, scalars, foreign types: read as NumPy
            return entry.load().for_namespace(importlib.import_module(module))
    return backend_for_namespace(_numpy())


def _numpy():
    import numpy

    return numpy


# The built-in backends; a new one is one module and one line here (or an entry point).
register_backend("numpy", "gpumatch.backends.numpy_backend:NumpyBackend", priority=0)
register_backend("cupy", "gpumatch.backends.cupy_backend:CupyBackend",
                 available=lambda: cupy_status(),  # looked up when asked: tests replace it
                 array_module="cupy", priority=10)
