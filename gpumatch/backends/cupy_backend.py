"""The GPU backend: CuPy arrays, fused CUDA kernels for the heavy stages.

Data stay on the device from the PSF stamps (rendered there in one batch for
the models that declare ``renders_on_device``) to the matched exposure. The
spatial system (a few hundred unknowns) is solved in float64 either on the
host (LAPACK, after copying it back; the kernel coefficients are held by the
host-side :class:`~gpumatch.kernel.SpatialKernel` anyway) or on the device
(stacked cuSOLVER calls, then one small copy of the solution): the first pays
the copy and one core's LAPACK, the second a device eigensolver's launch
sequence. Which is faster depends on the machine, so both exist and
``ModelPsfMatchTask(..., spatial_solve=...)`` chooses; the default, ``"host"``
for now, is to be decided by measurement on a GPU (``benchmarks/bench_gpu.py``
times both). The CUDA host code is in :mod:`gpumatch.cuda`.

CuPy is imported when the backend is made, not when this module is.
"""

from __future__ import annotations

import logging

import numpy as np

from ..apply import PendingExposure
from ..cuda.apply import HostTransfers, pinned_empty, start_convolve_planes_cupy
from ..cuda.moments import adaptive_moments_cupy
from ..cuda.normal_equations import candidate_normal_equations_cupy
from ..linalg import DEVICE_FAILURES, solve_symmetric_batch
from ..spatial_solve import solve_spatial_systems
from .base import Backend, check_spatial_solve

log = logging.getLogger("gpumatch")

__all__ = ["CupyBackend"]


class CupyBackend(Backend):
    """The GPU backend: CuPy arrays, fused CUDA kernels for the heavy stages.

    Parameters
    ----------
    spatial_solve : {"host", "device"}, optional
        Where the spatial system is solved (see the module). Default: the
        class's, ``_spatial_solve``.
    xp : module, optional
        The CuPy module (default: ``import cupy``).
    """

    name = "cupy"
    on_device = True
    device_errors = DEVICE_FAILURES
    _spatial_solve = "host"
    #: Allocates host planes that this backend reads from files: pinned, so that
    #: they are copied to the device directly, with no staging copy.
    empty_host = staticmethod(pinned_empty)

    def __init__(self, spatial_solve=None, xp=None):
        if xp is None:
            import cupy as xp
        self.xp = xp
        super().__init__(spatial_solve)

    @classmethod
    def for_namespace(cls, xp):
        return cls(xp=xp)

    @property
    def oom_errors(self):
        return (self.xp.cuda.memory.OutOfMemoryError,)

    @property
    def spatial_solve(self):
        """Where the spatial system is solved: ``"host"`` (LAPACK) or ``"device"`` (cuSOLVER)."""
        return self._spatial_solve

    @spatial_solve.setter
    def spatial_solve(self, where):
        self._spatial_solve = check_spatial_solve(where)

    # -- arrays and memory ------------------------------------------------------------

    def to_host(self, array):
        return array.get() if self.owns(array) else np.asarray(array)

    def solve_triangular(self, L, B, trans="N"):
        from cupyx.scipy.linalg import solve_triangular

        return solve_triangular(L, B, trans=trans, lower=True, check_finite=False)

    def fused_moments(self, stamps, max_iter=100, rtol=1e-8):
        """:func:`gpumatch.cuda.moments.adaptive_moments_cupy` (one launch for all stamps)."""
        return adaptive_moments_cupy(stamps, max_iter, rtol)

    def describe_device(self):
        """The CUDA device, in words (name, index, memory)."""
        try:
            cuda = self.xp.cuda
            dev = cuda.Device().id
            props = cuda.runtime.getDeviceProperties(dev)
            name = props["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            return f"{name} (CUDA device {dev}, {props['totalGlobalMem'] / 2**30:.0f} GiB)"
        except Exception as exc:  # a broken device is reported, not raised, here
            return f"CUDA device (properties unavailable: {exc.__class__.__name__}: {exc})"

    def free_memory(self):
        """Free device bytes, counting the blocks CuPy's pool holds unused."""
        xp = self.xp
        free, _ = xp.cuda.runtime.memGetInfo()
        return free + xp.get_default_memory_pool().free_bytes()

    def release_cached_memory(self):
        self.xp.get_default_memory_pool().free_all_blocks()
        self.xp.get_default_pinned_memory_pool().free_all_blocks()

    def sync(self):
        """Wait for all work queued on the current stream."""
        self.xp.cuda.get_current_stream().synchronize()

    # -- stages -------------------------------------------------------------------------

    def normal_equations(self, templates, targets, basis, variance, factors=None):
        """Per-candidate ``M`` and ``b`` (float64, on the device)."""
        return candidate_normal_equations_cupy(templates, targets, basis, variance)

    def solve_candidates(self, M, b):
        """Single-candidate kernels ``M^-1 b`` (diagnostics): stacked Cholesky on the
        device in bounded chunks, the pseudo-inverse where it is not accepted, as on
        the host; a chunk whose device call fails is redone smaller, then on the host
        (:func:`~gpumatch.linalg.solve_symmetric_batch`)."""
        return solve_symmetric_batch(self.xp.asarray(M), self.xp.asarray(b), self.xp)

    def solve_spatial_many(self, As, rhss, nb, nkt, kernel_sums, condition_type="EIGENVALUE",
                           to_models=None):
        """:func:`~gpumatch.spatial_solve.solve_spatial_systems` where :attr:`spatial_solve`
        says (on the device, one stacked solve for all the systems; if a device call
        fails, on the host, where the same rule gives the same answers)."""
        args = (As, rhss, nb, nkt, kernel_sums, condition_type)
        if self._spatial_solve == "device":
            try:
                return solve_spatial_systems(*args, xp=self.xp, to_models=to_models)
            except DEVICE_FAILURES as exc:
                log.warning("device solve of %d spatial systems failed (%s: %s); solving them "
                            "on the host", len(As), type(exc).__name__, exc)
        return solve_spatial_systems(*args, xp=np, to_models=to_models)

    def _start_apply(self, exposure, kernel, psf, transfers):
        planes = start_convolve_planes_cupy(exposure.image, exposure.variance, exposure.mask,
                                            kernel, exposure.bbox,
                                            exposure.get_plane_bitmask("NO_DATA"),
                                            transfers=transfers)
        return PendingExposure(planes, exposure, exposure.psf if psf is None else psf)

    def start_apply(self, exposure, kernel, psf, transfers=None):
        """The application, returned once its copies and launches are queued.

        On a device out-of-memory error the memory pools' cached blocks (for
        example those left by a batch of :func:`gpumatch.match_many`) are freed
        and the application is queued again, once.
        """
        try:
            return self._start_apply(exposure, kernel, psf, transfers)
        except self.oom_errors:
            self.release_cached_memory()
            log.warning("device out of memory applying the kernel; retrying once")
            return self._start_apply(exposure, kernel, psf, transfers)

    def transfers(self):
        """Streams that consecutive host-resident applications share, so that one
        exposure's copies in overlap the previous one's compute."""
        return HostTransfers()
