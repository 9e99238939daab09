"""The verdict on a match: is the result good enough to use?

Every result of :meth:`ModelPsfMatchTask.run` and :func:`gpumatch.match_many`
carries ``metadata["matchQuality"]``:

``"good"``
    At every candidate the matched PSF is within ``maxMatchedPsfResidual``
    (relative L2) of the reference and its FWHM within ``maxFwhmError``
    (relative) of the reference's.
``"poor"``
    The kernel was solved and applied but does not reach the reference (too
    small a kernel or basis for the two PSFs, or a reference narrower than
    the exposure PSF, which needs a deconvolution the basis cannot do).
``"failed"``
    The output has no valid pixel (the exposure is no larger than the kernel
    and its edges, or NaN input pixels spread over the whole interior), or the
    quality measurements are not finite: nothing in it can be used.

``metadata["matchQualityReason"]`` is one line with the numbers and the fix.
The rules are docs/algorithm.md section 12; the quality figures themselves are those of
section 8.
"""

from __future__ import annotations

import numpy as np

from .backend import array_namespace, to_numpy
from .errors import ConditioningWarning, PoorMatchError, PoorMatchWarning, warn

__all__ = ["ON_POOR_MATCH", "match_verdict", "valid_pixel_count",
           "conditioning_threat", "apply_policy",
           "check_on_poor_match", "warn_conditioning", "judge"]

#: Accepted values of ``on_poor_match``.
ON_POOR_MATCH = ("warn", "raise", "ignore")

# The fix named for a match that does not reach the reference: the recommended
# settings choose kernel and basis from the two PSFs (docs/algorithm.md section 15).
_SETTINGS_FIX = ("a larger kernelSize and wider alardSigGauss (now kernelSize={k}, widest "
                 "width {w:g} px), or the recommended settings "
                 "ModelPsfMatchConfig.for_psfs(exposure_psf, reference) (on the command line: "
                 "without --lsst-defaults)")


def valid_pixel_count(image, kernel_size):
    """Finite pixels of a matched image inside its kernel-sized edges.

    The edge (``kernel_size // 2`` pixels on each side) is never valid, so an
    exposure no larger than the kernel gives 0 without looking at a pixel;
    otherwise the interior is counted where it lies (host or device), which
    also catches NaN input pixels spread over it by the application.

    Returns
    -------
    valid, interior : int
        Finite interior pixels and the interior's size (pixels).
    """
    ny, nx = image.shape
    h = int(kernel_size) // 2
    iy, ix = max(ny - 2 * h, 0), max(nx - 2 * h, 0)
    if iy == 0 or ix == 0:
        return 0, 0
    xp = array_namespace(image)
    valid = int(to_numpy(xp.count_nonzero(xp.isfinite(image[h:ny - h, h:nx - h]))))
    return valid, iy * ix


def conditioning_threat(cond_equilibrated, rank, n_unknowns):
    """The reason the spatial solution is threatened by its conditioning, or None.

    The solution is threatened when the equilibrated system is singular to
    working precision: an eigenvalue below ``n eps lambda_max`` (the solver's
    own rank tolerance, so directions were dropped and the kernel there is
    the least-norm choice, not the data's), i.e. ``n eps cond >= 1``.
    Below that the fit (the matched PSF) carries rounding errors of order
    ``eps sqrt(cond)``: ``gpumatch example`` has an equilibrated condition
    number of 1e12 (raw 5e12) and a matched-PSF residual of 6e-4, and its
    coefficients move by 1e-4 relative under 1e-15 perturbations of the
    system without changing the match.
    """
    eps = np.finfo(np.float64).eps
    singular = not np.isfinite(cond_equilibrated) or n_unknowns * eps * cond_equilibrated >= 1.0
    if rank >= n_unknowns and not singular:
        return None
    return (f"the spatial system is singular to working precision (equilibrated condition "
            f"number {cond_equilibrated:.3g}, rank {rank} of {n_unknowns}): the candidates do "
            f"not determine {n_unknowns - rank or 'some'} direction(s) of the spatial kernel, "
            f"which the solver sets to the least-norm choice; lower spatialKernelOrder, use "
            f"smaller cells (sizeCellX/sizeCellY, more candidates) or fewer basis functions")


def _deconvolution(md):
    """``(n_deconvolved, widest exposure FWHM)``: candidates whose reference is
    narrower than the exposure PSF (adaptive-moment FWHM of the stamps, pixels)."""
    fwhm_t = np.asarray(md["candidateFwhmExposure"], dtype=float)
    fwhm_r = np.asarray(md["candidateFwhmReference"], dtype=float)
    ok = np.isfinite(fwhm_t) & np.isfinite(fwhm_r)
    if not ok.any():
        return 0, float("nan")
    return int(np.count_nonzero(fwhm_r[ok] < fwhm_t[ok])), float(fwhm_t[ok].max())


def match_verdict(md, config, image):
    """The verdict on one match, from its metadata and matched image.

    Parameters
    ----------
    md : dict
        The result's metadata (``matchedPsfRelL2Max``,
        ``matchedPsfFwhmRatioWorst``, ``candidateFwhmReference``,
        ``candidateFwhmExposure``,
        ``ALKernelSize``, ``ALBasisSigGauss``, ``numKernelCandidates``).
    config : ModelPsfMatchConfig
        ``maxMatchedPsfResidual`` and ``maxFwhmError``.
    image : array (ny, nx)
        The matched image (host or device).

    Returns
    -------
    quality : {"good", "poor", "failed"}
    reason : str
        One line: the numbers and the fix.
    valid : int
        Valid (finite, interior) output pixels.
    """
    k = md["ALKernelSize"]
    valid, interior = valid_pixel_count(image, k)
    ny, nx = image.shape
    if interior == 0:
        return "failed", (
            f"no valid output pixel: the {nx}x{ny} exposure is no larger than the {k}x{k} kernel "
            f"and its {k // 2}-pixel edges; use a kernelSize well below {min(nx, ny)} or a "
            f"larger exposure"), 0
    if valid == 0:
        return "failed", (
            f"no valid output pixel: every one of the {interior} interior pixels is NaN (NaN "
            f"input pixels spread over the {k}x{k} kernel footprint); replace or mask the "
            f"input's NaN pixels before matching"), 0
    resid, ratio = md["matchedPsfRelL2Max"], md["matchedPsfFwhmRatioWorst"]
    n = md["numKernelCandidates"]
    if not (np.isfinite(resid) and np.isfinite(ratio)):
        return "failed", (
            f"the matched-PSF quality is not finite (worst relative L2 {resid:.3g}, FWHM ratio "
            f"{ratio:.3g}): the kernel cannot be trusted; check the PSF models for NaN or "
            f"empty stamps"), valid
    max_res, max_fwhm = config.maxMatchedPsfResidual, config.maxFwhmError
    numbers = (f"worst matched-PSF residual {resid:.3g} (maxMatchedPsfResidual={max_res:g}), "
               f"worst FWHM ratio {ratio:.4f} (maxFwhmError={max_fwhm:g})")
    if resid <= max_res and abs(ratio - 1.0) <= max_fwhm:
        return "good", f"{numbers} over {n} candidates", valid
    n_dec, fwhm_t = _deconvolution(md)
    if n_dec:
        fwhm_r = float(np.min(md["candidateFwhmReference"]))
        return "poor", (
            f"deconvolution: the reference (FWHM {fwhm_r:.2f} px) is narrower than the exposure "
            f"PSF (FWHM up to {fwhm_t:.2f} px) at {n_dec} of {n} candidates: a deconvolution "
            f"this basis cannot do; {numbers}; use a reference wider than {fwhm_t:.2f} px "
            f"everywhere"), valid
    widest = max(md["ALBasisSigGauss"])
    return "poor", (f"the kernel does not reach the reference: {numbers}; use "
                    + _SETTINGS_FIX.format(k=k, w=widest)), valid


def apply_policy(result, on_poor_match, stacklevel=3):
    """Act on a result's verdict as ``on_poor_match`` says.

    ``"warn"``: a :class:`~gpumatch.errors.PoorMatchWarning` (and a log line)
    for a poor or failed verdict; ``"raise"``: :class:`PoorMatchError`
    carrying ``result``; ``"ignore"``: nothing (the verdict stays in the
    metadata). Returns ``result``.
    """
    md = result.metadata
    quality = md.get("matchQuality", "good")
    if quality == "good" or on_poor_match == "ignore":
        return result
    word = "poor match" if quality == "poor" else "failed match (nothing usable)"
    message = f"{word}: {md['matchQualityReason']}"
    if on_poor_match == "raise":
        raise PoorMatchError(message, result)
    warn(message, PoorMatchWarning, stacklevel=stacklevel)
    return result


def check_on_poor_match(value):
    """Refuse an ``on_poor_match`` that is not one of :data:`ON_POOR_MATCH`."""
    if value not in ON_POOR_MATCH:
        raise ValueError(f"on_poor_match={value!r} must be one of "
                         f"{', '.join(repr(v) for v in ON_POOR_MATCH)}")
    return value


def warn_conditioning(md):
    """:class:`~gpumatch.errors.ConditioningWarning` when :func:`conditioning_threat` says so."""
    why = conditioning_threat(md["spatialConditionNumEquilibrated"], md["spatialSolveRank"],
                              md["numSpatialUnknowns"])
    if why is not None:
        warn(why, ConditioningWarning, stacklevel=7)  # the caller of ModelPsfMatchTask.run
    return why


def judge(md, config, solution, image):
    """Add the verdict and the equilibrated condition number to ``md`` (in place).

    Keys added: ``spatialConditionNumEquilibrated`` (the solution's, unless
    already there), ``matchQuality``, ``matchQualityReason`` and ``numValidPixels``.
    """
    md.setdefault("spatialConditionNumEquilibrated",
                  float(solution.equilibrated_condition_number))
    quality, reason, valid = match_verdict(md, config, image)
    md.update(matchQuality=quality, matchQualityReason=reason, numValidPixels=valid)
    return md
