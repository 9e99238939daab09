"""Exposures to and from astropy's NDData / CCDData.

- ``data`` is the image; ``uncertainty`` becomes the variance
  (:class:`~astropy.nddata.VarianceUncertainty` as is,
  :class:`~astropy.nddata.StdDevUncertainty` squared,
  :class:`~astropy.nddata.InverseVariance` inverted, with 0 giving +inf);
- a boolean mask sets one plane (``BAD`` by default) where True; an integer
  mask, or integer ``flags`` (CCDData, whose masks are boolean), is taken as
  the bit planes themselves;
- ``LTV1/LTV2`` and ``MP_<NAME>`` entries of ``meta`` carry ``xy0`` and the mask
  plane names (FITS conventions, as :mod:`gpumatch.io.fits`); the unit is kept
  in ``meta["BUNIT"]``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import GpumatchError, InputWarning, warn

log = logging.getLogger("gpumatch")

__all__ = ["exposure_from_nddata", "exposure_to_ccddata"]


class NDDataConversionError(GpumatchError, ValueError):
    """An NDData object cannot be turned into an exposure."""


def _unit_string(unit):
    try:
        return unit.to_string("fits")
    except Exception:
        return unit.to_string()


def _variance_from(uncertainty, data_unit, shape):
    from astropy import units as u
    from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty

    arr = np.asarray(uncertainty.array, dtype=np.float64)
    if arr.shape != shape:
        if arr.ndim == 0:
            arr = np.full(shape, float(arr))
        else:
            raise NDDataConversionError(
                f"uncertainty has shape {arr.shape} but data has shape {shape}; they must agree")
    unc_unit = getattr(uncertainty, "unit", None)
    if isinstance(uncertainty, VarianceUncertainty):
        var, power = arr, 2
    elif isinstance(uncertainty, StdDevUncertainty):
        var, power = arr * arr, 1
    elif isinstance(uncertainty, InverseVariance):
        with np.errstate(divide="ignore"):
            var = 1.0 / arr
        var[arr == 0] = np.inf
        power = -2
    else:
        raise NDDataConversionError(
            f"uncertainty of type {type(uncertainty).__name__} cannot be converted to a "
            "variance; use VarianceUncertainty, StdDevUncertainty or InverseVariance")
    if unc_unit is not None and data_unit is not None:
        expected = data_unit ** power
        try:
            factor = (1.0 * unc_unit).to(expected).value
        except u.UnitConversionError:
            raise NDDataConversionError(
                f"uncertainty unit {unc_unit} does not match data unit {data_unit}") from None
        if factor != 1.0:
            # factor converts the stored quantity; the variance scales by it
            # (variance), its square (std) or its inverse (inverse variance).
            var = var * (factor if power == 2 else factor ** 2 if power == 1 else 1.0 / factor)
    return var


def exposure_from_nddata(obj: Any, psf: Any = None, *, xy0: tuple[int, int] | None = None,
                         mask_planes: dict | None = None, bool_mask_plane: str = "BAD",
                         cls: Any = None) -> Any:
    """An :class:`~gpumatch.Exposure` from an astropy ``NDData``/``CCDData``.

    Parameters
    ----------
    obj : NDData
        ``data`` (2-d), optional ``uncertainty``, ``mask``, ``wcs``, ``meta``,
        ``unit`` and ``psf``.
    psf : Psf or str, optional
        The exposure's PSF model (a string goes through
        :func:`gpumatch.psf.parse_psf`). When omitted and ``obj.psf`` is an odd
        square array, an :class:`~gpumatch.ImagePsf` of it.
    xy0 : (int, int), optional
        Parent origin; default ``-LTV1, -LTV2`` from ``meta`` or ``(0, 0)``.
    mask_planes : dict, optional
        Plane name to bit; default the ``MP_*`` entries of ``meta`` or the
        standard planes.
    bool_mask_plane : str
        The plane a boolean mask sets where True.
    cls : type, optional
        The exposure class built, as in :func:`gpumatch.io.fits.read_exposure`
        (:meth:`gpumatch.Exposure.from_nddata` passes its own).

    Returns
    -------
    Exposure
        A new exposure; ``obj`` is not modified.
    """
    from ..pixels import DEFAULT_MASK_PLANES
    from .fits import _EXPOSURE_CLASS

    data = getattr(obj, "data", None)
    if data is None or not hasattr(obj, "uncertainty") or isinstance(obj, np.ndarray):
        raise NDDataConversionError(
            f"expected an astropy NDData/CCDData, got {type(obj).__name__} without .data")
    image = np.asarray(data)
    if image.ndim != 2:
        raise NDDataConversionError(f"NDData data must be 2-d, got shape {image.shape}")
    unit = getattr(obj, "unit", None)

    meta_in = getattr(obj, "meta", None) or {}
    meta = {}
    planes_from_meta = {}
    ltv = {}
    for key, value in dict(meta_in).items():
        k = str(key)
        ku = k.upper()
        if ku.startswith("MP_") and len(ku) > 3:
            try:
                planes_from_meta[k[3:]] = int(value)
                continue
            except (TypeError, ValueError):
                pass
        if ku in ("LTV1", "LTV2"):
            ltv[ku] = value
            continue
        if ku in ("", "COMMENT", "HISTORY"):
            continue
        meta[k] = value
    if unit is not None:
        meta["BUNIT"] = _unit_string(unit)

    if obj.uncertainty is None:
        variance = np.ones(image.shape, dtype=image.dtype if image.dtype.kind == "f"
                           else np.float64)
        warn("NDData without uncertainty: using variance = 1 (give a "
             "VarianceUncertainty, StdDevUncertainty or InverseVariance to set it)", InputWarning)
    else:
        variance = _variance_from(obj.uncertainty, unit, image.shape)
        if image.dtype == np.float32:
            variance = variance.astype(np.float32)

    planes = dict(mask_planes if mask_planes is not None
                  else (planes_from_meta or DEFAULT_MASK_PLANES))
    flags = getattr(obj, "flags", None)
    flags = np.asarray(flags) if flags is not None else None
    if flags is not None and not (flags.shape == image.shape and flags.dtype.kind in "iu"):
        log.debug("NDData flags of shape %s and dtype %s are not bit planes; ignored",
                  flags.shape, flags.dtype)
        flags = None
    mask_in = getattr(obj, "mask", None)
    mask = None if flags is None else np.array(flags)
    if mask_in is not None:
        m = np.asarray(mask_in)
        if m.shape != image.shape:
            if m.ndim == 0:
                m = np.broadcast_to(m, image.shape)
            else:
                raise NDDataConversionError(
                    f"mask has shape {m.shape} but data has shape {image.shape}; they must agree")
        if m.dtype.kind == "b":
            if bool_mask_plane not in planes:
                raise NDDataConversionError(
                    f"bool_mask_plane {bool_mask_plane!r} is not a mask plane; known: "
                    f"{sorted(planes)}")
            bit = 1 << planes[bool_mask_plane]
            if mask is None:
                mask = np.where(m, np.int32(bit), np.int32(0))
            else:
                # Pixels masked but without any flag get the plane's bit.
                mask[m & (mask == 0)] |= bit
        elif m.dtype.kind in "iu":
            mask = np.array(m) if mask is None else mask | m
        else:
            raise NDDataConversionError(
                f"mask of dtype {m.dtype} is neither boolean nor integer bit planes")

    if xy0 is None:
        xy0 = (-int(round(float(ltv.get("LTV1", 0) or 0))),
               -int(round(float(ltv.get("LTV2", 0) or 0))))
    if isinstance(psf, str):
        from ..psf.parse import parse_psf

        psf = parse_psf(psf)
    if psf is None:
        stamp = getattr(obj, "psf", None)
        if stamp is not None:
            from ..psf import ImagePsf

            arr = np.asarray(stamp)
            if arr.ndim == 2 and arr.shape[0] == arr.shape[1] and arr.shape[0] % 2 == 1:
                psf = ImagePsf(arr)
            else:
                warn(f"NDData psf of shape {arr.shape} is not an odd square image; not used",
                     InputWarning)
    exposure_class = _EXPOSURE_CLASS if cls is None else cls
    return exposure_class(image, variance, mask, xy0=xy0, psf=psf, wcs=getattr(obj, "wcs", None),
                          meta=meta, mask_planes=planes)


def exposure_to_ccddata(exposure: Any, unit: Any = None) -> Any:
    """An astropy :class:`~astropy.nddata.CCDData` of ``exposure`` (NumPy arrays).

    Parameters
    ----------
    unit : str or astropy unit, optional
        Default ``meta["BUNIT"]``, else ``"adu"``.

    The variance becomes a :class:`~astropy.nddata.VarianceUncertainty`. CCDData
    masks are boolean, so ``mask`` is "any bit set" and the integer bit planes
    go into ``flags`` (which :func:`exposure_from_nddata` reads back); ``xy0``
    and the plane names go into ``meta`` as ``LTV1/LTV2`` and ``MP_<NAME>``.
    Arrays are shared with the exposure where possible (no copy).
    """
    from astropy import units as u
    from astropy.nddata import CCDData, VarianceUncertainty

    from ..backend import to_numpy

    if unit is None:
        unit = exposure.meta.get("BUNIT") or "adu"
    unit = u.Unit(unit)
    image = np.asarray(to_numpy(exposure.image))
    variance = np.asarray(to_numpy(exposure.variance))
    flags = np.asarray(to_numpy(exposure.mask))
    mask = flags != 0
    from astropy.io import fits

    from .._warnings import quiet
    from .fits import meta_to_header

    # A FITS header, not a dict: CCDData.write copies a dict's entries itself and
    # fails on keys over 8 characters with non-string values (MP_DETECTED_NEGATIVE);
    # meta_to_header writes them as HIERARCH cards and JSON-encodes what a card
    # cannot hold.
    meta = fits.Header()
    meta_to_header(exposure.meta, meta)
    with quiet():
        meta["BUNIT"] = _unit_string(unit)
        meta["LTV1"] = -int(exposure.xy0[0])
        meta["LTV2"] = -int(exposure.xy0[1])
        for name, bit in exposure.mask_planes.items():
            meta[f"MP_{name}"] = int(bit)
    wcs = exposure.wcs
    try:
        return CCDData(image, unit=unit, uncertainty=VarianceUncertainty(variance), mask=mask,
                       flags=flags, wcs=wcs, meta=meta)
    except (TypeError, ValueError) as exc:
        if wcs is None:
            raise
        warn(f"exposure.wcs cannot be attached to CCDData ({exc}); left out", InputWarning)
        return CCDData(image, unit=unit, uncertainty=VarianceUncertainty(variance), mask=mask,
                       flags=flags, meta=meta)
