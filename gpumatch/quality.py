"""How well the solved kernel matches the PSFs."""

from __future__ import annotations

import numpy as np

from .backend import to_numpy
from .normal_equations import candidate_design_matrices, good_region

__all__ = ["candidate_residuals", "matched_psf_stamps"]


def matched_psf_stamps(cell_set, kernel):
    """Template stamps convolved with the normalised kernel at each candidate.

    Returns
    -------
    matched, target : ndarray (n, g, g)
        On the good region (``g = psf_size - k + 1``).
    """
    templates = to_numpy(cell_set.templates)
    K = kernel.compute_images(cell_set.xs, cell_set.ys, normalize=True)
    n, size, _ = templates.shape
    k = K.shape[1]
    # One "basis" per candidate: design matrices for each candidate's own kernel.
    matched = np.empty((n, size - k + 1, size - k + 1))
    for i in range(n):
        C = candidate_design_matrices(templates[i:i + 1], K[i:i + 1])
        matched[i] = C[0, :, 0].reshape(size - k + 1, size - k + 1)
    good = good_region(size, k)
    target = to_numpy(cell_set.targets)[:, good, good]
    return matched, target


def candidate_residuals(cell_set, kernel):
    """Relative L2 and max-abs residual of the matched PSF at every candidate."""
    matched, target = matched_psf_stamps(cell_set, kernel)
    diff = matched - target
    rel = np.sqrt((diff ** 2).sum(axis=(1, 2)) / (target ** 2).sum(axis=(1, 2)))
    mx = np.abs(diff).max(axis=(1, 2))
    return {
        "relative_l2": rel,
        "max_abs": mx,
        "relative_l2_median": float(np.median(rel)),
        "relative_l2_max": float(rel.max()),
        "max_abs_max": float(mx.max()),
    }
