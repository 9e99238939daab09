"""Exposures in FITS files, in the LSST multi-extension layout.

Layout written by :func:`write_exposure` (and preferred by :func:`read_exposure`):

==== ============= ==========================================================
HDU  EXTNAME       content
==== ============= ==========================================================
0    (primary)     no data; the exposure's ``meta`` cards, ``FILTER``
1    ``IMAGE``     image plane (its dtype); WCS, ``LTV1/LTV2``, ``EXTTYPE``
2    ``MASK``      integer bit planes; ``MP_<NAME> = bit`` for every plane
3    ``VARIANCE``  variance plane (its dtype); ``UTYPE`` for astropy's CCDData
4..  (tables)      the afw object archive of an LSST input, PSF replaced
                   (:mod:`gpumatch.io.afw_archive`); ``AR_HDU`` points to it
     ``REFPSF``    matched exposures only, after the archive: the reference PSF
                   at the image centre
     ``NOISECORR`` matched exposures only: the output noise correlation
==== ============= ==========================================================

A matched exposure's primary header also holds its provenance and a summary of
its noise correlation (``GPM_*`` cards, see :mod:`gpumatch.provenance`); they
are read into ``exposure.provenance`` and ``exposure.noise_correlation``, the
reference becomes ``exposure.psf``, and every file read gets
``exposure.source`` (its path and SHA-256).

Conventions:

- ``LTV1 = -x0`` and ``LTV2 = -y0`` (IRAF/LSST): parent coordinates are array
  index plus ``xy0``. A ``PHYSICAL`` alternate WCS (``CRVAL1A = x0``...) says the
  same thing to image viewers.
- ``exposure.wcs`` is an :class:`astropy.wcs.WCS` for the *array* pixels, as every
  FITS reader sees the file (astropy's 0-based ``pixel_to_world``); it is written
  to the headers of all three planes and read back from ``IMAGE``.
- ``meta`` keys are FITS keywords (upper-cased; longer ones become ``HIERARCH``).
  Values that a card cannot hold (lists, dicts, NaN) are stored as JSON with
  the comment ``gpumatch:json`` and decoded on reading.
- ``filter`` is the ``FILTER`` card; ``id``, ``photo_calib`` (a number) and
  ``visit_info`` (JSON-serialisable) use ``GM_ID``, ``GM_PHCAL`` and ``GM_VISIT``.
  These cards are not repeated in ``meta`` on reading.

A plain image (one image HDU, no ``IMAGE``/``MASK``/``VARIANCE`` names) is read
too; its variance and mask come from the arguments or default to ones and
zeros, with a log line saying so.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from typing import Any

import numpy as np

from .._warnings import quiet
from ..errors import InputWarning, warn
from ..provenance import CARDS, NOISE_CARDS
from ._atomic import atomic_write
from ._fitsfile import FitsFormatError, _fits, _open

#: The class :func:`read_exposure` builds when no ``cls`` is given:
#: :class:`gpumatch.Exposure`, set by :mod:`gpumatch.io` (which sits above both), so
#: that this reader, which ``Exposure.read_fits`` calls, does not import it back.
_EXPOSURE_CLASS: Any = None

log = logging.getLogger("gpumatch")

__all__ = ["read_exposure", "write_exposure", "FitsFormatError", "header_to_meta",
           "meta_to_header"]

JSON_COMMENT = "gpumatch:json"
_PLANES = ("IMAGE", "MASK", "VARIANCE")
_RESERVED = {"FILTER", "GM_ID", "GM_PHCAL", "GM_VISIT"}
# Provenance and noise-correlation cards: read into exposure.provenance and
# noise_correlation, never into meta (a rewrite takes them from there).
_RECORD_CARDS = frozenset(CARDS) | frozenset(NOISE_CARDS)

_STRUCTURAL = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|EXTNAME|EXTTYPE|EXTVER|EXTLEVEL|"
    r"INHERIT|BSCALE|BZERO|BLANK|CHECKSUM|DATASUM|COMMENT|HISTORY|TFIELDS|"
    r"TTYPE\d+|TFORM\d+|TDIM\d+|TUNIT\d+|TNULL\d+|TSCAL\d+|TZERO\d+|THEAP|"
    r"ZIMAGE|ZCMPTYPE|ZBITPIX|ZNAXIS\d*|ZTILE\d+|ZNAME\d+|ZVAL\d+|ZMASKCMP|ZQUANTIZ|"
    r"ZDITHER0|ZSIMPLE|ZEXTEND|ZBLOCKED|ZTENSION|ZPCOUNT|ZGCOUNT|ZHECKSUM|ZDATASUM|ZBLANK|"
    r"ZSCALE|ZZERO|LTV\d|LTM\d_\d|MP_.*)$"
)
_WCS_KEY = re.compile(
    r"^((WCSAXES|WCSNAME|CTYPE\d|CRPIX\d|CRVAL\d|CDELT\d|CUNIT\d|CROTA\d|CRDER\d|CSYER\d|"
    r"LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX)[A-Z]?|(CD|PC|PV|PS)\d+_\d+[A-Z]?|"
    r"(A|B|AP|BP)_(\d+_\d+|ORDER|DMAX))$"
)


# -- headers <-> meta -----------------------------------------------------------


def _plain_value(value):
    """``value`` as a Python scalar a FITS card can hold, or raise ValueError."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError("non-finite float")
        return v
    if isinstance(value, str):
        if not value.isascii() or not value.isprintable():
            raise ValueError("non-ASCII string")
        return value
    raise ValueError(f"type {type(value).__name__}")


def meta_to_header(meta, header, skip=()):
    """Add ``meta`` (a mapping) to an astropy header as cards.

    Values a card cannot hold are stored as JSON strings with the comment
    ``gpumatch:json``; values that cannot be serialised at all are skipped
    with a warning naming them.
    """
    for key, value in meta.items():
        k = str(key).strip()
        if not k or k.upper() in skip:
            continue
        if _STRUCTURAL.match(k.upper()) or _WCS_KEY.match(k.upper()):
            # Layout and WCS cards are written from the data and exposure.wcs.
            log.debug("meta[%r] is a FITS layout or WCS keyword; not written as metadata", key)
            continue
        if not k.isascii() or not k.replace(" ", "").replace("-", "").replace("_", "").isalnum():
            warn(f"meta key {key!r} is not a valid FITS keyword; not written", InputWarning)
            continue
        try:
            card_value, comment = _plain_value(value), None
        except ValueError:
            try:
                card_value, comment = json.dumps(_jsonable(value), allow_nan=True), JSON_COMMENT
            except (TypeError, ValueError):
                warn(f"meta[{key!r}] ({type(value).__name__}) cannot be stored in a FITS "
                     "header; not written", InputWarning)
                continue
        with quiet():  # HIERARCH notices for long keys
            header[k] = (card_value, comment) if comment else card_value


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def header_to_meta(header, skip_wcs=True, exclude=()):
    """Non-structural cards of ``header`` as a dict (JSON cards decoded).

    ``COMMENT``/``HISTORY``/blank cards, the data-layout keywords, ``LTV``/``LTM``,
    ``MP_*`` and (with ``skip_wcs``) WCS keywords are left out; the first of
    duplicated keywords wins.
    """
    meta = {}
    for card in header.cards:
        key = card.keyword
        if not key or key in meta or key in exclude or _STRUCTURAL.match(key):
            continue
        if skip_wcs and _WCS_KEY.match(key):
            continue
        value = card.value
        if card.comment == JSON_COMMENT and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        elif not isinstance(value, (str, bool, int, float)):
            value = None  # an undefined card
        meta[key] = value
    return meta


def _wcs_from_header(header, path):
    if not any(k in header for k in ("CTYPE1", "CRVAL1", "CD1_1", "PC1_1", "CRPIX1")):
        return None
    from astropy.wcs import WCS

    try:
        with quiet():
            return WCS(header)
    except Exception as exc:
        warn(f"{path}: the WCS in the header could not be read ({exc}); exposure.wcs = None",
             InputWarning)
        return None


def _wcs_cards(wcs):
    if wcs is None:
        return None
    to_header = getattr(wcs, "to_header", None)
    if to_header is None:
        warn(f"exposure.wcs ({type(wcs).__name__}) is not an astropy WCS; it is not written "
             "to FITS", InputWarning)
        return None
    with quiet():
        try:
            return to_header(relax=True)
        except TypeError:
            return to_header()


# -- reading --------------------------------------------------------------------


def _hdu_role(hdu):
    for key in ("EXTTYPE", "EXTNAME"):
        value = hdu.header.get(key)
        # UNCERT: astropy CCDData's uncertainty plane (see _uncertainty_variance).
        if isinstance(value, str) and value.strip().upper() in _PLANES + ("UNCERT",):
            return value.strip().upper()
    return None


def _native(arr, empty=None):
    """A native-byte-order copy (FITS data are big-endian), detached from the file,
    in an array from ``empty(shape, dtype)`` (default :func:`numpy.empty`)."""
    arr = np.asarray(arr)
    dtype = arr.dtype.newbyteorder("=") if arr.dtype.byteorder not in ("=", "|") else arr.dtype
    out = (np.empty if empty is None else empty)(arr.shape, dtype)
    np.copyto(out, arr)
    return out


def _xy0_from_header(header, path):
    ltv = [header.get("LTV1"), header.get("LTV2")]
    if ltv[0] is None and ltv[1] is None:
        name = str(header.get("WCSNAMEA", "")).strip().upper()
        # The physical (parent pixel) alternate WCS, named or recognisable by its
        # linear pixel axes as LSST writes it.
        linear = all(str(header.get(f"CTYPE{i}A", "")).strip().upper() == "LINEAR"
                     and str(header.get(f"CUNIT{i}A", "pixel")).strip().lower() in ("pixel", "")
                     for i in (1, 2))
        if (name == "PHYSICAL" or linear) and "CRVAL1A" in header:
            ltv = [-(header.get("CRVAL1A", 0) - (header.get("CRPIX1A", 1) - 1)),
                   -(header.get("CRVAL2A", 0) - (header.get("CRPIX2A", 1) - 1))]
        else:
            return (0, 0)
    out = []
    for v in ltv:
        v = 0.0 if v is None else float(v)
        if not math.isfinite(v) or abs(v - round(v)) > 1e-6:
            raise FitsFormatError(
                f"{path}: LTV1/LTV2 = {ltv} are not whole pixels; gpumatch needs an integer "
                "origin (fix or remove the LTV cards)")
        out.append(-int(round(v)))
    return tuple(out)


def _mask_planes(header):
    planes = {}
    for card in header.cards:
        key = card.keyword
        if key.startswith("MP_") and len(key) > 3:
            try:
                planes[key[3:]] = int(card.value)
            except (TypeError, ValueError):
                continue
    return planes


def _as_mask(arr, path, source):
    arr = np.asarray(arr)
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind == "b":
        return arr.astype(np.int32)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)) \
            and (arr.size == 0 or (arr.min() >= -2 ** 31 and arr.max() < 2 ** 31)):
        log.info("%s: %s holds floats; converted to int32 bit planes", path, source)
        return arr.astype(np.int32)
    raise FitsFormatError(
        f"{path}: {source} has {arr.dtype} data; a mask must hold integer bit planes")


def read_exposure(path: str | os.PathLike, *, psf: Any = None, variance: Any = None,
                  mask: Any = None, mask_planes: dict | None = None, hdu: int | str | None = None,
                  empty: Any = None, cls: Any = None) -> Any:
    """Read an :class:`~gpumatch.Exposure` from a FITS file.

    Parameters
    ----------
    path : str or path-like
    psf : Psf or str, optional
        Attached to the exposure (FITS files carry no gpumatch PSF); a string
        goes through :func:`gpumatch.psf.parse_psf` (``"psfex:PATH"``, ...).
    variance : array or float, optional
        Variance plane (or constant) to use instead of the file's; required
        for a plain image unless unit variance is acceptable (then an
        :class:`~gpumatch.InputWarning` says it was defaulted).
    mask : integer array, optional
        Mask plane to use instead of the file's (plain image: zeros otherwise).
    mask_planes : dict, optional
        Plane name to bit; default: the file's ``MP_*`` cards, else the
        standard planes.
    hdu : int or str, optional
        For a plain image in a multi-HDU file: which HDU holds it (default:
        the first HDU with 2-d image data).
    empty : callable, optional
        ``empty(shape, dtype)`` gives the arrays the planes read from the file
        are put in (default :func:`numpy.empty`);
        :func:`gpumatch.cuda.apply.pinned_empty` puts them in pinned memory,
        from which a GPU copies them without staging.
    cls : type, optional
        The class built, called as :class:`~gpumatch.Exposure` is (default
        :class:`~gpumatch.Exposure`; :meth:`gpumatch.Exposure.read_fits` passes its own).

    Returns
    -------
    Exposure
        The exposure, with ``source`` set.

    Raises
    ------
    FileNotFoundError, PermissionError
        The file is missing or unreadable.
    FitsFormatError
        Not FITS, no image, a missing plane, planes of different shapes, ...
        Each message names the file and says what to do.
    """
    p = os.fspath(path)
    if isinstance(psf, str):
        from ..psf.parse import parse_psf

        psf = parse_psf(psf)
    hdul = _open(p)
    try:
        return _read_hdul(hdul, p, psf, variance, mask, mask_planes, hdu, empty,
                          _EXPOSURE_CLASS if cls is None else cls)
    except (FitsFormatError, OSError, Warning):  # Warning: one the caller escalated to an error
        raise
    except MemoryError:
        from ..limits import ResourceLimitError, format_bytes

        raise ResourceLimitError(
            f"{p}: not enough memory to read its planes ({format_bytes(os.path.getsize(p))} on "
            "disk); free memory, or run fewer at once (fewer --workers)") from None
    except Exception as exc:
        # Truncated or corrupt data sections surface here (astropy reads lazily).
        raise FitsFormatError(
            f"{p}: cannot read its data ({exc.__class__.__name__}: {exc}); the file may be "
            "truncated or corrupt, write it again") from None
    finally:
        hdul.close()


def _read_hdul(hdul, p, psf, variance, mask, mask_planes, hdu, empty, exposure_class):
    from ..pixels import DEFAULT_MASK_PLANES

    roles = {}
    for i, h in enumerate(hdul):
        role = _hdu_role(h)
        if role is not None and role not in roles:
            roles[role] = i
    primary = hdul[0].header
    if "IMAGE" in roles and hdu is None:
        image_hdu = hdul[roles["IMAGE"]]
        layout = "multi-extension"
    else:
        image_hdu = _plain_image_hdu(hdul, p, hdu)
        layout = "plain"
    image = image_hdu.data
    if image is None or np.ndim(image) != 2:
        raise FitsFormatError(
            f"{p}: the {'IMAGE extension' if layout != 'plain' else 'image HDU'} holds "
            f"{'no data' if image is None else f'a {np.ndim(image)}-d array'}; "
            "an exposure needs a 2-d image")
    image = _native(image, empty)
    if image.dtype.kind not in "f":
        image = image.astype(np.float64) if image.dtype.itemsize > 2 else \
            image.astype(np.float32)
    hdr = image_hdu.header
    shape = image.shape

    def plane(name):
        i = roles.get(name)
        if i is None:
            return None, None
        data = hdul[i].data
        if data is None:
            raise FitsFormatError(
                f"{p}: the {name} extension (HDU {i}) holds no data; rewrite the file "
                f"with a {name} plane or pass {name.lower()}= explicitly")
        if np.shape(data) != shape:
            raise FitsFormatError(
                f"{p}: the {name} plane has shape {np.shape(data)} but IMAGE has shape "
                f"{shape}; all planes of an exposure must have the same shape")
        return _native(data, empty), hdul[i].header

    defaulted = []

    def absent(name, argument, value, dtype):
        """The constant plane ``value`` for a plane the file lacks (plain images only)."""
        if layout != "plain":
            raise FitsFormatError(
                f"{p}: has an IMAGE extension but no {name} extension; add one, "
                f"or pass {name.lower()}= ({argument}) to read it anyway")
        defaulted.append(f"{name.lower()} = {value}")
        return np.full(shape, value, dtype=dtype)

    if variance is not None:
        var = _given_plane(variance, shape, p, "variance", float_=True)
    else:
        # A plain image may still carry named planes: an image in the primary
        # HDU with MASK/VARIANCE extensions, or a CCDData file (MASK, UNCERT).
        var, _ = plane("VARIANCE")
        if var is None and "UNCERT" in roles:
            var = _uncertainty_variance(*plane("UNCERT"), p)
        if var is None:
            var = absent("VARIANCE", "an array or a constant", 1, image.dtype)
        elif var.dtype.kind != "f":
            var = var.astype(image.dtype)
    mask_header = None
    if mask is not None:
        msk = _as_mask(_given_plane(mask, shape, p, "mask"), p, "the mask argument")
    else:
        msk, mask_header = plane("MASK")
        if msk is None:
            msk = absent("MASK", "an integer array", 0, np.int32)
        else:
            msk = _as_mask(msk, p, "the MASK extension")
    if defaulted:
        planes = " and ".join(d.split(" ")[0] for d in defaulted)
        warn(f"{p}: plain image without {planes} planes; using {', '.join(defaulted)} "
             "(pass variance=/mask= to give them)", InputWarning)

    if mask_planes is None:
        planes = _mask_planes(mask_header) if mask_header is not None else {}
        if mask_header is not None and not planes:
            from .lsst_images import mask_planes_from_cards

            planes = mask_planes_from_cards(mask_header, p)  # lsst-images' MSKN/MSKM
        if not planes:
            planes = dict(DEFAULT_MASK_PLANES)
            if msk.dtype.itemsize < 4:  # e.g. CCDData's uint8 (1 = bad = BAD's bit 0)
                msk = msk.astype(np.int32)
        elif "NO_DATA" not in planes:
            _add_no_data_plane(planes, msk, p)
        width = 8 * msk.dtype.itemsize
        bad = {k: v for k, v in planes.items() if not 0 <= v < width}
        if bad:
            raise FitsFormatError(
                f"{p}: mask planes {bad} do not fit the {msk.dtype} MASK extension; fix "
                "the MP_* cards or pass mask_planes=")
    else:
        planes = mask_planes

    xy0 = _xy0_from_header(hdr, p)
    wcs = _wcs_from_header(hdr, p)
    if wcs is None and layout == "plain" and image_hdu is not hdul[0]:
        wcs = _wcs_from_header(primary, p)
    meta = header_to_meta(primary, skip_wcs=True, exclude=_RECORD_CARDS)
    if layout != "plain" and "BUNIT" not in meta and isinstance(hdr.get("BUNIT"), str):
        meta["BUNIT"] = hdr["BUNIT"]  # files that give the unit per plane
    # LSST files keep the metadata in the primary header; a plain image in an
    # extension (e.g. a tile-compressed one) has its own cards too.
    if layout == "plain" and image_hdu is not hdul[0]:
        for k, v in header_to_meta(hdr, skip_wcs=True).items():
            meta.setdefault(k, v)
    fields = {}
    for key in _RESERVED:
        if key in meta:
            fields[key] = meta.pop(key)
    visit = fields.get("GM_VISIT")
    photo = fields.get("GM_PHCAL")
    filt = fields.get("FILTER")
    try:
        exposure = exposure_class(
            image, var, msk, xy0=xy0, psf=psf, wcs=wcs,
            photo_calib=photo, filter=filt if filt != "" else None, visit_info=visit,
            id=fields.get("GM_ID"), meta=meta, mask_planes=planes)
    except ValueError as exc:
        raise FitsFormatError(f"{p}: {exc}") from None
    if layout != "plain":
        from .afw_archive import attach_archive

        attach_archive(exposure, hdul, primary, p)  # LSST's archived PSF, calibration, ...
        from .lsst_images import attach_lsst_images, is_lsst_images

        if is_lsst_images(primary):
            attach_lsst_images(exposure, hdul, primary, p)
    _read_record(exposure, hdul, primary, p, psf is None)
    log.debug("read %s (%s, %dx%d, xy0=%s)", p, layout, shape[1], shape[0], xy0)
    return exposure


def _add_no_data_plane(planes, mask, path):
    """Define ``NO_DATA`` (the plane that marks pixels a convolution cannot fill) on the
    first free bit of a file's plane list that lacks it, as LSST adds planes on use."""
    used = set(planes.values())
    free = [b for b in range(8 * mask.dtype.itemsize) if b not in used]
    if free:
        planes["NO_DATA"] = free[0]
        log.info("%s: its mask planes have no NO_DATA; defined as bit %d (no pixel has it)",
                 path, free[0])


def _read_record(exposure, hdul, primary, path, set_psf):
    """The file's checksum and, for a gpumatch output, its provenance, noise
    correlation and reference PSF (as ``psf`` unless one was given)."""
    from .. import provenance

    exposure.source = {"path": path, "sha256": provenance.file_sha256(path)}
    prov, corr, reference = provenance.read_output_record(hdul, primary, path)
    exposure.provenance, exposure.noise_correlation = prov, corr
    if set_psf and reference is not None:
        exposure.psf = reference


def _uncertainty_variance(data, header, path):
    """The variance from a CCDData ``UNCERT`` plane, by its ``UTYPE`` card."""
    kind = str(header.get("UTYPE", "")).strip()
    data = np.asarray(data, dtype=np.float64)
    if kind == "StdDevUncertainty":
        return data * data
    if kind == "VarianceUncertainty":
        return data
    if kind == "InverseVariance":
        with np.errstate(divide="ignore"):
            return np.where(data > 0, 1.0 / np.where(data > 0, data, 1.0), np.inf)
    raise FitsFormatError(
        f"{path}: its UNCERT extension has UTYPE = {kind!r}; gpumatch reads StdDevUncertainty, "
        "VarianceUncertainty or InverseVariance (rewrite it with one of them, or give a "
        "VARIANCE extension)")


def _plain_image_hdu(hdul, path, which):
    if which is not None:
        try:
            h = hdul[which]
        except (KeyError, IndexError):
            raise FitsFormatError(f"{path}: has no HDU {which!r}; it has "
                                  f"{len(hdul)} HDUs") from None
        return h
    for h in hdul:
        if h.is_image and h.header.get("NAXIS", 0) == 2 and h.data is not None \
                and np.ndim(h.data) == 2 and min(h.data.shape) > 0:
            return h
    kinds = ", ".join(f"{i}:{type(h).__name__}" for i, h in enumerate(hdul))
    raise FitsFormatError(
        f"{path}: no 2-d image found (HDUs {kinds}); give an exposure with IMAGE/MASK/VARIANCE "
        "extensions or a FITS image")


def _given_plane(value, shape, path, name, float_=False):
    arr = np.asarray(value)
    if arr.ndim == 0:
        if not float_:
            return np.full(shape, arr, dtype=np.int32)
        return np.full(shape, float(arr), dtype=np.float64)
    if arr.shape != shape:
        raise FitsFormatError(
            f"{path}: the {name} given has shape {arr.shape} but the image has shape {shape}; "
            "all planes of an exposure must have the same shape")
    return arr


# -- writing --------------------------------------------------------------------


def _exposure_hdul(exposure):
    """The LSST-layout HDUList of ``exposure`` (in memory)."""
    from ..backend import to_numpy

    fits = _fits()
    image = np.asarray(to_numpy(exposure.image))
    variance = np.asarray(to_numpy(exposure.variance))
    mask = np.asarray(to_numpy(exposure.mask))
    if image.shape != variance.shape or image.shape != mask.shape:
        raise ValueError(f"exposure planes disagree in shape: image {image.shape}, variance "
                         f"{variance.shape}, mask {mask.shape}")
    if mask.dtype.kind == "i" and mask.dtype.itemsize == 1:
        mask = mask.astype(np.int16)  # FITS has no signed bytes

    primary = fits.PrimaryHDU()
    meta_to_header(exposure.meta, primary.header, skip=_RESERVED | _RECORD_CARDS)
    if exposure.filter is not None:
        if isinstance(exposure.filter, str):
            primary.header["FILTER"] = exposure.filter
        else:
            warn(f"exposure.filter ({type(exposure.filter).__name__}) is not a string; not "
                 "written", InputWarning)
    for key, value, what in (("GM_ID", exposure.id, "id"),
                             ("GM_PHCAL", exposure.photo_calib, "photo_calib"),
                             ("GM_VISIT", exposure.visit_info, "visit_info")):
        if value is None:
            continue
        if key == "GM_PHCAL" and not isinstance(value, numbers.Real):
            warn(f"exposure.photo_calib ({type(value).__name__}) is not a number; not written",
                 InputWarning)
            continue
        meta_to_header({key: value}, primary.header)
        if key not in primary.header:
            warn(f"exposure.{what} cannot be stored in FITS; not written", InputWarning)

    x0, y0 = exposure.xy0
    wcs_header = _wcs_cards(exposure.wcs)
    hdus = [primary]
    for name, data in (("IMAGE", image), ("MASK", mask), ("VARIANCE", variance)):
        h = fits.ImageHDU(data=data, name=name)
        hdr = h.header
        hdr["EXTTYPE"] = (name, "LSST-style exposure plane")
        hdr["INHERIT"] = (True, "inherit the primary header")
        if wcs_header is not None:
            with quiet():
                for card in wcs_header.cards:
                    if card.keyword in ("COMMENT", "HISTORY", ""):
                        continue
                    hdr[card.keyword] = (card.value, card.comment)
        hdr["LTV1"] = (-int(x0), "-x0: parent x = array column + x0")
        hdr["LTV2"] = (-int(y0), "-y0: parent y = array row + y0")
        hdr["CRPIX1A"] = 1.0
        hdr["CRPIX2A"] = 1.0
        hdr["CRVAL1A"] = float(x0)
        hdr["CRVAL2A"] = float(y0)
        hdr["CTYPE1A"] = "LINEAR"
        hdr["CTYPE2A"] = "LINEAR"
        hdr["CUNIT1A"] = "PIXEL"
        hdr["CUNIT2A"] = "PIXEL"
        hdr["WCSNAMEA"] = "PHYSICAL"
        if name == "VARIANCE":
            # astropy's CCDData.read(..., hdu_uncertainty="VARIANCE") reads this card.
            hdr["UTYPE"] = ("VarianceUncertainty", "this plane is a variance")
        if name == "MASK":
            for plane, bit in sorted(exposure.mask_planes.items(), key=lambda kv: kv[1]):
                key = f"MP_{plane}"
                with quiet():
                    hdr[key] = (int(bit), f"mask plane {plane}")
        hdus.append(h)
    from ..provenance import output_hdus
    from .afw_archive import archive_hdus

    # After the planes: IMAGE, MASK and VARIANCE stay HDUs 1 to 3, the archive
    # follows them (AR_HDU points to it), then the provenance HDUs.
    hdus.extend(archive_hdus(exposure, primary.header, len(hdus)))
    hdus.extend(output_hdus(exposure, primary.header))
    return fits.HDUList(hdus)


def _compressed(hdul):
    """``hdul`` with its image planes tile-compressed losslessly (GZIP_2, floats not
    quantised), as LSST's ``lossless`` recipe writes them."""
    fits = _fits()
    out = [hdul[0]]
    for h in hdul[1:]:
        if isinstance(h, fits.ImageHDU) and h.data is not None:
            h = fits.CompImageHDU(h.data, h.header, compression_type="GZIP_2",
                                  quantize_level=0.0)
        out.append(h)
    return fits.HDUList(out)


def write_exposure(exposure: Any, path: str | os.PathLike, overwrite: bool = False,
                   compress: bool | None = None) -> str:
    """Write ``exposure`` to ``path`` atomically (see the module docstring).

    The file is complete when it appears: it is written to a temporary file in
    the same directory and renamed. An existing ``path`` raises
    :class:`FileExistsError` unless ``overwrite`` is True. ``compress`` (default:
    ``path`` ends in ``.fz``) tile-compresses the planes losslessly.
    """
    if compress is None:
        compress = os.fspath(path).lower().endswith(".fz")

    def writer(tmp):
        # Built here, after atomic_write has checked ``path``: a refused
        # output costs no copy of the planes.
        hdul = _exposure_hdul(exposure)
        if compress:
            hdul = _compressed(hdul)
        with quiet():
            hdul.writeto(tmp, overwrite=True, output_verify="silentfix", checksum=True)

    p = atomic_write(path, writer, overwrite=overwrite, what="exposure")
    log.info("wrote %s", p)
    return p
