"""Overlap-save tile sizes of the host application (docs/algorithm.md section 7.5).

A leaf module: the application (:mod:`gpumatch.apply`) and the memory estimate
(:mod:`gpumatch.limits`) both size the tiles with it.
"""

from __future__ import annotations

import math

__all__ = ["FAST_TILES", "choose_tile"]

#: FFT-friendly tile sizes in pixels (products of 2, 3 and 5).
FAST_TILES = (64, 96, 128, 160, 192, 256, 320, 384, 512)


def choose_tile(n_out_y, n_out_x, k):
    """FFT tile size minimising the estimated work of overlap-save.

    Parameters
    ----------
    n_out_y, n_out_x : int
        Outputs to compute, in pixels.
    k : int
        Kernel size in pixels; a tile of size ``t`` gives ``t - k + 1`` outputs
        per side, and at least 16.

    Returns
    -------
    int
        The tile size ``t`` in pixels (one of :data:`FAST_TILES`, or the power of
        two above ``2 k`` for kernels too large for them).
    """
    best = None
    for t in FAST_TILES:
        b = t - (k - 1)
        if b < 16:
            continue
        tiles = -(-n_out_y // b) * -(-n_out_x // b)
        cost = tiles * t * t * math.log2(t)
        if best is None or cost < best[0]:
            best = (cost, t)
    if best is None:
        return int(2 ** math.ceil(math.log2(2 * k)))
    return best[1]
