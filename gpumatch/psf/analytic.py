"""Analytic PSF models rendered at pixel centres."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..backend import to_numpy
from ..basis import polynomial_exponents
from ..pixels import Box
from .base import FixedSizePsf, odd_stamp_size

__all__ = ["GaussianPsf", "DoubleGaussianPsf", "MoffatPsf", "VaryingGaussianPsf",
           "render_gaussians"]


@functools.lru_cache(maxsize=32)
def _quadratic_terms(width, height):
    """``u^2, u v, v^2`` at every pixel centre, ``(3, height * width)`` (pixels^2,
    offsets from the central pixel)."""
    u = np.arange(width, dtype=np.float64) - width // 2
    v = np.arange(height, dtype=np.float64) - height // 2
    uu, vv = np.meshgrid(u, v)
    terms = np.stack([uu * uu, uu * vv, vv * vv]).reshape(3, -1)
    terms.setflags(write=False)
    return terms


def render_gaussians(width, height, ixx, iyy, ixy, xp=np):
    """Unnormalised elliptical Gaussians sampled at pixel centres.

    Parameters
    ----------
    width, height : int
        Odd stamp size; the Gaussian is centred on pixel ``[height//2, width//2]``.
    ixx, iyy, ixy : arrays (n,)
        Covariance of each Gaussian (pixels^2), on the host or the device.
    xp : module
        NumPy or CuPy: where the stamps are made.

    Returns
    -------
    array (n, height, width)
    """
    # A few numbers per Gaussian, worked out on the host; then the stamps in two
    # array operations (a product with the pixels' quadratic terms, and exp), which
    # on a GPU is two launches whatever the number of stamps.
    ixx, iyy, ixy = (np.asarray(to_numpy(v), dtype=np.float64).ravel() for v in (ixx, iyy, ixy))
    det = ixx * iyy - ixy * ixy
    coeffs = (-0.5 / det)[:, None] * np.stack([iyy, -2.0 * ixy, ixx], axis=1)
    q = xp.asarray(coeffs) @ xp.asarray(_quadratic_terms(width, height))
    return xp.exp(q).reshape(-1, height, width)


def _same_stamps(stamp, n, xp):
    """``n`` copies of one normalised ``stamp`` (a host array), made on ``xp``'s device."""
    stamp = xp.asarray(stamp / stamp.sum())
    return xp.ascontiguousarray(xp.broadcast_to(stamp, (n,) + stamp.shape))


class GaussianPsf(FixedSizePsf):
    """A circular Gaussian PSF.

    Parameters
    ----------
    width, height : int
        Odd stamp size in pixels.
    sigma : float
        Gaussian width in pixels.
    """

    def __init__(self, width: int, height: int, sigma: float) -> None:
        self.width, self.height = odd_stamp_size(width, height)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = float(sigma)

    def compute_kernel_images(self, xs: ArrayLike, ys: ArrayLike, xp: Any = np) -> Any:
        s2 = np.array([self.sigma ** 2])
        stamp = render_gaussians(self.width, self.height, s2, s2, np.zeros(1))[0]
        return _same_stamps(stamp, int(np.size(to_numpy(xs))), xp)

    def compute_shape(self, x=None, y=None):
        s2 = self.sigma ** 2
        return s2, s2, 0.0

    def _parameters(self):
        return {"sigma": self.sigma}


class DoubleGaussianPsf(FixedSizePsf):
    """``exp(-r^2 / 2 sigma1^2) + b exp(-r^2 / 2 sigma2^2)``, normalised to sum 1.

    Parameters
    ----------
    width, height : int
        Odd stamp size in pixels.
    sigma1, sigma2 : float
        Widths of the core and the wing in pixels (``sigma2`` is unused when ``b == 0``).
    b : float
        Peak amplitude of the wing relative to the core.
    """

    def __init__(self, width: int, height: int, sigma1: float, sigma2: float = 0.0,
                 b: float = 0.0) -> None:
        self.width, self.height = odd_stamp_size(width, height)
        if not sigma1 > 0:
            raise ValueError(f"sigma1 must be positive, got {sigma1}")
        if b < 0:
            raise ValueError(f"b must be >= 0, got {b}")
        if b != 0 and not sigma2 > 0:
            raise ValueError(f"sigma2 must be positive when b != 0, got {sigma2}")
        self.sigma1 = float(sigma1)
        self.sigma2 = float(sigma2)
        self.b = float(b)

    def compute_kernel_images(self, xs: ArrayLike, ys: ArrayLike, xp: Any = np) -> Any:
        s1, zero = np.array([self.sigma1 ** 2]), np.zeros(1)
        stamp = render_gaussians(self.width, self.height, s1, s1, zero)[0]
        if self.b != 0:
            s2 = np.array([self.sigma2 ** 2])
            stamp = stamp + self.b * render_gaussians(self.width, self.height, s2, s2, zero)[0]
        return _same_stamps(stamp, int(np.size(to_numpy(xs))), xp)

    def compute_shape(self, x=None, y=None):
        if self.b == 0:
            s2 = self.sigma1 ** 2
            return s2, s2, 0.0
        return super().compute_shape(x, y)

    def _parameters(self):
        return {"sigma1": self.sigma1, "sigma2": self.sigma2, "b": self.b}


class MoffatPsf(FixedSizePsf):
    """A circular Moffat PSF, ``(1 + r^2 / alpha^2)^(-beta)``, normalised to sum 1.

    Heavier wings than a Gaussian of the same FWHM (seeing-limited stars are
    close to ``beta`` 2.5 to 4.5).

    Parameters
    ----------
    width, height : int
        Odd stamp size in pixels.
    fwhm : float
        Full width at half maximum in pixels:
        ``alpha = fwhm / (2 sqrt(2^(1/beta) - 1))``.
    beta : float
        Power-law index (> 1 so the flux is finite).
    """

    def __init__(self, width: int, height: int, fwhm: float, beta: float = 3.0) -> None:
        self.width, self.height = odd_stamp_size(width, height)
        if not fwhm > 0:
            raise ValueError(f"fwhm must be positive, got {fwhm}")
        if not beta > 1:
            raise ValueError(f"beta must be > 1 (finite flux), got {beta}")
        self.fwhm_pixels = float(fwhm)
        self.beta = float(beta)
        self.alpha = self.fwhm_pixels / (2.0 * np.sqrt(2.0 ** (1.0 / self.beta) - 1.0))

    def compute_kernel_images(self, xs: ArrayLike, ys: ArrayLike, xp: Any = np) -> Any:
        r2 = _quadratic_terms(self.width, self.height)[[0, 2]].sum(axis=0)
        stamp = ((1.0 + r2 / self.alpha ** 2) ** -self.beta).reshape(self.height, self.width)
        return _same_stamps(stamp, int(np.size(to_numpy(xs))), xp)

    def _parameters(self):
        return {"fwhm": self.fwhm_pixels, "beta": self.beta}


def _poly_terms(u, v, n_coeffs):
    """Monomials 1, u, v, u^2, uv, v^2, ... (first ``n_coeffs`` of them)."""
    order = 0
    while (order + 1) * (order + 2) // 2 < n_coeffs:
        order += 1
    return [u ** a * v ** c for a, c in polynomial_exponents(order)[:n_coeffs]]


class VaryingGaussianPsf(FixedSizePsf):
    """An elliptical Gaussian whose size and shape vary across the detector.

    Size (determinant radius, pixels) and reduced shear ``g1, g2`` are
    polynomials in ``u, v`` in ``[-1, 1]`` over ``bbox``, with coefficients in
    the term order 1, u, v, u^2, uv, v^2, ...

    Parameters
    ----------
    width, height : int
        Odd stamp size in pixels.
    bbox : Box or (x0, y0, x1, y1)
        The detector area in parent pixels (inclusive ends) that maps to
        ``[-1, 1]``; the model extrapolates outside it.
    sigma, g1, g2 : sequence of float
        Polynomial coefficients.
    """

    def __init__(self, width: int, height: int, bbox: Any, sigma: ArrayLike,
                 g1: ArrayLike = (0.0,), g2: ArrayLike = (0.0,)) -> None:
        self.width, self.height = odd_stamp_size(width, height)
        if isinstance(bbox, Box):
            bbox = (bbox.x0, bbox.y0, bbox.x1, bbox.y1)
        self.bbox = tuple(float(v) for v in bbox)
        x0, y0, x1, y1 = self.bbox
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"bbox must have x1 > x0 and y1 > y0, got {bbox}")
        self.sigmacoeffs = tuple(float(c) for c in np.atleast_1d(sigma))
        self.g1_coeffs = tuple(float(c) for c in np.atleast_1d(g1))
        self.g2_coeffs = tuple(float(c) for c in np.atleast_1d(g2))
        self.average_position = (0.5 * (x0 + x1), 0.5 * (y0 + y1))

    def _uv(self, xs, ys):
        x0, y0, x1, y1 = self.bbox
        xs = np.asarray(to_numpy(xs), dtype=np.float64).ravel()
        ys = np.asarray(to_numpy(ys), dtype=np.float64).ravel()
        return (2 * xs - (x0 + x1)) / (x1 - x0), (2 * ys - (y0 + y1)) / (y1 - y0)

    def moments(self, xs: ArrayLike, ys: ArrayLike) -> tuple[NDArray[np.float64], ...]:
        """Covariance of the Gaussian at parent positions.

        A few numbers per position: worked out on the host even when the stamps
        are made on a device (see :func:`render_gaussians`).

        {positions}

        Returns
        -------
        tuple of ndarray (n,)
            ``(ixx, iyy, ixy)`` host arrays in pixels^2.
        """
        u, v = self._uv(xs, ys)

        def poly(coeffs):
            return sum(c * t for c, t in zip(coeffs, _poly_terms(u, v, len(coeffs))))

        s = poly(self.sigmacoeffs) + 0 * u
        g1 = poly(self.g1_coeffs) + 0 * u
        g2 = poly(self.g2_coeffs) + 0 * u
        g2sq = g1 * g1 + g2 * g2
        if np.any(s <= 0) or np.any(g2sq >= 1):
            raise ValueError("VaryingGaussianPsf: size <= 0 or |g| >= 1 at some requested position")
        # M = s^2 A A^T with A = [[1+g1, g2], [g2, 1-g1]] / sqrt(1 - g^2): det M = s^4.
        f = s * s / (1 - g2sq)
        ixx = f * ((1 + g1) ** 2 + g2 * g2)
        iyy = f * ((1 - g1) ** 2 + g2 * g2)
        ixy = f * 2 * g2
        return ixx, iyy, ixy

    def compute_kernel_images(self, xs: ArrayLike, ys: ArrayLike, xp: Any = np) -> Any:
        ixx, iyy, ixy = self.moments(xs, ys)
        img = render_gaussians(self.width, self.height, ixx, iyy, ixy, xp=xp)
        return img / img.sum(axis=(1, 2), keepdims=True)

    def compute_shape(self, x=None, y=None):
        x, y = self._position(x, y)
        ixx, iyy, ixy = self.moments([x], [y])
        return float(ixx[0]), float(iyy[0]), float(ixy[0])

    def _parameters(self):
        return {"bbox": self.bbox, "sigma": self.sigmacoeffs, "g1": self.g1_coeffs,
                "g2": self.g2_coeffs}
