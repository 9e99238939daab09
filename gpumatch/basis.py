"""The Alard-Lupton kernel basis (docs/algorithm.md section 4)."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("gpumatch")

__all__ = ["alard_lupton_basis", "alard_lupton_factors", "basis_widths", "BasisChoice",
           "polynomial_exponents", "SeparableBasis"]

#: Sums at or below this are treated as zero (float32 machine epsilon).
SUM_EPSILON = 1.1920929e-07


def polynomial_exponents(order):
    """Exponents ``(a, c)`` of the terms x^a y^c in order 1, x, y, x^2, xy, y^2, ..."""
    return [(i, n - i) for n in range(order + 1) for i in range(n, -1, -1)]


def alard_lupton_basis(kernel_size, sigmas, degrees):
    """Renormalised Alard-Lupton basis images.

    Parameters
    ----------
    kernel_size : int
        Odd kernel size ``k`` in pixels.
    sigmas : sequence of float
        Gaussian widths in pixels, in configuration order.
    degrees : sequence of int
        Polynomial degree of each Gaussian.

    Returns
    -------
    ndarray (nb, k, k), float64
        ``nb = sum((d + 1)(d + 2) / 2)``. Image 0 sums to 1; every other image
        sums to zero (unless its raw sum was already below float32 epsilon) and
        has unit sum of squares.
    """
    k = int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if len(sigmas) != len(degrees):
        raise ValueError("sigmas and degrees must have the same length")
    basis, _ = _alard_lupton(k, sigmas, degrees)
    _warn_if_not_zero_sum(basis, sigmas, degrees, k)
    return basis


@dataclass(frozen=True)
class SeparableBasis:
    """A basis written as sums of separable images: ``basis[b] = sum_t A[b, t]
    filters[iy[t]] (rows) x filters[ix[t]] (columns)``.

    Every Alard-Lupton image is a Gaussian times ``x^a y^c``, so a product of
    two 1-D filters, and the renormalisation of docs/algorithm.md section 4
    mixes it with image 0 only. The per-candidate normal equations use this to
    correlate stamps with 1-D filters (about ten times fewer operations than
    with the whole images); see :func:`gpumatch.normal_equations.candidate_design_matrices`.

    Attributes
    ----------
    filters : ndarray (n_filters, k)
        1-D filters over the offsets ``-h .. h`` pixels.
    iy, ix : ndarray of int (n_terms,)
        Row and column filter of each separable term.
    A : ndarray (n_basis, n_terms)
        Weights of the terms in each basis image.
    """

    filters: np.ndarray
    iy: np.ndarray
    ix: np.ndarray
    A: np.ndarray

    def images(self):
        """The basis images these factors describe, ``(n_basis, k, k)``."""
        outer = self.filters[self.iy][:, :, None] * self.filters[self.ix][:, None, :]
        return np.tensordot(self.A, outer, axes=1)


def alard_lupton_factors(kernel_size, sigmas, degrees):
    """The :class:`SeparableBasis` of :func:`alard_lupton_basis` (same arguments).

    Its images equal :func:`alard_lupton_basis` to rounding (about 1e-16 of
    their largest value). Made once per distinct basis (its arrays are
    read-only and shared).
    """
    return _factors(int(kernel_size), tuple(float(s) for s in sigmas),
                    tuple(int(d) for d in degrees))


@functools.lru_cache(maxsize=64)
def _factors(k, sigmas, degrees):
    factors = _alard_lupton(k, sigmas, degrees)[1]
    for array in (factors.filters, factors.iy, factors.ix, factors.A):
        array.flags.writeable = False
    return factors


def _alard_lupton(k, sigmas, degrees):
    """The renormalised basis images and their separable factors."""
    h = k // 2
    off = np.arange(-h, h + 1, dtype=np.float64)
    u = off[None, :]  # column offset (x)
    v = off[:, None]  # row offset (y)
    # With k == 1 there is no spatial extent; keep the terms finite.
    scale = float(h) if h > 0 else 1.0
    images, filters, iy, ix = [], [], [], []
    for sigma, degree in zip(sigmas, degrees):
        g = np.exp(-(u * u + v * v) / (2.0 * sigma * sigma))
        g /= g.sum()
        # 1-D factors of g (x/h)^a (y/h)^c: the same filters serve rows and columns.
        g1 = np.exp(-(off * off) / (2.0 * sigma * sigma))
        g1 /= g1.sum()
        first = len(filters)
        filters.extend(g1 * (off / scale) ** a for a in range(int(degree) + 1))
        for a, c in polynomial_exponents(int(degree)):
            images.append(g * (u / scale) ** a * (v / scale) ** c)
            iy.append(first + c)
            ix.append(first + a)
    basis = np.array(images)
    # A tracks the same steps on the terms: image 0 to unit sum, the others
    # minus image 0 (zero sum) and to unit sum of squares.
    A = np.zeros((len(basis), len(basis)))
    s0 = basis[0].sum()
    basis[0] /= s0
    A[0, 0] = 1.0 / s0
    b0 = basis[0]
    for i in range(1, len(basis)):
        s = basis[i].sum()
        if abs(s) > SUM_EPSILON:
            basis[i] = basis[i] / s - b0
            A[i, i], A[i, 0] = 1.0 / s, -A[0, 0]
        else:
            A[i, i] = 1.0
        norm = math.sqrt((basis[i] ** 2).sum())
        basis[i] /= norm
        A[i] /= norm
    return basis, SeparableBasis(np.array(filters), np.array(iy), np.array(ix), A)


#: Largest sum of a basis image after image 0 that still counts as zero. The
#: kernel sum is then carried by the first coefficient alone, as the solve's
#: ``a0 -> kernelSum`` step (docs/algorithm.md section 6) assumes.
ZERO_SUM_TOLERANCE = 1e-9


def bases_with_a_sum(basis, tol=ZERO_SUM_TOLERANCE):
    """Indices ``b >= 1`` of basis images whose sum is not zero (``|sum| > tol``).

    An image whose raw sum is below ``SUM_EPSILON`` is only scaled to unit
    norm (docs/algorithm.md section 4); a high-degree term of a narrow Gaussian
    in a large kernel (for example ``x^6`` of a 0.7-pixel Gaussian with
    ``kernelSize`` 59) is such an image, and after scaling its sum is of
    order 1.
    """
    sums = np.abs(np.asarray(basis).sum(axis=(1, 2)))
    return [int(i) for i in np.flatnonzero(sums[1:] > tol) + 1]


def _warn_if_not_zero_sum(basis, sigmas, degrees, kernel_size):
    """Warn when the kernel sum is not carried by the first coefficient alone."""
    bad = bases_with_a_sum(basis)
    if not bad:
        return
    from .errors import ConditioningWarning, warn

    owners, first = [], 0
    for g, degree in enumerate(degrees):
        n = (int(degree) + 1) * (int(degree) + 2) // 2
        if any(first <= b < first + n for b in bad):
            owners.append(f"alardSigGauss[{g}]={float(sigmas[g]):g} (degree {int(degree)})")
        first += n
    warn(f"{len(bad)} basis images of {', '.join(owners)} in a {kernel_size}-pixel kernel are "
         "too small to be made zero-sum and keep a sum of order 1, so replacing the fitted a0 "
         "by kernelSum distorts the kernel; lower alardDegGauss for that Gaussian, widen it, or "
         "lower kernelSize", ConditioningWarning)


@dataclass(frozen=True)
class BasisChoice:
    """Widths, degrees and kernel size actually used, and how they were chosen."""

    sigmas: tuple
    degrees: tuple
    kernel_size: int
    mode: str  # "config", "convolution" or "deconvolution"


def basis_widths(config, template_sigma=None, reference_sigma=None):
    """Choose the basis widths and kernel size (docs/algorithm.md section 4, ``scaleByFwhm``).

    Parameters
    ----------
    config : ModelPsfMatchConfig
    template_sigma, reference_sigma : float, optional
        Gaussian-equivalent widths (FWHM / 2.3548, pixels) of the exposure PSF
        and of the reference PSF; needed only when ``config.scaleByFwhm``.
    """
    degrees = tuple(config.alardDegGauss)
    if not config.scaleByFwhm:
        return BasisChoice(tuple(config.alardSigGauss), degrees, config.kernelSize, "config")
    n = config.alardNGauss
    t, r = float(template_sigma), float(reference_sigma)
    if t == r:
        mode, sigmas = "config", list(config.alardSigGauss)
    else:
        if r > t:
            mode, big, small, min_sig = "convolution", r, t, config.alardMinSig
        else:
            mode, big, small, min_sig = "deconvolution", t, r, config.alardMinSigDeconv
        k = max(math.sqrt(big * big - small * small), min_sig)
        first = max(min_sig, k / config.alardGaussBeta) if n > 1 else k
        sigmas = [first]
        for _ in range(1, n):
            sigmas.append(sigmas[-1] * config.alardGaussBeta)
    size = int(config.kernelSizeFwhmScaling * sigmas[-1])
    if size % 2 == 0:
        size += 1
    size = min(max(size, config.kernelSizeMin), config.kernelSizeMax)
    if size % 2 == 0:
        # Clipping to an even bound would break the odd-size invariant; step
        # inside [kernelSizeMin, kernelSizeMax] where possible.
        size = size + 1 if size + 1 <= config.kernelSizeMax else size - 1
    log.info("scaleByFwhm: mode=%s widths=%s kernelSize=%d", mode,
             ", ".join(f"{s:.3f}" for s in sigmas), size)
    return BasisChoice(tuple(sigmas), degrees, size, mode)
