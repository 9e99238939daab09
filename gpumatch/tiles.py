"""Overlap-save tile sizes of the host application (docs/algorithm.md section 7.5).

A leaf module: the application (:mod:`gpumatch.apply`) and the memory estimate
(:mod:`gpumatch.limits`) both size the tiles with it.
"""

from __future__ import annotations

import math

__all__ = ["FAST_TILES", "TILE_COST", "choose_tile"]

#: FFT-friendly tile sizes in pixels (products of 2, 3 and 5), each with its
#: time per tile pixel relative to 192's, measured for the whole host
#: application (transforms, products, weighting; groups of four tiles, two
#: threads) of a 2048x2048 exposure with a 21-pixel kernel on the 2-core
#: development VM (benchmarks/RESULTS.md, "CPU speed"): small tiles pay the
#: Python work per call, large ones fall out of the cores' caches (a single
#: 512-pixel tile took 52 ms where 192-pixel tiles took 26 ms on a 512x512
#: exposure).
TILE_COST = {64: 1.7, 96: 1.42, 128: 1.18, 160: 1.06, 192: 1.0, 224: 1.14, 256: 1.05,
             320: 1.19, 384: 1.52, 512: 1.68}
FAST_TILES = tuple(sorted(TILE_COST))


def choose_tile(n_out_y, n_out_x, k):
    """FFT tile size minimising the estimated time of overlap-save: tiles times
    tile pixels times :data:`TILE_COST`.

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
        cost = tiles * t * t * TILE_COST[t]
        if best is None or cost < best[0]:
            best = (cost, t)
    if best is None:
        return int(2 ** math.ceil(math.log2(2 * k)))
    return best[1]
