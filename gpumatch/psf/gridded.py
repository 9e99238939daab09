"""A PSF given as stamps on a grid of positions, interpolated between them."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import PsfEvaluationError
from .base import Psf

log = logging.getLogger("gpumatch")

__all__ = ["GriddedPsf"]


def _is_photutils_model(obj):
    return hasattr(obj, "grid_xypos") and hasattr(obj, "data") and hasattr(obj, "oversampling")


class GriddedPsf(Psf):
    """PSF stamps on a rectilinear grid of parent positions, bilinearly interpolated.

    At ``(x, y)`` the stamp is the bilinear interpolation of the four grid
    stamps around it; outside the grid the nearest edge is used (no
    extrapolation). Each grid stamp is normalised to sum 1, so every
    interpolated stamp sums to 1.

    Parameters
    ----------
    stamps : array (n, h, w), or a photutils ``GriddedPSFModel``
        Odd-sized stamps, PSF centred on the middle pixel, one per position.
        A photutils model is converted with :meth:`from_photutils`.
    xs, ys : arrays (n,)
        Parent positions of the stamps. They must form a full grid: every
        combination of the distinct ``xs`` and the distinct ``ys`` exactly once,
        in any order.
    """

    def __init__(self, stamps: ArrayLike, xs: ArrayLike | None = None,
                 ys: ArrayLike | None = None) -> None:
        if xs is None and ys is None and _is_photutils_model(stamps):
            other = GriddedPsf.from_photutils(stamps)
            self.__dict__.update(other.__dict__)
            return
        arr = np.array(stamps, dtype=np.float64)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] < 1:
            raise ValueError(f"stamps must be an array (n, h, w), got shape {arr.shape}")
        n, h, w = arr.shape
        if h % 2 == 0 or w % 2 == 0:
            raise ValueError(f"grid stamps must have odd sizes (centre on the middle pixel), "
                             f"got {w}x{h}")
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=(1, 2)))[0])
            raise ValueError(f"grid stamp {bad} contains NaN or infinite values")
        sums = arr.sum(axis=(1, 2))
        if not np.all(sums > 0):
            bad = int(np.flatnonzero(~(sums > 0))[0])
            raise ValueError(f"grid stamp {bad} has no positive flux (sum {sums[bad]:.3g})")
        if xs is None or ys is None:
            raise ValueError("give the grid positions xs and ys (one per stamp)")
        xs = np.asarray(xs, dtype=np.float64).ravel()
        ys = np.asarray(ys, dtype=np.float64).ravel()
        if xs.shape != (n,) or ys.shape != (n,):
            raise ValueError(f"{n} stamps need {n} positions, got {xs.size} xs and {ys.size} ys")
        if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
            raise ValueError("grid positions must be finite")
        gx = np.unique(xs)
        gy = np.unique(ys)
        if gx.size * gy.size != n:
            raise ValueError(
                f"the {n} positions do not form a full grid ({gx.size} distinct x by {gy.size} "
                f"distinct y needs {gx.size * gy.size} stamps)")
        ix = np.searchsorted(gx, xs)
        iy = np.searchsorted(gy, ys)
        grid = np.full((gy.size, gx.size), -1, dtype=np.int64)
        grid[iy, ix] = np.arange(n)
        if (grid < 0).any():
            raise ValueError("the positions repeat a grid point and miss another; every "
                             "(x, y) combination must appear once")
        self.grid_x = gx
        self.grid_y = gy
        # stamps[iy, ix] in grid order, each normalised to sum 1.
        self.stamps = (arr / sums[:, None, None])[grid]
        self.stamps.setflags(write=False)
        self.average_position = (0.5 * (gx[0] + gx[-1]), 0.5 * (gy[0] + gy[-1]))

    @classmethod
    def from_photutils(cls, model: Any, xy0: tuple[int, int] = (0, 0)) -> GriddedPsf:
        """Convert a photutils ``GriddedPSFModel``.

        An oversampled model (``oversampling`` > 1, an effective PSF) is sampled
        at whole-pixel offsets from its centre, which needs the centre on a
        sample (odd array sizes).

        Parameters
        ----------
        model : photutils.psf.GriddedPSFModel
            Its ``grid_xypos`` are pixel coordinates of the image the grid was
            made for.
        xy0 : (int, int)
            That image's parent origin (pixels).

        Returns
        -------
        GriddedPsf
            Stamps at parent positions ``grid_xypos + xy0``.
        """
        data = np.asarray(model.data, dtype=np.float64)
        pos = np.asarray(model.grid_xypos, dtype=np.float64).reshape(-1, 2)
        over = np.broadcast_to(np.asarray(model.oversampling, dtype=np.int64).ravel(), (2,))
        # photutils gives oversampling as (y, x) when it differs per axis.
        oy, ox = int(over[0]), int(over[1])
        if data.ndim == 2:
            data = data[None]
        n, h, w = data.shape
        if oy > 1 or ox > 1:
            if h % 2 == 0 or w % 2 == 0:
                raise ValueError(
                    f"photutils model has even-sized oversampled stamps ({w}x{h}); gpumatch "
                    "needs odd sizes so that a sample falls on the centre")
            cy, cx = (h - 1) // 2, (w - 1) // 2
            data = data[:, cy % oy::oy, cx % ox::ox]
            log.info("photutils GriddedPSFModel oversampled by (%d, %d): sampled at whole "
                     "pixels, stamps %dx%d", ox, oy, data.shape[2], data.shape[1])
        return cls(data, pos[:, 0] + xy0[0], pos[:, 1] + xy0[1])

    @staticmethod
    def _axis(grid, t):
        """Lower index and weight of the upper neighbour, clamped to the grid."""
        if grid.size == 1:
            z = np.zeros(t.shape, dtype=np.int64)
            return z, z, np.zeros(t.shape)
        tc = np.clip(t, grid[0], grid[-1])
        i0 = np.clip(np.searchsorted(grid, tc, side="right") - 1, 0, grid.size - 2)
        w = (tc - grid[i0]) / (grid[i0 + 1] - grid[i0])
        return i0, i0 + 1, w

    def compute_kernel_images(self, xs: ArrayLike, ys: ArrayLike) -> NDArray[np.float64]:
        """Interpolate stamps bilinearly between the grid's, each summing to 1.

        Parameters
        ----------
        xs, ys : array_like (n,)
            Parent positions in pixels (clamped to the grid).

        Returns
        -------
        ndarray (n, h, w)
            One stamp per position.
        """
        xs = np.asarray(xs, dtype=np.float64).ravel()
        ys = np.asarray(ys, dtype=np.float64).ravel()
        if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
            i = int(np.flatnonzero(~(np.isfinite(xs) & np.isfinite(ys)))[0])
            raise PsfEvaluationError(f"GriddedPsf: position (x={xs[i]}, y={ys[i]}) is not finite")
        x0, x1, wx = self._axis(self.grid_x, xs)
        y0, y1, wy = self._axis(self.grid_y, ys)
        s = self.stamps
        out = ((1 - wy) * (1 - wx))[:, None, None] * s[y0, x0]
        out += ((1 - wy) * wx)[:, None, None] * s[y0, x1]
        out += (wy * (1 - wx))[:, None, None] * s[y1, x0]
        out += (wy * wx)[:, None, None] * s[y1, x1]
        return out

    def compute_kernel_image(self, x: float, y: float) -> NDArray[np.float64]:
        return self.compute_kernel_images([x], [y])[0]

    def dimensions(self, x: float | None = None, y: float | None = None) -> tuple[int, int]:
        return self.stamps.shape[3], self.stamps.shape[2]

    def __repr__(self):
        h, w = self.stamps.shape[2:]
        return (f"GriddedPsf({self.grid_x.size}x{self.grid_y.size} grid over "
                f"x [{self.grid_x[0]:g}, {self.grid_x[-1]:g}], y [{self.grid_y[0]:g}, "
                f"{self.grid_y[-1]:g}], stamps {w}x{h})")
