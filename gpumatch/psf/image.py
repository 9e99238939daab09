"""A PSF given as one image, the same everywhere."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputWarning, warn
from .base import Psf, pad_or_crop

__all__ = ["ImagePsf"]


class ImagePsf(Psf):
    """A spatially constant PSF given as an odd square image.

    Parameters
    ----------
    array : 2-d array
        The PSF, centred on the central pixel; it is copied and normalised to
        sum 1.
    """

    def __init__(self, array: ArrayLike) -> None:
        arr = np.array(array, dtype=np.float64, copy=True)
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] % 2 == 0:
            raise ValueError(f"ImagePsf needs an odd square 2-d array, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("ImagePsf array contains NaN or infinite values")
        s = arr.sum()
        if not s > 0:
            raise ValueError(f"ImagePsf array must have a positive sum, got {s}")
        self.array = arr / s
        self.array.setflags(write=False)

    def compute_kernel_image(self, x: float, y: float) -> NDArray[np.float64]:
        return self.array.copy()

    def compute_kernel_images(self, xs: ArrayLike, ys: ArrayLike) -> NDArray[np.float64]:
        n = np.size(xs)
        return np.broadcast_to(self.array, (n,) + self.array.shape).copy()

    def resized(self, width: int, height: int) -> ImagePsf:
        if (width, height) != self.array.shape[::-1]:
            warn(f"ImagePsf resized from {self.array.shape[1]}x{self.array.shape[0]} to "
                 f"{width}x{height} by zero-padding/cropping", InputWarning)
        return ImagePsf(pad_or_crop(self.array, width, height))

    def __repr__(self):
        return f"ImagePsf({self.array.shape[1]}x{self.array.shape[0]})"
