"""Per-candidate normal equations on the device (``kernels/normal_equations.cu``).

One thread block per candidate convolves the template stamp with every basis
image on the good region and forms ``M = C^T C / var`` and ``b = C^T s / var``
in float64 without writing the design matrices to device memory (the kernel
source explains why this beats an im2col + batched GEMM formulation here).
The result equals :func:`gpumatch.normal_equations.candidate_normal_equations`
to float64 rounding.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .module import device_limits, get_kernel

log = logging.getLogger("gpumatch")

__all__ = ["candidate_normal_equations_cupy", "ne_shared_bytes", "ne_launch_config"]

_SOURCE = "normal_equations.cu"
_NAME = "gm_candidate_normal_equations"
_MAX_THREADS = 256


def ne_shared_bytes(kernel_size, stamp_size, n_basis):
    """Dynamic shared memory of one block; mirrors the layout in the .cu file."""
    win = (stamp_size + 1) // 2 * 2
    tpitch = win if (win // 2) % 2 == 1 else win + 2
    cpitch = n_basis if n_basis % 2 == 1 else n_basis + 1
    g = stamp_size - kernel_size + 1
    ss_len = (g * g + 1) // 2 * 2
    return 8 * (stamp_size * tpitch + ss_len + g * g * cpitch)


def ne_launch_config(kernel_size, stamp_size, n_basis):
    """Threads per block: the (basis, good row) items in as few equal passes as fit."""
    g = stamp_size - kernel_size + 1
    items = g * n_basis
    passes = max(1, math.ceil(items / _MAX_THREADS))
    per_pass = math.ceil(items / passes)
    return min(_MAX_THREADS, max(32, -(-per_pass // 32) * 32))


def candidate_normal_equations_cupy(templates, targets, basis, variance=2.0):
    """``M`` (n, nb, nb) and ``b`` (n, nb) for every candidate, on the device.

    Parameters
    ----------
    templates, targets : array (n, size, size)
        NumPy or CuPy; copied to the device as float64 if needed.
    basis : array (nb, k, k)
    variance : float

    Returns
    -------
    M, b : cupy.ndarray (float64)
    """
    import cupy as cp

    templates = cp.ascontiguousarray(cp.asarray(templates, dtype=cp.float64))
    targets = cp.ascontiguousarray(cp.asarray(targets, dtype=cp.float64))
    basis_d = cp.ascontiguousarray(cp.asarray(basis, dtype=cp.float64))
    n, size, size2 = templates.shape
    nb, k, k2 = basis_d.shape
    if size != size2 or k != k2 or targets.shape != templates.shape:
        raise ValueError(f"stamps {templates.shape}/{targets.shape} and basis {basis_d.shape} "
                         "must be (n, s, s) and (nb, k, k)")
    M = cp.empty((n, nb, nb), dtype=cp.float64)
    b = cp.empty((n, nb), dtype=cp.float64)
    if n == 0:
        return M, b
    g = size - k + 1
    smem = ne_shared_bytes(k, size, nb)
    if g < 1 or smem > device_limits()["max_shared_optin"]:
        from ..normal_equations import candidate_normal_equations

        log.debug("normal equations: %d-pixel stamps, %d bases need %d B of shared memory; "
                  "using the generic CuPy path", size, nb, smem)
        return candidate_normal_equations(templates, targets, basis_d, variance, xp=cp)
    threads = ne_launch_config(k, size, nb)
    fn = get_kernel(_SOURCE, _NAME, {"NE_KSIZE": k, "NE_STAMP": size, "NE_NBASIS": nb,
                                     "NE_MAX_THREADS": _MAX_THREADS}, smem)
    fn((n,), (threads,), (templates, targets, basis_d, np.float64(1.0 / variance), np.int32(n),
                          M, b), shared_mem=smem)
    return M, b
