"""The object archive that LSST (afw) exposures carry after their pixel planes.

An LSST calexp keeps its PSF model, photometric calibration, archived WCS and
other objects in binary tables after ``IMAGE``/``MASK``/``VARIANCE``. The
layout, as found in real files (see ``shared/data/lsst/README.md``):

- the primary header's ``AR_HDU`` is the 1-based HDU number of the *index*
  table (``EXTTYPE = 'ARCHIVE_INDEX'``), and cards such as ``PSF_ID``,
  ``WCS_ID``, ``PHOTOCALIB_ID`` give the archive ids of the exposure's objects;
- the index has one row per (object, catalogue) pair: ``id``, the catalogue
  number counted from the index (``cat_archive``; newer files spell it
  ``cat.archive``), the order among the object's catalogues
  (``cat_persistable`` / ``cat.persistable``), ``row0``, ``nrows``, the class
  ``name`` and its ``module``;
- catalogue ``N`` is the HDU ``AR_HDU - 1 + N`` (0-based) and holds the rows of
  every archived object of one class; nested objects are referred to by id.

Classes turned into gpumatch PSF models: ``GaussianPsf``, ``DoubleGaussianPsf``,
``KernelPsf`` and ``PcaPsf`` (a ``FixedKernel``, or a ``LinearCombinationKernel``
of ``FixedKernel`` images weighted by ``Chebyshev1Function2D`` or
``PolynomialFunction2D`` spatial functions). ``PiffPsf`` is a pickled Python
object and is never unpickled; other classes (``PsfexPsf``, ``CoaddPsf``, ...)
are named in one line. The PSF problem is kept (:attr:`AfwArchive.psf_problem`)
so that the command line can say it when no other PSF is given.

Written back (:func:`archive_hdus`): the archive is copied through with the
PSF's own index rows replaced by the new PSF (``GaussianPsf``,
``DoubleGaussianPsf``, or a ``KernelPsf`` of one ``FixedKernel`` stamp) in a
catalogue of its own; catalogues that only the old PSF used are dropped and the
others renumbered. An exposure without an archive is written with no archive
pointer cards at all.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np

from ..errors import InputWarning, warn
from ..psf.base import Psf, centred_on

log = logging.getLogger("gpumatch")

__all__ = ["AfwArchive", "ArchiveKernelPsf", "read_archive", "attach_archive", "archive_hdus",
           "strip_archive_pointers", "ARCHIVE_POINTER"]

#: Primary-header cards that point into the archive (they must not outlive it).
ARCHIVE_POINTER = re.compile(
    r"^(AR_HDU|EXPINFO_V|ARCHIVE_ID_.*|(PSF|WCS|SKYWCS|PHOTOCALIB|CALIB|DETECTOR|VALIDPOLYGON|"
    r"APCORR|TRANSMISSIONCURVE|COADDINPUTS|FILTER|FILTERLABEL|VISITINFO|SUMMARYSTATS)_ID)$")

#: AB magnitude zero point of a flux in nJy: 3631 Jy = 10**(0.4 * 31.4) nJy.
_NJY_AB_ZERO = 10.0 ** (0.4 * 31.4)

_PSF_REFS = {  # class -> columns holding archive ids of nested objects
    "PcaPsf": ("kernel",), "KernelPsf": ("kernel",),
    "LinearCombinationKernel": ("spatialfunctions", "components"),
}


class ArchiveError(ValueError):
    """An archive entry cannot be turned into a gpumatch object (message: why)."""


def _col(table, *names):
    """The first of ``names`` that ``table`` has (afw spells some with '_' or '.')."""
    have = {n.lower(): n for n in table.columns.names}
    for name in names:
        for spelling in (name, name.replace("_", "."), name.replace(".", "_")):
            if spelling.lower() in have:
                return have[spelling.lower()]
    return None


def _point(row, table, name):
    """A 2-vector column ``name`` or its ``name_x``/``name_y`` pair (afw ``Point``)."""
    col = _col(table, name)
    if col is not None:
        v = np.ravel(row[col])
        if v.size == 2:
            return float(v[0]), float(v[1])
    cx, cy = _col(table, f"{name}_x"), _col(table, f"{name}_y")
    if cx is None or cy is None:
        raise ArchiveError(f"no {name!r} column")
    return float(row[cx]), float(row[cy])


class AfwArchive:
    """The archive of one file: its tables (in memory), the index and the pointers.

    Attributes
    ----------
    hdus : list of astropy BinTableHDU
        The index, then catalogues 1..N, detached from the file.
    pointers : dict
        The primary-header pointer cards (``PSF_ID``, ``WCS_ID``, ...), without
        ``AR_HDU`` (set again when written).
    psf_id : int or None
    psf_class : str or None
        Class name of the archived PSF.
    psf_problem : str or None
        Why the archived PSF could not be used (one line), or None.
    """

    def __init__(self, hdus, pointers, path):
        self.hdus = hdus
        self.pointers = dict(pointers)
        self.path = path
        index = hdus[0].data
        self._cols = {k: _col(hdus[0], *names) for k, names in (
            ("id", ("id",)), ("cat", ("cat_archive",)), ("pers", ("cat_persistable",)),
            ("row0", ("row0",)), ("nrows", ("nrows",)), ("name", ("name",)),
            ("module", ("module",)))}
        missing = [k for k, c in self._cols.items() if c is None and k != "module"]
        if missing:
            raise ArchiveError(f"the archive index has no {', '.join(missing)} column")
        self.rows = [self._index_row(r) for r in index]
        bad = [r["id"] for r in self.rows if not 1 <= r["cat"] < len(hdus)]
        if bad:
            raise ArchiveError(f"index rows of ids {bad[:5]} point past the "
                               f"{len(hdus) - 1} catalogues")
        pid = self.pointers.get("PSF_ID")
        self.psf_id = int(pid) if isinstance(pid, (int, np.integer)) and pid > 0 else None
        self.psf_class = self.class_of(self.psf_id) if self.psf_id is not None else None
        self.psf_problem = None
        self.model = None  # the gpumatch model of the archived PSF, once built

    def _index_row(self, r):
        c = self._cols
        return {"id": int(r[c["id"]]), "cat": int(r[c["cat"]]), "pers": int(r[c["pers"]]),
                "row0": int(r[c["row0"]]), "nrows": int(r[c["nrows"]]),
                "name": str(r[c["name"]]).strip(),
                "module": str(r[c["module"]]).strip() if c["module"] else ""}

    def class_of(self, obj_id):
        for r in self.rows:
            if r["id"] == obj_id:
                return r["name"]
        return None

    def ids_of(self, name):
        return sorted({r["id"] for r in self.rows if r["name"] == name})

    def tables(self, obj_id):
        """The object's rows: one astropy FITS_rec per catalogue, in persistable order."""
        entries = sorted((r for r in self.rows if r["id"] == obj_id), key=lambda r: r["pers"])
        if not entries:
            raise ArchiveError(f"archive id {obj_id} is not in the index")
        out = []
        for r in entries:
            if not 1 <= r["cat"] < len(self.hdus):
                raise ArchiveError(f"archive id {obj_id} points to catalogue {r['cat']}, "
                                   f"but the archive has {len(self.hdus) - 1}")
            hdu = self.hdus[r["cat"]]
            out.append((hdu, hdu.data[r["row0"]:r["row0"] + r["nrows"]]))
        return out

    def first_row(self, obj_id):
        hdu, rows = self.tables(obj_id)[0]
        if len(rows) < 1:
            raise ArchiveError(f"archive id {obj_id} has no rows")
        return hdu, rows[0]

    # -- objects -------------------------------------------------------------------

    def psf(self):
        """The archived PSF as a gpumatch model, or None (reason in :attr:`psf_problem`)."""
        if self.psf_id is None:
            return None
        name = self.psf_class
        where = f"{self.path}: the PSF archived in the file (id {self.psf_id}"
        if name is None:
            self.psf_problem = f"{where}) is missing from its archive index; give --psf MODEL"
            return None
        if name == "PiffPsf":
            # A pickle runs arbitrary code when loaded: it is never loaded here.
            self.psf_problem = (f"{where}) is a PiffPsf, a pickled Python object that gpumatch "
                                "does not unpickle; pass the Piff file with --psf piff:FILE")
            return None
        builder = {"GaussianPsf": self._gaussian, "DoubleGaussianPsf": self._double_gaussian,
                   "KernelPsf": self._kernel_psf, "PcaPsf": self._kernel_psf}.get(name)
        if builder is None:
            self.psf_problem = (f"{where}) is a {name}, which gpumatch cannot evaluate; "
                                "give --psf MODEL")
            return None
        try:
            self.model = builder(self.psf_id)
            return self.model
        except (ArchiveError, ValueError, KeyError, IndexError) as exc:
            self.psf_problem = f"{where}, a {name}) cannot be read ({exc}); give --psf MODEL"
            return None

    def _gaussian(self, obj_id):
        from ..psf.analytic import GaussianPsf

        hdu, row = self.first_row(obj_id)
        w, h = _point(row, hdu, "dimensions")
        return GaussianPsf(int(w), int(h), float(row[_col(hdu, "sigma")]))

    def _double_gaussian(self, obj_id):
        from ..psf.analytic import DoubleGaussianPsf

        hdu, row = self.first_row(obj_id)
        w, h = _point(row, hdu, "dimensions")
        cols = [_col(hdu, n) for n in ("sigma1", "sigma2", "b")]
        if None in cols:
            raise ArchiveError("DoubleGaussianPsf needs sigma1, sigma2 and b columns")
        return DoubleGaussianPsf(int(w), int(h), *(float(row[c]) for c in cols))

    def _kernel_psf(self, obj_id):
        hdu, row = self.first_row(obj_id)
        kernel_id = int(row[_col(hdu, "kernel")])
        images, functions = self._kernel(kernel_id)
        avg = None
        if _col(hdu, "averagePosition") or _col(hdu, "averagePosition_x"):
            avg = _point(row, hdu, "averagePosition")
        return ArchiveKernelPsf(images, functions, average_position=avg,
                                name=f"{self.psf_class} id {obj_id}")

    def _kernel(self, kernel_id):
        """``(images, functions)`` of a kernel: odd square centred images (n, s, s)
        and one spatial function per image (None for a constant weight of 1)."""
        name = self.class_of(kernel_id)
        hdu, row = self.first_row(kernel_id)
        if name == "FixedKernel":
            return _fixed_image(hdu, row)[None], [None]
        if name == "LinearCombinationKernel":
            comps = np.ravel(row[_col(hdu, "components")]).astype(int)
            funcs = np.ravel(row[_col(hdu, "spatialfunctions")]).astype(int)
            if len(funcs) != len(comps):
                raise ArchiveError(f"LinearCombinationKernel id {kernel_id} has {len(comps)} "
                                   f"components but {len(funcs)} spatial functions")
            images = []
            for cid in comps:
                if self.class_of(int(cid)) != "FixedKernel":
                    raise ArchiveError(f"component {cid} is a {self.class_of(int(cid))}, "
                                       "not a FixedKernel")
                images.append(_fixed_image(*self.first_row(int(cid))))
            size = max(i.shape[0] for i in images)
            from ..psf.base import pad_or_crop

            images = np.stack([pad_or_crop(i, size, size) for i in images])
            return images, [self._function(int(f)) for f in funcs]
        raise ArchiveError(f"its kernel (id {kernel_id}) is a {name}, which gpumatch cannot "
                           "evaluate")

    def _function(self, func_id):
        name = self.class_of(func_id)
        hdu, row = self.first_row(func_id)
        coeffs = np.ravel(row[_col(hdu, "coefficients")]).astype(np.float64)
        if name == "Chebyshev1Function2D":
            return SpatialFunction(coeffs, _point(row, hdu, "min"), _point(row, hdu, "max"))
        if name == "PolynomialFunction2D":
            return SpatialFunction(coeffs)
        raise ArchiveError(f"spatial function id {func_id} is a {name}, which gpumatch "
                           "cannot evaluate")

    def photo_calib(self):
        """``calibrationMean`` (nJy per count) of the archived PhotoCalib, or None."""
        pid = self.pointers.get("PHOTOCALIB_ID")
        ids = [int(pid)] if isinstance(pid, (int, np.integer)) else self.ids_of("PhotoCalib")
        for obj_id in ids:
            try:
                hdu, row = self.first_row(obj_id)
            except ArchiveError:
                continue
            col = _col(hdu, "calibrationMean")
            if col is not None:
                return float(row[col])
        return None

    def filter_label(self):
        """The band (else the physical filter) of an archived FilterLabel, or None."""
        for obj_id in self.ids_of("FilterLabel"):
            hdu, row = self.first_row(obj_id)
            for name in ("band", "physical"):
                col = _col(hdu, name)
                if col is not None and str(row[col]).strip():
                    return str(row[col]).strip()
        return None

    def has_wcs(self):
        return any(r["name"] in ("SkyWcs", "TanWcs", "Wcs") or r["name"].endswith("Wcs")
                   for r in self.rows)


def _fixed_image(hdu, row):
    """A FixedKernel's image as an odd square array with its centre in the middle."""
    w, h = (int(v) for v in _point(row, hdu, "dimensions"))
    cx, cy = (int(v) for v in _point(row, hdu, "center"))
    img = np.asarray(row[_col(hdu, "image")], dtype=np.float64).reshape(h, w)  # row-major
    return centred_on(img, cx, cy)


class SpatialFunction:
    """A 2-d polynomial in afw term order ``1, x, y, x^2, xy, y^2, ...``.

    With ``lo``/``hi`` (the box corners, parent pixels) it is a Chebyshev series of
    the first kind in ``x`` and ``y`` mapped onto [-1, 1] over that box
    (afw ``Chebyshev1Function2D``); without, an ordinary polynomial in parent
    pixels (afw ``PolynomialFunction2D``).
    """

    def __init__(self, coeffs, lo=None, hi=None):
        n = len(coeffs)
        order = int(round((math.sqrt(8 * n + 1) - 3) / 2))
        if (order + 1) * (order + 2) // 2 != n:
            raise ArchiveError(f"{n} coefficients is not a full 2-d polynomial")
        self.coeffs = np.asarray(coeffs, dtype=np.float64)
        self.terms = [(k - j, j) for k in range(order + 1) for j in range(k + 1)]
        self.order = order
        self.lo, self.hi = lo, hi
        if lo is not None and not (hi[0] > lo[0] and hi[1] > lo[1]):
            raise ArchiveError(f"Chebyshev box {lo}..{hi} is empty")

    def __call__(self, x, y):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if self.lo is None:
            px = [x ** i for i in range(self.order + 1)]
            py = [y ** i for i in range(self.order + 1)]
        else:
            u = (2.0 * x - (self.lo[0] + self.hi[0])) / (self.hi[0] - self.lo[0])
            v = (2.0 * y - (self.lo[1] + self.hi[1])) / (self.hi[1] - self.lo[1])
            px, py = _chebyshev(u, self.order), _chebyshev(v, self.order)
        return sum(c * px[i] * py[j] for c, (i, j) in zip(self.coeffs, self.terms))


def _chebyshev(t, order):
    """``[T_0(t), ..., T_order(t)]`` by the recurrence ``T_{n+1} = 2 t T_n - T_{n-1}``."""
    out = [np.ones_like(t), t]
    for _ in range(order - 1):
        out.append(2.0 * t * out[-1] - out[-2])
    return out[:order + 1]


class ArchiveKernelPsf(Psf):
    """An afw ``KernelPsf``/``PcaPsf``: images weighted by spatial functions.

    The PSF at parent ``(x, y)`` is ``sum_k f_k(x, y) B_k``, normalised to sum 1
    (a ``FixedKernel`` is one image with weight 1).

    Parameters
    ----------
    images : array (n, s, s)
        Odd square component images, centred.
    functions : list of callables or None
        ``f_k(x, y)`` of parent pixels; None means the constant 1.
    average_position : (float, float), optional
        Where the model is typical (parent pixels).
    """

    def __init__(self, images, functions, average_position=None, name="KernelPsf"):
        images = np.array(images, dtype=np.float64)
        if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] % 2 == 0:
            raise ValueError(f"kernel images must be (n, s, s) with s odd, got {images.shape}")
        if len(functions) != len(images):
            raise ValueError(f"{len(images)} images but {len(functions)} spatial functions")
        self.images = images
        self.functions = list(functions)
        self.name = name
        if average_position is not None:
            self.average_position = tuple(float(v) for v in average_position)

    def weights(self, xs, ys):
        """Component weights at the positions, ``(n_positions, n_components)``."""
        xs, ys = np.ravel(xs).astype(np.float64), np.ravel(ys).astype(np.float64)
        return np.stack([np.ones_like(xs) if f is None else np.broadcast_to(f(xs, ys), xs.shape)
                         for f in self.functions], axis=1)

    def compute_kernel_images(self, xs, ys):
        stamps = np.einsum("pk,kij->pij", self.weights(xs, ys), self.images)
        sums = stamps.sum(axis=(1, 2))
        if not np.all(np.isfinite(sums)) or np.any(sums <= 0):
            from ..errors import PsfEvaluationError

            bad = int(np.flatnonzero(~(sums > 0))[0])
            raise PsfEvaluationError(
                f"{self.name}: the PSF at ({np.ravel(xs)[bad]}, {np.ravel(ys)[bad]}) sums to "
                f"{sums[bad]}; give --psf MODEL")
        return stamps / sums[:, None, None]

    def compute_kernel_image(self, x, y):
        return self.compute_kernel_images([x], [y])[0]

    def dimensions(self, x=None, y=None):
        return self.images.shape[2], self.images.shape[1]

    def __repr__(self):
        s = self.images.shape
        return f"ArchiveKernelPsf({self.name}, {s[0]} images {s[2]}x{s[1]})"


# -- reading --------------------------------------------------------------------


def read_archive(hdul, primary, path):
    """The :class:`AfwArchive` that ``primary``'s ``AR_HDU`` points to, or None.

    A broken archive is ignored with one :class:`~gpumatch.errors.InputWarning`
    (the pixels are still usable with an explicit PSF).
    """
    from astropy.io import fits

    ar = primary.get("AR_HDU")
    if ar is None:
        return None
    pointers = {k: primary[k] for k in primary if ARCHIVE_POINTER.match(k) and k != "AR_HDU"}
    try:
        start = int(ar) - 1
        if not 0 < start < len(hdul) or not isinstance(hdul[start], fits.BinTableHDU) \
                or isinstance(hdul[start], fits.CompImageHDU):
            raise ArchiveError(f"AR_HDU = {ar} is not a table HDU of this {len(hdul)}-HDU file")
        n_cat = hdul[start].header.get("AR_NCAT")
        if n_cat is None:  # the archive's tables, up to the first HDU that is not one
            n_cat = 1
            while start + n_cat < len(hdul) and \
                    hdul[start + n_cat].header.get("EXTTYPE") == "ARCHIVE_DATA":
                n_cat += 1
        if start + int(n_cat) > len(hdul):
            raise ArchiveError(f"AR_NCAT = {n_cat} catalogues do not fit in the file")
        # Detached from the file (closed after reading) by copying the rows.
        hdus = [fits.BinTableHDU(data=np.array(h.data), header=h.header.copy())
                for h in hdul[start:start + int(n_cat)]]
        return AfwArchive(hdus, pointers, path)
    except (ArchiveError, ValueError, TypeError, KeyError) as exc:
        warn(f"{path}: its afw archive cannot be read ({exc}); its PSF, calibration and "
             "archived WCS are ignored (give --psf MODEL)", InputWarning)
        return None


def attach_archive(exposure, hdul, primary, path):
    """Fill ``exposure``'s PSF, calibration, filter and ``archive`` from the file's archive.

    Fields already set (a PSF given by the caller, a ``FILTER`` card) are kept;
    the pointer cards leave ``exposure.meta`` (they are written again with the
    archive, or not at all). Returns the archive or None.
    """
    for key in list(exposure.meta):
        if ARCHIVE_POINTER.match(key):
            del exposure.meta[key]
    archive = read_archive(hdul, primary, path)
    exposure.archive = archive
    if exposure.photo_calib is None and archive is not None:
        exposure.photo_calib = archive.photo_calib()
    fluxmag0 = exposure.meta.get("FLUXMAG0")
    if exposure.photo_calib is None and isinstance(fluxmag0, (int, float)) \
            and not isinstance(fluxmag0, bool) and fluxmag0 > 0:
        exposure.photo_calib = _NJY_AB_ZERO / float(fluxmag0)
    if archive is None:
        return None
    if exposure.psf is None:
        exposure.psf = archive.psf()
        if exposure.psf is not None:
            exposure.psf_source = f"archive ({archive.psf_class})"
            log.info("%s: PSF read from its archive (%s)", path, archive.psf_class)
    if exposure.filter is None:
        exposure.filter = archive.filter_label()
    if exposure.wcs is None and archive.has_wcs():
        warn(f"{path}: its WCS is only in the afw archive, which gpumatch does not evaluate; "
             "exposure.wcs is None (the archived WCS is copied to outputs)", InputWarning)
    return archive


# -- writing --------------------------------------------------------------------


def strip_archive_pointers(header):
    """Remove every archive pointer card from ``header`` (in place)."""
    for key in [k for k in header if ARCHIVE_POINTER.match(k)]:
        del header[key]


def _table(columns, name, cat_number):
    from astropy.io import fits

    hdu = fits.BinTableHDU.from_columns(fits.ColDefs(columns))
    for i, col in enumerate(columns, start=1):
        # afw tells a Point from an Array by this card, as the input files do.
        kind = ("Point" if col.name in ("dimensions", "center", "averagePosition") else
                "Array" if col.name == "image" else "Scalar")
        hdu.header[f"TCCLS{i}"] = (kind, "Field template used by lsst.afw.table")
    hdu.header["EXTTYPE"] = "ARCHIVE_DATA"
    hdu.header["AR_CATN"] = (cat_number, "# of this catalog relative to the start of this archive")
    hdu.header["AR_NAME"] = (name, "Class name for objects stored here")
    return hdu


def _psf_entries(psf, bbox, first_id):
    """``[(id, class name, module, columns)]`` for ``psf`` (the first is the PSF itself)."""
    from astropy.io import fits

    from ..psf.analytic import DoubleGaussianPsf, GaussianPsf

    if isinstance(psf, GaussianPsf):
        return [(first_id, "GaussianPsf", "lsst.afw.detection", [
            fits.Column(name="dimensions_x", format="J", array=[psf.width]),
            fits.Column(name="dimensions_y", format="J", array=[psf.height]),
            fits.Column(name="sigma", format="D", array=[psf.sigma])])]
    if isinstance(psf, DoubleGaussianPsf):
        return [(first_id, "DoubleGaussianPsf", "lsst.meas.algorithms", [
            fits.Column(name="dimensions_x", format="J", array=[psf.width]),
            fits.Column(name="dimensions_y", format="J", array=[psf.height]),
            fits.Column(name="sigma1", format="D", array=[psf.sigma1]),
            fits.Column(name="sigma2", format="D", array=[psf.sigma2]),
            fits.Column(name="b", format="D", array=[psf.b])])]
    # Anything else: its stamp at the typical position, as a KernelPsf of a FixedKernel.
    pos = psf.average_position
    if pos is None:
        pos = bbox.center
    stamp = np.asarray(psf.compute_kernel_image(float(pos[0]), float(pos[1])), dtype=np.float64)
    h, w = stamp.shape
    return [
        (first_id, "KernelPsf", "lsst.afw.detection", [
            fits.Column(name="kernel", format="J", array=[first_id + 1]),
            fits.Column(name="averagePosition", format="2D", array=[[pos[0], pos[1]]])]),
        (first_id + 1, "FixedKernel", "lsst.afw.math", [
            fits.Column(name="dimensions", format="2J", array=[[w, h]]),
            fits.Column(name="center", format="2J", array=[[w // 2, h // 2]]),
            fits.Column(name="image", format=f"{w * h}D", array=[stamp.ravel()])]),
    ]


def _copy_table(hdu):
    from astropy.io import fits

    return fits.BinTableHDU(data=hdu.data, header=hdu.header.copy())


def _nested_ids(archive, obj_id, seen):
    """``obj_id`` and the ids its (known) tables refer to, recursively."""
    if obj_id in seen:
        return seen
    seen.add(obj_id)
    cols = _PSF_REFS.get(archive.class_of(obj_id), ())
    try:
        for hdu, rows in archive.tables(obj_id):
            for name in cols:
                col = _col(hdu, name)
                if col is not None:
                    for ref in np.ravel(rows[col]).astype(int):
                        _nested_ids(archive, int(ref), seen)
    except ArchiveError:
        pass
    return seen


def archive_hdus(exposure, header, index_position):
    """HDUs of ``exposure``'s archive with its PSF replaced by ``exposure.psf``.

    Sets ``AR_HDU`` and the pointer cards in ``header`` (the primary header) for an
    index written at 0-based HDU ``index_position``; with no archive, removes every
    pointer card and returns ``[]``.
    """
    from astropy.io import fits

    strip_archive_pointers(header)
    archive = getattr(exposure, "archive", None)
    if archive is None:
        return []
    if exposure.psf is not None and exposure.psf is archive.model:
        # The exposure still has the archived PSF: the archive goes out as it came.
        _set_pointers(header, index_position, archive.pointers)
        return [_copy_table(h) for h in archive.hdus]
    # The old PSF's own objects go (ids that other entries also use are kept: only
    # the PcaPsf/KernelPsf trees are followed, and a catalogue stays while any of
    # its rows belongs to a kept object).
    drop = _nested_ids(archive, archive.psf_id, set()) if archive.psf_id is not None else set()
    shared = set()
    for r in archive.rows:
        if r["id"] not in drop:
            shared.update(_nested_ids(archive, r["id"], set()) - {r["id"]})
    drop -= shared
    kept_cats = sorted({r["cat"] for r in archive.rows if r["id"] not in drop})
    renumber = {old: new for new, old in enumerate(kept_cats, start=1)}
    rows = [dict(r, cat=renumber[r["cat"]]) for r in archive.rows if r["id"] not in drop]
    out_cats = []
    for old in kept_cats:
        h = _copy_table(archive.hdus[old])
        h.header["AR_CATN"] = renumber[old]
        out_cats.append(h)
    pointers = dict(archive.pointers)
    if exposure.psf is not None:
        psf_id = archive.psf_id or (max((r["id"] for r in archive.rows), default=0) + 1)
        next_id = max([r["id"] for r in archive.rows] + [psf_id]) + 1
        entries = _psf_entries(exposure.psf, exposure.bbox, psf_id)
        # The PSF's nested objects get fresh ids beyond every id in use.
        entries = [(psf_id if i == 0 else next_id + i - 1, name, module, cols)
                   for i, (_, name, module, cols) in enumerate(entries)]
        if len(entries) > 1:
            entries[0][3][0] = fits.Column(name="kernel", format="J", array=[entries[1][0]])
        for obj_id, name, module, cols in entries:
            cat = len(out_cats) + 1
            out_cats.append(_table(cols, name, cat))
            rows.append({"id": obj_id, "cat": cat, "pers": 0, "row0": 0, "nrows": 1,
                         "name": name, "module": module})
        pointers["PSF_ID"] = psf_id
    else:
        pointers.pop("PSF_ID", None)
    index = _index_hdu(archive, rows, len(out_cats) + 1)
    _set_pointers(header, index_position, pointers)
    return [index] + out_cats


def _set_pointers(header, index_position, pointers):
    from .._warnings import quiet

    header["AR_HDU"] = (index_position + 1, "HDU (1-based) of the afw archive index")
    with quiet():  # HIERARCH notices (PHOTOCALIB_ID, ARCHIVE_ID_...)
        for key, value in pointers.items():
            header[key] = value


def _index_hdu(archive, rows, n_cat):
    from astropy.io import fits

    old = archive.hdus[0]
    names = archive._cols
    fmt = {c.name: c.format for c in old.columns}
    cols = []
    for key, default_fmt in (("id", "J"), ("cat", "J"), ("pers", "J"), ("row0", "J"),
                             ("nrows", "J"), ("name", "64A"), ("module", "64A")):
        name = names[key] or {"module": "module"}.get(key)
        cols.append(fits.Column(name=name, format=fmt.get(name, default_fmt),
                                array=[r[key] for r in rows]))
    hdu = fits.BinTableHDU.from_columns(cols)
    for card in old.header.cards:
        # The column documentation (TDOC/TCCLS) and EXTTYPE, as in the input.
        if card.keyword.startswith(("TDOC", "TCCLS")) or card.keyword == "EXTTYPE":
            hdu.header[card.keyword] = (card.value, card.comment)
    hdu.header["AR_CATN"] = 0
    hdu.header["AR_NCAT"] = (n_cat, "# of catalogs in this archive, including the index")
    return hdu
