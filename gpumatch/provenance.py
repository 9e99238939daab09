"""What every matched exposure records about how it was made, and its noise.

A matched exposure (``result.psfMatchedExposure``) carries

- ``exposure.provenance``: a dict with the gpumatch ``version``, the UTC
  ``date`` of the match (ISO 8601), the ``input`` file (None for an in-memory
  exposure), ``inputSha256`` (SHA-256 of the input file, or of the input's
  image bytes for an in-memory exposure: ``inputChecksumOf`` says which), the
  ``reference`` PSF's description (:func:`gpumatch.psf.parse.psf_description`),
  the exposure ``psf``'s description and, for a model read from a file, that
  file (``psfFile``) and its SHA-256 (``psfSha256``), the ``backend``, the imposed
  ``kernelSum`` and the full configuration ``config`` (a dict of every field);
  For an input on the GPU the checksum is taken when the output is written
  (until then ``inputSha256`` holds a placeholder that computes it);
- ``exposure.noise_correlation``: the normalised correlation of the output
  noise at the image centre (:meth:`gpumatch.SpatialKernel.noise_correlation`).

:func:`gpumatch.io.fits.write_exposure` writes them (see :data:`CARDS`,
:data:`NOISE_CARDS`, :data:`REFPSF` and :data:`NOISECORR`) and
:func:`gpumatch.io.fits.read_exposure` reads them back, with ``psf`` the
reference. :func:`gpumatch.pipeline.output_conflict` is how ``gpumatch match``
decides whether an existing output may be kept (docs/algorithm.md sections 14
and 14.6).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import threading
import weakref

import numpy as np

log = logging.getLogger("gpumatch")

__all__ = ["CARDS", "NOISE_CARDS", "REFPSF", "NOISECORR", "file_sha256", "image_sha256",
           "record_match", "read_output_record", "start_input_checksum", "psf_file_record"]

#: Primary-header cards of the provenance, and the ``provenance`` key each holds.
#: Long values (the configuration as JSON, descriptions) continue over FITS
#: ``CONTINUE`` cards.
CARDS = {
    "GPM_VERS": "version",
    "GPM_DATE": "date",
    "GPM_INPT": "input",
    "GPM_ISHA": "inputSha256",
    "GPM_ISUM": "inputChecksumOf",
    "GPM_REF": "reference",
    "GPM_PSF": "psf",
    "GPM_PSFF": "psfFile",
    "GPM_PSHA": "psfSha256",
    "GPM_BACK": "backend",
    "GPM_KSIN": "kernelSum",
    "GPM_CONF": "config",
    "GPM_CMOD": "configMode",
}
#: Primary-header summary of ``NOISECORR``: correlation between pixels 1 and 2
#: apart along x and y, and the factor by which the variance of a 5x5 (11x11)
#: box sum exceeds the sum of the variance plane over the box.
NOISE_CARDS = {
    "GPM_CX1": ("correlation at lag (dx, dy) = (1, 0)", (0, 1)),
    "GPM_CX2": ("correlation at lag (dx, dy) = (2, 0)", (0, 2)),
    "GPM_CY1": ("correlation at lag (dx, dy) = (0, 1)", (1, 0)),
    "GPM_CY2": ("correlation at lag (dx, dy) = (0, 2)", (2, 0)),
    "GPM_BV5": ("Var(5x5 box sum) / sum of VARIANCE over it", 5),
    "GPM_BV11": ("Var(11x11 box sum) / sum of VARIANCE over it", 11),
}
#: Image HDU of the reference PSF rendered at the image centre.
REFPSF = "REFPSF"
#: Image HDU of the output noise correlation at the image centre, ``[dy, dx]``.
NOISECORR = "NOISECORR"
_COMMENTS = {
    "GPM_VERS": "gpumatch version that wrote this output",
    "GPM_DATE": "UTC date of the match",
    "GPM_INPT": "input file",
    "GPM_ISHA": "SHA-256 of the input (see GPM_ISUM)",
    "GPM_ISUM": "what GPM_ISHA is of: file, image or none",
    "GPM_REF": "reference PSF (gpumatch model string or repr)",
    "GPM_PSF": "input exposure PSF",
    "GPM_PSFF": "file the exposure PSF model was read from",
    "GPM_PSHA": "SHA-256 of that file",
    "GPM_BACK": "backend that matched it",
    "GPM_KSIN": "kernel sum imposed",
    "GPM_CONF": "configuration (JSON, every field)",
    "GPM_CMOD": "how it was chosen (JSON: given, or recommended)",
}
# Relative difference between two renderings of one reference stamp that is
# taken for round-off (other machines, other libm), not a different model.
_STAMP_RTOL = 1e-9


# -- checksums --------------------------------------------------------------------------


def file_sha256(path, chunk=1 << 22):
    """SHA-256 (hex) of the bytes of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def psf_file_record(psf):
    """``(path, sha256)`` of the file a PSF model was read from (its ``path``,
    made absolute), or ``(None, None)`` for a model without one (analytic, in
    memory) or whose file is gone."""
    path = getattr(psf, "path", None)
    if not path or not os.path.isfile(path):
        return None, None
    path = os.path.abspath(os.fspath(path))
    return path, file_sha256(path)


def image_sha256(image):
    """SHA-256 (hex) of an image's pixel bytes (C order, native byte order)."""
    from .backend import to_numpy

    arr = np.ascontiguousarray(to_numpy(image))
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


class _LazyImageChecksum:
    """The checksum of an in-memory device input, taken when the output is written.

    Hashing costs about 11 ms per 16 MB on the host, to which a device image
    must first be copied: on the GPU only outputs that are written pay it.
    The image is held by a weak reference, so a matched exposure does not keep
    its input alive; a device input freed before the output is written leaves
    no checksum.
    """

    def __init__(self, image):
        self._ref = weakref.ref(image)

    def value(self):
        image = self._ref()
        return None if image is None else image_sha256(image)

    def __reduce__(self):
        # A weak reference does not pickle (or deep-copy): the copy holds the value.
        return _checksum_value, (self.value(),)


def _checksum_value(value):
    return value


class _BackgroundImageChecksum:
    """The checksum of a host image, hashed on a second thread while the match
    runs (hashlib releases the GIL), so the ~11 ms per 16 MB leave the
    critical path; :meth:`value` waits for it."""

    def __init__(self, image):
        self._image, self._value = image, None
        self._thread = threading.Thread(target=self._hash, name="gpumatch-checksum",
                                        daemon=True)
        self._thread.start()

    def _hash(self):
        try:
            self._value = image_sha256(self._image)
        except Exception:  # noqa: BLE001 - value() hashes again and raises there
            pass

    def value(self):
        self._thread.join()
        if self._value is None and self._image is not None:
            self._value = image_sha256(self._image)
        self._image = None
        return self._value


def start_input_checksum(exposure):
    """What :func:`record_match` records of the input, with the checksum of a
    host image already being taken: ``(path, checksum, of)``, where
    ``checksum`` may be an object whose ``value()`` gives it."""
    source = getattr(exposure, "source", None)
    if source is None and _on_host(exposure.image):
        return None, _BackgroundImageChecksum(exposure.image), "image"
    return _input_checksum(exposure)


def _on_host(image):
    from .backend import array_namespace

    return array_namespace(image) is np


def _input_checksum(exposure):
    source = getattr(exposure, "source", None)
    if source is not None:
        return source.get("path"), source.get("sha256"), "file"
    if _on_host(exposure.image):  # on the host: cheap, taken now
        return None, image_sha256(exposure.image), "image"
    try:
        return None, _LazyImageChecksum(exposure.image), "image"
    except TypeError:  # an array type without weak references
        return None, image_sha256(exposure.image), "image"


# -- the record ---------------------------------------------------------------------------


def record_match(matched, exposure, reference, kernel, config, backend, checksum=None):
    """Attach provenance and noise correlation to a matched exposure.

    Called by :class:`gpumatch.ModelPsfMatchTask` for every result.

    Parameters
    ----------
    matched : Exposure
        The matched exposure (gets ``provenance`` and ``noise_correlation``).
    exposure : Exposure
        The input (its ``source`` names the file it was read from, if any).
    reference : Psf
        The reference PSF as the caller gave it (before any resizing).
    kernel : SpatialKernel
    config : ModelPsfMatchConfig or None
        None for an output of :func:`gpumatch.apply.apply_kernel` (a kernel
        given, not solved): recorded as ``configMode`` ``{"mode": "kernel"}``.
    backend : str
    checksum : tuple, optional
        :func:`start_input_checksum` of ``exposure``, taken when the match
        began (default: taken now).
    """
    from . import __version__
    from .psf.parse import psf_description

    path, checksum, of = _input_checksum(exposure) if checksum is None else checksum
    if isinstance(checksum, _BackgroundImageChecksum):
        checksum = checksum.value()
    psf_file, psf_sha256 = psf_file_record(exposure.psf)
    matched.provenance = {
        "version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": path,
        "inputSha256": checksum,
        "inputChecksumOf": of,
        "reference": psf_description(reference),
        "psf": None if exposure.psf is None else psf_description(exposure.psf),
        "psfFile": psf_file,
        "psfSha256": psf_sha256,
        "backend": backend,
        "kernelSum": kernel.kernel_sum,
        "config": None if config is None else config.to_dict(),
        "configMode": {"mode": "kernel"} if config is None else _config_mode(config),
    }
    matched.psf_reference = reference
    cx, cy = exposure.bbox.center
    matched.noise_correlation = kernel.noise_correlation(cx, cy)


def _config_mode(config):
    """``{"mode": "given"}``, or ``{"mode": "recommended", "overrides": {...}}`` for a
    configuration chosen per exposure by :meth:`ModelPsfMatchConfig.for_psfs`
    (its fields then follow from the input, the reference and the overrides)."""
    overrides = getattr(config, "recommend_overrides", None)
    if overrides is None:
        return {"mode": "given"}
    return {"mode": "recommended", "overrides": json.loads(json.dumps(overrides, default=str))}


def _card_value(key, value):
    if key in ("GPM_CONF", "GPM_CMOD"):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, _LazyImageChecksum):
        value = value.value()
    if value is None:
        return ""
    if isinstance(value, str):
        # A card holds printable ASCII: a model's repr may hold anything.
        value = value.encode("ascii", "backslashreplace").decode("ascii")
        return "".join(c if c.isprintable() else " " for c in value)
    return value


def _image_centre(exposure):
    """The parent position of the exposure's central pixel (whole pixels)."""
    ny, nx = exposure.shape
    return exposure.xy0[0] + (nx - 1) // 2, exposure.xy0[1] + (ny - 1) // 2


def output_hdus(exposure, header):
    """Write ``exposure``'s record into the primary ``header``; return the extra HDUs.

    Nothing for an exposure without ``provenance``. The reference stamp
    (:data:`REFPSF`) is ``exposure.psf_reference`` (else ``exposure.psf``)
    rendered at the central pixel, whose parent position its cards ``GPM_X``,
    ``GPM_Y`` give.
    """
    from astropy.io import fits

    from .kernel import box_variance_factor

    prov = getattr(exposure, "provenance", None)
    if not prov:
        return []
    for key, name in CARDS.items():
        value = _card_value(key, prov.get(name))
        if name == "inputSha256":
            prov[name] = value or None  # taken once: a rewrite records the same
        header[key] = (value, _COMMENTS[key])
    hdus = []
    reference = getattr(exposure, "psf_reference", None) or exposure.psf
    x, y = _image_centre(exposure)
    try:
        stamp = None if reference is None else np.asarray(
            reference.compute_kernel_image(float(x), float(y)), dtype=np.float64)
    except Exception as exc:  # the output matters more than its reference's stamp
        from .errors import GpumatchWarning, warn

        warn(f"the reference PSF {prov.get('reference')} cannot be rendered at ({x}, {y}) "
             f"({exc.__class__.__name__}: {exc}); the output has no {REFPSF} stamp",
             GpumatchWarning)
        stamp = None
    if stamp is not None:
        h = fits.ImageHDU(stamp, name=REFPSF)
        h.header["GPM_X"] = (x, "parent x of the stamp's position (pixels)")
        h.header["GPM_Y"] = (y, "parent y of the stamp's position (pixels)")
        hdus.append(h)
    corr = getattr(exposure, "noise_correlation", None)
    if corr is not None:
        corr = np.asarray(corr, dtype=np.float64)
        c = corr.shape[0] // 2
        for key, (comment, what) in NOISE_CARDS.items():
            if isinstance(what, tuple):
                dy, dx = what
                value = float(corr[c + dy, c + dx]) if max(dy, dx) <= c else 0.0
            else:
                value = box_variance_factor(corr, what)
            if math.isfinite(value):  # FITS cards hold no NaN
                header[key] = (value, comment)
        h = fits.ImageHDU(corr, name=NOISECORR)
        for axis, name in ((1, "LAG_X"), (2, "LAG_Y")):  # pixel -> lag in pixels
            h.header[f"CTYPE{axis}"] = (name, f"d{name[-1].lower()} in pixels")
            h.header[f"CRPIX{axis}"] = (c + 1.0, "lag 0 (FITS pixel)")
            h.header[f"CRVAL{axis}"] = 0.0
            h.header[f"CDELT{axis}"] = 1.0
        hdus.append(h)
    return hdus


def header_record(header):
    """The provenance dict from a primary header, or None when it has none."""
    if "GPM_VERS" not in header:
        return None
    prov = {}
    for key, name in CARDS.items():
        value = header.get(key)
        prov[name] = None if value == "" else value
    for name in ("config", "configMode"):
        try:
            prov[name] = json.loads(prov[name]) if prov[name] else None
        except ValueError:
            prov[name] = None
    if prov.get("kernelSum") is not None:
        prov["kernelSum"] = float(prov["kernelSum"])
    return prov


def _rebuild_reference(description, stamp, where):
    """The reference model from its description, else an ImagePsf of its stamp."""
    from .psf import ImagePsf, parse_psf

    model = None
    if description:
        try:
            model = parse_psf(description)
        except Exception as exc:  # a repr, or a file that has moved: the stamp stands in
            log.debug("%s: reference %r not rebuilt (%s); using its stamp", where[0],
                      description, exc)
    if stamp is None:
        return model
    if model is not None:
        try:
            again = np.asarray(model.compute_kernel_image(float(where[1]), float(where[2])))
        except Exception:
            again = None
        if again is not None and _same_stamp(again, stamp):
            return model
        log.info("%s: reference %r no longer renders as recorded; using the recorded stamp",
                 where[0], description)
    try:
        return ImagePsf(stamp)
    except ValueError:
        return model


def read_output_record(hdul, primary, path):
    """``(provenance, noise_correlation, reference)`` of an opened output, or Nones."""
    prov = header_record(primary)
    corr = stamp = None
    x = y = 0
    for h in hdul[1:]:
        name = str(h.header.get("EXTNAME", "")).strip().upper()
        if name == NOISECORR and h.data is not None:
            corr = np.array(h.data, dtype=np.float64)
        elif name == REFPSF and h.data is not None:
            stamp = np.array(h.data, dtype=np.float64)
            x, y = h.header.get("GPM_X", 0), h.header.get("GPM_Y", 0)
    reference = None
    if prov is not None:
        reference = _rebuild_reference(prov.get("reference"), stamp, (path, x, y))
    return prov, corr, reference


def _same_stamp(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
    return float(np.abs(a - b).max(initial=0.0)) <= _STAMP_RTOL * scale
