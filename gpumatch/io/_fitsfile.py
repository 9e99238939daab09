"""Opening a FITS file, or saying in one line why it cannot be read.

Below every reader (:mod:`gpumatch.io.fits`, :mod:`gpumatch.io.kernel_fits`,
:mod:`gpumatch.io.lsst_images`), so that they share it without importing each other;
:mod:`gpumatch.io.fits` re-exports :class:`FitsFormatError`.
"""

from __future__ import annotations

import os

from .._warnings import recorded
from ..errors import GpumatchError

__all__ = ["FitsFormatError"]


class FitsFormatError(GpumatchError, ValueError):
    """A FITS file exists but does not hold what gpumatch needs."""


def _fits():
    from astropy.io import fits

    return fits


def _open(path):
    fits = _fits()
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such file; check the path")
    if os.path.isdir(p):
        raise IsADirectoryError(f"{p} is a directory, not a FITS file; give the file's path")
    if not os.path.isfile(p):  # a FIFO or device would block or never end
        raise FitsFormatError(f"{p} is not a regular file (a FIFO, device or socket); give "
                              "the path of a FITS file")
    try:
        with recorded() as caught:
            hdul = fits.open(p, memmap=False, lazy_load_hdus=False)
            hdul.verify("silentfix")
    except PermissionError:
        raise PermissionError(f"{p}: permission denied; make the file readable") from None
    except Exception as exc:
        raise FitsFormatError(
            f"{p} is not a readable FITS file ({exc.__class__.__name__}: {exc}); "
            "check that it is a complete FITS image") from None
    _refuse_truncated(hdul, p, caught)
    return hdul


def _refuse_truncated(hdul, path, caught):
    """Refuse a file cut short: astropy reads what it can and only warns, so a
    missing extension would otherwise be reported as absent (astropy's warnings
    about a short file or a cut header, or data that end past the file's end)."""
    size = os.path.getsize(path)
    end = max(hdul.fileinfo(i)["datLoc"] + hdul.fileinfo(i)["datSpan"] for i in range(len(hdul)))
    cut = [str(w.message) for w in caught
           if "truncated" in str(w.message) or "Error validating header" in str(w.message)]
    if end > size or cut:
        hdul.close()
        raise FitsFormatError(
            f"{path} is truncated ({size} bytes{f', {end} expected' if end > size else ''}; "
            "the copy or write was interrupted); copy or write the file again")
