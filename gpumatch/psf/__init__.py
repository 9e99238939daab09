"""PSF models: the :class:`Psf` interface and the built-in models."""

from .analytic import DoubleGaussianPsf, GaussianPsf, VaryingGaussianPsf
from .base import Psf, ResizedPsf, pad_or_crop
from .image import ImagePsf

__all__ = [
    "Psf", "ResizedPsf", "pad_or_crop", "GaussianPsf", "DoubleGaussianPsf",
    "VaryingGaussianPsf", "ImagePsf",
]
