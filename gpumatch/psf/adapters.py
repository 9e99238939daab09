"""Adapters for PSF models from other packages: GalSim, Piff and lsst.images.

Neither package is a dependency: each is imported only when an adapter needs
it, and the adapters also work with any object offering the same methods.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ..errors import PsfEvaluationError
from .base import Psf, SquareStampPsf, centred_on

log = logging.getLogger("gpumatch")

__all__ = ["GalSimPsf", "PiffPsf", "LsstImagesPsf"]


def _check_size(size):
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"stamp size must be odd and positive, got {size}")
    return size


def _normalised(arr, what, x, y):
    arr = np.array(arr, dtype=np.float64)
    s = arr.sum()
    if arr.ndim != 2 or not np.all(np.isfinite(arr)) or not s > 0:
        raise PsfEvaluationError(
            f"{what} gave an unusable stamp at parent position (x={x:.2f}, y={y:.2f}) "
            f"(shape {arr.shape}, sum {s:.3g})")
    return arr / s


class GalSimPsf(SquareStampPsf):
    """A GalSim profile (or a position-dependent source of them) as a gpumatch PSF.

    Parameters
    ----------
    model : GSObject, object with ``getPSF(image_pos)``, or callable
        - a ``galsim.GSObject``: the same PSF everywhere;
        - an object with ``getPSF(galsim.PositionD)`` (``galsim.des.DES_PSFEx``,
          ``DES_Shapelet``): evaluated at ``(x + offset[0], y + offset[1])``;
        - a callable ``f(x, y) -> GSObject`` taking parent coordinates.
    size : int
        Odd stamp size in pixels.
    scale : float
        Pixel scale the profile is drawn with (1.0: the profile is in pixels).
    method : str
        GalSim ``drawImage`` method: ``"auto"`` convolves with the pixel (right for
        an optical/atmospheric profile); ``"no_pixel"`` samples it (right for an
        effective PSF, e.g. a PSFEx model).
    offset : (float, float)
        Added to parent coordinates for ``getPSF`` models (GalSim image
        coordinates start at 1).
    """

    def __init__(self, model: Any, size: int = 25, scale: float = 1.0, method: str = "auto",
                 offset: tuple[float, float] = (1.0, 1.0)) -> None:
        self.model = model
        self.size = _check_size(size)
        self.scale = float(scale)
        self.method = str(method)
        self.offset = tuple(float(v) for v in offset)
        if hasattr(model, "drawImage"):
            self._kind = "constant"
        elif hasattr(model, "getPSF"):
            self._kind = "getPSF"
        elif callable(model):
            self._kind = "callable"
        else:
            raise TypeError(f"GalSimPsf needs a GalSim GSObject, an object with getPSF(), or a "
                            f"callable f(x, y) -> GSObject; got {type(model).__name__}")

    def _with_size(self, size):
        return GalSimPsf(self.model, size, self.scale, self.method, self.offset)

    def _profile(self, x, y):
        if self._kind == "constant":
            return self.model
        if self._kind == "callable":
            return self.model(x, y)
        import galsim

        return self.model.getPSF(galsim.PositionD(x + self.offset[0], y + self.offset[1]))

    def compute_kernel_image(self, x, y):
        x, y = float(x), float(y)
        prof = self._profile(x, y)
        image = prof.drawImage(nx=self.size, ny=self.size, scale=self.scale, method=self.method)
        return _normalised(image.array, f"GalSim profile {prof!r}", x, y)

    def compute_kernel_images(self, xs, ys):
        xs = np.ravel(xs)
        ys = np.ravel(ys)
        if self._kind == "constant":
            one = self.compute_kernel_image(float(xs[0]), float(ys[0])) if xs.size else None
            return np.broadcast_to(one, (xs.size,) + one.shape).copy() if xs.size else \
                np.zeros((0, self.size, self.size))
        return super().compute_kernel_images(xs, ys)

    def __repr__(self):
        return f"GalSimPsf({self.model!r}, size={self.size}, method={self.method!r})"


class PiffPsf(SquareStampPsf):
    """A Piff PSF model.

    Parameters
    ----------
    model : piff.PSF
        Or any object with ``draw(x, y, chipnum=..., center=True, stamp_size=...)``
        returning an image with ``.array``.
    size : int
        Odd stamp size in pixels.
    chipnum : int, optional
        For multi-chip models.
    offset : (float, float)
        Added to parent coordinates to get the coordinates the model was fitted
        in (1, 1 for catalogue positions in FITS/GalSim convention).
    path : str, optional
        The file the model was read from (for provenance).
    """

    def __init__(self, model: Any, size: int = 25, chipnum: int | None = None,
                 offset: tuple[float, float] = (1.0, 1.0), path: str | None = None) -> None:
        if not hasattr(model, "draw"):
            raise TypeError(f"PiffPsf needs a piff.PSF (with draw()), got {type(model).__name__}")
        self.model = model
        self.size = _check_size(size)
        self.chipnum = chipnum
        self.offset = tuple(float(v) for v in offset)
        self.path = path

    def _with_size(self, size):
        return PiffPsf(self.model, size, self.chipnum, self.offset, self.path)

    @classmethod
    def read(cls, path: str | os.PathLike, **kwargs: Any) -> PiffPsf:
        """Read a Piff model file (imports piff).

        Parameters
        ----------
        path : str or path-like
            A model file written by Piff (``piff.PSF.write``).
        **kwargs
            ``size``, ``chipnum``, ``offset``: as for :class:`PiffPsf`.

        Returns
        -------
        PiffPsf
            The model, with ``path`` set.
        """
        p = os.fspath(path)
        if not os.path.exists(p):
            raise FileNotFoundError(f"Piff model {p}: no such file; check the path")
        try:
            import piff
        except ImportError:
            raise ImportError(f"reading the Piff model {p} needs the 'piff' package "
                              "(pip install piff)") from None
        try:
            model = piff.read(p)
        except Exception as exc:
            raise ValueError(f"{p} is not a readable Piff model ({exc.__class__.__name__}: "
                             f"{exc})") from None
        return cls(model, path=p, **kwargs)

    def compute_kernel_image(self, x, y):
        x, y = float(x), float(y)
        kwargs = {"center": True, "stamp_size": self.size}
        if self.chipnum is not None:
            kwargs["chipnum"] = self.chipnum
        image = self.model.draw(x + self.offset[0], y + self.offset[1], **kwargs)
        arr = getattr(image, "array", image)
        return _normalised(arr, f"Piff model {self.path or self.model!r}", x, y)

    def __repr__(self):
        return f"PiffPsf({self.path or type(self.model).__name__!r}, size={self.size})"


class LsstImagesPsf(Psf):
    """A PSF object of Rubin's ``lsst.images`` package as a gpumatch PSF.

    Parameters
    ----------
    model : lsst.images PointSpreadFunction
        Or any object with ``compute_kernel_image(*, x, y)`` returning an image
        with ``.array`` and ``.bbox`` (intervals ``bbox.y``/``bbox.x`` with
        ``start``), whose pixel ``(0, 0)`` is the PSF centre. Positions are
        parent pixels in both packages.
    """

    def __init__(self, model):
        if not hasattr(model, "compute_kernel_image"):
            raise TypeError(f"LsstImagesPsf needs an lsst.images PSF, got {type(model).__name__}")
        self.model = model

    def compute_kernel_image(self, x, y):
        x, y = float(x), float(y)
        image = self.model.compute_kernel_image(x=x, y=y)
        bbox = image.bbox
        # The package puts the centre at (0, 0) of the stamp's own coordinates.
        stamp = centred_on(np.asarray(image.array), -int(bbox.x.start), -int(bbox.y.start))
        return _normalised(stamp, f"lsst.images PSF {type(self.model).__name__}", x, y)

    def __repr__(self):
        return f"LsstImagesPsf({type(self.model).__name__})"
