"""How well the solved kernel matches the PSFs at every candidate."""

from __future__ import annotations

import numpy as np

from .backend import array_namespace, to_numpy
from .backends import backend_for_namespace
from .moments import SIGMA_TO_FWHM, adaptive_moments_batch
from .normal_equations import good_region
from .threads import map_in_threads, piece_size

__all__ = ["candidate_residuals", "matched_psf_stamps"]


def _correlate_each(stamps, kernels, xp=np):
    """Correlate stamp ``i`` with kernel ``i`` (docs/algorithm.md section 5 orientation).

    Returns the whole stamps ``(n, size, size)``, pixels outside the stamp
    taken as zero. Batched FFTs on the arrays' own device; on the host, in
    pieces shared out to the host threads (each stamp's result is the same
    bits in any piece), so that the transforms' temporaries stay small.
    """
    import scipy.fft  # not at import time: `import gpumatch` stays light

    backend = backend_for_namespace(xp)
    fft = backend.fft
    n, size, _ = stamps.shape
    k = kernels.shape[1]
    h = k // 2
    shape = (scipy.fft.next_fast_len(size + k - 1),) * 2

    def correlate(sl):
        # Correlation is convolution with the flipped kernel; the linear
        # convolution index t maps to output pixel t - h.
        conv = fft.irfft2(fft.rfft2(stamps[sl], shape) * fft.rfft2(kernels[sl, ::-1, ::-1], shape),
                          shape)
        return conv[:, h:h + size, h:h + size]

    if backend.on_device:
        return correlate(slice(None))
    out = np.empty((n, size, size))
    step = piece_size(n, least=32, most=64)

    def piece(i):
        out[i:i + step] = correlate(slice(i, i + step))

    map_in_threads(piece, range(0, n, step))
    return out


def matched_psf_stamps(cell_set, kernel, xp=np):
    """Template stamps correlated with the normalised kernel at each candidate.

    Parameters
    ----------
    xp : module
        ``numpy`` (default; NumPy arrays out) or ``cupy`` (the stamps stay on
        the device).

    Returns
    -------
    matched, target : array (n, psf_size, psf_size)
        Whole stamps; their good region (``good_region(psf_size, k)``) is
        where the kernel footprint stays inside the template stamp.
    """
    backend = backend_for_namespace(xp)
    templates, targets = backend.asarray(cell_set.templates), backend.asarray(cell_set.targets)
    K = xp.asarray(kernel.compute_images(cell_set.xs, cell_set.ys, normalize=True))
    return _correlate_each(templates, K, xp), targets


def candidate_residuals(cell_set, kernel):
    """Matched-PSF quality at every candidate.

    Returns
    -------
    dict
        ``relative_l2`` and ``max_abs`` (per candidate, on the good region),
        ``fwhm_matched``, ``fwhm_reference`` and ``fwhm_exposure`` (the
        exposure PSF's; per candidate, adaptive moments of the whole stamps,
        pixels), and summaries.
    """
    # On the device when the stamps are there: only per-candidate numbers come back.
    xp = array_namespace(cell_set.templates)
    full_m, full_t = matched_psf_stamps(cell_set, kernel, xp)
    # The good region of the whole-stamp correlation is the good-region result.
    good = good_region(full_m.shape[1], kernel.dimensions[0])
    diff = full_m[:, good, good] - full_t[:, good, good]
    target = full_t[:, good, good]
    rel = to_numpy(xp.sqrt((diff ** 2).sum(axis=(1, 2)) / (target ** 2).sum(axis=(1, 2))))
    mx = to_numpy(xp.abs(diff).max(axis=(1, 2)))
    n = len(full_m)
    # A spatially constant reference (the usual case) is measured once; the
    # exposure PSF (template) stamps in the same batch tell a deconvolution.
    constant_ref = bool((full_t == full_t[:1]).all())
    n_ref = 1 if constant_ref else n
    templates = backend_for_namespace(xp).asarray(cell_set.templates)
    mom = adaptive_moments_batch(xp.concatenate([full_m, full_t[:n_ref], templates]), xp=xp)
    radius = to_numpy((mom[:, 2] * mom[:, 3] - mom[:, 4] ** 2) ** 0.25 * SIGMA_TO_FWHM)
    fm = radius[:n]
    ft = np.full(n, radius[n]) if constant_ref else radius[n:n + n_ref]
    fx = radius[n + n_ref:]
    ratio = fm / ft
    worst = int(np.nanargmax(np.abs(ratio - 1))) if np.isfinite(ratio).any() else 0
    return {
        "relative_l2": rel,
        "max_abs": mx,
        "fwhm_matched": fm,
        "fwhm_reference": ft,
        "fwhm_exposure": fx,
        "relative_l2_median": float(np.median(rel)),
        "relative_l2_max": float(rel.max()),
        "max_abs_max": float(mx.max()),
        "fwhm_ratio_median": float(np.nanmedian(ratio)),
        "fwhm_ratio_worst": float(ratio[worst]),
    }
