"""Second moments of PSF images: adaptive (Gaussian-weighted) moments."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["adaptive_moments", "determinant_radius", "shear_from_moments", "SIGMA_TO_FWHM"]

#: FWHM of a Gaussian in units of its sigma, ``2 sqrt(2 ln 2)``.
SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def adaptive_moments(image, max_iter=200, rtol=1e-9):
    """Adaptive second moments of a stamp: the best-fit elliptical Gaussian.

    Iterates an elliptical Gaussian weight until its centre and covariance
    match the weighted centroid and twice the weighted second moments (the
    fixed point of Bernstein & Jarvis 2002 / HSM).

    Parameters
    ----------
    image : 2-d array
        The stamp, indexed ``[y, x]``.

    Returns
    -------
    xc, yc : float
        Centroid in array pixel coordinates.
    ixx, iyy, ixy : float
        Second moments (pixels^2).
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or img.size == 0 or not np.all(np.isfinite(img)):
        raise ValueError("adaptive_moments needs a finite, non-empty 2-d image")
    if not np.clip(img, 0, None).sum() > 0:
        raise ValueError("adaptive_moments needs an image with positive flux")
    out = adaptive_moments_batch(img[None], max_iter, rtol)[0]
    if not np.all(np.isfinite(out)):
        raise ValueError("adaptive moments did not converge")
    xc, yc, ixx, iyy, ixy = (float(v) for v in out)
    return xc, yc, ixx, iyy, ixy


def determinant_radius(ixx, iyy, ixy):
    """``(ixx iyy - ixy^2)^(1/4)`` in pixels."""
    return float((ixx * iyy - ixy * ixy) ** 0.25)


def shear_from_moments(ixx, iyy, ixy):
    """Reduced shear ``(g1, g2)`` of an ellipse with these second moments."""
    t = ixx + iyy
    e1 = (ixx - iyy) / t
    e2 = 2 * ixy / t
    e = math.hypot(e1, e2)
    f = 1.0 / (1.0 + math.sqrt(max(0.0, 1 - e * e)))
    return e1 * f, e2 * f


def adaptive_moments_batch(stamps, max_iter=100, rtol=1e-8):
    """:func:`adaptive_moments` of many same-sized stamps at once.

    Parameters
    ----------
    stamps : array (n, ny, nx)

    Returns
    -------
    ndarray (n, 5)
        ``xc, yc, ixx, iyy, ixy`` per stamp; rows that fail to converge are NaN.
    """
    img = np.asarray(stamps, dtype=np.float64)
    n, ny, nx = img.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    pos = np.clip(img, 0, None)
    tot = pos.sum(axis=(1, 2))
    ok = np.isfinite(img).all(axis=(1, 2)) & (tot > 0)
    tot = np.where(ok, tot, 1.0)
    img = np.where(ok[:, None, None], img, 0.0)
    xc = (pos * x).sum(axis=(1, 2)) / tot
    yc = (pos * y).sum(axis=(1, 2)) / tot
    wxx = np.full(n, max(1.0, min(nx, ny) / 8.0) ** 2)
    wyy = wxx.copy()
    wxy = np.zeros(n)
    done = ~ok
    for _ in range(max_iter):
        det = wxx * wyy - wxy * wxy
        dx = x[None] - xc[:, None, None]
        dy = y[None] - yc[:, None, None]
        q = (wyy[:, None, None] * dx * dx - 2 * wxy[:, None, None] * dx * dy
             + wxx[:, None, None] * dy * dy) / det[:, None, None]
        w = np.exp(-0.5 * q) * img
        s = w.sum(axis=(1, 2))
        s = np.where(s > 0, s, np.nan)
        nxc = xc + (w * dx).sum(axis=(1, 2)) / s
        nyc = yc + (w * dy).sum(axis=(1, 2)) / s
        qxx = (w * dx * dx).sum(axis=(1, 2)) / s
        qyy = (w * dy * dy).sum(axis=(1, 2)) / s
        qxy = (w * dx * dy).sum(axis=(1, 2)) / s
        qdet = qxx * qyy - qxy * qxy
        with np.errstate(divide="ignore", invalid="ignore"):
            ia = qyy / qdet - wyy / det
            ib = qxx / qdet - wxx / det
            ic = -qxy / qdet + wxy / det
            idet = ia * ib - ic * ic
            good = (qdet > 0) & (ia > 0) & (idet > 0)
            nxx = np.where(good, ib / idet, 2 * qxx)
            nyy = np.where(good, ia / idet, 2 * qyy)
            nxy = np.where(good, -ic / idet, 2 * qxy)
        change = np.maximum(np.abs(nxx - wxx), np.maximum(np.abs(nyy - wyy), np.abs(nxy - wxy)))
        change = np.maximum(change / np.maximum(wxx, wyy), np.abs(nxc - xc) + np.abs(nyc - yc))
        keep = done | ~np.isfinite(change)
        wxx, wyy, wxy = np.where(keep, wxx, nxx), np.where(keep, wyy, nyy), np.where(keep, wxy, nxy)
        xc, yc = np.where(keep, xc, nxc), np.where(keep, yc, nyc)
        done = done | (change < rtol)
        if done.all():
            break
    out = np.stack([xc, yc, wxx, wyy, wxy], axis=1)
    out[~(done & ok)] = np.nan
    return out
