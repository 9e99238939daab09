"""The PSF model interface shared by all models."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._docstrings import fill_docstrings
from ..backend import array_namespace
from ..errors import InputWarning, warn
from ..moments import SIGMA_TO_FWHM, adaptive_moments, determinant_radius

__all__ = ["Psf", "FixedSizePsf", "SquareStampPsf", "ResizedPsf", "pad_or_crop", "centred_on",
           "odd_stamp_size"]


def pad_or_crop(stamp, width, height):
    """Centre ``stamp`` in a ``height x width`` array, zero-padding or cropping.

    Works on a single stamp ``(h, w)`` or a batch ``(n, h, w)``.
    """
    xp = array_namespace(stamp)  # CuPy stamps are padded on the device
    stamp = xp.asarray(stamp)
    h, w = stamp.shape[-2:]
    out = xp.zeros(stamp.shape[:-2] + (height, width), dtype=stamp.dtype)
    # Offsets follow docs/algorithm.md section 3: (new - old) // 2, negative meaning crop.
    oy, ox = (height - h) // 2, (width - w) // 2
    sy0, dy0 = max(0, -oy), max(0, oy)
    sx0, dx0 = max(0, -ox), max(0, ox)
    ny, nx = min(h - sy0, height - dy0), min(w - sx0, width - dx0)
    out[..., dy0:dy0 + ny, dx0:dx0 + nx] = stamp[..., sy0:sy0 + ny, sx0:sx0 + nx]
    return out


def odd_stamp_size(width: int, height: int) -> tuple[int, int]:
    """Check a stamp size: odd and positive.

    Parameters
    ----------
    width, height : int
        Stamp size in pixels.

    Returns
    -------
    tuple of int
        ``(width, height)`` as ints.

    Raises
    ------
    ValueError
        If either is even or below 1.
    """
    width, height = int(width), int(height)
    if width < 1 or height < 1 or width % 2 == 0 or height % 2 == 0:
        raise ValueError(f"PSF stamp size must be odd and positive, got {width}x{height}")
    return width, height


def centred_on(stamp, cx, cy):
    """``stamp`` zero-padded to the smallest odd square whose middle pixel is
    ``stamp[cy, cx]`` (for models whose centre pixel is not the middle one)."""
    stamp = np.asarray(stamp, dtype=np.float64)
    h, w = stamp.shape
    half = max(cx, w - 1 - cx, cy, h - 1 - cy)
    out = np.zeros((2 * half + 1, 2 * half + 1))
    out[half - cy:half - cy + h, half - cx:half - cx + w] = stamp
    return out


@fill_docstrings
class Psf:
    """Base class of PSF models.

    A subclass needs only :meth:`compute_kernel_image`; everything else has a
    default built on it. Positions are parent pixel coordinates.

    Notes
    -----
    The device-rendering contract: a model whose :attr:`renders_on_device` is True implements
    ``compute_kernel_images(xs, ys, xp=np)``: ``xs, ys`` are host arrays of
    parent positions (pixels) and the stamps, normalised to sum 1, are made
    with the array module ``xp`` (NumPy, or CuPy on the device), so that a
    device backend realises all candidates in one batch (see
    :func:`gpumatch.cellset.realize_stamps`). Other models are called without
    ``xp`` and their host stamps are copied to the device.
    """

    #: Where the model is "typical" (parent pixels), or None for the centre of
    #: the exposure it belongs to.
    average_position = None
    #: True when :meth:`compute_kernel_images` takes ``xp=`` and renders the
    #: stamps in ``xp``'s arrays (on a device) itself (the device-rendering
    #: contract above); False: the stamps are made on the host and copied.
    renders_on_device = False

    def __init_subclass__(cls, **kwargs):
        # Overrides without a docstring inherit the one they override, so the
        # documented contract (parameters, units, returns) shows on every model;
        # the models' own docstrings get the shared sections (gpumatch._docstrings).
        super().__init_subclass__(**kwargs)
        fill_docstrings(cls)
        for name, value in list(vars(cls).items()):
            if name.startswith("_") or getattr(value, "__doc__", "") is not None:
                continue
            doc = next((getattr(base, name).__doc__ for base in cls.__mro__[1:]
                        if getattr(getattr(base, name, None), "__doc__", None)), None)
            if doc is not None and callable(value):
                value.__doc__ = doc

    def compute_kernel_image(self, x: float, y: float) -> NDArray[np.float64]:
        """The PSF at parent position ``(x, y)``, centred in a stamp of odd size.

        {position}

        Returns
        -------
        ndarray (h, w)
            Sums to 1; the centre pixel ``[h // 2, w // 2]`` holds the peak
            (``h`` and ``w`` odd, equal for most models).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement compute_kernel_image(x, y)"
        )

    def compute_kernel_images(self, xs: ArrayLike, ys: ArrayLike) -> Any:
        """Evaluate the PSF at many parent positions.

        The default calls :meth:`compute_kernel_image` per position; models
        override it to evaluate in one batch.

        {positions}

        Returns
        -------
        ndarray (n, h, w) or list of ndarray
            One stamp per position, each summing to 1 (a list when the sizes differ).
        """
        stamps = [np.asarray(self.compute_kernel_image(float(x), float(y)))
                  for x, y in zip(np.ravel(xs), np.ravel(ys))]
        shapes = {s.shape for s in stamps}
        if len(shapes) == 1 and stamps and stamps[0].ndim == 2:
            return np.stack(stamps)
        return stamps

    def dimensions(self, x: float | None = None, y: float | None = None) -> tuple[int, int]:
        """Size of the stamp at parent position ``(x, y)``.

        {position_or_average}

        Returns
        -------
        tuple of int
            ``(width, height)`` in pixels.
        """
        x, y = self._position(x, y)
        h, w = np.shape(self.compute_kernel_image(x, y))
        return w, h

    def compute_shape(self, x: float | None = None,
                      y: float | None = None) -> tuple[float, float, float]:
        """Adaptive second moments of the PSF at parent position ``(x, y)``.

        {position_or_average}

        Returns
        -------
        tuple of float
            ``(ixx, iyy, ixy)`` in pixels^2.
        """
        x, y = self._position(x, y)
        _, _, ixx, iyy, ixy = adaptive_moments(self.compute_kernel_image(x, y))
        return ixx, iyy, ixy

    def determinant_radius(self, x: float | None = None, y: float | None = None) -> float:
        """Determinant radius ``(ixx iyy - ixy^2)^(1/4)`` of :meth:`compute_shape`.

        {position_or_average}

        Returns
        -------
        float
            Radius in pixels.
        """
        return determinant_radius(*self.compute_shape(x, y))

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """Full width at half maximum: determinant radius times ``2 sqrt(2 ln 2)``.

        {position_or_average}

        Returns
        -------
        float
            FWHM in pixels.
        """
        return self.determinant_radius(x, y) * SIGMA_TO_FWHM

    def resized(self, width: int, height: int) -> Psf:
        """Give this model with stamps of ``width x height`` pixels.

        The default zero-pads or centre-crops every stamp and warns
        (:class:`~gpumatch.InputWarning`); analytic models re-render instead,
        as a model of the same class and parameters.

        Parameters
        ----------
        width, height : int
            Odd stamp size in pixels.

        Returns
        -------
        Psf
            The resized model.
        """
        return ResizedPsf(self, width, height)

    def _position(self, x, y):
        if x is None or y is None:
            pos = self.average_position
            return (0.0, 0.0) if pos is None else (float(pos[0]), float(pos[1]))
        return float(x), float(y)


class FixedSizePsf(Psf):
    """Base of models with one stamp size everywhere that render on any device.

    A subclass sets ``self.width, self.height = odd_stamp_size(width, height)``
    in its constructor, whose first two parameters are ``width, height``
    (pixels) and whose others are the names :meth:`_parameters` returns, in
    order, and implements ``compute_kernel_images(xs, ys, xp=np)``. This class
    gives :meth:`compute_kernel_image` (one stamp of the batch),
    :meth:`dimensions` (``width, height`` everywhere), :meth:`resized`
    (re-rendered, not padded) and ``repr``; their docstrings are :class:`Psf`'s.
    """

    renders_on_device = True

    def _parameters(self):
        """The constructor's arguments after ``width, height``: ``{name: value}``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _parameters()")

    def compute_kernel_images(self, xs: ArrayLike, ys: ArrayLike, xp: Any = np) -> Any:
        """Evaluate the PSF at many parent positions, on ``xp``'s device.

        Parameters
        ----------
        xs, ys : array_like (n,)
            Parent positions in pixels (host arrays).
        xp : module
            The array module the stamps are made with (NumPy, or CuPy for the device).

        Returns
        -------
        array (n, height, width)
            One stamp per position, each summing to 1 and centred on its middle pixel.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute_kernel_images")

    def compute_kernel_image(self, x: float, y: float) -> NDArray[np.float64]:
        return self.compute_kernel_images([x], [y])[0]

    def dimensions(self, x: float | None = None, y: float | None = None) -> tuple[int, int]:
        return self.width, self.height

    def resized(self, width: int, height: int) -> FixedSizePsf:
        return type(self)(width, height, *self._parameters().values())

    def __repr__(self):
        params = ", ".join(f"{k}={v}" for k, v in self._parameters().items())
        return f"{type(self).__name__}({self.width}, {self.height}, {params})"


class SquareStampPsf(Psf):
    """Base of models drawn into square stamps of a size they are given (PSFEx, GalSim, Piff).

    A subclass keeps the odd stamp size in ``self.size`` (pixels) and
    implements :meth:`_with_size`; this class gives :meth:`dimensions` and
    :meth:`resized`.
    """

    def _with_size(self, size):
        """The same model drawn into ``size x size`` stamps."""
        raise NotImplementedError(f"{type(self).__name__} must implement _with_size(size)")

    def dimensions(self, x: float | None = None, y: float | None = None) -> tuple[int, int]:
        return self.size, self.size

    def resized(self, width: int, height: int) -> Psf:
        """Re-render the model into ``width x height`` stamps (square only).

        Parameters
        ----------
        width, height : int
            Odd stamp size in pixels; a non-square size is padded/cropped instead.

        Returns
        -------
        Psf
            The resized model.
        """
        if width != height:
            return super().resized(width, height)
        return self._with_size(width)


class ResizedPsf(Psf):
    """A model whose stamps are zero-padded or centre-cropped to a new size."""

    def __init__(self, psf, width, height):
        if width % 2 == 0 or height % 2 == 0 or width < 1 or height < 1:
            raise ValueError(f"resized PSF stamps must be odd and positive, got {width}x{height}")
        self.psf = psf
        self.width = int(width)
        self.height = int(height)
        self.average_position = psf.average_position
        warn(f"resizing {type(psf).__name__} stamps to {width}x{height} by zero-padding/cropping "
             "(no re-rendering)", InputWarning)

    def compute_kernel_image(self, x, y):
        stamp = pad_or_crop(self.psf.compute_kernel_image(x, y), self.width, self.height)
        return stamp / stamp.sum()

    def compute_kernel_images(self, xs, ys):
        stamps = self.psf.compute_kernel_images(xs, ys)
        out = np.stack([pad_or_crop(s, self.width, self.height) for s in stamps])
        return out / out.sum(axis=(1, 2), keepdims=True)

    def resized(self, width, height):
        return ResizedPsf(self.psf, width, height)

    def __repr__(self):
        return f"ResizedPsf({self.psf!r}, {self.width}, {self.height})"
