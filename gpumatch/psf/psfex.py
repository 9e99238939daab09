"""PSFEx PSF models (``.psf`` files).

A PSFEx model is a stack of component images ``B_k`` (the ``PSF_MASK`` column of
the ``PSF_DATA`` binary table) sampled every ``PSF_SAMP`` image pixels, combined
with polynomial coefficients of the position:

    PSF(x, y) = sum_k B_k X^a_k Y^c_k,   X = (x_sex - POLZERO1) / POLSCAL1,
                                         Y = (y_sex - POLZERO2) / POLSCAL2,

with the terms in PSFEx's order ``1, X, X^2, ..., Y, XY, ..., Y^2, ...`` (the X
power runs fastest). The PSF centre is sample ``PSFAXIS // 2`` on each axis.

To give an image-pixel stamp the model is resampled onto the image grid with a
Lanczos-3 kernel, as PSFEx itself does when it moves a PSF between grids (the
weights are divided by their sum at each position, so a constant resamples
exactly); the stamp is then normalised to sum 1. The model already includes the
pixel response (an "effective PSF"): it is sampled, never integrated over pixels.
This reproduces GalSim's ``DES_PSFEx`` (Lanczos-3 ``InterpolatedImage`` drawn with
``method="no_pixel"``) to about 1e-7 per pixel. Lanczos-3 does not reproduce
linear functions exactly, so a PSF drawn at a sub-pixel position has its
centroid off by up to ~0.02 px; centred stamps (:meth:`PsfexPsf.compute_kernel_image`)
are symmetric and unaffected.

Coordinates
-----------
The polynomial uses SExtractor's pixel coordinates (``X_IMAGE``, ``Y_IMAGE``), in
which the centre of the first pixel of the image SExtractor ran on is (1, 1).
gpumatch positions are parent coordinates (0-based array index + ``xy0``), so

    x_sex = x + offset[0],  y_sex = y + offset[1],

with ``offset = (1, 1)`` by default: right when the exposure is the image the
catalogue came from and its ``xy0`` is ``(0, 0)``. If that image had ``xy0 =
(x0, y0)`` (a cutout with LTV cards, say) pass ``image_xy0=(x0, y0)`` (giving
``offset = (1 - x0, 1 - y0)``) or any ``offset`` directly.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._warnings import quiet
from ..backend import to_numpy
from ..errors import PsfEvaluationError
from ..limits import MAX_PSF_STAMP, MAX_PSFEX_DEGREE
from .base import SquareStampPsf

log = logging.getLogger("gpumatch")

__all__ = ["PsfexPsf", "PsfStamp", "lanczos_weights"]

LANCZOS_ORDER = 3


class PsfStamp(NamedTuple):
    """A PSF image on the exposure's pixel grid.

    ``array[j, i]`` is the pixel at parent position ``(x0 + i, y0 + j)``.
    """

    array: np.ndarray
    x0: int
    y0: int


def _lanczos(t, a=LANCZOS_ORDER):
    t = np.asarray(t, dtype=np.float64)
    out = np.sinc(t) * np.sinc(t / a)
    return np.where(np.abs(t) < a, out, 0.0)


def lanczos_weights(positions, n_samples, a=LANCZOS_ORDER):
    """Weights that interpolate samples ``0 .. n_samples-1`` at real ``positions``.

    Returns an array ``positions.shape + (n_samples,)``; each row is the
    Lanczos-``a`` kernel, divided by its sum over all integer samples (inside the
    model or not) so that a constant is reproduced exactly.
    """
    s = np.asarray(positions, dtype=np.float64)[..., None]
    j = np.arange(n_samples, dtype=np.float64)
    w = _lanczos(s - j, a)
    # Sum over every integer within reach, so the edge of the model fades out
    # instead of being renormalised upward.
    base = np.floor(s)
    total = sum(_lanczos(s - (base + m), a) for m in range(-a + 1, a + 1))
    return w / total


def _poly_exponents(degree):
    """PSFEx term order for one group of (X, Y): X power fastest."""
    return [(nx, ny) for ny in range(degree + 1) for nx in range(degree + 1 - ny)]


def _odd_ceil(v):
    n = int(math.ceil(v - 1e-9))
    return n if n % 2 == 1 else n + 1


class PsfexPsf(SquareStampPsf):
    """A PSFEx model evaluated at parent positions.

    Build it with :meth:`read`; the constructor takes the model's parts.

    Parameters
    ----------
    components : array (n_terms, ny, nx)
        Component images ``B_k`` in PSFEx term order.
    sampling : float
        ``PSF_SAMP``: image pixels per model sample.
    degree : int
        Polynomial degree in (X, Y) (0 with ``polzero``/``polscal`` unused
        for a constant model).
    polzero, polscal : (float, float)
        ``POLZERO1/2`` and ``POLSCAL1/2`` (SExtractor pixel coordinates).
    offset : (float, float)
        Added to parent coordinates to get SExtractor coordinates (see the
        module docstring); default ``(1, 1)``.
    size : int, optional
        Odd width = height of the image-pixel stamps; default the smallest odd
        number covering the model, ``ceil(PSFAXIS1 * PSF_SAMP)``.
    path : str, optional
        Where the model came from (used in messages).
    header : dict, optional
        The ``PSF_DATA`` header cards.
    """

    renders_on_device = True

    def __init__(self, components, sampling, degree=0, polzero=(0.0, 0.0),
                 polscal=(1.0, 1.0), offset=(1.0, 1.0), size=None, path=None, header=None):
        comps = np.array(components, dtype=np.float64)
        if comps.ndim == 2:
            comps = comps[None]
        if comps.ndim != 3 or min(comps.shape) < 1:
            raise ValueError(f"components must be (n_terms, ny, nx), got shape {comps.shape}")
        self.degree = int(degree)
        self.exponents = _poly_exponents(self.degree)
        if comps.shape[0] != len(self.exponents):
            raise ValueError(f"a degree-{self.degree} PSFEx polynomial has "
                             f"{len(self.exponents)} terms but {comps.shape[0]} component "
                             "images were given")
        if not np.all(np.isfinite(comps)):
            raise ValueError("PSFEx component images contain NaN or infinite values")
        self.components = comps
        self.components.setflags(write=False)
        self.sampling = float(sampling)
        if not (math.isfinite(self.sampling) and self.sampling > 0):
            raise ValueError(f"PSF_SAMP must be positive, got {sampling}")
        self.polzero = tuple(float(v) for v in polzero)
        self.polscal = tuple(float(v) for v in polscal)
        if self.degree > 0 and not all(math.isfinite(v) and v != 0 for v in self.polscal):
            raise ValueError(f"POLSCAL must be finite and non-zero, got {self.polscal}")
        self.offset = tuple(float(v) for v in offset)
        ny, nx = comps.shape[1:]
        if size is None:
            size = _odd_ceil(max(nx, ny) * self.sampling)
        size = int(size)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"stamp size must be odd and positive, got {size}")
        if size > MAX_PSF_STAMP:
            raise ValueError(f"{size}-pixel stamps exceed gpumatch's limit of {MAX_PSF_STAMP} "
                             "pixels (PSFAXIS x PSF_SAMP, or size=)")
        self.size = size
        self.path = path
        self.header = dict(header or {})
        self.average_position = (self.polzero[0] - self.offset[0],
                                 self.polzero[1] - self.offset[1])
        self._centered = None

    # -- construction ------------------------------------------------------------

    def _with_size(self, size):
        return PsfexPsf(self.components, self.sampling, self.degree, self.polzero,
                        self.polscal, offset=self.offset, size=size, path=self.path,
                        header=self.header)

    @classmethod
    def read(cls, path, offset=None, image_xy0=None, size=None):
        """Read a PSFEx ``.psf`` file.

        Parameters
        ----------
        path : str or path-like
            The ``.psf`` file.
        offset : (float, float), optional
            SExtractor minus parent coordinates; default ``(1, 1)``.
        image_xy0 : (int, int), optional
            Parent origin of the image the model was made from; sets
            ``offset = (1 - x0, 1 - y0)``. Give this or ``offset``, not both.
        size : int, optional
            Stamp size in image pixels (odd).

        Returns
        -------
        PsfexPsf
            The model, with ``path`` and the ``PSF_DATA`` header kept.

        Raises
        ------
        FileNotFoundError
            No such file.
        ValueError
            The file is not a PSFEx model this reader understands; the message
            names the file and the problem.
        """
        from astropy.io import fits

        p = os.fspath(path)
        if offset is not None and image_xy0 is not None:
            raise ValueError("give offset or image_xy0, not both")
        if image_xy0 is not None:
            offset = (1.0 - float(image_xy0[0]), 1.0 - float(image_xy0[1]))
        if offset is None:
            offset = (1.0, 1.0)
        if not os.path.exists(p):
            raise FileNotFoundError(f"PSFEx model {p}: no such file; check the path")

        def bad(what):
            return ValueError(f"{p} is not a usable PSFEx model: {what}")

        try:
            with quiet():
                hdul = fits.open(p, memmap=False)
        except Exception as exc:
            raise bad(f"cannot be read as FITS ({exc.__class__.__name__}: {exc})") from None
        with hdul:
            if "PSF_DATA" in hdul:
                hdu = hdul["PSF_DATA"]
            else:
                tables = [h for h in hdul if isinstance(h, fits.BinTableHDU)]
                if not tables:
                    raise bad("no PSF_DATA binary table")
                hdu = tables[0]
            h = hdu.header
            cols = hdu.columns.names if hasattr(hdu, "columns") else []
            if "PSF_MASK" not in cols:
                raise bad(f"the {hdu.name} table has no PSF_MASK column (columns: {cols})")

            def key(name, default=None, kind=float):
                if name not in h:
                    if default is not None:
                        return default
                    raise bad(f"header keyword {name} is missing")
                try:
                    return kind(h[name])
                except (TypeError, ValueError):
                    raise bad(f"header keyword {name} = {h[name]!r} is not a {kind.__name__}") \
                        from None

            polnaxis = key("POLNAXIS", 0, int)
            if polnaxis not in (0, 2):
                raise bad(f"POLNAXIS = {polnaxis}; only models in image position "
                          "(POLNAXIS = 2, X*_IMAGE and Y*_IMAGE) or constant models are supported")
            if polnaxis == 2:
                n1 = str(h.get("POLNAME1", "")).strip().upper()
                n2 = str(h.get("POLNAME2", "")).strip().upper()
                if not (n1.startswith("X") and n1.endswith("IMAGE")
                        and n2.startswith("Y") and n2.endswith("IMAGE")):
                    raise bad(f"the polynomial depends on {n1!r} and {n2!r}; only X*_IMAGE, "
                              "Y*_IMAGE are supported")
                ngrp = key("POLNGRP", 1, int)
                if ngrp != 1 or key("POLGRP1", 1, int) != 1 or key("POLGRP2", 1, int) != 1:
                    raise bad(f"POLNGRP = {ngrp}; only one polynomial group is supported")
                degree = key("POLDEG1", kind=int)
                polzero = (key("POLZERO1"), key("POLZERO2"))
                polscal = (key("POLSCAL1"), key("POLSCAL2"))
                if degree < 0:
                    raise bad(f"POLDEG1 = {degree} is negative")
            else:
                degree, polzero, polscal = 0, (0.0, 0.0), (1.0, 1.0)
            nterms = (degree + 1) * (degree + 2) // 2
            sampling = key("PSF_SAMP")
            if not (math.isfinite(sampling) and sampling > 0):
                raise bad(f"PSF_SAMP = {sampling} must be positive")
            psfnaxis = key("PSFNAXIS", 3, int)
            ax1, ax2 = key("PSFAXIS1", kind=int), key("PSFAXIS2", kind=int)
            ax3 = key("PSFAXIS3", 1, int) if psfnaxis >= 3 else 1
            if ax3 != nterms:
                raise bad(f"PSFAXIS3 = {ax3} but a degree-{degree} polynomial in "
                          f"{polnaxis} variables has {nterms} terms")
            # Sizes checked before the data are read or any stamp is allocated.
            if degree > MAX_PSFEX_DEGREE:
                raise bad(f"POLDEG1 = {degree} exceeds gpumatch's limit of {MAX_PSFEX_DEGREE}")
            stamp = max(ax1, ax2) * sampling
            if min(ax1, ax2) < 1 or not stamp <= MAX_PSF_STAMP:
                raise bad(f"PSFAXIS1 x PSFAXIS2 = {ax1} x {ax2} sampled every PSF_SAMP = "
                          f"{sampling:g} pixels makes {stamp:g}-pixel stamps (limit "
                          f"{MAX_PSF_STAMP}); the file is damaged or not a PSF model")
            try:
                raw = np.asarray(hdu.data["PSF_MASK"])
            except Exception as exc:  # a truncated file surfaces here (astropy reads lazily)
                log.debug("%s: PSF_MASK unreadable: %r", p, exc)
                raise bad(f"its PSF_MASK data are missing or cut short ({os.path.getsize(p)} "
                          "bytes); the file is truncated, write or copy it again") from None
            if raw.shape[0] < 1:
                raise bad("the PSF_DATA table has no rows")
            data = np.asarray(raw[0], dtype=np.float64)
            if data.size != ax1 * ax2 * ax3:
                raise bad(f"PSF_MASK holds {data.size} values but PSFAXIS1 x PSFAXIS2 x "
                          f"PSFAXIS3 = {ax1} x {ax2} x {ax3} = {ax1 * ax2 * ax3}")
            if data.shape != (ax3, ax2, ax1):
                data = data.reshape(ax3, ax2, ax1)
            if not np.all(np.isfinite(data)):
                raise bad("PSF_MASK contains NaN or infinite values")
            header = {k: h[k] for k in h if k and k not in ("COMMENT", "HISTORY")}
        try:
            return cls(data, sampling, degree, polzero, polscal, offset=offset, size=size,
                       path=p, header=header)
        except ValueError as exc:
            raise bad(str(exc)) from None

    # -- evaluation --------------------------------------------------------------

    def coefficients(self, xs: ArrayLike, ys: ArrayLike) -> NDArray[np.float64]:
        """Polynomial terms of the model at parent positions.

        {positions}

        Returns
        -------
        ndarray (n, n_terms)
            The terms ``X^a Y^c`` in the file's scaled coordinates.
        """
        xs = np.asarray(xs, dtype=np.float64).ravel()
        ys = np.asarray(ys, dtype=np.float64).ravel()
        if xs.shape != ys.shape:
            raise ValueError(f"xs and ys differ in length ({xs.size} and {ys.size})")
        if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
            i = int(np.flatnonzero(~(np.isfinite(xs) & np.isfinite(ys)))[0])
            raise PsfEvaluationError(
                f"{self._name()}: position (x={xs[i]}, y={ys[i]}) is not finite")
        X = (xs + self.offset[0] - self.polzero[0]) / self.polscal[0]
        Y = (ys + self.offset[1] - self.polzero[1]) / self.polscal[1]
        return np.stack([X ** a * Y ** c for a, c in self.exponents], axis=-1)

    def sampled_images(self, xs: ArrayLike, ys: ArrayLike) -> NDArray[np.float64]:
        """The model on its own sample grid (no resampling).

        {positions}

        Returns
        -------
        ndarray (n, ny, nx)
            The component images combined at each position.
        """
        return np.tensordot(self.coefficients(xs, ys), self.components, axes=(1, 0))

    def _weights(self, frac, n_model):
        """Resampling weights ``(..., size, n_model)`` for PSF centres at ``frac``.

        Output pixel ``i`` (offset ``i - size//2`` from the stamp centre) samples the
        model at ``n_model//2 + (i - size//2 - frac) / sampling``.
        """
        h = self.size // 2
        d = np.arange(self.size, dtype=np.float64) - h
        frac = np.asarray(frac, dtype=np.float64)
        pos = n_model // 2 + (d - frac[..., None]) / self.sampling
        return lanczos_weights(pos, n_model)

    def _centered_terms(self):
        if self._centered is None:
            ny, nx = self.components.shape[1:]
            wy = self._weights(0.0, ny)
            wx = self._weights(0.0, nx)
            terms = wy @ self.components @ wx.T
            self._centered = (terms, terms.sum(axis=(1, 2)))
        return self._centered

    def _check_sums(self, sums, xs, ys):
        """Raise naming the first position whose stamp has no positive flux."""
        ok = np.isfinite(sums) & (sums > 0)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise PsfEvaluationError(
                f"{self._name()} has no positive flux at parent position "
                f"(x={float(xs[i]):.2f}, y={float(ys[i]):.2f}) (sum {float(sums[i]):.3g}); "
                "the position is probably far outside the area the model was fitted on")

    def compute_kernel_images(self, xs: ArrayLike, ys: ArrayLike, xp: Any = np) -> Any:
        """Render stamps centred on their middle pixel, each summing to 1.

        Parameters
        ----------
        xs, ys : array_like (n,)
            Parent positions in pixels, on the host or the device.
        xp : module
            NumPy or CuPy: where the stamps are made.

        Returns
        -------
        array (n, size, size)
            One stamp per position.
        """
        xs = np.asarray(to_numpy(xs), dtype=np.float64).ravel()
        ys = np.asarray(to_numpy(ys), dtype=np.float64).ravel()
        P = self.coefficients(xs, ys)
        terms, term_sums = self._centered_terms()
        sums = P @ term_sums
        self._check_sums(sums, xs, ys)
        stamps = xp.einsum("nk,kij->nij", xp.asarray(P), xp.asarray(terms))
        return stamps / xp.asarray(sums)[:, None, None]

    def compute_kernel_image(self, x, y):
        return self.compute_kernel_images([x], [y])[0]

    def compute_images(self, xs: ArrayLike, ys: ArrayLike) -> tuple:
        """Render stamps with the PSF centred at the exact (sub-pixel) positions.

        {positions}

        Returns
        -------
        stamps : array (n, size, size)
            Each sums to 1; stamp ``k`` pixel ``[j, i]`` is at parent position
            ``(x0[k] + i, y0[k] + j)``.
        x0, y0 : int arrays (n,)
            Parent position of pixel ``[0, 0]`` of each stamp: the nearest pixel
            to the position, minus ``size // 2``.
        """
        xs = np.asarray(xs, dtype=np.float64).ravel()
        ys = np.asarray(ys, dtype=np.float64).ravel()
        P = self.coefficients(xs, ys)
        cx = np.floor(xs + 0.5)
        cy = np.floor(ys + 0.5)
        ny, nx = self.components.shape[1:]
        wx = self._weights(xs - cx, nx)  # (n, size, nx)
        wy = self._weights(ys - cy, ny)
        model = np.tensordot(P, self.components, axes=(1, 0))
        stamps = wy @ model @ wx.transpose(0, 2, 1)
        sums = stamps.sum(axis=(1, 2))
        self._check_sums(sums, xs, ys)
        stamps /= sums[:, None, None]
        h = self.size // 2
        return stamps, cx.astype(np.int64) - h, cy.astype(np.int64) - h

    def compute_image(self, x: float, y: float) -> PsfStamp:
        """The PSF centred at parent ``(x, y)`` on the exposure's pixel grid.

        {position}

        Returns
        -------
        PsfStamp
            ``(array, x0, y0)``; ``array`` sums to 1.
        """
        stamps, x0, y0 = self.compute_images([x], [y])
        return PsfStamp(stamps[0], int(x0[0]), int(y0[0]))

    def _name(self):
        return f"PSFEx model {self.path}" if self.path else "PSFEx model"

    def __repr__(self):
        where = f"{self.path!r}, " if self.path else ""
        ny, nx = self.components.shape[1:]
        return (f"PsfexPsf({where}{nx}x{ny} samples of {self.sampling:g} px, degree "
                f"{self.degree}, stamps {self.size}x{self.size}, offset={self.offset})")

