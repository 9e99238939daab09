"""Reading and writing: FITS exposures, astropy NDData, kernels on disk.

The methods that use these (:meth:`gpumatch.Exposure.read_fits`,
:meth:`gpumatch.SpatialKernel.read_fits`, ...) import them lazily, so
``import gpumatch`` does not import astropy.
"""

from .fits import FitsFormatError, read_exposure, write_exposure
from .kernel_fits import read_kernel, write_kernel
from .nddata import NDDataConversionError, exposure_from_nddata, exposure_to_ccddata

__all__ = [
    "read_exposure", "write_exposure", "FitsFormatError", "exposure_from_nddata",
    "exposure_to_ccddata", "NDDataConversionError", "read_kernel", "write_kernel",
]
