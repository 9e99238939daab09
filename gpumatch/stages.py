"""NumPy implementations of the backend-specific stages."""

from __future__ import annotations

import numpy as np

from .apply import apply_kernel
from .normal_equations import candidate_normal_equations, solve_candidates

__all__ = ["NumpyStages"]


class NumpyStages:
    """The CPU backend: NumPy arrays, SciPy FFTs."""

    name = "numpy"
    xp = np

    def sync(self):
        pass

    def normal_equations(self, templates, targets, basis, variance):
        return candidate_normal_equations(templates, targets, basis, variance, xp=np)

    def solve_candidates(self, M, b):
        return solve_candidates(M, b, xp=np)

    def apply(self, exposure, kernel, psf):
        return apply_kernel(exposure, kernel, psf=psf, backend="numpy")
