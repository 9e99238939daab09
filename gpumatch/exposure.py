"""Exposures: image, mask and variance planes with their metadata."""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np

from .backend import array_namespace
from .pixels import DEFAULT_MASK_PLANES, Box

__all__ = ["Box", "Exposure", "DEFAULT_MASK_PLANES"]


class Exposure:
    """An image with variance, mask, PSF and metadata.

    Arrays are indexed ``[y, x]``; pixel ``[j, i]`` sits at parent position
    ``(x0 + i, y0 + j)``. gpumatch never modifies the arrays given here.

    Parameters
    ----------
    image : array (ny, nx)
        Pixel values (NumPy or CuPy array).
    variance : array (ny, nx), optional
        Per-pixel variance; ones when omitted.
    mask : int array (ny, nx), optional
        Bit mask; zeros when omitted.
    xy0 : (int, int)
        Parent coordinates of pixel ``[0, 0]``.
    psf : Psf, optional
        The exposure's PSF model (parent coordinates).
    wcs, photo_calib, filter, visit_info, id, meta : object, optional
        Carried through unchanged.
    mask_planes : dict, optional
        Plane name to bit index; :data:`DEFAULT_MASK_PLANES` when omitted.
    archive : gpumatch.io.afw_archive.AfwArchive, optional
        The afw object archive of the LSST file this exposure came from; written
        back with the exposure's PSF in place of the archived one.

    Attributes
    ----------
    psf_source : str or None
        Where :attr:`psf` came from when a reader attached it (``"archive
        (PcaPsf)"``, ``"--psf"``, a sidecar file), for summaries.
    """

    #: The file the exposure was read from: ``{"path": ..., "sha256": ...}``
    #: (set by :meth:`read_fits`), else None.
    source = None
    #: How a matched exposure was made (version, date, input and its checksum,
    #: reference, configuration, backend; see :mod:`gpumatch.provenance`), else None.
    provenance = None
    #: Normalised correlation of a matched exposure's noise at the image centre,
    #: ``[dy, dx]`` with lag 0 in the middle (see
    #: :meth:`gpumatch.SpatialKernel.noise_correlation`), else None.
    noise_correlation = None
    #: The reference PSF as given to the match (``psf`` may be a resized copy).
    psf_reference = None

    def __init__(self, image: Any, variance: Any = None, mask: Any = None, *,
                 xy0: tuple[int, int] = (0, 0), psf: Any = None, wcs: Any = None,
                 photo_calib: Any = None, filter: Any = None, visit_info: Any = None,
                 id: Any = None, meta: dict | None = None, mask_planes: dict | None = None,
                 archive: Any = None) -> None:
        xp = array_namespace(image)
        if not hasattr(image, "ndim"):
            image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"image must be a 2-d array [y, x], got shape {image.shape}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image is empty (shape {image.shape})")
        if not (image.dtype.kind == "f"):
            image = image.astype(xp.float64)
        if variance is None:
            variance = xp.ones(image.shape, dtype=image.dtype)
        elif not hasattr(variance, "ndim"):
            variance = np.asarray(variance)
        if mask is None:
            mask = xp.zeros(image.shape, dtype=np.int32)
        elif not hasattr(mask, "ndim"):
            mask = np.asarray(mask)
        for name, arr in (("variance", variance), ("mask", mask)):
            if tuple(arr.shape) != tuple(image.shape):
                raise ValueError(
                    f"{name} has shape {tuple(arr.shape)} but image has shape "
                    f"{tuple(image.shape)}; all planes must have the same shape"
                )
        if mask.dtype.kind not in "iu":
            raise ValueError(f"mask must be an integer array of bit planes, got dtype {mask.dtype}")
        if variance.dtype.kind != "f":
            variance = variance.astype(image.dtype)
        try:
            x0, y0 = (int(v) for v in xy0)
        except (TypeError, ValueError):
            raise ValueError(f"xy0 must be a pair of integers, got {xy0!r}") from None
        self.image = image
        self.variance = variance
        self.mask = mask
        self.xy0 = (x0, y0)
        self.psf = psf
        self.wcs = wcs
        self.photo_calib = photo_calib
        self.filter = filter
        self.visit_info = visit_info
        self.id = id
        self.meta = dict(meta) if meta is not None else {}
        planes = dict(DEFAULT_MASK_PLANES if mask_planes is None else mask_planes)
        for name, bit in planes.items():
            if not (0 <= int(bit) < 8 * mask.dtype.itemsize):
                raise ValueError(f"mask plane {name!r} has bit {bit}, outside the {mask.dtype} mask")
        self.mask_planes = {str(k): int(v) for k, v in planes.items()}
        self.archive = archive
        self.psf_source = None

    @property
    def bbox(self) -> Box:
        """The exposure's :class:`Box` in parent coordinates."""
        ny, nx = self.image.shape
        return Box(self.xy0[0], self.xy0[1], nx, ny)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the planes, pixels."""
        return tuple(self.image.shape)

    def get_plane_bitmask(self, name: str) -> int:
        """Integer bitmask of a named mask plane.

        Parameters
        ----------
        name : str
            A key of :attr:`mask_planes` (``"BAD"``, ``"SAT"``, ...).

        Returns
        -------
        int
            ``1 << bit``.

        Raises
        ------
        KeyError
            The plane is not defined; the message lists those that are.
        """
        try:
            return 1 << self.mask_planes[name]
        except KeyError:
            raise KeyError(
                f"mask plane {name!r} is not defined; defined planes: {sorted(self.mask_planes)}"
            ) from None

    def copy_metadata_to(self, image: Any, variance: Any, mask: Any, psf: Any) -> Exposure:
        """A new exposure with these planes and PSF and this one's metadata.

        Parameters
        ----------
        image, variance, mask : array (ny, nx)
            The new planes, on the same pixels (same ``xy0``).
        psf : Psf or None
            The new exposure's PSF.

        Returns
        -------
        Exposure
            With this one's ``xy0``, WCS, calibration, filter, visit, id, mask
            planes, archive and a deep copy of ``meta``.
        """
        return Exposure(
            image, variance, mask, xy0=self.xy0, psf=psf, wcs=self.wcs,
            photo_calib=self.photo_calib, filter=self.filter, visit_info=self.visit_info,
            id=self.id, meta=copy.deepcopy(self.meta), mask_planes=self.mask_planes,
            archive=self.archive,
        )

    # -- files and astropy (gpumatch.io) ----------------------------------------

    @classmethod
    def read_fits(cls, path: str | os.PathLike, **kwargs: Any) -> Exposure:
        """Read an exposure from a FITS file (LSST layout or a plain image).

        Parameters
        ----------
        path : str or path-like
            The FITS file.
        **kwargs
            ``psf``, ``variance``, ``mask``, ``mask_planes``, ``hdu``, ``empty``:
            see :func:`gpumatch.io.fits.read_exposure`, which also describes the layout.

        Returns
        -------
        Exposure
            The exposure, with :attr:`source` set.
        """
        from .io.fits import read_exposure

        return read_exposure(path, cls=cls, **kwargs)

    def write_fits(self, path: str | os.PathLike, overwrite: bool = False,
                   compress: bool | None = None) -> str:
        """Write this exposure to ``path`` in the LSST multi-extension layout.

        Parameters
        ----------
        path : str or path-like
            Output file, written atomically.
        overwrite : bool
            Replace an existing file; otherwise it raises :class:`FileExistsError`.
        compress : bool, optional
            Tile-compress the planes, losslessly (default: ``path`` ends in ``.fz``).

        Returns
        -------
        str
            The path written.
        """
        from .io.fits import write_exposure

        return write_exposure(self, path, overwrite=overwrite, compress=compress)

    @classmethod
    def from_nddata(cls, obj: Any, psf: Any = None, **kwargs: Any) -> Exposure:
        """An exposure from an astropy ``NDData``/``CCDData``.

        Parameters
        ----------
        obj : astropy.nddata.NDData
            Data, uncertainty (as variance), mask, WCS and meta are used.
        psf : Psf or str, optional
            Overrides ``obj.psf``.
        **kwargs
            ``xy0``, ``mask_planes``, ``bool_mask_plane``: see
            :func:`gpumatch.io.nddata.exposure_from_nddata`.

        Returns
        -------
        Exposure
            A new exposure; ``obj`` is not modified.
        """
        from .io.nddata import exposure_from_nddata

        return exposure_from_nddata(obj, psf=psf, cls=cls, **kwargs)

    def to_ccddata(self, unit: Any = None, **kwargs: Any) -> Any:
        """Convert to an astropy ``CCDData`` (variance as ``VarianceUncertainty``).

        Parameters
        ----------
        unit : astropy.units.Unit or str, optional
            The data's unit (default: ``meta["BUNIT"]``, else ``"adu"``).
        **kwargs
            Passed to :func:`gpumatch.io.nddata.exposure_to_ccddata`.

        Returns
        -------
        astropy.nddata.CCDData
            A copy of the planes and metadata.
        """
        from .io.nddata import exposure_to_ccddata

        return exposure_to_ccddata(self, unit=unit, **kwargs)

    def __repr__(self):
        ny, nx = self.image.shape
        return (f"Exposure({nx}x{ny} at xy0={self.xy0}, dtype={self.image.dtype}, "
                f"psf={type(self.psf).__name__ if self.psf is not None else None})")
