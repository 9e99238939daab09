"""CuPy/CUDA implementations of the backend-specific stages.

Same interface as :class:`gpumatch.stages.NumpyStages`; the task drives both.
Data stay on the device from the PSF stamps (rendered there in one batch for
the built-in analytic models) to the matched exposure; only the spatial system
(a few hundred unknowns) is solved on the host, in float64, because the kernel
coefficients are held by the host-side :class:`~gpumatch.kernel.SpatialKernel`
anyway and LAPACK on a 157 x 157 matrix is faster than a device eigensolver's
launch sequence.
"""

from __future__ import annotations

import logging

import cupy

from ..apply import apply_kernel
from ..linalg import solve_symmetric_batch
from .normal_equations import candidate_normal_equations_cupy

log = logging.getLogger("gpumatch")

__all__ = ["CupyStages"]


class CupyStages:
    """The GPU backend: CuPy arrays, fused CUDA kernels for the heavy stages."""

    name = "cupy"
    xp = cupy

    def sync(self):
        """Wait for all work queued on the current stream."""
        cupy.cuda.get_current_stream().synchronize()

    def normal_equations(self, templates, targets, basis, variance):
        """Per-candidate ``M`` and ``b`` (float64, on the device)."""
        return candidate_normal_equations_cupy(templates, targets, basis, variance)

    def solve_candidates(self, M, b):
        """Single-candidate kernels ``M^-1 b`` (batched eigendecomposition on the device,
        pseudo-inverse where singular, as on the host)."""
        return solve_symmetric_batch(cupy.asarray(M), cupy.asarray(b), cupy)

    def apply(self, exposure, kernel, psf):
        """Exact per-pixel application; stays on the device for CuPy planes.

        On a device out-of-memory error the memory pools' cached blocks (for
        example those left by a batch of :func:`gpumatch.match_many`) are freed
        and the application is retried once.
        """
        try:
            return apply_kernel(exposure, kernel, psf=psf, backend="cupy")
        except cupy.cuda.memory.OutOfMemoryError:
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
            log.warning("device out of memory applying the kernel; retrying once")
            return apply_kernel(exposure, kernel, psf=psf, backend="cupy")
