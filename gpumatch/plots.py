"""Diagnostic figures (the reference's debug displays, saved as files).

Needs matplotlib (``pip install gpumatch[plots]``); imported only when used.
"""

from __future__ import annotations

import os

import numpy as np

from .backend import to_numpy
from .io._atomic import atomic_write
from .quality import candidate_residuals

__all__ = ["save_diagnostic_figures", "plot_cells", "plot_kernel_mosaic", "plot_residual_map",
           "plot_basis", "plot_spatial_coefficients"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("diagnostic figures need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, overwrite=True):
    """Write a figure atomically (temporary file, then rename)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"),
                        overwrite=overwrite, what="figure")


#: ``result.metadata`` keys of the per-candidate residuals, by ``candidate_residuals`` key.
_RESIDUAL_KEYS = {"relative_l2": "candidateRelL2", "max_abs": "candidateMaxAbs",
                  "fwhm_matched": "candidateFwhmMatched",
                  "fwhm_reference": "candidateFwhmReference"}


def _candidate_residuals(result):
    """The per-candidate residuals the run measured (recomputed only when absent)."""
    md = getattr(result, "metadata", None) or {}
    if all(key in md for key in _RESIDUAL_KEYS.values()):
        return {name: np.asarray(md[key]) for name, key in _RESIDUAL_KEYS.items()}
    return candidate_residuals(result.kernelCellSet, result.psfMatchingKernel)


def _limits(values, min_rel_span=1e-2):
    """Colour limits of ``values``, widened to at least ``min_rel_span`` of their size.

    A nearly constant map (a spatially constant PSF, say) would otherwise get a
    colour bar whose ticks all read the same number.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    scale = max(abs(lo), abs(hi))
    span = min_rel_span * scale if scale > 0 else 1.0
    if hi - lo < span:
        mid = 0.5 * (lo + hi)
        lo, hi = mid - 0.5 * span, mid + 0.5 * span
    return lo, hi


def _colorbar(fig, mappable, ax, **kw):
    """A colour bar with plain tick labels (no offset text over the titles)."""
    cb = fig.colorbar(mappable, ax=ax, **kw)
    fmt = cb.formatter
    if hasattr(fmt, "set_useOffset"):
        fmt.set_useOffset(False)
        cb.update_ticks()
    return cb


def _panels(plt, n, width, height):
    """A figure of ``n`` tickless panels, ``width x height`` inches each, in a near-square grid.

    Returns ``(fig, axes)``: the ``n`` panels in reading order; the grid's spare
    panels are hidden.
    """
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1, height * rows), squeeze=False,
                             constrained_layout=True)
    axes = axes.ravel()
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n]


def _positions(bbox, n):
    """Parent positions (pixels) of an ``n x n`` grid spanning ``bbox``, ends included.

    Returns ``(xs, ys)``, flattened row by row from the bottom row.
    """
    gx, gy = np.meshgrid(np.linspace(bbox.x0, bbox.x1, n), np.linspace(bbox.y0, bbox.y1, n))
    return gx.ravel(), gy.ravel()


def plot_cells(exposure, cell_set, residuals=None):
    """The exposure with the spatial cells and the candidates on it."""
    plt = _pyplot()
    img = to_numpy(exposure.image).astype(np.float64)
    finite = img[np.isfinite(img)]
    lo, med, hi = np.percentile(finite, [5, 50, 99.9]) if finite.size else (0, 0.5, 1)
    bb, reg = exposure.bbox, cell_set.region
    fig, ax = plt.subplots(figsize=(7, 7 * reg.height / reg.width + 0.5))
    extent = (bb.x0 - 0.5, bb.x1 + 0.5, bb.y0 - 0.5, bb.y1 + 0.5)
    # An asinh stretch about the median (the sky) shows both the sky noise and
    # the stars, whatever the sky level.
    vmin, vmax = lo - med, max(hi - med, 1e-12)
    try:
        from matplotlib.colors import AsinhNorm

        norm = AsinhNorm(linear_width=max(med - lo, 1e-12), vmin=vmin, vmax=vmax)
        stretch = "asinh stretch"
    except ImportError:  # matplotlib < 3.6
        from matplotlib.colors import Normalize

        norm = Normalize(vmin=vmin, vmax=vmax)
        stretch = "linear"
    im = ax.imshow(img - med, origin="lower", cmap="gray", norm=norm, extent=extent)
    cb = fig.colorbar(im, ax=ax, label=f"exposure image - median {med:.4g} (counts, {stretch})",
                      fraction=0.046, location="bottom", pad=0.08)
    # Ticks evenly spaced along the bar, so their labels never overlap.
    ticks = norm.inverse(np.linspace(0.0, 1.0, 6))
    cb.set_ticks(np.asarray(ticks, dtype=np.float64))
    cb.set_ticklabels([f"{t:.3g}" for t in np.asarray(ticks, dtype=np.float64)])
    for i in range(cell_set.n_cells_x + 1):
        ax.axvline(reg.x0 - 0.5 + i * cell_set.size_cell_x, color="tab:blue", lw=0.5)
    for j in range(cell_set.n_cells_y + 1):
        ax.axhline(reg.y0 - 0.5 + j * cell_set.size_cell_y, color="tab:blue", lw=0.5)
    c = None if residuals is None else residuals["relative_l2"]
    lim = (None, None) if c is None else _limits(c)
    sc = ax.scatter(cell_set.xs, cell_set.ys, c=c, s=18, cmap="viridis", edgecolor="k", lw=0.3,
                    vmin=lim[0], vmax=lim[1])
    if c is not None:
        _colorbar(fig, sc, ax, label="matched-PSF relative L2 residual", fraction=0.046)
    ax.plot([bb.x0 - 0.5, bb.x1 + 0.5, bb.x1 + 0.5, bb.x0 - 0.5, bb.x0 - 0.5],
            [bb.y0 - 0.5, bb.y0 - 0.5, bb.y1 + 0.5, bb.y1 + 0.5, bb.y0 - 0.5], "r-", lw=1,
            label="exposure")
    ax.set_xlim(reg.x0 - 0.5, reg.x1 + 0.5)
    ax.set_ylim(reg.y0 - 0.5, reg.y1 + 0.5)
    ax.set_xlabel("parent x (pixels)")
    ax.set_ylabel("parent y (pixels)")
    ax.set_title(f"{len(cell_set)} candidates in {cell_set.n_cells_x}x{cell_set.n_cells_y} cells "
                 f"of {cell_set.size_cell_x}x{cell_set.size_cell_y} px")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def plot_kernel_mosaic(kernel, bbox, n=5):
    """Normalised kernel images on an ``n x n`` grid across the exposure."""
    plt = _pyplot()
    xs, ys = _positions(bbox, n)
    imgs = kernel.compute_images(xs, ys, normalize=True)
    vmax = np.abs(imgs).max()
    fig, axes = plt.subplots(n, n, figsize=(1.6 * n + 1, 1.6 * n), squeeze=False)
    for idx, ax in enumerate(axes[::-1].ravel()):
        # Rows run bottom-up so the mosaic has the detector's orientation.
        r, c = divmod(idx, n)
        im = ax.imshow(imgs[r * n + c], origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"({xs[r * n + c]:.0f}, {ys[r * n + c]:.0f})", fontsize=7)
    fig.colorbar(im, ax=axes, label="normalised kernel value", shrink=0.8)
    fig.suptitle(f"matching kernel across the exposure ({kernel.dimensions[0]} px, "
                 "titles: parent x, y)")
    return fig


def plot_residual_map(cell_set, residuals):
    """Matched-PSF residual of every candidate, as a map over the cells."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    reg = cell_set.region
    extent = (reg.x0 - 0.5, reg.x0 - 0.5 + cell_set.n_cells_x * cell_set.size_cell_x,
              reg.y0 - 0.5, reg.y0 - 0.5 + cell_set.n_cells_y * cell_set.size_cell_y)
    shape = (cell_set.n_cells_y, cell_set.n_cells_x)
    ratio = residuals["fwhm_matched"] / residuals["fwhm_reference"]
    percent = 100 * (np.asarray(ratio) - 1)
    finite = percent[np.isfinite(percent)]
    # The FWHM offset is signed: a diverging map centred on 0, at least +-0.01%.
    m = max(float(np.abs(finite).max()) if finite.size else 0.0, 0.01)
    for ax, values, label, cmap, (lo, hi) in (
        (axes[0], residuals["relative_l2"], "relative L2 residual", "magma",
         _limits(residuals["relative_l2"])),
        (axes[1], residuals["max_abs"], "max |matched - reference| (fraction of flux)", "magma",
         _limits(residuals["max_abs"])),
        (axes[2], percent, "FWHM matched / reference - 1 (%)", "RdBu_r", (-m, m)),
    ):
        im = ax.imshow(np.asarray(values).reshape(shape), origin="lower", extent=extent,
                       cmap=cmap, vmin=lo, vmax=hi)
        _colorbar(fig, im, ax, label=label, fraction=0.046)
        ax.set_xlabel("parent x (pixels)")
        ax.set_ylabel("parent y (pixels)")
    axes[0].set_title("matched-PSF residual per candidate")
    axes[1].set_title("largest pixel residual")
    axes[2].set_title("matched-PSF FWHM")
    fig.tight_layout()
    return fig


def plot_basis(kernel):
    """Every basis image of the kernel."""
    plt = _pyplot()
    basis = kernel.basis_images
    fig, axes = _panels(plt, len(basis), 2.3, 2.0)
    for i, ax in enumerate(axes):
        v = np.abs(basis[i]).max()
        im = ax.imshow(basis[i], origin="lower", cmap="RdBu_r", vmin=-v, vmax=v)
        ax.set_title(f"basis {i}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Alard-Lupton basis (basis 0 sums to 1, the others to 0)")
    return fig


def plot_spatial_coefficients(kernel, bbox, n=64):
    """Each basis coefficient as a function of position on the exposure."""
    plt = _pyplot()
    P = kernel.spatial_functions.evaluate(*_positions(bbox, n))
    coef = (P @ kernel.spatial_coefficients.T).T.reshape(-1, n, n)
    fig, axes = _panels(plt, len(coef), 2.9, 2.2)
    extent = (bbox.x0 - 0.5, bbox.x1 + 0.5, bbox.y0 - 0.5, bbox.y1 + 0.5)
    for i, ax in enumerate(axes):
        lo, hi = _limits(coef[i])
        im = ax.imshow(coef[i], origin="lower", extent=extent, cmap="viridis", vmin=lo, vmax=hi)
        ax.set_title(f"basis {i}", fontsize=8)
        _colorbar(fig, im, ax, fraction=0.046, format="%.4g")
    fig.suptitle("spatial coefficient of each basis over the exposure (axes: parent x, y)")
    return fig


def save_diagnostic_figures(result, directory, exposure=None, prefix="", overwrite=True):
    """Save every diagnostic figure of a run as PNG files in ``directory``.

    Parameters
    ----------
    result : ModelPsfMatchResult
    directory : str
        Created if missing.
    exposure : Exposure, optional
        Shown under the cells (the matched exposure when omitted).
    prefix : str
        Put before every file name.
    overwrite : bool
        Replace existing figures (default); False refuses them
        (:class:`FileExistsError`).

    Returns
    -------
    list of str
        Paths written.
    """
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    exposure = result.psfMatchedExposure if exposure is None else exposure
    kernel = result.psfMatchingKernel
    cells = result.kernelCellSet
    residuals = _candidate_residuals(result)
    bbox = exposure.bbox
    makers = (
        ("cells", lambda: plot_cells(exposure, cells, residuals)),
        ("kernel_mosaic", lambda: plot_kernel_mosaic(kernel, bbox)),
        ("residual_map", lambda: plot_residual_map(cells, residuals)),
        ("kernel_basis", lambda: plot_basis(kernel)),
        ("spatial_coefficients", lambda: plot_spatial_coefficients(kernel, bbox)),
    )
    paths = []
    try:
        # One figure at a time, closed as soon as it is saved.
        for name, make in makers:
            fig = make()
            try:
                paths.append(_save(fig, os.path.join(directory, f"{prefix}{name}.png"),
                                   overwrite))
            finally:
                plt.close(fig)
    except BaseException:
        # All five or none: a failure removes the figures already saved.
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)
        raise
    return paths
