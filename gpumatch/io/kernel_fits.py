"""Spatial matching kernels in FITS files.

Layout (all floating-point data float64, so a kernel read back is bit-identical):

==== ========== ==============================================================
HDU  EXTNAME    content
==== ========== ==============================================================
0    (primary)  ``GMKIND = 'SPATIAL_KERNEL'``, ``GMKVERS``, ``KSIZE``, ``NBASIS``,
                ``SPMODEL`` (``chebyshev1``/``polynomial``), ``SPORDER``,
                ``NTERMS``, region ``REGX0 REGY0 REGW REGH`` (parent pixels),
                ``KSUM``
1    ``BASIS``  basis images, array ``(nbasis, k, k)``
2    ``COEFFS`` spatial coefficients, array ``(nbasis, nterms)``
3    ``CONFIG`` (optional) table ``NAME``, ``VALUE`` (JSON) of the configuration
==== ========== ==============================================================
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from .._warnings import quiet
from ._atomic import atomic_write, check_output_path
from ._fitsfile import FitsFormatError, _open

log = logging.getLogger("gpumatch")

__all__ = ["write_kernel", "read_kernel"]

#: The class :func:`read_kernel` builds when no ``cls`` is given:
#: :class:`gpumatch.SpatialKernel`, set by :mod:`gpumatch.io` (which sits above both), so
#: that this reader, which ``SpatialKernel.read_fits`` calls, does not import it back.
_KERNEL_CLASS: Any = None

KIND = "SPATIAL_KERNEL"
VERSION = 1


def _config_dict(config):
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a ModelPsfMatchConfig, got "
                        f"{type(config).__name__}")
    out = {}
    for key, value in config.items():
        if isinstance(value, tuple):
            value = list(value)
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            raise TypeError(f"config[{key!r}] = {value!r} cannot be written "
                            "(it must be JSON-serialisable)") from None
        out[str(key)] = text
    return out


def _kernel_hdul(kernel, config):
    from astropy.io import fits

    sf = kernel.spatial_functions
    region = sf.region
    primary = fits.PrimaryHDU()
    h = primary.header
    h["GMKIND"] = (KIND, "gpumatch spatially varying matching kernel")
    h["GMKVERS"] = (VERSION, "layout version")
    h["KSIZE"] = (int(kernel.dimensions[0]), "kernel width = height (pixels)")
    h["NBASIS"] = (int(kernel.n_basis), "number of basis images")
    h["SPMODEL"] = (sf.model_type, "spatial model type")
    h["SPORDER"] = (int(sf.order), "spatial order")
    h["NTERMS"] = (int(sf.n_terms), "spatial terms per basis")
    h["REGX0"] = (int(region.x0), "spatial region x0 (parent pixels)")
    h["REGY0"] = (int(region.y0), "spatial region y0 (parent pixels)")
    h["REGW"] = (int(region.width), "spatial region width (pixels)")
    h["REGH"] = (int(region.height), "spatial region height (pixels)")
    h["KSUM"] = (float(kernel.kernel_sum), "kernel sum (coefficient of basis 0)")
    hdus = [primary,
            fits.ImageHDU(np.ascontiguousarray(kernel.basis_images, dtype=np.float64),
                          name="BASIS"),
            fits.ImageHDU(np.ascontiguousarray(kernel.spatial_coefficients, dtype=np.float64),
                          name="COEFFS")]
    cfg = _config_dict(config)
    if cfg is not None:
        names = list(cfg)
        values = [cfg[n] for n in names]
        wn = max([1] + [len(n) for n in names])
        wv = max([1] + [len(v) for v in values])
        cols = [fits.Column(name="NAME", format=f"{wn}A", array=np.array(names, dtype=f"U{wn}")),
                fits.Column(name="VALUE", format=f"{wv}A",
                            array=np.array(values, dtype=f"U{wv}"))]
        hdus.append(fits.BinTableHDU.from_columns(cols, name="CONFIG"))
    return fits.HDUList(hdus)


def write_kernel(kernel: Any, path: str | os.PathLike, overwrite: bool = False,
                 config: Any = None) -> str:
    """Write a :class:`~gpumatch.SpatialKernel` to ``path`` atomically.

    Parameters
    ----------
    kernel : SpatialKernel
    path : str or path-like
    overwrite : bool
        Replace an existing file (otherwise :class:`FileExistsError`).
    config : dict or ModelPsfMatchConfig, optional
        Stored in the ``CONFIG`` table (default: ``kernel.config`` when set).
    """
    p = check_output_path(path, overwrite, "kernel")
    if config is None:
        config = getattr(kernel, "config", None)
    hdul = _kernel_hdul(kernel, config)

    def writer(tmp):
        with quiet():
            hdul.writeto(tmp, overwrite=True, checksum=True)

    atomic_write(p, writer, overwrite=overwrite, what="kernel")
    log.info("wrote kernel %s", p)
    return p


def read_kernel(path: str | os.PathLike, cls: Any = None) -> Any:
    """Read a kernel written by :func:`write_kernel`.

    Parameters
    ----------
    path : str or path-like
        The kernel file.
    cls : type, optional
        The class built, called as :class:`~gpumatch.SpatialKernel` is (default
        :class:`~gpumatch.SpatialKernel`; :meth:`gpumatch.SpatialKernel.read_fits`
        passes its own).

    Returns
    -------
    SpatialKernel
        With ``.config`` (a dict, or None when none was stored) and ``.path``.

    Raises
    ------
    FileNotFoundError, FitsFormatError
        Missing file, or not a gpumatch kernel file (message names the file).
    """
    from ..pixels import Box
    from ..spatial import SpatialFunctions

    kernel_class = _KERNEL_CLASS if cls is None else cls

    p = os.fspath(path)
    hdul = _open(p)
    try:
        h = hdul[0].header
        if h.get("GMKIND") != KIND:
            raise FitsFormatError(
                f"{p} is not a gpumatch kernel file (no GMKIND = '{KIND}' in its primary "
                "header); write kernels with psfMatchingKernel.write_fits(path)")
        try:
            basis = np.array(hdul["BASIS"].data, dtype=np.float64)
            coeffs = np.array(hdul["COEFFS"].data, dtype=np.float64)
        except KeyError as exc:
            raise FitsFormatError(f"{p}: the kernel file has no {exc.args[0]} extension; it is "
                                  "incomplete, write it again") from None
        try:
            model = str(h["SPMODEL"]).strip()
            order = int(h["SPORDER"])
            region = Box(int(h["REGX0"]), int(h["REGY0"]), int(h["REGW"]), int(h["REGH"]))
        except KeyError as exc:
            raise FitsFormatError(f"{p}: the kernel header lacks {exc.args[0]}; the file is "
                                  "damaged, write it again") from None
        try:
            sf = SpatialFunctions(model, order, region)
            kernel = kernel_class(basis, sf, coeffs)
        except ValueError as exc:
            raise FitsFormatError(f"{p}: inconsistent kernel file: {exc}") from None
        config = None
        if "CONFIG" in hdul:
            data = hdul["CONFIG"].data
            config = {}
            for name, value in zip(data["NAME"], data["VALUE"]):
                name = str(name).strip()
                try:
                    config[name] = json.loads(str(value))
                except ValueError:
                    raise FitsFormatError(f"{p}: CONFIG entry {name!r} is not valid JSON") \
                        from None
    finally:
        hdul.close()
    kernel.config = config
    kernel.path = p
    return kernel
