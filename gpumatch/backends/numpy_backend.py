"""The CPU backend: NumPy arrays, SciPy FFTs and LAPACK."""

from __future__ import annotations

import numpy as np

from ..apply import PendingExposure, convolve_planes
from ..backend import to_numpy
from ..linalg import solve_symmetric_batch
from ..normal_equations import candidate_normal_equations
from ..spatial_solve import solve_spatial_systems
from .base import Backend

__all__ = ["NumpyBackend"]


class NumpyBackend(Backend):
    """The CPU backend: everything on the host, in NumPy arrays."""

    name = "numpy"
    xp = np

    def asarray(self, array):
        return to_numpy(array)

    @property
    def fft(self):
        import scipy.fft  # not at import time: `import gpumatch` stays light

        return scipy.fft

    def solve_triangular(self, L, B, trans="N"):
        from scipy.linalg import solve_triangular

        return solve_triangular(L, B, trans=trans, lower=True, check_finite=False)

    def errstate(self):
        return np.errstate(divide="ignore", invalid="ignore")

    def normal_equations(self, templates, targets, basis, variance, factors=None):
        return candidate_normal_equations(templates, targets, basis, variance, xp=np,
                                          factors=factors)

    def solve_candidates(self, M, b):
        return solve_symmetric_batch(M, b, np)

    def solve_spatial_many(self, As, rhss, nb, nkt, kernel_sums, condition_type="EIGENVALUE",
                           to_models=None):
        """LAPACK, system by system."""
        return solve_spatial_systems(As, rhss, nb, nkt, kernel_sums, condition_type, xp=np,
                                     to_models=to_models)

    def start_apply(self, exposure, kernel, psf, transfers=None):
        """The application, done before this returns (on the CPU nothing is queued)."""
        planes = convolve_planes(to_numpy(exposure.image), to_numpy(exposure.variance),
                                 to_numpy(exposure.mask), kernel, exposure.bbox,
                                 exposure.get_plane_bitmask("NO_DATA"))
        return PendingExposure(planes, exposure, exposure.psf if psf is None else psf)
