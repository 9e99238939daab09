"""Recommended settings: a configuration chosen from the two PSFs (docs/algorithm.md section 15).

:meth:`ModelPsfMatchConfig.for_psfs` measures the exposure PSF on a 3 x 3 grid
over the detector and the reference PSF, works out the ideal matching kernel
(the reference deconvolved by the exposure PSF) at each position, and chooses

- ``kernelSize``: the smallest odd size whose cut of the ideal kernels still
  reproduces the reference (wings included) to a fifth of the target at every
  position (or to within half the target of the largest allowed size);
- ``alardSigGauss``: widths from the core of the narrowest ideal kernel to a
  sixth of the kernel size, none narrower than the core, so the fit has no
  narrow high-degree terms to spend on a checkerboard that only adds noise
  (docs/algorithm.md section 4);
- ``alardDegGauss``: degree 2, enough for the kernel's change of width and
  shape across the detector.

It then solves the match on a coarse 5 x 5 grid of candidates (no image needed,
:func:`evaluate_config`) and, while the worst residual or FWHM error is above
half the target, escalates: where the ideal kernels are elongated (an
elliptical exposure PSF matched to a round reference), it shapes them with a
Gaussian as wide as their long axis of degree 6 and one 1.5 times wider of
degree 4, on stamps padded so that the fit's good region holds the reference
out to five of its widths, and with one more spatial order; otherwise it adds
a narrower Gaussian of degree 4.
Then it grows the kernel, up to ``kernelSizeMax`` (:data:`DEFAULT_MAX_KERNEL`
unless given). The first setting within 80% of the targets is taken, else the
best one. What it expects is kept in :class:`Recommendation`
(``config.recommendation``); when no setting reaches the target, a
:class:`PoorMatchWarning` says so with the residual it expects. Other settings
keep ``autoPadPsfTo = 1.4`` (padding to 2.0 gained little there at several
times the cost, see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .basis import alard_lupton_basis, bases_with_a_sum
from .errors import GpumatchError, PoorMatchWarning, warn
from .moments import adaptive_moments_batch
from .pixels import Box
from .psf.base import pad_or_crop

log = logging.getLogger("gpumatch")

__all__ = ["Recommendation", "recommend_config", "evaluate_config", "ideal_kernel",
           "ideal_noise_gain",
           "detector_box", "recommended_per_exposure", "task_for_exposure"]


#: Largest kernel the recommended mode chooses unless ``kernelSizeMax`` is given (pixels).
DEFAULT_MAX_KERNEL = 71

#: Fraction of the targets at which the coarse check stops escalating, and the
#: fraction within which the first (smallest) setting tried is taken: room for
#: the real run's finer candidate grid.
MARGIN = 0.5
ACCEPT = 0.8

#: Axis ratio (minor over major axis of the adaptive moments) below which an
#: ideal kernel counts as elongated, and the basis of :func:`recommend_config`'s
#: second setting shapes it (docs/algorithm.md section 15.3).
ELONGATED = 0.8

#: Polynomial degree of the first Gaussian that shapes an elongated kernel (the
#: second gets degree 4: two of degree 6 at widths 1.5 apart are so nearly
#: collinear that the spatial system becomes singular to working precision),
#: and the reference's extent, in its widths from the centre, that the fit's
#: good region covers with them (see :func:`_pad_for`).
SHAPE_DEGREE = 6
SHAPE_GOOD_WIDTHS = 5.0


def _within(got, max_res, max_fwhm):
    return got["residual"] <= max_res and abs(got["fwhm_ratio"] - 1) <= max_fwhm


@dataclass
class Recommendation:
    """What :func:`recommend_config` chose and expects (attached as ``config.recommendation``).

    Attributes
    ----------
    reached : bool
        Whether the coarse check reached both targets.
    residual, fwhm_ratio : float
        Worst matched-PSF relative L2 residual and worst FWHM ratio expected
        (coarse candidate grid).
    noise_variance_gain, ideal_noise_variance_gain : float
        Sum of the squared normalised kernel at the detector centre, for the
        chosen kernel and for the ideal matching kernel (NaN where that is
        unbounded, see :func:`ideal_noise_gain`).
    exposure_sigma, reference_sigma : (float, float) and float
        Smallest and largest determinant radius of the exposure PSF over the
        detector, and that of the reference (pixels).
    tried : list of dict
        Every configuration tried with what it reached.
    """

    reached: bool
    residual: float
    fwhm_ratio: float
    noise_variance_gain: float
    ideal_noise_variance_gain: float
    exposure_sigma: tuple
    reference_sigma: float
    max_residual: float
    max_fwhm_error: float
    tried: list = field(default_factory=list)

    def summary(self):
        """One line: what the recommended settings are expected to reach."""
        verdict = "reaches" if self.reached else "does NOT reach"
        ideal = self.ideal_noise_variance_gain
        ideal = "unbounded" if math.isnan(ideal) else format(ideal, ".4g")
        return (f"recommended settings {verdict} the target (residual <= {self.max_residual:g}, "
                f"FWHM within {self.max_fwhm_error:g}): expected worst residual "
                f"{self.residual:.3g}, FWHM ratio {self.fwhm_ratio:.4f}, noise variance gain "
                f"{self.noise_variance_gain:.4g} (ideal kernel {ideal})")


class _Footprint:
    """What the cell set needs of an exposure: a bounding box and a PSF (no pixels)."""

    image = None

    def __init__(self, bbox, psf):
        self.bbox, self.psf = bbox, psf

    @property
    def shape(self):
        """``(ny, nx)`` of the detector it stands for (the run's memory check reads it)."""
        return self.bbox.height, self.bbox.width


def detector_box(psf, bbox=None):
    """The detector area over which ``psf`` is measured (parent pixels).

    ``bbox`` when given (an :class:`Box`); else the model's own domain
    (``VaryingGaussianPsf.bbox``, a PSFEx model's polynomial domain); else a
    small box at the model's average position (a model that does not say
    where it applies is taken as constant).
    """
    if bbox is not None:
        return bbox
    dom = getattr(psf, "bbox", None)
    if isinstance(dom, Box):
        return dom
    if dom is not None and len(dom) == 4:
        x0, y0, x1, y1 = dom
        return Box(int(math.floor(x0)), int(math.floor(y0)), int(x1 - x0) + 1, int(y1 - y0) + 1)
    polscal = getattr(psf, "polscal", None)
    if polscal is not None and getattr(psf, "degree", 0) > 0:
        cx, cy = psf.average_position
        w, h = int(round(polscal[0])), int(round(polscal[1]))
        return Box(int(round(cx - w / 2)), int(round(cy - h / 2)), w, h)
    cx, cy = psf.average_position or (0.0, 0.0)
    return Box(int(round(cx)) - 64, int(round(cy)) - 64, 128, 128)


def _stamps(psf, xs, ys, size):
    """Stamps of ``psf`` at ``(xs, ys)`` rendered (or padded) to ``size x size``, sum 1."""
    model = psf.resized(size, size) if hasattr(psf, "resized") else psf
    raw = model.compute_kernel_images(np.asarray(xs, float), np.asarray(ys, float))
    out = np.stack([pad_or_crop(np.asarray(s, dtype=np.float64), size, size) for s in raw])
    return out / out.sum(axis=(1, 2), keepdims=True)


def _radii(stamps):
    mom = adaptive_moments_batch(stamps)
    return (mom[:, 2] * mom[:, 3] - mom[:, 4] ** 2) ** 0.25


def _axes(stamps):
    """Major- and minor-axis widths (pixels) of each stamp's adaptive moments
    (square roots of the eigenvalues of the second-moment matrix; NaN where the
    moments do not converge)."""
    mom = adaptive_moments_batch(stamps)
    half = (mom[:, 2] + mom[:, 3]) / 2
    split = np.hypot((mom[:, 2] - mom[:, 3]) / 2, mom[:, 4])
    return np.sqrt(half + split), np.sqrt(np.maximum(half - split, 0.0))


def ideal_kernel(template, target, rcond=1e-6):
    """The kernel ``K`` whose convolution with ``template`` gives ``target``, by
    Fourier division.

    ``K`` is in convolution orientation (``target = template`` convolved with
    ``K``, as :func:`_truncation_residuals` applies it); as a correlation
    kernel in the orientation of docs/algorithm.md section 5 it is ``K``
    flipped in both axes (``K[::-1, ::-1]``).

    Parameters
    ----------
    template, target : 2-d arrays, same odd shape
        Exposure-PSF and reference-PSF stamps (sum 1).
    rcond : float
        Frequencies where ``|FT(template)|`` is below ``rcond`` times its peak
        are damped (Wiener), so a model with noise does not blow up.

    Returns
    -------
    ndarray
        The kernel, same shape, centred on the middle pixel, sum 1.
    """
    t = np.fft.fft2(np.fft.ifftshift(template))
    r = np.fft.fft2(np.fft.ifftshift(target))
    eps = (rcond * np.abs(t).max()) ** 2
    k = np.fft.fftshift(np.real(np.fft.ifft2(r * np.conj(t) / (np.abs(t) ** 2 + eps))))
    return k / k.sum()


def ideal_noise_gain(template, target):
    """Sum of the squared ideal kernel (:func:`ideal_kernel`), or NaN where it is
    unbounded: where the reference has more power than the exposure PSF at high
    frequencies (a Moffat core against a Gaussian), exact matching deconvolves and
    the sum grows without limit as the damping is lowered."""
    gains = [float((ideal_kernel(template, target, rcond) ** 2).sum()) for rcond in (1e-6, 1e-9)]
    return gains[0] if abs(gains[1] - gains[0]) <= 0.01 * gains[0] else math.nan


def _truncation_residuals(templates, target, kernels, sizes):
    """Worst relative L2 residual over positions of ``template (*) kernel`` against
    ``target`` with each kernel cut to ``s x s`` and renormalised, for each ``s``.

    ``templates`` and ``kernels`` are ``(n, m, m)`` stacks (one per position),
    ``target`` one ``(m, m)`` stamp, all centred on their middle pixel.
    """
    import scipy.fft

    m = kernels.shape[-1]
    shift = (-(m // 2), -(m // 2))
    ft = scipy.fft.rfft2(np.roll(templates, shift, axis=(1, 2)))
    centre = np.abs(np.arange(m) - m // 2)
    worst = []
    for s in sizes:
        inside = (centre[:, None] <= s // 2) & (centre[None, :] <= s // 2)
        cut = kernels * inside
        cut = cut / cut.sum(axis=(1, 2), keepdims=True)
        matched = scipy.fft.irfft2(ft * scipy.fft.rfft2(np.roll(cut, shift, axis=(1, 2))),
                                   s=(m, m))
        matched = np.roll(matched, (m // 2, m // 2), axis=(1, 2))
        worst.append(float(np.sqrt(((matched - target) ** 2).sum(axis=(1, 2))
                                   / (target ** 2).sum()).max()))
    return np.array(worst)


def _grid_cells(area, nx, ny):
    """Cell sizes ``(cx, cy)`` and the footprint whose cells (docs/algorithm.md
    section 3: centres of the cells of the footprint grown by one cell) put
    ``nx x ny`` candidates from one corner of ``area`` to the opposite one."""
    cx = max(32, -(-(area.width - 1) // (nx - 1)))
    cy = max(32, -(-(area.height - 1) // (ny - 1)))
    return cx, cy, Box(area.x0 + cx // 2, area.y0 + cy // 2, (nx - 2) * cx, (ny - 2) * cy)


def evaluate_config(config, exposure_psf, reference, bbox, grid=(5, 5)):
    """Solve the match on a coarse candidate grid and measure it (no image needed).

    Parameters
    ----------
    config : ModelPsfMatchConfig
    exposure_psf, reference : Psf
    bbox : Box
        The detector area (parent pixels).
    grid : (int, int)
        Candidates from corner to corner (>= 3 each way) of ``bbox`` grown by
        half a cell of ``config`` (``sizeCellX // 2``, ``sizeCellY // 2``): a
        real run's candidates lie on a finer grid over that area, the centres
        of the cells of ``bbox`` grown by one cell (docs/algorithm.md section 3).

    Returns
    -------
    dict
        ``residual`` (worst relative L2), ``fwhm_ratio`` (worst),
        ``noise_variance_gain`` (at the centre of ``bbox``).
    """
    from .kernel import SpatialKernel
    from .quality import candidate_residuals
    from .stages import StageContext, solve_exposure

    nx, ny = (max(3, int(g)) for g in grid)
    area = bbox.grown(config.sizeCellX // 2, config.sizeCellY // 2)
    cx_, cy_, footprint = _grid_cells(area, nx, ny)
    cfg = config.copy(sizeCellX=cx_, sizeCellY=cy_)
    state = solve_exposure(StageContext.on(cfg, "numpy"), _Footprint(footprint, exposure_psf),
                           reference, 1.0)
    kernel = SpatialKernel(state.basis, state.sf, state.solution.coefficients)
    q = candidate_residuals(state.cell_set, kernel)
    cx, cy = bbox.center
    return {"residual": q["relative_l2_max"], "fwhm_ratio": q["fwhm_ratio_worst"],
            "noise_variance_gain": float(kernel.noise_variance_gain(cx, cy))}


def _odd(v):
    v = int(math.ceil(v))
    return v if v % 2 else v + 1


def _odd_fast_length(n):
    """The smallest odd number >= ``n`` with no prime factor above 7 (fast FFTs)."""
    n = _odd(n)
    while True:
        m = n
        for p in (3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 2


def _widths(core, outer, max_ratio=2.5):
    """Gaussian widths from ``core`` to ``outer`` (pixels), successive ratio <= ``max_ratio``."""
    if outer <= core * 1.25:
        return (core,)
    n = int(math.ceil(math.log(outer / core) / math.log(max_ratio)))
    return tuple(core * (outer / core) ** (i / n) for i in range(n + 1))


def _pad_for(size, good):
    """The smallest ``autoPadPsfTo`` (at least 1.4, LSST's, and at most 2.0, the
    largest allowed; two decimals) whose stamps give a ``size``-pixel kernel a
    good region (docs/algorithm.md section 6) at least ``good`` pixels wide."""
    pad = math.ceil(100 * (size - 1 + good) / size) / 100
    return min(2.0, max(1.4, pad))


def _more_order(box, config):
    """1 when a run over ``box`` has more than twice as many candidates as the
    spatial terms of ``config.spatialKernelOrder + 1`` (docs/algorithm.md section 3
    counts the cells of the box grown by one cell; section 8.3 calls fewer
    poorly constrained), else 0."""
    nx = (box.width + 2 * config.sizeCellX) // config.sizeCellX
    ny = (box.height + 2 * config.sizeCellY) // config.sizeCellY
    o = config.spatialKernelOrder + 1
    return int(nx * ny > (o + 1) * (o + 2))


def _zero_sum_degrees(size, sigmas, degrees):
    """``degrees``, or the same capped at 4, or all 2: the first whose basis in a
    ``size``-pixel kernel has no image with a sum after image 0 (a high-degree
    term of a narrow Gaussian in a large kernel keeps one, and the fit's a0 then
    no longer carries the kernel sum, see :func:`gpumatch.basis.bases_with_a_sum`)."""
    sigmas = tuple(round(s, 3) for s in sigmas)
    for option in (tuple(degrees), tuple(min(d, 4) for d in degrees), (2,) * len(degrees)):
        if not bases_with_a_sum(alard_lupton_basis(size, sigmas, option)):
            return option
    return (2,) * len(degrees)


def recommend_config(cls, exposure_psf, reference, bbox=None, overrides=None):
    """The configuration behind :meth:`ModelPsfMatchConfig.for_psfs` (see the module text)."""
    overrides = dict(overrides or {})
    base = cls(**{k: v for k, v in overrides.items()
                  if k not in ("kernelSize", "alardNGauss", "alardSigGauss", "alardDegGauss")})
    max_res = float(getattr(base, "maxMatchedPsfResidual", 0.01))
    max_fwhm = float(getattr(base, "maxFwhmError", 0.01))
    k_max = int(overrides.get("kernelSizeMax", DEFAULT_MAX_KERNEL))
    k_max = k_max if k_max % 2 else k_max - 1
    box = detector_box(exposure_psf, bbox)

    # The exposure PSF on a 3 x 3 grid over the detector: the narrowest one
    # needs the widest kernel, the widest one the narrowest kernel core.
    gx = np.linspace(box.x0, box.x1, 3)
    gy = np.linspace(box.y0, box.y1, 3)
    xs, ys = (a.ravel() for a in np.meshgrid(gx, gy))
    w_exp = max(exposure_psf.dimensions(float(xs[4]), float(ys[4])))
    w_ref = max(reference.dimensions(*(reference.average_position or box.center)))
    n = _odd_fast_length(2 * max(w_exp, w_ref) + 2 * k_max)
    templates = _stamps(exposure_psf, xs, ys, n)
    target = _stamps(reference, [xs[4]], [ys[4]], n)[0]
    t_radii = _radii(templates)
    r_sigma = float(_radii(target[None])[0])
    wide = int(np.argmax(t_radii))

    # Kernel size: the ideal kernel, cut to the size, must leave well under the
    # target at every position, or within half the target of what the largest
    # allowed size leaves: a model with a cut-off edge, such as PSFEx, has an
    # ideal kernel that rings out to the stamp's edge, which no kernel of useful
    # size follows (and the matched-PSF residual is measured on the stamp's
    # centre, docs/algorithm.md section 8).
    ideals = np.stack([ideal_kernel(t, target) for t in templates])
    floor = _truncation_residuals(templates, target, ideals, [k_max])[0]
    lo, hi = 5, k_max // 2  # half sizes: the first that meets the bound, by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        if _truncation_residuals(templates, target, ideals, [2 * mid + 1])[0] \
                <= max(0.2 * max_res, floor + 0.5 * max_res):
            hi = mid
        else:
            lo = mid + 1
    size = 2 * lo + 1
    # Widths: from the core of the narrowest ideal kernel to the wings of the widest.
    ideal_gain = ideal_noise_gain(templates[4], target)
    m = 4 * _odd(r_sigma) + 1
    core = max(0.7, float(_radii(pad_or_crop(ideals[wide], m, m)[None])[0]))
    outer = max(core, size / 6.0)
    sigmas = _widths(core, outer)
    degrees = (2,) * len(sigmas)
    order = None  # the configuration's spatialKernelOrder, until a shaping setting
    # An elongated ideal kernel (an elliptical exposure PSF matched to a round
    # reference) is narrow along one axis only: isotropic Gaussians of low degree
    # cannot follow it, narrow ones fit a checkerboard; a Gaussian as wide as its
    # long axis times a polynomial of high degree narrows it along the short one.
    major, minor = _axes(pad_or_crop(ideals, m, m))
    good_min = 2 * math.ceil(SHAPE_GOOD_WIDTHS * r_sigma) + 1
    elongated = bool(np.any(minor / major < ELONGATED))  # moments that failed are NaN
    long_axis = float(np.max(major[np.isfinite(minor / major)])) if elongated else math.nan
    tried = []
    best, candidates = None, []
    for attempt in range(4):
        fields = {"kernelSize": size, "alardNGauss": len(sigmas),
                  "alardSigGauss": tuple(round(s, 3) for s in sigmas),
                  "alardDegGauss": _zero_sum_degrees(size, sigmas, degrees)}
        if order is not None:
            fields.update(autoPadPsfTo=_pad_for(size, good_min), spatialKernelOrder=order)
        fields.update(overrides)
        fields.setdefault("kernelSizeMax", max(k_max, int(fields["kernelSize"])))
        cfg = cls(**fields)
        try:
            got = evaluate_config(cfg, exposure_psf, reference, box)
        except (np.linalg.LinAlgError, ValueError, GpumatchError) as exc:
            log.debug("recommend: %s failed: %s", fields, exc)
            got = {"residual": math.inf, "fwhm_ratio": math.nan,
                   "noise_variance_gain": math.nan}
        tried.append({"kernelSize": cfg.kernelSize, "alardSigGauss": cfg.alardSigGauss,
                      "alardDegGauss": cfg.alardDegGauss, "autoPadPsfTo": cfg.autoPadPsfTo,
                      "spatialKernelOrder": cfg.spatialKernelOrder, **got})
        log.debug("recommend: tried %s", tried[-1])
        candidates.append((cfg, got))
        ok = _within(got, MARGIN * max_res, MARGIN * max_fwhm) or (
            attempt > 0 and _within(got, ACCEPT * max_res, ACCEPT * max_fwhm))
        if best is None or got["residual"] < best[1]["residual"]:
            best = (cfg, got)
        if ok or (attempt > 0 and size == k_max and fields["kernelSize"] == k_max):
            break
        if attempt == 0 and elongated:
            # Shape the elongated kernel (see above), on stamps padded so that
            # the fit's good region holds the reference out to five of its
            # widths: there the fit pins the matched PSF's flux, so its a0 is
            # the kernel sum; on a narrower region the polynomial's wings put
            # flux outside it, and replacing a0 by the kernel sum distorts the
            # kernel (37% with a 15-pixel good region on DES, 0.7% with 27).
            # One more spatial order where the run has the candidates for it
            # (_more_order): the kernel's short axis,
            # sqrt(r^2 - a^2) for a PSF long axis a close to the reference's r,
            # changes much faster across the detector than the PSF itself
            # (docs/algorithm.md section 15.3).
            shaped = (long_axis, 1.5 * long_axis)
            sigmas = shaped + (_widths(shaped[1], outer)[1:] if outer > 1.25 * shaped[1] else ())
            degrees = (SHAPE_DEGREE, 4) + (2,) * (len(sigmas) - 2)
            order = base.spatialKernelOrder + _more_order(box, base)
            continue
        # Escalate: a narrower first width for structure finer than the core,
        # then a larger kernel; degree 4 on the first width from now on.
        if attempt == 0 and core / 2 >= 0.7:
            sigmas = (core / 2,) + tuple(sigmas)
        else:
            size = min(k_max, _odd(size * 1.25 + 1))
        if attempt == 0:
            degrees = (4,) + (2,) * (len(sigmas) - 1)
    # The first (smallest, least noisy) setting within ACCEPT of the targets, else
    # the one with the smallest residual.
    cfg, got = next((c for c in candidates if _within(c[1], ACCEPT * max_res, ACCEPT * max_fwhm)),
                    best)
    rec = Recommendation(
        reached=_within(got, max_res, max_fwhm),
        residual=got["residual"], fwhm_ratio=got["fwhm_ratio"],
        noise_variance_gain=got["noise_variance_gain"], ideal_noise_variance_gain=ideal_gain,
        exposure_sigma=(float(t_radii.min()), float(t_radii.max())), reference_sigma=r_sigma,
        max_residual=max_res, max_fwhm_error=max_fwhm, tried=tried)
    cfg.recommendation = rec
    log.info("%s; kernelSize=%d, alardSigGauss=%s, alardDegGauss=%s", rec.summary(),
             cfg.kernelSize, cfg.alardSigGauss, cfg.alardDegGauss)
    if not rec.reached:
        warn(f"{rec.summary()} with kernels up to kernelSizeMax={k_max} px; raise "
             f"kernelSizeMax or choose a reference wider than the exposure PSF "
             f"(exposure PSF sigma {rec.exposure_sigma[0]:.3g} to {rec.exposure_sigma[1]:.3g} "
             f"px, reference {r_sigma:.3g} px)", PoorMatchWarning)
    return cfg


def recommended_per_exposure(config, overrides):
    """Mark ``config`` so that :func:`task_for_exposure` replaces it, for each
    exposure, by :meth:`ModelPsfMatchConfig.for_psfs` with ``overrides`` on top
    (the command line's default mode). Returns ``config``."""
    config.recommend_overrides = dict(overrides or {})
    return config


def task_for_exposure(task, exposure, reference):
    """``task``, its configuration recommended for ``exposure`` when marked by
    :func:`recommended_per_exposure` (the mark is kept, so the next exposure
    gets its own); an unmarked task is returned unchanged."""
    overrides = getattr(task.config, "recommend_overrides", None)
    if overrides is None:
        return task
    config = type(task.config).for_psfs(exposure.psf, reference, bbox=exposure.bbox, **overrides)
    task.config = recommended_per_exposure(config, overrides)
    return task
