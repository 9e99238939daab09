"""PSF models from short strings (command lines, configuration files) or foreign objects."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .._warnings import quiet

__all__ = ["parse_psf", "psf_description", "psf_forms_help", "register_form", "FORMS", "PsfForm"]


class PsfForm(NamedTuple):
    """One string form of :func:`parse_psf`.

    Attributes
    ----------
    syntax : str
        How it is written, e.g. ``moffat:fwhm=F[,beta=B][,size=N]``.
    help : str
        What it makes, one line (for ``--help``).
    parse : callable
        ``parse(spec, body) -> Psf``: ``spec`` is the whole string (for
        messages), ``body`` what follows ``NAME:``.
    aliases : tuple of str
        Other accepted names.
    """

    syntax: str
    help: str
    parse: Callable[[str, str], Any]
    aliases: tuple[str, ...] = ()


#: The string forms :func:`parse_psf` accepts, by name (lower case, without
#: ``-`` or ``_``), in the order help and error messages list them; add one with
#: :func:`register_form`.
FORMS: dict[str, PsfForm] = {}
_ALIASES: dict[str, str] = {}


def register_form(name, form):
    """Make ``name:...`` (and ``form.aliases``) a string form of :func:`parse_psf`.

    Parameters
    ----------
    name : str
        The form's name, lower case.
    form : PsfForm
        Its syntax, help line and parser.
    """
    FORMS[name] = form
    for alias in (name,) + tuple(form.aliases):
        _ALIASES[alias] = name


def _forms_syntax():
    """The accepted forms on one line, for error messages."""
    return " | ".join(f.syntax for f in FORMS.values())


def psf_forms_help(indent=2):
    """The accepted PSF model strings, one per line with what each makes (for ``--help``).

    Parameters
    ----------
    indent : int
        Spaces before each line.

    Returns
    -------
    str
        Lines ``syntax  help``, syntaxes aligned, ending with a newline.
    """
    rows = [(syntax, form.help if i == 0 else "") for form in FORMS.values()
            for i, syntax in enumerate(form.syntax.split(" | "))]
    width = max(len(s) for s, _ in rows)
    return "".join(f"{' ' * indent}{s.ljust(width)}  {h}".rstrip() + "\n" for s, h in rows)


_NAME = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_\-]*)\s*:(.*)$", re.S)
_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _fail(spec, why):
    return ValueError(f"cannot parse PSF model {spec!r}: {why}. Accepted forms: {_forms_syntax()}")


def _params(spec, body, allowed):
    out = {}
    body = body.strip()
    if not body:
        return out
    for item in body.split(","):
        if "=" not in item:
            raise _fail(spec, f"{item.strip()!r} is not NAME=VALUE")
        key, value = (t.strip() for t in item.split("=", 1))
        key = key.lower()
        if key not in allowed:
            raise _fail(spec, f"unknown parameter {key!r} (allowed: {', '.join(allowed)})")
        if key in out:
            raise _fail(spec, f"parameter {key!r} given twice")
        try:
            v = float(value)
        except ValueError:
            raise _fail(spec, f"{key}={value!r} is not a number") from None
        if not math.isfinite(v):
            raise _fail(spec, f"{key}={value!r} is not finite")
        out[key] = v
    return out


def _size(spec, p, sigma_max):
    """(width, height) from size/width/height or a default of ~6 sigma."""
    if "size" in p and ("width" in p or "height" in p):
        raise _fail(spec, "give size or width/height, not both")
    default = max(3, int(math.ceil(6.0 * sigma_max)) | 1)
    w = p.get("size", p.get("width", p.get("height", default)))
    h = p.get("size", p.get("height", p.get("width", default)))
    from ..limits import check_stamp_size

    for v in (w, h):
        if v != int(v) or int(v) < 1 or int(v) % 2 == 0:
            raise _fail(spec, f"stamp size {v:g} must be an odd positive integer")
        check_stamp_size(v, f"PSF model {spec!r}")
    return int(w), int(h)


def _positive(spec, p, *names):
    for n in names:
        if n in p and not p[n] > 0:
            raise _fail(spec, f"{n}={p[n]:g} must be positive")


def _gaussian(spec, body):
    from .analytic import GaussianPsf

    p = _params(spec, body, ("fwhm", "sigma", "size", "width", "height"))
    if ("fwhm" in p) == ("sigma" in p):
        raise _fail(spec, "give exactly one of fwhm= and sigma=")
    _positive(spec, p, "fwhm", "sigma")
    sigma = p["sigma"] if "sigma" in p else p["fwhm"] * _SIGMA_PER_FWHM
    w, h = _size(spec, p, sigma)
    return GaussianPsf(w, h, sigma)


def _double_gaussian(spec, body):
    from .analytic import DoubleGaussianPsf

    p = _params(spec, body, ("sigma1", "sigma2", "b", "size", "width", "height"))
    if "sigma1" not in p:
        raise _fail(spec, "sigma1= is required")
    _positive(spec, p, "sigma1", "sigma2")
    b = p.get("b", 0.0)
    if b < 0:
        raise _fail(spec, f"b={b:g} must be >= 0")
    if b != 0 and "sigma2" not in p:
        raise _fail(spec, "sigma2= is required when b is not 0")
    sigma2 = p.get("sigma2", 0.0)
    w, h = _size(spec, p, max(p["sigma1"], sigma2 if b else 0.0))
    return DoubleGaussianPsf(w, h, p["sigma1"], sigma2, b)


def _moffat(spec, body):
    from .analytic import MoffatPsf

    p = _params(spec, body, ("fwhm", "beta", "size", "width", "height"))
    if "fwhm" not in p:
        raise _fail(spec, "fwhm= is required")
    _positive(spec, p, "fwhm")
    beta = p.get("beta", 3.0)
    if not beta > 1:
        raise _fail(spec, f"beta={beta:g} must be > 1")
    # Moffat wings are heavier than a Gaussian's: default to ~8 FWHM (6 x 1.33 FWHM).
    w, h = _size(spec, p, 1.33 * p["fwhm"])
    return MoffatPsf(w, h, p["fwhm"], beta)


def _path(spec, body):
    path = body.strip()
    if not path:
        raise _fail(spec, "the file name is missing")
    return os.path.expanduser(path)


def read_image_psf(path):
    """An :class:`ImagePsf` from the first 2-d image in a FITS file."""
    from astropy.io import fits

    from .image import ImagePsf

    if not os.path.exists(path):
        raise FileNotFoundError(f"PSF image {path}: no such file; check the path")
    from ..limits import check_stamp_size

    def image(h):
        # The header's size is checked before its data are read.
        if not (h.is_image and h.header.get("NAXIS") == 2):
            return None
        check_stamp_size(max(h.header.get("NAXIS1", 0), h.header.get("NAXIS2", 0)),
                         f"PSF image {path}")
        return None if h.data is None else np.array(h.data, dtype=np.float64)

    try:
        with quiet():
            with fits.open(path, memmap=False) as hdul:
                data = next((d for d in map(image, hdul) if d is not None), None)
    except OSError as exc:
        raise ValueError(f"PSF image {path} is not a readable FITS file ({exc})") from None
    if data is None:
        raise ValueError(f"PSF image {path} has no 2-d image HDU")
    try:
        return ImagePsf(data)
    except ValueError as exc:
        raise ValueError(f"PSF image {path}: {exc}") from None


def _from_object(obj):
    from .base import Psf

    if isinstance(obj, Psf):
        return obj
    if hasattr(obj, "grid_xypos") and hasattr(obj, "oversampling"):
        from .gridded import GriddedPsf

        return GriddedPsf.from_photutils(obj)
    if hasattr(obj, "drawImage") or hasattr(obj, "getPSF"):
        from .adapters import GalSimPsf

        return GalSimPsf(obj)
    if hasattr(obj, "draw") and hasattr(obj, "drawStar"):
        from .adapters import PiffPsf

        return PiffPsf(obj)
    if type(obj).__module__.startswith("lsst.images") and hasattr(obj, "kernel_bbox"):
        from .adapters import LsstImagesPsf

        return LsstImagesPsf(obj)
    if hasattr(obj, "compute_kernel_image"):
        return obj
    raise TypeError(f"cannot use a {type(obj).__name__} as a PSF model; give a gpumatch Psf, "
                    f"a photutils GriddedPSFModel, a GalSim GSObject, a Piff PSF or a string "
                    f"({_forms_syntax()})")


def parse_psf(spec: Any) -> Any:
    """A PSF model from a string, or an object from another package.

    Strings (names are case-insensitive; sizes default to the odd number
    just above 6 sigma of the widest component)::

        gaussian:fwhm=7.7,size=23
        gaussian:sigma=3.27,size=23
        doublegaussian:sigma1=3.27,sigma2=8.175,b=0.1,size=23
        moffat:fwhm=6.0,beta=3,size=51     (beta defaults to 3)
        psfex:PATH.psf          (PsfexPsf.read)
        image:PATH.fits         (ImagePsf of the first 2-d image)
        piff:PATH               (PiffPsf.read; needs piff)
        lsstimages:PATH.fits    (a PSF file written by lsst.images)

    Objects: a gpumatch :class:`Psf` is returned as is; a photutils
    ``GriddedPSFModel`` becomes a :class:`GriddedPsf`, a GalSim profile a
    :class:`GalSimPsf`, a Piff PSF a :class:`PiffPsf`.

    Parameters
    ----------
    spec : str or object
        A string form (the table :data:`FORMS`) or a PSF object.

    Returns
    -------
    Psf
        The model.

    Raises
    ------
    ValueError
        One line naming the string, what is wrong, and the accepted forms.
    """
    if not isinstance(spec, str):
        if isinstance(spec, os.PathLike):
            spec = os.fspath(spec)
            raise _fail(spec, "a bare path needs a prefix saying what it holds")
        return _from_object(spec)
    m = _NAME.match(spec)
    if m is None:
        raise _fail(spec, "expected NAME:PARAMETERS")
    name = m.group(1).lower().replace("-", "").replace("_", "")
    if name not in _ALIASES:
        raise _fail(spec, f"unknown model {m.group(1)!r}")
    return FORMS[_ALIASES[name]].parse(spec, m.group(2))


def _psfex(spec, body):
    from .psfex import PsfexPsf

    return PsfexPsf.read(_path(spec, body))


def _image(spec, body):
    return read_image_psf(_path(spec, body))


def _piff(spec, body):
    from .adapters import PiffPsf

    return PiffPsf.read(_path(spec, body))


def _lsst_images(spec, body):
    from ..io.lsst_images import read_psf

    return read_psf(_path(spec, body))


for _name, _form in (
    ("gaussian", PsfForm("gaussian:fwhm=F[,size=N] | gaussian:sigma=S[,size=N]",
                         "circular Gaussian; FWHM or sigma in pixels", _gaussian, ("gauss",))),
    ("doublegaussian", PsfForm("doublegaussian:sigma1=S1[,sigma2=S2,b=B][,size=N]",
                               "core + wing of relative peak B; sigmas in pixels",
                               _double_gaussian, ("dgauss", "doublegauss"))),
    ("moffat", PsfForm("moffat:fwhm=F[,beta=B][,size=N]",
                       "circular Moffat; FWHM in pixels, beta > 1 (default 3)", _moffat)),
    ("psfex", PsfForm("psfex:PATH.psf", "PSFEx model file", _psfex)),
    ("image", PsfForm("image:PATH.fits", "PSF image: the first 2-d image of a FITS file",
                      _image)),
    ("piff", PsfForm("piff:PATH", "Piff PSF file (needs piff)", _piff)),
    ("lsstimages", PsfForm("lsstimages:PATH.fits", "PSF file written by lsst.images",
                           _lsst_images, ("lsst",))),
):
    register_form(_name, _form)


def psf_description(psf):
    """A string that :func:`parse_psf` turns back into ``psf``, else ``repr(psf)``.

    Gaussian and double-Gaussian models are written with every parameter
    (floats in their shortest exact form, so the round trip is exact); a
    PSFEx model read from a file with the default offset and stamp size is
    ``psfex:PATH`` (the file's absolute path, so that it reads back from any
    directory). Other models (varying,
    gridded, GalSim, images, ...) have no string form and give their
    ``repr``, which :func:`parse_psf` refuses.
    """
    from .analytic import DoubleGaussianPsf, GaussianPsf
    from .psfex import PsfexPsf, _odd_ceil

    if type(psf) is GaussianPsf:
        return f"gaussian:sigma={psf.sigma!r},width={psf.width},height={psf.height}"
    if type(psf) is DoubleGaussianPsf:
        wing = f",sigma2={psf.sigma2!r},b={psf.b!r}" if psf.sigma2 > 0 else ""
        return (f"doublegaussian:sigma1={psf.sigma1!r}{wing},width={psf.width},"
                f"height={psf.height}")
    if type(psf) is PsfexPsf and psf.path and psf.offset == (1.0, 1.0):
        ny, nx = psf.components.shape[1:]
        if psf.size == _odd_ceil(max(nx, ny) * psf.sampling):
            return f"psfex:{os.path.abspath(os.fspath(psf.path))}"
    return repr(psf)
