"""Adaptive moments of many stamps on the device (``kernels/adaptive_moments.cu``).

The device twin of :func:`gpumatch.moments.adaptive_moments_batch`: one thread
block per stamp runs the whole fixed-point iteration, where the array form
would launch ~100 small kernels per step. Stamps whose shared-memory need
exceeds the device's limit use the array form on the device instead.
"""

from __future__ import annotations

import numpy as np

from .module import device_limits, get_kernel

__all__ = ["adaptive_moments_cupy", "am_shared_bytes", "AM_THREADS"]

_SOURCE = "adaptive_moments.cu"
_NAME = "gm_adaptive_moments"
#: Threads per block (``AM_THREADS`` in the .cu file).
AM_THREADS = 128
_NSUM = 6


def am_shared_bytes(ny, nx, threads=AM_THREADS):
    """Dynamic shared memory of one block; mirrors the layout in the .cu file."""
    return 8 * (ny * nx + _NSUM * threads + 8)


def adaptive_moments_cupy(stamps, max_iter=100, rtol=1e-8):
    """``xc, yc, ixx, iyy, ixy`` of every stamp ``(n, ny, nx)``, as a CuPy ``(n, 5)``
    array; NaN rows where the stamp is not finite, has no positive flux, or
    does not converge in ``max_iter`` steps."""
    import cupy as cp

    stamps = cp.ascontiguousarray(cp.asarray(stamps, dtype=cp.float64))
    if stamps.ndim != 3:
        raise ValueError(f"stamps must be (n, ny, nx), got shape {stamps.shape}")
    n, ny, nx = stamps.shape
    out = cp.empty((n, 5), dtype=cp.float64)
    if n == 0:
        return out
    smem = am_shared_bytes(ny, nx)
    if ny * nx == 0 or smem > device_limits()["max_shared_optin"]:
        from ..moments import adaptive_moments_batch

        return adaptive_moments_batch(stamps, max_iter, rtol, xp=cp, device_kernel=False)
    fn = get_kernel(_SOURCE, _NAME, {"AM_THREADS": AM_THREADS}, smem)
    fn((n,), (AM_THREADS,), (stamps, np.int32(n), np.int32(ny), np.int32(nx), np.int32(max_iter),
                             np.float64(rtol), out), shared_mem=smem)
    return out
