"""NumPy implementations of the backend-specific stages."""

from __future__ import annotations

import numpy as np

from .apply import start_apply_kernel
from .normal_equations import candidate_normal_equations, solve_candidates
from .spatial_solve import solve_spatial_system, solve_spatial_systems

__all__ = ["NumpyStages"]


class NumpyStages:
    """The CPU backend: NumPy arrays, SciPy FFTs."""

    name = "numpy"
    xp = np
    #: Allocates host planes that this backend reads from files.
    empty_host = staticmethod(np.empty)

    def sync(self):
        pass

    def normal_equations(self, templates, targets, basis, variance):
        return candidate_normal_equations(templates, targets, basis, variance, xp=np)

    def solve_candidates(self, M, b):
        return solve_candidates(M, b, xp=np)

    def solve_spatial(self, A, rhs, nb, nkt, kernel_sum, condition_type="EIGENVALUE",
                      to_model=None):
        """:func:`~gpumatch.spatial_solve.solve_spatial_system` (LAPACK, system by system)."""
        return solve_spatial_system(A, rhs, nb, nkt, kernel_sum, condition_type, xp=np,
                                    to_model=to_model)

    def solve_spatial_many(self, As, rhss, nb, nkt, kernel_sums, condition_type="EIGENVALUE",
                           to_models=None):
        """:func:`~gpumatch.spatial_solve.solve_spatial_systems`: a :class:`SpatialSolution`
        or the :class:`~gpumatch.errors.SolutionError` of each system."""
        return solve_spatial_systems(As, rhss, nb, nkt, kernel_sums, condition_type, xp=np,
                                     to_models=to_models)

    def apply(self, exposure, kernel, psf):
        return self.start_apply(exposure, kernel, psf).result()

    def start_apply(self, exposure, kernel, psf, transfers=None):
        """The application, done before this returns (see the CuPy twin)."""
        return start_apply_kernel(exposure, kernel, psf=psf, backend="numpy")

    def transfers(self):
        """Nothing to share between applications on the CPU."""
        return None
