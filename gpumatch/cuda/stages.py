"""CuPy/CUDA implementations of the backend-specific stages.

Same interface as :class:`gpumatch.stages.NumpyStages`; the task drives both.
Data stay on the device from the PSF stamps (rendered there in one batch for
the built-in analytic models) to the matched exposure. The spatial system (a
few hundred unknowns) is solved in float64 either on the host (LAPACK, after
copying it back; the kernel coefficients are held by the host-side
:class:`~gpumatch.kernel.SpatialKernel` anyway) or on the device (stacked
cuSOLVER calls, then one small copy of the solution): the first pays the copy
and one core's LAPACK, the second a device eigensolver's launch sequence.
Which is faster depends on the machine, so both exist and
``ModelPsfMatchTask(..., spatial_solve=...)`` chooses; the default, ``"host"``
for now, is to be decided by measurement on a GPU (``benchmarks/bench_gpu.py``
times both).
"""

from __future__ import annotations

import logging

import cupy
import numpy as np

from ..apply import start_apply_kernel
from ..linalg import DEVICE_FAILURES, solve_symmetric_batch
from ..spatial_solve import check_spatial_solve, solve_spatial_systems
from .apply import pinned_empty
from .normal_equations import candidate_normal_equations_cupy

log = logging.getLogger("gpumatch")

__all__ = ["CupyStages"]


class CupyStages:
    """The GPU backend: CuPy arrays, fused CUDA kernels for the heavy stages.

    Parameters
    ----------
    spatial_solve : {"host", "device"}, optional
        Where the spatial system is solved (see the module). Default: the
        class's, ``_spatial_solve``.
    """

    name = "cupy"
    xp = cupy
    _spatial_solve = "host"
    #: Allocates host planes that this backend reads from files: pinned, so that
    #: they are copied to the device directly, with no staging copy.
    empty_host = staticmethod(pinned_empty)

    def __init__(self, spatial_solve=None):
        if spatial_solve is not None:
            self.spatial_solve = spatial_solve

    @property
    def spatial_solve(self):
        """Where the spatial system is solved: ``"host"`` (LAPACK) or ``"device"`` (cuSOLVER)."""
        return self._spatial_solve

    @spatial_solve.setter
    def spatial_solve(self, where):
        self._spatial_solve = check_spatial_solve(where)

    def sync(self):
        """Wait for all work queued on the current stream."""
        cupy.cuda.get_current_stream().synchronize()

    def normal_equations(self, templates, targets, basis, variance):
        """Per-candidate ``M`` and ``b`` (float64, on the device)."""
        return candidate_normal_equations_cupy(templates, targets, basis, variance)

    def solve_candidates(self, M, b):
        """Single-candidate kernels ``M^-1 b`` (diagnostics): stacked Cholesky on the
        device in bounded chunks, the pseudo-inverse where it is not accepted, as on
        the host; a chunk whose device call fails is redone smaller, then on the host
        (:func:`~gpumatch.linalg.solve_symmetric_batch`)."""
        return solve_symmetric_batch(cupy.asarray(M), cupy.asarray(b), cupy)

    def solve_spatial(self, A, rhs, nb, nkt, kernel_sum, condition_type="EIGENVALUE",
                      to_model=None):
        """:func:`~gpumatch.spatial_solve.solve_spatial_system` where :attr:`spatial_solve` says."""
        (sol,) = self.solve_spatial_many([A], [rhs], nb, nkt, [kernel_sum], condition_type,
                                         [to_model])
        if isinstance(sol, BaseException):
            raise sol
        return sol

    def solve_spatial_many(self, As, rhss, nb, nkt, kernel_sums, condition_type="EIGENVALUE",
                           to_models=None):
        """:func:`~gpumatch.spatial_solve.solve_spatial_systems` where :attr:`spatial_solve`
        says (on the device, one stacked solve for all the systems; if a device call
        fails, on the host, where the same rule gives the same answers)."""
        args = (As, rhss, nb, nkt, kernel_sums, condition_type)
        if self._spatial_solve == "device":
            try:
                return solve_spatial_systems(*args, xp=cupy, to_models=to_models)
            except DEVICE_FAILURES as exc:
                log.warning("device solve of %d spatial systems failed (%s: %s); solving them "
                            "on the host", len(As), type(exc).__name__, exc)
        return solve_spatial_systems(*args, xp=np, to_models=to_models)

    def apply(self, exposure, kernel, psf):
        """Exact per-pixel application; stays on the device for CuPy planes."""
        return self.start_apply(exposure, kernel, psf).result()

    def start_apply(self, exposure, kernel, psf, transfers=None):
        """:meth:`apply`, returned once its copies and launches are queued.

        On a device out-of-memory error the memory pools' cached blocks (for
        example those left by a batch of :func:`gpumatch.match_many`) are freed
        and the application is queued again, once.
        """
        try:
            return start_apply_kernel(exposure, kernel, psf=psf, backend="cupy",
                                      transfers=transfers)
        except cupy.cuda.memory.OutOfMemoryError:
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
            log.warning("device out of memory applying the kernel; retrying once")
            return start_apply_kernel(exposure, kernel, psf=psf, backend="cupy",
                                      transfers=transfers)

    def transfers(self):
        """Streams that consecutive host-resident applications share, so that one
        exposure's copies in overlap the previous one's compute."""
        from .apply import HostTransfers

        return HostTransfers()
