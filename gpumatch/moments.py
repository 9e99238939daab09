"""Second moments of PSF images: adaptive (Gaussian-weighted) moments."""

from __future__ import annotations

import math

import numpy as np

from .backends import backend_for_arrays, backend_for_namespace
from .threads import map_in_threads, piece_size

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


#: Fewest stamps per host piece of :func:`adaptive_moments_batch` (see
#: :func:`gpumatch.threads.piece_size`).
_HOST_CHUNK = 64


def adaptive_moments_batch(stamps, max_iter=100, rtol=1e-8, xp=None, device_kernel=True):
    """:func:`adaptive_moments` of many same-sized stamps at once.

    Parameters
    ----------
    stamps : array (n, ny, nx)
        NumPy or CuPy (then computed on the device).
    xp : module, optional
        Array namespace; default: that of ``stamps``.
    device_kernel : bool
        On the device, use the fused CUDA kernel
        (:func:`gpumatch.cuda.moments.adaptive_moments_cupy`, one launch)
        rather than this array code (about 100 launches per step); the
        results agree to rounding.

    Returns
    -------
    array (n, 5)
        ``xc, yc, ixx, iyy, ixy`` per stamp; rows that fail to converge are NaN.
    """
    backend = backend_for_arrays(stamps) if xp is None else backend_for_namespace(xp)
    xp = backend.xp
    if device_kernel and backend.fused_moments is not None:
        return backend.fused_moments(stamps, max_iter, rtol)
    if not backend.on_device and len(stamps) > _HOST_CHUNK:
        step = piece_size(len(stamps), least=_HOST_CHUNK)
        # Rows are independent (each one's result is that of the row alone):
        # pieces run on the host threads, and a piece's temporaries stay in
        # cache, so time grows linearly with the number of stamps.
        return np.concatenate(map_in_threads(
            lambda i: _moments_of(stamps[i:i + step], max_iter, rtol, backend),
            range(0, len(stamps), step)))
    return _moments_of(stamps, max_iter, rtol, backend)


def _moments_of(stamps, max_iter, rtol, backend):
    """:func:`adaptive_moments_batch` of one piece, in array code on ``backend``."""
    xp = backend.xp
    img = xp.asarray(stamps, dtype=xp.float64)
    n, ny, nx = img.shape
    x = xp.arange(nx, dtype=xp.float64)
    y = xp.arange(ny, dtype=xp.float64)
    pos = xp.clip(img, 0, None)
    tot = pos.sum(axis=(1, 2))
    ok = xp.isfinite(img).all(axis=(1, 2)) & (tot > 0)
    tot = xp.where(ok, tot, 1.0)
    img = xp.where(ok[:, None, None], img, 0.0)
    xc = (pos.sum(axis=1) * x).sum(axis=1) / tot
    yc = (pos.sum(axis=2) * y).sum(axis=1) / tot
    wxx = xp.full(n, max(1.0, min(nx, ny) / 8.0) ** 2)
    wyy = wxx.copy()
    wxy = xp.zeros(n)
    done = ~ok
    # Converged rows are frozen, so testing for the end less often changes no
    # result; on the device each test is a synchronisation.
    check_every = 8 if backend.on_device else 1
    quiet = backend.errstate

    for it in range(max_iter):
        if xp is np:
            # Only the rows still iterating are computed (a third of them after
            # ten steps on real stamps): each row's step uses its own values
            # alone, so the results are the same bits.
            act = np.flatnonzero(~done)
            if not act.size:
                break
            cur = (xc[act], yc[act], wxx[act], wyy[act], wxy[act])
            new, change = _moment_step(img[act], x, y, *cur, xp, quiet)
            keep = ~np.isfinite(change)
            for full, old, upd in zip((xc, yc, wxx, wyy, wxy), cur, new):
                full[act] = np.where(keep, old, upd)
            done[act] = change < rtol
            continue
        new, change = _moment_step(img, x, y, xc, yc, wxx, wyy, wxy, xp, quiet)
        keep = done | ~xp.isfinite(change)
        xc, yc, wxx, wyy, wxy = (xp.where(keep, old, upd) for old, upd in
                                 zip((xc, yc, wxx, wyy, wxy), new))
        done = done | (change < rtol)
        if (it + 1) % check_every == 0 and bool(done.all()):
            break
    out = xp.stack([xc, yc, wxx, wyy, wxy], axis=1)
    out[~(done & ok)] = np.nan
    return out


def _moment_step(img, x, y, xc, yc, wxx, wyy, wxy, xp, quiet):
    """One adaptive-moments iteration for every row given: the new
    ``(xc, yc, wxx, wyy, wxy)`` and the relative change.

    ``x`` and ``y`` are the 1-D pixel coordinates of the stamp's columns and
    rows; the weight's exponent is built from them by broadcasting and the
    weighted sums are taken from the column and row marginals, so each step
    makes a few passes over the stamps rather than one per product."""
    det = wxx * wyy - wxy * wxy
    dx = x[None, :] - xc[:, None]  # (n, nx)
    dy = y[None, :] - yc[:, None]  # (n, ny)
    # -q/2 = ax dx^2 + ay dy^2 + bxy dx dy
    ax = (-0.5 * wyy / det)[:, None] * dx * dx
    ay = (-0.5 * wxx / det)[:, None] * dy * dy
    bxy = (wxy / det)[:, None] * dx
    w = ay[:, :, None] + ax[:, None, :]
    w += dy[:, :, None] * bxy[:, None, :]
    w = xp.exp(w, out=w)
    w *= img
    wx = w.sum(axis=1)  # column marginal (n, nx)
    wy = w.sum(axis=2)  # row marginal (n, ny)
    s = wx.sum(axis=1)
    s = xp.where(s > 0, s, np.nan)
    mx = (wx * dx).sum(axis=1) / s
    my = (wy * dy).sum(axis=1) / s
    nxc = xc + mx
    nyc = yc + my
    qxx = (wx * dx * dx).sum(axis=1) / s
    qyy = (wy * dy * dy).sum(axis=1) / s
    qxy = (xp.matmul(w, dx[:, :, None])[:, :, 0] * dy).sum(axis=1) / s
    qdet = qxx * qyy - qxy * qxy
    with quiet():
        ia = qyy / qdet - wyy / det
        ib = qxx / qdet - wxx / det
        ic = -qxy / qdet + wxy / det
        idet = ia * ib - ic * ic
        good = (qdet > 0) & (ia > 0) & (idet > 0)
        nxx = xp.where(good, ib / idet, 2 * qxx)
        nyy = xp.where(good, ia / idet, 2 * qyy)
        nxy = xp.where(good, -ic / idet, 2 * qxy)
    change = xp.maximum(xp.abs(nxx - wxx), xp.maximum(xp.abs(nyy - wyy), xp.abs(nxy - wxy)))
    change = xp.maximum(change / xp.maximum(wxx, wyy), xp.abs(nxc - xc) + xp.abs(nyc - yc))
    return (nxc, nyc, nxx, nyy, nxy), change
