"""Adaptive moments of many stamps: the NumPy loop computes only the rows still
iterating; that must give the same bits as stepping every row every time."""

import numpy as np

from gpumatch.moments import adaptive_moments_batch


class _NumpyAsOther:
    """NumPy under another name: ``adaptive_moments_batch`` then takes its
    array-generic path (every row every step), the one the device runs."""

    def __getattr__(self, name):
        return getattr(np, name)


def elliptical_stamps(rng, n, ny, nx, widths, shear, centre, noise):
    """Elliptical Gaussians and three bad stamps (a NaN, no positive flux, all zero).

    Each stamp has its centre at ``rng.uniform(*centre)`` of the stamp's size
    on each axis, axis widths drawn from ``widths`` (pixels), a correlation
    up to ``shear`` and Gaussian noise of standard deviation ``noise``.
    """
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    out = np.empty((n, ny, nx))
    for i in range(n):
        xc, yc = rng.uniform(*centre) * nx, rng.uniform(*centre) * ny
        sxx, syy = rng.uniform(*widths, 2) ** 2
        sxy = rng.uniform(-shear, shear) * np.sqrt(sxx * syy)
        det = sxx * syy - sxy ** 2
        dx, dy = x - xc, y - yc
        q = (syy * dx * dx - 2 * sxy * dx * dy + sxx * dy * dy) / det
        out[i] = np.exp(-0.5 * q) + rng.normal(0, noise, (ny, nx))
    out[1, 3, 4] = np.nan            # not finite
    out[2] = -np.abs(out[2])         # no positive flux
    out[3] = 0.0
    return out


def _stamps(rng, n=40, ny=31, nx=27):
    # From compact to wide and elliptical: convergence takes from a few to
    # many more steps.
    return elliptical_stamps(rng, n, ny, nx, widths=(0.8, 5.0), shear=0.6, centre=(0.3, 0.7),
                             noise=3e-3)


def test_active_rows_give_the_same_bits_as_every_row():
    stamps = _stamps(np.random.default_rng(5))
    for max_iter in (100, 24, 6, 1):
        fast = adaptive_moments_batch(stamps, max_iter, 1e-8)
        with np.errstate(divide="ignore", invalid="ignore"):
            full = adaptive_moments_batch(stamps, max_iter, 1e-8, xp=_NumpyAsOther(),
                                          device_kernel=False)
        np.testing.assert_array_equal(fast, full)
        if max_iter == 24:
            # Some rows converged and some did not: the active set really shrank.
            bad = np.isnan(fast).any(axis=1)
            assert 3 < bad.sum() < len(stamps) - 5
    assert np.isnan(fast).all()          # one step: nothing converges
    # And each row is what it would be alone.
    alone = np.array([adaptive_moments_batch(stamps[i:i + 1])[0] for i in range(len(stamps))])
    np.testing.assert_array_equal(adaptive_moments_batch(stamps), alone)
