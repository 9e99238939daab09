"""Known-answer self-check of an array backend (docs/algorithm.md section 16).

A GPU path can be wrong on one machine and right on another (a driver, a
CUDA library, a card that rounds or races differently). Before gpumatch
trusts ``backend="cupy"`` in a process it matches a small, deterministic
exposure on that backend and on NumPy and compares every stage at
:data:`TOLERANCE`; on disagreement the GPU is not used (``"auto"``) or the
run stops (``"cupy"`` asked for explicitly). ``gpumatch selftest`` runs the
same comparison on a larger case and prints it.

Every backend is also checked against answers that do not come from any
backend: the kernel sums to ``kernelSum`` everywhere (docs/algorithm.md
section 6) and the matched image equals a brute-force per-pixel evaluation
of the normalised kernel (section 7) at sampled pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time

import numpy as np

from .errors import BackendWarning, SelfCheckError, warn

log = logging.getLogger("gpumatch")

__all__ = ["TOLERANCE", "SelfCheckError", "SelfCheckReport", "StageAgreement", "run_self_check",
           "check_backend_once", "device_description"]

#: Largest relative difference accepted between a backend and NumPy (float32
#: planes), and between any backend and the brute-force answers.
TOLERANCE = 1e-5

#: Set to "0" to skip the automatic check at the first use of a GPU backend.
ENV_SWITCH = "GPUMATCH_SELF_CHECK"


@dataclasses.dataclass
class StageAgreement:
    """One compared quantity: its largest relative difference and whether it passed."""

    stage: str
    quantity: str
    difference: float
    tolerance: float = TOLERANCE

    @property
    def passed(self):
        # NaN (a comparison that found non-finite values) never passes.
        return bool(self.difference <= self.tolerance)


@dataclasses.dataclass
class SelfCheckReport:
    """What :func:`run_self_check` found.

    Attributes
    ----------
    backend : str
        The backend checked.
    device : str
        Where it ran (GPU name, or the CPU).
    case : str
        ``"small"`` or ``"large"``: the workload (see :func:`_case`).
    agreements : list of StageAgreement
    timings : dict
        ``{backend: {stage: seconds}}`` of the compared runs.
    error : str or None
        The exception that stopped the check, if one did.
    """

    backend: str
    device: str
    case: str
    agreements: list
    timings: dict
    error: str | None = None

    @property
    def passed(self):
        return self.error is None and all(a.passed for a in self.agreements)

    def worst(self):
        """The failing (or else the largest relative) agreement, or None."""
        if not self.agreements:
            return None
        failing = [a for a in self.agreements if not a.passed]
        return failing[0] if failing else max(self.agreements, key=lambda a: a.difference)

    def summary(self):
        """One line: the verdict and the figure that decided it."""
        if self.error is not None:
            return f"backend {self.backend!r} on {self.device}: self-check stopped: {self.error}"
        w = self.worst()
        word = "agrees" if self.passed else "DISAGREES"
        figure = "" if w is None else (f"; worst {w.stage} {w.quantity}: {w.difference:.3g} "
                                       f"(tolerance {w.tolerance:.0e})")
        return f"backend {self.backend!r} on {self.device} {word} with the known answers{figure}"

    def table(self):
        """The per-stage agreements and timings as aligned text lines."""
        lines = [f"device: {self.device}", f"case: {self.case}", "",
                 f"{'stage':<22} {'quantity':<40} {'rel. difference':>15}  result"]
        for a in self.agreements:
            lines.append(f"{a.stage:<22} {a.quantity:<40} {a.difference:>15.3g}  "
                         f"{'ok' if a.passed else 'FAIL'}")
        if self.timings:
            stages = sorted({s for t in self.timings.values() for s in t})
            lines += ["", "timings (s; a GPU after one warm-up run): " + ", ".join(stages)]
            lines += [f"  {name:<6} " + "  ".join(f"{t.get(s, float('nan')):8.4f}" for s in stages)
                      for name, t in self.timings.items()]
        if self.error is not None:
            lines += ["", f"error: {self.error}"]
        lines += ["", self.summary()]
        return "\n".join(lines)


def device_description(backend):
    """The device a backend (a registered name) computes on, in words."""
    from .backends import get_backend

    try:
        return get_backend(backend).describe_device()
    except Exception as exc:  # a broken device is reported, not raised, here
        return f"backend {backend!r} (unavailable: {exc.__class__.__name__}: {exc})"


def _case(size):
    """A deterministic workload: exposure, reference, configuration and kernelSum.

    ``"small"`` (automatic check, well under a second on NumPy): 256 x 256
    pixels, 64-pixel cells, kernelSize 11, a spatially varying elliptical
    exposure PSF, spatial order 1. ``"large"`` (``gpumatch selftest``): 1024 x
    1024 pixels with the production configuration (docs/algorithm.md
    section 11). Both have stars, a saturated-size pixel, a NaN and a masked
    pixel, and a non-zero origin.
    """
    from .config import ModelPsfMatchConfig
    from .exposure import Box, Exposure
    from .psf import DoubleGaussianPsf, VaryingGaussianPsf

    n, cell = (256, 64) if size == "small" else (1024, 128)
    xy0 = (37, -21)
    rng = np.random.default_rng(20261128)
    image = rng.normal(100.0, 5.0, (n, n))
    ys, xs = rng.integers(12, n - 12, (2, 40))
    for y, x in zip(ys, xs):
        yy, xx = np.mgrid[y - 6:y + 7, x - 6:x + 7]
        image[y - 6:y + 7, x - 6:x + 7] += 2e4 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 8.0)
    image[n // 3, n // 3] = 6.5e4
    image[2 * n // 3, n // 4] = np.nan
    variance = np.abs(image) / 4.0 + 25.0
    mask = np.zeros((n, n), np.int32)
    mask[n // 2, n // 5] = 1 << 1
    box = Box(xy0[0], xy0[1], n, n)
    psf = VaryingGaussianPsf(21, 21, box, sigma=(1.8, 0.15, -0.1), g1=(0.03, 0.02, 0.0),
                             g2=(-0.02, 0.0, 0.01))
    exposure = Exposure(image.astype(np.float32), variance.astype(np.float32), mask, xy0=xy0,
                        psf=psf)
    if size == "small":
        config = ModelPsfMatchConfig(kernelSize=11, alardSigGauss=(0.8, 1.6, 3.2),
                                     alardDegGauss=(2, 2, 1), spatialKernelOrder=1,
                                     sizeCellX=cell, sizeCellY=cell)
        reference = DoubleGaussianPsf(17, 17, sigma1=2.6)
    else:
        config = ModelPsfMatchConfig(kernelSize=21, alardSigGauss=(1.0, 2.0, 4.5),
                                     alardDegGauss=(4, 2, 2), spatialKernelOrder=2,
                                     sizeCellX=cell, sizeCellY=cell)
        reference = DoubleGaussianPsf(23, 23, sigma1=3.27, sigma2=8.175, b=0.1)
    return exposure, reference, config, 1.0


def _relative(a, b):
    """max |a - b| / max |b| over pixels finite in both; NaN if the non-finite
    pixels differ (where NaN or inf sits is part of the answer)."""
    from .backend import to_numpy

    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        return float("nan")
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(fa, fb) or not np.array_equal(np.isnan(a), np.isnan(b)) or \
            not np.array_equal(a[~fa & ~np.isnan(a)], b[~fb & ~np.isnan(b)]):
        return float("nan")
    if not fb.any():
        return 0.0
    scale = np.abs(b[fb]).max()
    return float(np.abs(a[fa] - b[fb]).max() / scale) if scale > 0 else float(np.abs(a[fa]).max())


def _positions(result):
    """Parent positions where kernels are compared: the corners and centre of the exposure."""
    bbox = result.psfMatchedExposure.bbox
    xs = (bbox.x0, bbox.x1, bbox.x0, bbox.x1, 0.5 * (bbox.x0 + bbox.x1))
    ys = (bbox.y0, bbox.y0, bbox.y1, bbox.y1, 0.5 * (bbox.y0 + bbox.y1))
    return np.array(xs, float), np.array(ys, float)


def _least_squares_kernels(result, xs, ys):
    """Normalised kernels at ``(xs, ys)`` of the least-squares optimum of the
    stacked problem (docs/algorithm.md section 6), from the candidates' stamps
    with NumPy's SVD-based solver: nothing of the normal-equation or spatial
    stages is used, only the basis images and spatial functions."""
    from .backend import to_numpy

    kernel, cs = result.psfMatchingKernel, result.kernelCellSet
    basis, sf = kernel.basis_images, kernel.spatial_functions
    k = basis.shape[1]
    templates = np.asarray(to_numpy(cs.templates), dtype=np.float64)
    targets = np.asarray(to_numpy(cs.targets), dtype=np.float64)
    h, n = k // 2, templates.shape[1]
    windows = np.lib.stride_tricks.sliding_window_view(templates, (k, k), axis=(1, 2))
    conv = np.einsum("cyxji,bji->cyxb", windows, basis).reshape(len(templates), -1, len(basis))
    P = sf.evaluate(cs.xs, cs.ys)
    # Columns: a0 (basis 0, constant), then basis b >= 1 times each p_j.
    design = np.concatenate([conv[:, :, :1], (conv[:, :, 1:, None] * P[:, None, None, :])
                             .reshape(len(templates), conv.shape[1], -1)], axis=2)
    rhs = targets[:, h:n - h, h:n - h].reshape(len(templates), -1)
    x = np.linalg.lstsq(design.reshape(-1, design.shape[-1]), rhs.ravel(), rcond=None)[0]
    coeffs = np.zeros_like(kernel.spatial_coefficients)
    coeffs[0, 0] = 1.0
    coeffs[1:] = x[1:].reshape(len(basis) - 1, -1)
    images = np.einsum("nj,bj,bkl->nkl", sf.evaluate(xs, ys), coeffs, basis)
    return images / images.sum(axis=(1, 2))[:, None, None]


def _known_answers(result, exposure, kernel_sum, backend):
    """Agreements of one backend's result with answers that need no backend."""
    from .apply import direct_convolve_pixels

    kernel = result.psfMatchingKernel
    xs, ys = _positions(result)
    sums = kernel.compute_images(xs, ys).sum(axis=(1, 2))
    out = [StageAgreement(f"kernel ({backend})", "kernel sum = kernelSum at corners, centre",
                          float(np.abs(sums - kernel_sum).max() / abs(kernel_sum))),
           StageAgreement(f"spatialSolve ({backend})", "kernel = least-squares optimum",
                          _relative(kernel.compute_images(xs, ys, normalize=True),
                                    _least_squares_kernels(result, xs, ys)))]
    h = kernel.dimensions[0] // 2
    image = np.asarray(exposure.image, dtype=np.float64)
    ny, nx = image.shape
    rng = np.random.default_rng(1)
    py = rng.integers(h, ny - h, 256)
    px = rng.integers(h, nx - h, 256)
    brute = direct_convolve_pixels(image, kernel, exposure.bbox, py, px)
    matched = np.asarray(result.psfMatchedExposure.image, dtype=np.float64)[py, px]
    out.append(StageAgreement(f"apply ({backend})", "image = brute-force sum at 256 pixels",
                              _relative(matched, brute)))
    return out


def _compare(result, ref, backend):
    """Agreements, stage by stage, of ``result`` (``backend``) with the NumPy ``ref``."""
    cs, cr = result.kernelCellSet, ref.kernelCellSet
    xs, ys = _positions(ref)
    out = [
        StageAgreement("cellSet", "template stamps", _relative(cs.templates, cr.templates)),
        StageAgreement("cellSet", "target stamps", _relative(cs.targets, cr.targets)),
        StageAgreement("normalEquations", "M", _relative(cs.normal_matrices, cr.normal_matrices)),
        StageAgreement("normalEquations", "b", _relative(cs.normal_vectors, cr.normal_vectors)),
        StageAgreement("spatialSolve", "normalised kernel at corners, centre",
                       _relative(result.psfMatchingKernel.compute_images(xs, ys, normalize=True),
                                 ref.psfMatchingKernel.compute_images(xs, ys, normalize=True))),
    ]
    m, r = result.psfMatchedExposure, ref.psfMatchedExposure
    out += [StageAgreement("apply", "image", _relative(m.image, r.image)),
            StageAgreement("apply", "variance", _relative(m.variance, r.variance)),
            StageAgreement("apply", "mask (0 = identical)",
                           0.0 if np.array_equal(np.asarray(m.mask), np.asarray(r.mask)) else 1.0,
                           tolerance=0.0)]
    same_keys = set(result.metadata) == set(ref.metadata)
    out.append(StageAgreement("metadata", "keys (0 = identical)", 0.0 if same_keys else 1.0,
                              tolerance=0.0))
    return out


_STATE_LOCK = threading.RLock()
_RUNNING = threading.local()
_CHECKED = {}


@contextlib.contextmanager
def _checking():
    """Inside, :func:`check_backend_once` lets the backend being checked through."""
    _RUNNING.active = True
    try:
        yield
    finally:
        _RUNNING.active = False


def run_self_check(task_class, backend="cupy", case="small"):
    """Match a known case on ``backend`` and on NumPy and compare every stage.

    Parameters
    ----------
    task_class : type
        :class:`~gpumatch.task.ModelPsfMatchTask` (passed in because the task
        calls this module when it is constructed).
    backend : {"cupy", "numpy"}
        The backend to check. NumPy is checked against the brute-force
        answers only (comparing it with itself would prove nothing).
    case : {"small", "large"}
        The workload (:func:`_case`).

    Returns
    -------
    SelfCheckReport
        Never raises for a disagreement or a device error: both are in the report.
    """
    exposure, reference, config, kernel_sum = _case(case)
    timings = {}
    agreements = []
    # The check is about agreement, not about how good the match is.
    args = (exposure, reference, kernel_sum)
    try:
        with _checking():
            ref = task_class(config, backend="numpy").run(*args, on_poor_match="ignore")
            timings["numpy"] = dict(ref.metadata["timings"])
            agreements += _known_answers(ref, exposure, kernel_sum, "numpy")
            if backend != "numpy":
                task = task_class(config, backend=backend)
                task.run(*args, on_poor_match="ignore")  # warm-up: compiles, pools
                result = task.run(*args, on_poor_match="ignore")
                timings[backend] = dict(result.metadata["timings"])
                agreements += _compare(result, ref, backend)
                agreements += _known_answers(result, exposure, kernel_sum, backend)
        error = None
    except Exception as exc:  # a device or driver error is a failed check, reported
        error = f"{exc.__class__.__name__}: {exc}"
    return SelfCheckReport(backend, device_description(backend), case, agreements, timings, error)


def check_backend_once(task_class, backend, explicit):
    """Whether ``backend`` may be used in this process (checked at its first use).

    Parameters
    ----------
    task_class : type
        As for :func:`run_self_check`.
    backend : str
        The resolved backend; NumPy is the reference and always passes.
    explicit : bool
        True when the user named the backend: a failed check raises
        :class:`SelfCheckError` instead of warning and returning False.

    Returns
    -------
    bool
        False (after a :class:`~gpumatch.errors.BackendWarning`) when the
        backend failed its check and NumPy should be used instead.
    """
    if backend == "numpy" or getattr(_RUNNING, "active", False):
        return True
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return True
    with _STATE_LOCK:
        report = _CHECKED.get(backend)
        if report is None:
            t0 = time.perf_counter()
            report = _CHECKED[backend] = run_self_check(task_class, backend, "small")
            log.info("self-check of backend %r took %.2f s: %s", backend,
                     time.perf_counter() - t0, report.summary())
    if report.passed:
        return True
    message = (f"{report.summary()}; run `gpumatch selftest --backend {backend}` for the "
               f"per-stage figures")
    if explicit:
        raise SelfCheckError(message + f" (or set {ENV_SWITCH}=0 to skip the check at your "
                             "own risk; backend='numpy' gives correct results on the CPU)", report)
    warn(message + "; using backend 'numpy' instead", BackendWarning, stacklevel=3)
    return False
