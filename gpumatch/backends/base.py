"""The interface every array backend implements (:class:`Backend`).

A backend owns one array namespace (``xp``: NumPy, CuPy...) and supplies the
stages whose implementation depends on it: the per-candidate normal equations
and solves, the spatial solve, the application of the kernel, the transfers
between host and device, and the few array operations that differ between
namespaces (FFTs, triangular solves, the fused moments). The data path itself
(:mod:`gpumatch.stages`) is the same for all of them. Backends are found by
name through :mod:`gpumatch.backends`.
"""

from __future__ import annotations

import contextlib
import os
import platform

import numpy as np

__all__ = ["Backend", "SPATIAL_SOLVES", "check_spatial_solve"]

#: Where the GPU backend may solve the spatial system.
SPATIAL_SOLVES = ("host", "device")


def check_spatial_solve(where):
    """``where`` if it names a place to solve the spatial system, else ValueError."""
    if where not in SPATIAL_SOLVES:
        raise ValueError(f"spatial_solve={where!r} is not one of {SPATIAL_SOLVES}: 'host' solves "
                         "the spatial system with LAPACK, 'device' with cuSOLVER on the GPU")
    return where


class Backend:
    """One array backend: its namespace, its stages, its memory.

    Subclasses set :attr:`name` and :attr:`xp` and implement the stage
    methods; everything else has a host default. Instances are cheap; the
    task holds one (``ModelPsfMatchTask.array_backend``).

    Parameters
    ----------
    spatial_solve : {"host", "device"}, optional
        Where the spatial system is solved; host-only backends ignore it.
    """

    #: The name it is registered under (``ModelPsfMatchTask(backend=name)``).
    name = "abstract"
    #: The array namespace (module) of its arrays.
    xp = np
    #: True when its arrays live off the host (each synchronisation costs).
    on_device = False
    #: What its calls raise when device memory runs out (retried smaller).
    oom_errors: tuple = ()
    #: What a device linear-algebra call may raise that the host can still do.
    device_errors: tuple = ()
    #: Exposures per batch of :func:`gpumatch.match_many` on the host.
    default_batch = 8
    #: Upper bound of a batch sized from the free memory of a device.
    max_batch = 256
    #: Allocates host planes that this backend reads from files.
    empty_host = staticmethod(np.empty)

    def __init__(self, spatial_solve=None):
        if spatial_solve is not None:
            self.spatial_solve = spatial_solve

    @classmethod
    def for_namespace(cls, xp):
        """The backend for arrays of namespace ``xp`` (its registered module)."""
        return cls()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"

    # -- where the spatial system is solved ---------------------------------------

    @property
    def spatial_solve(self):
        """Where the spatial system is solved: ``"host"`` unless the backend says otherwise."""
        return "host"

    @spatial_solve.setter
    def spatial_solve(self, where):
        check_spatial_solve(where)  # a host backend accepts and ignores a valid choice

    # -- arrays -------------------------------------------------------------------

    def owns(self, array):
        """True when ``array`` belongs to this backend's namespace."""
        return type(array).__module__.partition(".")[0] == self.xp.__name__.partition(".")[0]

    def asarray(self, array):
        """``array`` as this backend's array (copied across devices when needed)."""
        return self.xp.asarray(array)

    def to_host(self, array):
        """A NumPy view or copy of one of this backend's arrays."""
        return np.asarray(array)

    @property
    def fft(self):
        """The FFT namespace of the arrays (``rfft2``, ``irfft2``)."""
        return self.xp.fft

    def solve_triangular(self, L, B, trans="N"):
        """``L^-1 B`` (``trans="N"``) or ``L^-T B`` (``"T"``), ``L`` lower-triangular."""
        raise NotImplementedError

    def errstate(self):
        """A context in which floating-point warnings of the namespace are silent."""
        return contextlib.nullcontext()

    #: The fused adaptive moments, ``fused_moments(stamps, max_iter, rtol)`` -> ``(n, 5)``,
    #: or None where the array form (:func:`gpumatch.moments.adaptive_moments_batch`) is used.
    fused_moments = None

    def describe_device(self):
        """The device it computes on, in words (the host's processor here)."""
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f
                            if line.startswith("model name")), cpu)
        except OSError:
            pass
        return f"CPU {cpu} ({os.cpu_count()} cores)"

    # -- memory -------------------------------------------------------------------

    def free_memory(self):
        """Free bytes where its arrays live, or None when the host's memory is what counts."""
        return None

    def release_cached_memory(self):
        """Give back what the namespace's memory pools hold but do not use."""

    def sync(self):
        """Wait for all queued work (stage timings mean something after it)."""

    # -- stages -------------------------------------------------------------------

    def normal_equations(self, templates, targets, basis, variance, factors=None):
        """Per-candidate ``M`` and ``b`` (float64), docs/algorithm.md section 4.

        ``factors`` (a :class:`gpumatch.basis.SeparableBasis` of ``basis``, or
        None) may be used to correlate with 1-D filters instead of whole images."""
        raise NotImplementedError

    def solve_candidates(self, M, b):
        """Single-candidate kernels ``M^-1 b`` (diagnostics)."""
        raise NotImplementedError

    def solve_spatial(self, A, rhs, nb, nkt, kernel_sum, condition_type="EIGENVALUE",
                      to_model=None):
        """One spatial system (:func:`gpumatch.spatial_solve.solve_spatial_system`)."""
        (sol,) = self.solve_spatial_many([A], [rhs], nb, nkt, [kernel_sum], condition_type,
                                         [to_model])
        if isinstance(sol, BaseException):
            raise sol
        return sol

    def solve_spatial_many(self, As, rhss, nb, nkt, kernel_sums, condition_type="EIGENVALUE",
                           to_models=None):
        """:func:`gpumatch.spatial_solve.solve_spatial_systems`: a solution or the
        :class:`~gpumatch.errors.SolutionError` of each system."""
        raise NotImplementedError

    def start_apply(self, exposure, kernel, psf, transfers=None):
        """The application of ``kernel`` to ``exposure`` (docs/algorithm.md section 8),
        returned once queued, as a :class:`gpumatch.apply.PendingExposure`."""
        raise NotImplementedError

    def apply(self, exposure, kernel, psf):
        """:meth:`start_apply`, waited for: the matched exposure."""
        return self.start_apply(exposure, kernel, psf).result()

    def transfers(self):
        """What consecutive applications share (streams on a device); None on the host."""
        return None
