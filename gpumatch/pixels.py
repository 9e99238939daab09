"""Pixel boxes and mask-plane bits: the small types shared by exposures, kernels,
PSF models and the file readers, kept below all of them so that none imports another
for them (docs/algorithm.md section 7)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Box", "DEFAULT_MASK_PLANES"]

#: Default mask planes and bits, as in the LSST stack (docs/algorithm.md section 7).
DEFAULT_MASK_PLANES = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
}


@dataclass(frozen=True)
class Box:
    """An integer pixel box in parent coordinates, ends inclusive (LSST style).

    Parameters
    ----------
    x0, y0 : int
        Parent coordinates of the lower-left pixel.
    width, height : int
        Size in pixels.
    """

    x0: int
    y0: int
    width: int
    height: int

    @property
    def x1(self) -> int:
        """Last column (inclusive)."""
        return self.x0 + self.width - 1

    @property
    def y1(self) -> int:
        """Last row (inclusive)."""
        return self.y0 + self.height - 1

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the box as a real box, ``((x0 + x1) / 2, (y0 + y1) / 2)``."""
        return (0.5 * (self.x0 + self.x1), 0.5 * (self.y0 + self.y1))

    def grown(self, dx: int, dy: int) -> Box:
        """The box grown by ``dx`` on left and right and ``dy`` on bottom and top.

        Parameters
        ----------
        dx, dy : int
            Margins in pixels (negative shrinks).

        Returns
        -------
        Box
            The grown box.
        """
        return Box(self.x0 - dx, self.y0 - dy, self.width + 2 * dx, self.height + 2 * dy)

    def contains(self, x: float, y: float) -> bool:
        """Whether parent position ``(x, y)`` (pixels) lies in the box, ends included.

        Parameters
        ----------
        x, y : float
            Parent position in pixels.

        Returns
        -------
        bool
            True inside or on the edge pixels.
        """
        return self.x0 <= x <= self.x1 and self.y0 <= y <= self.y1
