"""PSF models: the :class:`Psf` interface and the built-in models.

Models backed by files or other packages (:class:`PsfexPsf`, :class:`GriddedPsf`,
:class:`GalSimPsf`, :class:`PiffPsf`) import what they need only when used.
"""

from .adapters import GalSimPsf, LsstImagesPsf, PiffPsf
from .analytic import DoubleGaussianPsf, GaussianPsf, MoffatPsf, VaryingGaussianPsf
from .base import FixedSizePsf, Psf, ResizedPsf, SquareStampPsf, pad_or_crop
from .gridded import GriddedPsf
from .image import ImagePsf
from .parse import parse_psf, psf_forms_help
from .psfex import PsfexPsf, PsfStamp

__all__ = [
    "Psf", "FixedSizePsf", "SquareStampPsf", "ResizedPsf", "pad_or_crop", "GaussianPsf",
    "DoubleGaussianPsf", "MoffatPsf", "VaryingGaussianPsf", "ImagePsf", "PsfexPsf", "PsfStamp",
    "GriddedPsf", "GalSimPsf", "PiffPsf", "LsstImagesPsf", "parse_psf", "psf_forms_help",
]
