"""Files written by Rubin's ``lsst-images`` package (``lsst.images``).

What such a file holds, as seen in files the package writes (the fixtures in
``tests/data/lsst_images``, made by ``tests/data/make_lsst_images_fixtures.py``):

- the primary header's ``DATAMODL`` is a schema URL under
  ``https://images.lsst.io/schemas/`` (``masked_image-1.0.0``,
  ``gaussian_psf-1.0.0``, ...);
- ``IMAGE``/``MASK``/``VARIANCE`` planes (tile-compressed), each with its own
  ``BUNIT`` and the parent origin only in the linear pixel alternate WCS
  (``CRVAL1A/CRVAL2A``; read by :mod:`gpumatch.io.fits`);
- the mask planes as ``MSKNnnnn`` (name) / ``MSKMnnnn`` (its one-bit mask in
  the file's pixels) card pairs;
- a ``JSON`` table HDU whose one row holds the object tree as UTF-8 JSON
  (components such as a PSF are nested objects with a ``schema_url``), and an
  ``INDEX`` table of the HDUs.

PSFs read from the tree: the Gaussian form (``gaussian_psf``: ``sigma``,
``stamp_size``). Any other component that gpumatch does not read is named in
one :class:`~gpumatch.errors.InputWarning`.
"""

from __future__ import annotations

import json
import logging
import math

from ..errors import InputWarning, warn

log = logging.getLogger("gpumatch")

__all__ = ["SCHEMA_PREFIX", "is_lsst_images", "json_tree", "psf_from_tree", "read_psf",
           "attach_lsst_images", "mask_planes_from_cards"]

SCHEMA_PREFIX = "https://images.lsst.io/schemas/"

#: Components of an image tree that gpumatch reads (the planes come from their HDUs).
_UNDERSTOOD = {"schema_version", "min_read_version", "schema_url", "image", "mask", "variance",
               "psf", "metadata", "butler_info", "indirect", "band"}


_CONTAINER_CARDS = ("FMTVER", "INDXADDR", "INDXSIZE", "JSONADDR", "JSONSIZE", "DATAMODL")


def is_lsst_images(header):
    return str(header.get("DATAMODL", "")).startswith(SCHEMA_PREFIX)


def _schema(node):
    url = str(node.get("schema_url", "")) if isinstance(node, dict) else ""
    return url[len(SCHEMA_PREFIX):] if url.startswith(SCHEMA_PREFIX) else url


def json_tree(hdul, path):
    """The object tree of the file's ``JSON`` HDU (a dict)."""
    try:
        raw = hdul["JSON"].data[0][0]
        return json.loads(bytes(bytearray(raw)).decode("utf-8"))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its lsst-images JSON tree cannot be read ({exc})") from None


def psf_from_tree(node, path):
    """A gpumatch model of a PSF node, or None with one warning naming its form."""
    from ..psf.analytic import GaussianPsf

    schema = _schema(node)
    if schema.startswith("gaussian_psf-"):
        size, sigma = int(node["stamp_size"]), float(node["sigma"])
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"{path}: its Gaussian PSF has sigma {sigma}")
        return GaussianPsf(size, size, sigma)
    warn(f"{path}: its PSF is an lsst-images {schema or 'object without a schema'}, which "
         "gpumatch does not read; give --psf MODEL", InputWarning)
    return None


def read_psf(path):
    """The PSF of a file that ``lsst.images`` wrote for a PSF alone."""
    from ._fitsfile import FitsFormatError, _open

    hdul = _open(path)
    try:
        if not is_lsst_images(hdul[0].header):
            raise FitsFormatError(f"{path}: not an lsst-images file (no DATAMODL schema URL)")
        psf = psf_from_tree(json_tree(hdul, path), path)
    finally:
        hdul.close()
    if psf is None:
        raise FitsFormatError(f"{path}: holds no PSF gpumatch can evaluate")
    return psf


def attach_lsst_images(exposure, hdul, primary, path):
    """Give ``exposure`` the PSF of its tree and warn about components not read.

    The container cards (byte offsets of the JSON and INDEX HDUs, the data model)
    leave ``exposure.meta``: they describe this file, not an output.
    """
    for key in _CONTAINER_CARDS:
        exposure.meta.pop(key, None)
    try:
        tree = json_tree(hdul, path)
    except ValueError as exc:
        warn(f"{exc}; its PSF and metadata are ignored", InputWarning)
        return
    node = tree.get("psf")
    if isinstance(node, dict) and exposure.psf is None:
        exposure.psf = psf_from_tree(node, path)
        if exposure.psf is not None:
            exposure.psf_source = f"lsst-images ({_schema(node)})"
    if exposure.filter is None and isinstance(tree.get("band"), str):
        exposure.filter = tree["band"]
    ignored = sorted(k for k in tree if k not in _UNDERSTOOD)
    if ignored:
        warn(f"{path}: lsst-images components not read by gpumatch: {', '.join(ignored)} "
             "(they are not written to outputs)", InputWarning)


def mask_planes_from_cards(header, path):
    """Plane name to bit from ``MSKNnnnn``/``MSKMnnnn`` card pairs ({} if none)."""
    planes, bad = {}, []
    for key in header:
        if not (key.startswith("MSKN") and key[4:].isdigit()):
            continue
        name, value = header[key], header.get("MSKM" + key[4:])
        if isinstance(value, int) and value > 0 and value & (value - 1) == 0:
            planes[str(name).strip()] = value.bit_length() - 1
        else:
            bad.append(f"{key}={name!r}")
    if bad:
        warn(f"{path}: mask planes {', '.join(bad)} have no one-bit MSKM card; they are "
             "not defined (pass mask_planes= to set them)", InputWarning)
    return planes
