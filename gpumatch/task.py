"""The task facade: ``ModelPsfMatchTask`` with LSST's names.

The data path is exposure -> cell set -> per-candidate normal equations ->
spatial solve -> spatial kernel -> application; each stage lives in its own
module and the backend object supplies the array-specific pieces.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .backend import resolve_backend, single_threaded_blas
from .basis import alard_lupton_basis, basis_widths
from .cellset import build_cell_set
from .config import ModelPsfMatchConfig
from .errors import MissingPsfError, PsfEvaluationError
from .kernel import SpatialKernel
from .moments import SIGMA_TO_FWHM
from .provenance import record_match
from .quality import candidate_residuals
from .selftest import check_backend_once
from .spatial import SpatialFunctions
from .spatial_solve import assemble_spatial_system, check_spatial_solve
from .verdict import apply_policy, check_on_poor_match, judge, warn_conditioning

log = logging.getLogger("gpumatch")

__all__ = ["ModelPsfMatchTask", "ModelPsfMatchResult", "CellSetResult"]


@dataclass
class ModelPsfMatchResult:
    """What :meth:`ModelPsfMatchTask.run` returns (names as in LSST)."""

    psfMatchedExposure: object
    psfMatchingKernel: SpatialKernel
    kernelCellSet: object
    referencePsfModel: object
    metadata: dict = field(default_factory=dict)


class _Finishing(NamedTuple):
    """An exposure between :meth:`ModelPsfMatchTask._start_finish` and ``_complete``."""

    exposure: object
    cell_set: object
    choice: object
    sf: object
    solution: object
    reference: object
    times: dict
    kernel: SpatialKernel
    pending: object
    queue_time: float


class CellSetResult(NamedTuple):
    """What :meth:`ModelPsfMatchTask.buildCellSet` returns."""

    kernelCellSet: object
    referencePsfModel: object


def _stamp_width(psf):
    """A PSF's stamp width from its attributes, without evaluating it (0: unknown).

    Evaluating the model here would raise its errors before the cell set, which
    reports them with the position; an unknown width leaves the padding for the
    kernel, the usual largest term, in the estimate.
    """
    for attrs in (("size",), ("width", "height"), ("array",)):
        values = [getattr(psf, a, None) for a in attrs]
        if all(isinstance(v, int) for v in values):
            return max(values)
        if attrs == ("array",) and hasattr(values[0], "shape"):
            return max(values[0].shape)
    return 0


def _check_memory(config, exposure, reference, choice, xp=np):
    """Stop before the cell set if the run's estimated memory exceeds what is available."""
    from .limits import check_run_memory

    width = max(_stamp_width(p) for p in (exposure.psf, reference))
    check_run_memory(config, exposure.shape, width, choice.kernel_size, choice.degrees,
                     what="PSF-matching this exposure", xp=xp)


def _backend_stages(name, spatial_solve=None):
    if name == "cupy":
        from .cuda.stages import CupyStages

        return CupyStages(spatial_solve)
    from .stages import NumpyStages

    return NumpyStages()


def _psf_sigma(psf, x, y, label, tries=4, jitter=2.0, seed=0):
    """Determinant radius of ``psf`` near ``(x, y)``, retrying at jittered positions."""
    rng = np.random.default_rng(seed)
    positions = [(x, y)] + [(x + dx, y + dy) for dx, dy in rng.uniform(-jitter, jitter, (tries, 2))]
    last = None
    for px, py in positions:
        try:
            sigma = float(psf.determinant_radius(px, py))
            if math.isfinite(sigma) and sigma > 0:
                return sigma
            last = ValueError(f"size {sigma}")
        except Exception as exc:  # model-specific failures: retry nearby
            last = exc
    raise PsfEvaluationError(
        f"could not measure the FWHM of the {label} {psf!r} at parent position "
        f"(x={x:.2f}, y={y:.2f}) or {tries} positions within {jitter} px of it: {last}"
    )


def _noise_gains(kernel, bbox, n=5):
    """``noiseVarianceGain`` at the centre of ``bbox`` and its range on an
    ``n x n`` grid over it (see :meth:`SpatialKernel.noise_variance_gain`)."""
    xs, ys = np.meshgrid(np.linspace(bbox.x0, bbox.x1, n), np.linspace(bbox.y0, bbox.y1, n))
    grid = kernel.noise_variance_gain(xs.ravel(), ys.ravel())
    return {"noiseVarianceGain": kernel.noise_variance_gain(*bbox.center),
            "noiseVarianceGainMin": float(grid.min()), "noiseVarianceGainMax": float(grid.max())}


class ModelPsfMatchTask:
    """Match an exposure's PSF to a reference PSF model (docs/algorithm.md section 1).

    Parameters
    ----------
    config : ModelPsfMatchConfig, optional
    backend : {"auto", "numpy", "cupy"}
        ``"auto"`` uses the GPU when CuPy and a device are usable.
    spatial_solve : {"host", "device"}, optional
        Where the GPU backend solves the spatial system (float64 either way):
        ``"host"`` copies it back and uses LAPACK, ``"device"`` uses cuSOLVER
        and copies back only the solution. Default: the backend's
        (``"host"`` until measured on GPUs otherwise). The NumPy backend
        always solves on the host.
    """

    ConfigClass = ModelPsfMatchConfig
    _DefaultName = "modelPsfMatch"

    def __init__(self, config=None, backend="auto", *, spatial_solve=None):
        self.config = ModelPsfMatchConfig() if config is None else config
        if not isinstance(self.config, ModelPsfMatchConfig):
            raise TypeError(f"config must be a ModelPsfMatchConfig, got {type(self.config).__name__}")
        self.config.validate()
        if spatial_solve is not None:
            check_spatial_solve(spatial_solve)
        self.backend = resolve_backend(backend)
        # A GPU backend is trusted in a process only after it has matched a
        # known case like NumPy does (gpumatch/selftest.py).
        if not check_backend_once(type(self), self.backend, explicit=backend != "auto"):
            self.backend = "numpy"
        self._stages = _backend_stages(self.backend, spatial_solve)
        self.metadata = {}

    @property
    def spatial_solve(self):
        """Where the spatial system is solved: ``"host"`` or ``"device"``."""
        return getattr(self._stages, "spatial_solve", "host")

    @spatial_solve.setter
    def spatial_solve(self, where):
        check_spatial_solve(where)
        if hasattr(self._stages, "spatial_solve"):
            self._stages.spatial_solve = where

    # -- stages ---------------------------------------------------------------

    def _check_inputs(self, exposure, referencePsfModel, kernelSum=1.0):
        self.config.validate()
        if not hasattr(exposure, "image") or not hasattr(exposure, "bbox"):
            raise TypeError(f"exposure must be a gpumatch.Exposure, got {type(exposure).__name__}")
        if exposure.psf is None:
            raise MissingPsfError(
                "the exposure has no PSF; attach one (Exposure(..., psf=...) or exposure.psf = ...) "
                "before PSF matching"
            )
        if not hasattr(referencePsfModel, "compute_kernel_image"):
            raise TypeError(
                f"referencePsfModel must be a gpumatch PSF model (a Psf with compute_kernel_image), "
                f"got {type(referencePsfModel).__name__}"
            )
        try:
            ks = float(kernelSum)
        except (TypeError, ValueError):
            raise ValueError(f"kernelSum must be a number, got {kernelSum!r}") from None
        if not math.isfinite(ks) or ks == 0:
            raise ValueError(
                f"kernelSum={kernelSum!r} is invalid: the kernel is normalised by its sum when "
                "applied, so it must be finite and non-zero (usually 1.0)"
            )
        return ks

    def _basis_choice(self, exposure, referencePsfModel):
        cfg = self.config
        if not cfg.scaleByFwhm:
            return basis_widths(cfg)
        bbox = exposure.bbox
        pos = exposure.psf.average_position or bbox.center
        t = _psf_sigma(exposure.psf, pos[0], pos[1], "exposure PSF")
        rpos = referencePsfModel.average_position or bbox.center
        r = _psf_sigma(referencePsfModel, rpos[0], rpos[1], "reference PSF")
        log.info("PSF FWHM: exposure %.3f px, reference %.3f px", t * SIGMA_TO_FWHM, r * SIGMA_TO_FWHM)
        return basis_widths(cfg, t, r)

    def buildCellSet(self, exposure, referencePsfModel):
        """Cells, candidates and stamps for ``exposure`` (docs/algorithm.md section 3).

        Returns
        -------
        CellSetResult
            ``(kernelCellSet, referencePsfModel)``, the latter resized to the
            stamp size when needed.
        """
        _, _, cell_set, reference, _ = self._prepare(exposure, referencePsfModel, 1.0,
                                                     basis_for=None)
        return CellSetResult(cell_set, reference)

    def run(self, exposure, referencePsfModel, kernelSum=1.0, *, on_poor_match="warn"):
        """PSF-match ``exposure`` to ``referencePsfModel``.

        Parameters
        ----------
        exposure : Exposure
            Must carry a PSF; not modified.
        referencePsfModel : Psf
            The PSF to match to.
        kernelSum : float
            Sum imposed on the kernel (the output is normalised regardless).
        on_poor_match : {"warn", "raise", "ignore"}
            What a verdict (``metadata["matchQuality"]``, see
            :mod:`gpumatch.verdict`) of ``"poor"`` or ``"failed"`` does:
            a :class:`~gpumatch.errors.PoorMatchWarning` and a log line;
            :class:`~gpumatch.errors.PoorMatchError` carrying the result as
            its ``result``; or nothing.

        Returns
        -------
        ModelPsfMatchResult
        """
        check_on_poor_match(on_poor_match)
        with single_threaded_blas():
            result = self._run(exposure, referencePsfModel, kernelSum)
        return apply_policy(result, on_poor_match)

    def _run(self, exposure, referencePsfModel, kernelSum):
        times = {}
        parts = self._solve(exposure, referencePsfModel, kernelSum, times)
        return self._finish(exposure, *parts, times)

    def _solve(self, exposure, referencePsfModel, kernelSum, times):
        """Input checks -> cell set -> normal equations -> spatial solve.

        Shared by :meth:`run` and :func:`gpumatch.recommend.evaluate_config`
        (which needs only the PSFs and the bounding box of ``exposure``).

        Returns
        -------
        tuple
            ``(cell_set, choice, basis, sf, solution, reference)``; ``times``
            gets the seconds spent in each stage.
        """
        stages = self._stages
        t0 = time.perf_counter()

        kernel_sum, choice, cell_set, reference, basis = self._prepare(
            exposure, referencePsfModel, kernelSum)
        stages.sync()
        t1 = time.perf_counter()
        times["cellSet"] = t1 - t0

        M, b = stages.normal_equations(cell_set.templates, cell_set.targets, basis, 2.0)
        solutions = stages.solve_candidates(M, b)
        stages.sync()
        t2 = time.perf_counter()
        times["normalEquations"] = t2 - t1

        sf, A, rhs = self._spatial_system(cell_set, M, b, solutions)
        solution = stages.solve_spatial(A, rhs, len(basis), sf.n_terms, kernel_sum,
                                        self.config.conditionNumberType,
                                        to_model=sf.from_solve_functions())
        times["spatialSolve"] = time.perf_counter() - t2
        return cell_set, choice, basis, sf, solution, reference

    def _prepare(self, exposure, referencePsfModel, kernelSum, basis_for=alard_lupton_basis):
        """Input checks -> basis choice -> cell set -> basis.

        Shared by :meth:`run`, :meth:`buildCellSet` and :func:`gpumatch.match_many`.
        ``basis_for(kernel_size, sigmas, degrees)`` builds the basis (``None``:
        no basis is built and ``None`` is returned for it).

        Returns
        -------
        tuple
            ``(kernel_sum, choice, cell_set, reference, basis)``.
        """
        kernel_sum = self._check_inputs(exposure, referencePsfModel, kernelSum)
        choice = self._basis_choice(exposure, referencePsfModel)
        _check_memory(self.config, exposure, referencePsfModel, choice, self._stages.xp)
        cell_set, reference = build_cell_set(exposure, referencePsfModel, self.config,
                                             choice.kernel_size, xp=self._stages.xp)
        # The model as given, not resized: what the output records as its reference.
        cell_set.reference_given = referencePsfModel
        basis = None if basis_for is None else basis_for(choice.kernel_size, choice.sigmas,
                                                         choice.degrees)
        return kernel_sum, choice, cell_set, reference, basis

    def _spatial_system(self, cell_set, M, b, solutions):
        """Store the candidates' normal equations ``M``, ``b`` and kernels on
        ``cell_set`` and assemble the spatial system from them.

        Returns
        -------
        tuple
            ``(sf, A, rhs)``: the spatial functions, the system and its right
            side, in the unknowns of ``sf.solve_functions()`` (docs/algorithm.md
            section 6; ``sf.from_solve_functions()`` converts the solution).
        """
        cfg, xp = self.config, self._stages.xp
        cell_set.normal_matrices, cell_set.normal_vectors = M, b
        cell_set.kernel_solutions = solutions
        cell_set.status = ["GOOD"] * len(cell_set)
        sf = SpatialFunctions(cfg.spatialModelType, cfg.spatialKernelOrder, cell_set.region)
        # A few numbers per candidate: made on the host, copied once.
        P = xp.asarray(sf.solve_functions().evaluate(cell_set.xs, cell_set.ys))
        A, rhs = assemble_spatial_system(M, b, P, xp=xp)
        cell_set.spatial_matrix = A  # for the equilibrated condition number (gpumatch.verdict)
        return sf, A, rhs

    def _finish(self, exposure, cell_set, choice, basis, sf, solution, reference, times):
        """Spatial kernel -> application -> quality -> metadata.

        Shared by :meth:`run` and :func:`gpumatch.match_many`, so both give the
        same results and metadata.
        """
        return self._complete(self._start_finish(exposure, cell_set, choice, basis, sf,
                                                 solution, reference, times))

    def _start_finish(self, exposure, cell_set, choice, basis, sf, solution, reference, times,
                      transfers=None):
        """The first half of :meth:`_finish`: the spatial kernel, and its application
        queued (on ``transfers``, see :meth:`CupyStages.transfers`)."""
        kernel = SpatialKernel(basis, sf, solution.coefficients)
        t0 = time.perf_counter()
        pending = self._stages.start_apply(exposure, kernel, reference, transfers)
        return _Finishing(exposure, cell_set, choice, sf, solution, reference, times, kernel,
                          pending, time.perf_counter() - t0)

    def _complete(self, state):
        """The second half of :meth:`_finish`: quality (while the application may
        still run on the device), the matched exposure, metadata."""
        stages = self._stages
        cell_set, choice, sf, solution, times, kernel = (
            state.cell_set, state.choice, state.sf, state.solution, state.times, state.kernel)
        t0 = time.perf_counter()
        quality = candidate_residuals(cell_set, kernel)
        t1 = time.perf_counter()
        times["quality"] = t1 - t0
        matched = state.pending.result()
        stages.sync()
        # What the application cost beyond the quality step that ran beside it.
        times["apply"] = state.queue_time + time.perf_counter() - t1

        cx, cy = cell_set.region.center
        n = len(cell_set)
        md = {
            "spatialConditionNum": solution.condition_number,
            "spatialKernelSum": float(kernel.sum_at(cx, cy)),
            "ALBasisNGauss": len(choice.sigmas),
            "ALBasisDegGauss": list(choice.degrees),
            "ALBasisSigGauss": [float(s) for s in choice.sigmas],
            "ALKernelSize": int(choice.kernel_size),
            "ALBasisMode": choice.mode,
            "numKernelCandidates": n,
            "numUsedCandidates": n,
            "numRejectedCandidates": 0,
            "numSpatialTerms": sf.n_terms,
            "numSpatialUnknowns": solution.n_unknowns,
            "spatialSolveMethod": solution.method,
            "spatialSolveReason": solution.reason,
            "spatialConditionNumEquilibrated": solution.equilibrated_condition_number,
            "spatialSolveRank": solution.rank,
            "spatialSolveOn": self.spatial_solve,
            "psfSize": cell_set.psf_size,
            "psfPadding": cell_set.pad,
            "backend": self.backend,
            "matchedPsfRelL2Median": quality["relative_l2_median"],
            "matchedPsfRelL2Max": quality["relative_l2_max"],
            "matchedPsfMaxAbs": quality["max_abs_max"],
            "matchedPsfFwhmRatioMedian": quality["fwhm_ratio_median"],
            "matchedPsfFwhmRatioWorst": quality["fwhm_ratio_worst"],
            **_noise_gains(kernel, state.exposure.bbox),
            "candidateRelL2": quality["relative_l2"].tolist(),
            "candidateMaxAbs": quality["max_abs"].tolist(),
            "candidateFwhmMatched": quality["fwhm_matched"].tolist(),
            "candidateFwhmReference": quality["fwhm_reference"].tolist(),
            "candidateFwhmExposure": quality["fwhm_exposure"].tolist(),
            "timings": times,
        }
        judge(md, self.config, solution, matched.image)
        self.metadata = md
        record_match(matched, state.exposure, cell_set.reference_given, kernel, self.config,
                     self.backend)
        self._log_solution(md, sf.n_terms)
        return ModelPsfMatchResult(matched, kernel, cell_set, state.reference, md)

    def _log_solution(self, md, n_terms):
        cfg = self.config
        log.info("spatial kernel sum %.6g, condition number %.4g (%s, rank %d of %d)",
                 md["spatialKernelSum"], md["spatialConditionNum"], md["spatialSolveMethod"],
                 md["spatialSolveRank"], md["numSpatialUnknowns"])
        if md["spatialConditionNum"] > cfg.maxSpatialConditionNumber:
            # Routine for Alard-Lupton bases (5e12 on `gpumatch example`, a 6e-4 match): only
            # the equilibrated system's singularity threatens the solution (warn_conditioning).
            log.info("spatial condition number %.4g exceeds maxSpatialConditionNumber=%.4g "
                     "(equilibrated: %.4g)", md["spatialConditionNum"],
                     cfg.maxSpatialConditionNumber, md["spatialConditionNumEquilibrated"])
        warn_conditioning(md)
        used = md["numUsedCandidates"]
        if used < n_terms:
            log.warning("spatial model under-constrained: %d candidates for %d spatial terms "
                        "per basis; lower spatialKernelOrder or use smaller cells", used, n_terms)
        elif used <= 2 * n_terms:
            log.warning("spatial model poorly constrained: %d candidates for %d spatial terms "
                        "per basis", used, n_terms)

    def diagnostic(self, kernelCellSet, spatialKernel):
        """Matched-PSF residuals of every candidate, logged and returned.

        For each candidate the template stamp is correlated with the normalised
        spatial kernel at its position and compared with the target on the good
        region; the FWHM of the matched and reference stamps are measured with
        adaptive moments.

        Returns
        -------
        dict
            Arrays ``relative_l2``, ``max_abs``, ``fwhm_matched`` and
            ``fwhm_reference`` (one entry per candidate) and their summaries.
        """
        res = candidate_residuals(kernelCellSet, spatialKernel)
        log.info("matched-PSF residual over %d candidates: relative L2 median %.3g, max %.3g",
                 len(res["relative_l2"]), res["relative_l2_median"], res["relative_l2_max"])
        return res
