"""Reading and writing: FITS exposures, astropy NDData, kernels on disk.

The methods that use these (:meth:`gpumatch.Exposure.read_fits`,
:meth:`gpumatch.SpatialKernel.read_fits`, ...) import them lazily, so
``import gpumatch`` does not import astropy.
"""

from ..exposure import Exposure as _Exposure
from ..kernel import SpatialKernel as _SpatialKernel
from . import fits as _fits
from . import kernel_fits as _kernel_fits
from .fits import FitsFormatError, read_exposure, write_exposure
from .kernel_fits import read_kernel, write_kernel
from .nddata import NDDataConversionError, exposure_from_nddata, exposure_to_ccddata

# The readers build these classes unless told otherwise. They are given them here, by
# the package every reader's import runs first, rather than importing them: the
# classes' own read methods call the readers, and the import graph stays acyclic.
_fits._EXPOSURE_CLASS = _Exposure
_kernel_fits._KERNEL_CLASS = _SpatialKernel

__all__ = [
    "read_exposure", "write_exposure", "FitsFormatError", "exposure_from_nddata",
    "exposure_to_ccddata", "NDDataConversionError", "read_kernel", "write_kernel",
]
