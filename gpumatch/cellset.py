"""Cells, kernel candidates and PSF stamps (docs/algorithm.md section 3)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import array_namespace, to_numpy
from .backends import backend_for_namespace
from .errors import ConfigError, InsufficientAreaError, KernelTooLargeError, PsfEvaluationError
from .pixels import Box
from .psf.base import Psf, pad_or_crop

log = logging.getLogger("gpumatch")

__all__ = ["KernelCellSet", "KernelCandidate", "build_cell_set", "next_odd", "realize_stamps"]


def next_odd(value):
    """``ceil(value)``, plus one if that is even."""
    n = math.ceil(value)
    return n + 1 if n % 2 == 0 else n


def _describe_position(x, y):
    return f"parent position (x={x:.2f}, y={y:.2f})"


def _check_stamp(stamp, x, y, label):
    shape = getattr(stamp, "shape", None)
    if shape is None or len(shape) != 2 or 0 in shape:
        raise PsfEvaluationError(f"{label} returned an empty or non-2-d stamp (shape {shape}) "
                                 f"at {_describe_position(x, y)}; a PSF stamp must be a 2-d array")
    if shape[0] % 2 == 0 or shape[1] % 2 == 0:
        raise PsfEvaluationError(f"{label} returned an even-sized stamp {shape[1]}x{shape[0]} at "
                                 f"{_describe_position(x, y)}; PSF stamps must have odd sizes "
                                 "with the centre on the middle pixel")


def realize_stamps(psf, xs, ys, label="PSF", xp=np):
    """Evaluate ``psf`` at parent positions and check every stamp.

    Returns a list of stamps (or an array ``(n, h, w)``) normalised to sum 1,
    on ``xp``'s device when the model can render there.

    Raises
    ------
    PsfEvaluationError
        Naming the first position where the model raised, or returned a stamp
        that is empty, even-sized, not finite or without positive flux.
    """
    xs = np.asarray(xs, dtype=np.float64).ravel()
    ys = np.asarray(ys, dtype=np.float64).ravel()
    device = (backend_for_namespace(xp).on_device and isinstance(psf, Psf)
              and psf.renders_on_device)
    try:
        # Positions stay on the host: models work out their per-stamp numbers there.
        stamps = psf.compute_kernel_images(xs, ys, xp=xp) if device \
            else psf.compute_kernel_images(xs, ys)
    except PsfEvaluationError:
        raise
    except Exception as batch_exc:
        # Find the position that fails, so the message can name it.
        for x, y in zip(xs, ys):
            try:
                psf.compute_kernel_image(float(x), float(y))
            except Exception as exc:
                raise PsfEvaluationError(
                    f"{label} {psf!r} could not be evaluated at {_describe_position(x, y)}: "
                    f"{exc.__class__.__name__}: {exc}"
                ) from exc
        raise PsfEvaluationError(f"{label} {psf!r} failed in batch evaluation: {batch_exc}") \
            from batch_exc
    if hasattr(stamps, "ndim") and stamps.ndim == 3:
        if len(stamps) != len(xs):
            raise PsfEvaluationError(f"{label} returned {len(stamps)} stamps for {len(xs)} positions")
        _check_stamp(stamps[0], xs[0], ys[0], label)
        sums = stamps.sum(axis=(1, 2))
        # The stamps' own namespace: a model without device support renders on the host.
        ok = to_numpy(array_namespace(stamps).isfinite(stamps).all(axis=(1, 2)) & (sums > 0))
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise PsfEvaluationError(
                f"{label} {psf!r} returned a stamp with NaN/infinite values or no positive "
                f"flux at {_describe_position(xs[i], ys[i])}"
            )
        return stamps / sums[:, None, None]
    out = []
    if len(stamps) != len(xs):
        raise PsfEvaluationError(f"{label} returned {len(stamps)} stamps for {len(xs)} positions")
    for s, x, y in zip(stamps, xs, ys):
        s = np.asarray(s, dtype=np.float64)
        _check_stamp(s, x, y, label)
        tot = s.sum()
        if not np.all(np.isfinite(s)) or not tot > 0:
            raise PsfEvaluationError(
                f"{label} {psf!r} returned a stamp with NaN/infinite values or no positive "
                f"flux at {_describe_position(x, y)}"
            )
        out.append(s / tot)
    return out


def _place(stamps, size, xp):
    """Stack stamps centred in ``size x size`` zero arrays."""
    if hasattr(stamps, "ndim") and stamps.shape[-2:] == (size, size):
        return xp.asarray(stamps, dtype=xp.float64)
    if hasattr(stamps, "ndim"):
        return xp.asarray(pad_or_crop(stamps, size, size))
    return xp.asarray(np.stack([pad_or_crop(s, size, size) for s in stamps]))


class KernelCandidate:
    """One cell's candidate: a view into the :class:`KernelCellSet` arrays."""

    def __init__(self, cell_set, index):
        self._set = cell_set
        self.index = index

    @property
    def x(self):
        """Parent x of the cell centre (pixels)."""
        return float(self._set.xs[self.index])

    @property
    def y(self):
        """Parent y of the cell centre (pixels)."""
        return float(self._set.ys[self.index])

    @property
    def cell(self):
        """``(row, col)`` of the cell."""
        return divmod(self.index, self._set.n_cells_x)

    @property
    def template(self):
        """Exposure PSF stamp (the image that is convolved)."""
        return self._set.templates[self.index]

    @property
    def target(self):
        """Reference PSF stamp."""
        return self._set.targets[self.index]

    @property
    def status(self):
        return self._set.status[self.index]

    @property
    def kernel_solution(self):
        """Single-candidate basis coefficients ``M^-1 b``, or None before solving."""
        sol = self._set.kernel_solutions
        return None if sol is None else sol[self.index]

    def __repr__(self):
        return f"KernelCandidate(#{self.index}, x={self.x:.1f}, y={self.y:.1f}, {self.status})"


@dataclass(eq=False)
class KernelCellSet:
    """The grid of cells over region ``R`` and one candidate per cell.

    Attributes
    ----------
    region : Box
        Exposure bbox grown by one cell on every side (parent pixels).
    size_cell_x, size_cell_y, n_cells_x, n_cells_y : int
    xs, ys : ndarray (n,)
        Cell centres, parent pixels, rows of cells in order.
    templates, targets : array (n, psf_size, psf_size)
        Exposure-PSF and reference-PSF stamps, each summing to 1.
    psf_size, pad : int
        Stamp size after padding, and the padding applied (pixels).
    status : list of str
        ``"GOOD"`` once a candidate is used by the fit (all are, for model PSFs).
    """

    region: Box
    size_cell_x: int
    size_cell_y: int
    xs: np.ndarray
    ys: np.ndarray
    templates: Any
    targets: Any
    psf_size: int
    pad: int
    status: list = field(init=False)
    #: Filled by the per-candidate stage (docs/algorithm.md sections 6.1 and 6.2).
    kernel_solutions: Any = field(default=None, init=False)
    normal_matrices: Any = field(default=None, init=False)
    normal_vectors: Any = field(default=None, init=False)

    def __post_init__(self):
        self.status = ["UNKNOWN"] * len(self.xs)

    @property
    def n_cells_x(self):
        """Cells across the region."""
        return self.region.width // self.size_cell_x

    @property
    def n_cells_y(self):
        """Cells up the region."""
        return self.region.height // self.size_cell_y

    def __len__(self):
        return len(self.xs)

    @property
    def candidates(self):
        """All candidates, one per cell, row by row."""
        return [KernelCandidate(self, i) for i in range(len(self))]

    def __iter__(self):
        return iter(self.candidates)

    def __repr__(self):
        return (f"KernelCellSet({self.n_cells_x}x{self.n_cells_y} cells of "
                f"{self.size_cell_x}x{self.size_cell_y} px, {len(self)} candidates, "
                f"stamps {self.psf_size}x{self.psf_size})")


def cell_centres(region, size_cell_x, size_cell_y):
    """Cell centres over ``region`` (parent pixels), raising if no cell fits."""
    ncx = region.width // size_cell_x
    ncy = region.height // size_cell_y
    if ncx == 0 or ncy == 0:
        raise InsufficientAreaError(
            f"insufficient area: region {region.width}x{region.height} px holds no "
            f"{size_cell_x}x{size_cell_y}-pixel cell; lower sizeCellX/sizeCellY"
        )
    col = np.arange(ncx)
    row = np.arange(ncy)
    xs = region.x0 + size_cell_x * col + size_cell_x // 2
    ys = region.y0 + size_cell_y * row + size_cell_y // 2
    gx, gy = np.meshgrid(xs, ys)
    return gx.ravel().astype(np.float64), gy.ravel().astype(np.float64)


def build_cell_set(exposure, reference_psf, config, kernel_size=None, xp=np):
    """Build the cell set and the (possibly resized) reference model.

    Parameters
    ----------
    exposure : Exposure
        Its PSF gives the template stamps.
    reference_psf : Psf
        The model to match to (target stamps).
    config : ModelPsfMatchConfig
    kernel_size : int, optional
        Kernel size to pad for; ``config.kernelSize`` by default.

    Returns
    -------
    cell_set : KernelCellSet
    reference_psf : Psf
        The reference model, resized to the stamp size if needed.
    """
    kernel_size = config.kernelSize if kernel_size is None else int(kernel_size)
    region = exposure.bbox.grown(config.sizeCellX, config.sizeCellY)
    xs, ys = cell_centres(region, config.sizeCellX, config.sizeCellY)

    template_stamps = realize_stamps(exposure.psf, xs, ys, "exposure PSF", xp)
    if hasattr(template_stamps, "ndim"):
        shapes = [tuple(template_stamps.shape[1:])]
    else:
        shapes = [s.shape for s in template_stamps]
    psf_size = max(max(s) for s in shapes)

    if config.doAutoPadPsf:
        min_psf_size = next_odd(kernel_size * config.autoPadPsfTo)
        pad = max(0, min_psf_size - psf_size)
    else:
        if config.padPsfBy % 2 != 0:
            raise ConfigError(
                f"padPsfBy={config.padPsfBy} must be even so the PSF stays centred; "
                "use an even value or enable doAutoPadPsf"
            )
        pad = config.padPsfBy
    psf_size += pad

    max_kernel = psf_size - 1 if psf_size % 2 == 0 else psf_size - 2
    if kernel_size > max_kernel:
        raise KernelTooLargeError(
            f"kernelSize={kernel_size} is too big for {psf_size}-pixel PSF stamps (largest "
            f"usable kernel is {max_kernel}). Fix: set kernelSize={max_kernel}, or "
            f"doAutoPadPsf=True, or raise padPsfBy by {kernel_size - max_kernel}"
        )

    cx, cy = region.center
    ref_w, ref_h = reference_psf.dimensions(cx, cy)
    if (ref_w, ref_h) != (psf_size, psf_size):
        log.info("reference PSF %dx%d resized to %dx%d", ref_w, ref_h, psf_size, psf_size)
        reference_psf = reference_psf.resized(psf_size, psf_size)
    target_stamps = realize_stamps(reference_psf, xs, ys, "reference PSF", xp)

    templates = _place(template_stamps, psf_size, xp)
    targets = _place(target_stamps, psf_size, xp)
    # Padding can only add zeros, so the sums stay 1; renormalising guards
    # against user models whose stamps were cropped by a resize.
    templates = templates / templates.sum(axis=(1, 2), keepdims=True)
    targets = targets / targets.sum(axis=(1, 2), keepdims=True)
    log.debug("cell set: %d cells, PSF size %d (pad %d)", len(xs), psf_size, pad)
    return KernelCellSet(region, config.sizeCellX, config.sizeCellY, xs, ys, templates,
                         targets, psf_size, pad), reference_psf
