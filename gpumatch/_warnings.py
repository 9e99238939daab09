"""Thread-safe silencing of third-party warnings.

``warnings.catch_warnings()`` saves and restores the process-wide filter
list, so two threads inside it at once (before Python 3.14) can leave one
thread's filters installed for good -- for example "ignore every warning"
after parallel FITS reads. gpumatch's own uses go through :func:`quiet` and
:func:`recorded`, which hold one process-wide lock for the (short) time they
are inside ``catch_warnings``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

__all__ = ["quiet", "recorded"]

_LOCK = threading.RLock()


@contextlib.contextmanager
def quiet():
    """Ignore every warning inside the block (astropy's FITS/WCS notices)."""
    with _LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def recorded():
    """Record every warning raised inside the block; yields the list."""
    with _LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
