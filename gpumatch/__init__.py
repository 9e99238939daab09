"""gpumatch: GPU-first model-to-model PSF matching for astronomical exposures.

A spatially varying Alard-Lupton kernel is solved from PSF model stamps on a
grid of cells and applied to the exposure exactly per pixel, on a CUDA device
(CuPy) or on the CPU (NumPy/SciPy) with the same results.
"""

import logging as _logging

from .apply import apply_kernel
from .backend import cupy_usable
from .config import ModelPsfMatchConfig
from .errors import (BackendWarning, ConditioningWarning, ConfigError, GpumatchError,
                     GpumatchWarning, InputWarning, InsufficientAreaError, KernelTooLargeError,
                     MissingPsfError, PoorMatchError, PoorMatchWarning, PsfEvaluationError,
                     SelfCheckError, SolutionError)
from .exposure import DEFAULT_MASK_PLANES, Box, Exposure
from .kernel import SpatialKernel
from .many import match_many
from .psf import (DoubleGaussianPsf, GalSimPsf, GaussianPsf, GriddedPsf, ImagePsf, MoffatPsf,
                  PiffPsf, Psf, PsfexPsf, VaryingGaussianPsf, parse_psf)
from .task import CellSetResult, ModelPsfMatchResult, ModelPsfMatchTask

__version__ = "0.1.0"

_logging.getLogger("gpumatch").addHandler(_logging.NullHandler())

__all__ = [
    "ModelPsfMatchTask", "ModelPsfMatchConfig", "ModelPsfMatchResult", "CellSetResult",
    "Exposure", "Box", "DEFAULT_MASK_PLANES", "Psf", "GaussianPsf", "DoubleGaussianPsf", "MoffatPsf",
    "ImagePsf", "VaryingGaussianPsf", "PsfexPsf", "GriddedPsf", "GalSimPsf", "PiffPsf",
    "parse_psf", "SpatialKernel", "apply_kernel", "cupy_usable", "match_many",
    "GpumatchError", "ConfigError", "MissingPsfError", "InsufficientAreaError",
    "KernelTooLargeError", "PsfEvaluationError", "SolutionError", "PoorMatchError",
    "SelfCheckError", "GpumatchWarning", "PoorMatchWarning", "ConditioningWarning",
    "InputWarning", "BackendWarning",
]
