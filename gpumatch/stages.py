"""The data path as stages over a :class:`MatchState` (docs/algorithm.md sections 3-9).

exposure -> cell set (:func:`prepare`) -> per-candidate normal equations
(:func:`normal_equations`, then :func:`spatial_system`) -> spatial solve
(:func:`solve`) -> spatial kernel and its application (:func:`start_apply`)
-> quality, verdict and metadata (:func:`complete`).

:meth:`gpumatch.ModelPsfMatchTask.run` drives one state through them and
:func:`gpumatch.match_many` a batch (sharing one call of a stage between the
states where it can); a batch of one is a run, so both give the same results.
Each stage reads the task's configuration and backend
(``task.array_backend``, a :class:`gpumatch.backends.Backend`) and records its
seconds in ``state.times`` (:func:`timed`). A stage that fails for one
exposure of a batch records the error on its state (:func:`captured`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .backends import get_backend
from .basis import alard_lupton_basis, alard_lupton_factors, basis_widths
from .cellset import build_cell_set
from .errors import MissingPsfError, PsfEvaluationError
from .kernel import SpatialKernel
from .moments import SIGMA_TO_FWHM
from .provenance import record_match, start_input_checksum
from .quality import candidate_residuals
from .spatial import SpatialFunctions
from .spatial_solve import assemble_spatial_system
from .verdict import judge, warn_conditioning

log = logging.getLogger("gpumatch")

__all__ = ["MatchState", "StageContext", "ModelPsfMatchResult", "timed", "captured", "prepare",
           "normal_equations", "spatial_system", "solve", "start_apply", "complete",
           "solve_exposure", "check_inputs"]


@dataclass
class ModelPsfMatchResult:
    """What :meth:`ModelPsfMatchTask.run` returns (names as in LSST).

    Parameters
    ----------
    psfMatchedExposure : Exposure
        The matched exposure: same bbox, WCS and metadata as the input; its PSF
        is the reference.
    psfMatchingKernel : SpatialKernel
        The spatial kernel (parent pixel coordinates).
    kernelCellSet : KernelCellSet
        Cells, candidates, stamps and per-candidate solutions.
    referencePsfModel : Psf
        The reference as used (resized to the stamp size when needed).
    metadata : dict
        Diagnostics and the verdict (docs/algorithm.md sections 8 and 12).
    """

    psfMatchedExposure: object
    psfMatchingKernel: SpatialKernel
    kernelCellSet: object
    referencePsfModel: object
    metadata: dict = field(default_factory=dict)


@dataclass
class MatchState:
    """One exposure on its way through the stages.

    ``reference_model`` is the reference as given; ``reference`` the one the
    cell set used (resized to the stamp size when needed). Each stage fills
    its fields; ``times`` holds the seconds of each stage and ``error`` the
    exception that ended this exposure's way (in a batch).
    """

    exposure: object = None
    reference_model: object = None
    kernel_sum: float = 1.0
    source: object = None  # what the caller gave (a path, or the exposure)
    choice: object = None
    basis: object = None
    basis_factors: object = None
    input_checksum: object = None
    cell_set: object = None
    reference: object = None
    sf: object = None
    A: object = None
    rhs: object = None
    solution: object = None
    kernel: SpatialKernel = None
    pending: object = None  # the application in flight
    queue_time: float = 0.0
    times: dict = field(default_factory=dict)
    error: BaseException = None


@dataclass
class StageContext:
    """What the stages read of a task: its configuration and backend.

    A :class:`~gpumatch.ModelPsfMatchTask` is one; this is the task-free form
    (for callers that solve without a task, such as :mod:`gpumatch.recommend`).
    """

    config: object
    array_backend: object
    backend: str = ""
    metadata: dict = field(default_factory=dict)

    @classmethod
    def on(cls, config, backend="numpy"):
        """A context on a registered backend (no self-check: for the host backends)."""
        impl = get_backend(backend)
        return cls(config, impl, impl.name)


@contextlib.contextmanager
def timed(state, stage, backend=None, add=False):
    """Record the seconds of the enclosed code in ``state.times[stage]``.

    ``backend``: synchronised before the clock stops (queued device work is
    counted). ``add``: added to what is recorded already.
    """
    t0 = time.perf_counter()
    yield
    if backend is not None:
        backend.sync()
    seconds = time.perf_counter() - t0
    state.times[stage] = state.times.get(stage, 0.0) + seconds if add else seconds


@contextlib.contextmanager
def captured(state, passthrough=()):
    """A failure of the enclosed code becomes ``state.error``; ``passthrough``
    exceptions (out-of-memory: the batch is retried smaller) propagate."""
    try:
        yield
    except passthrough:
        raise
    except Exception as exc:
        state.error = exc


# -- inputs and basis ---------------------------------------------------------------


def check_inputs(config, exposure, referencePsfModel, kernelSum=1.0):
    """The kernel sum as a float, once the inputs are known to be usable."""
    config.validate()
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


def basis_choice(config, exposure, referencePsfModel):
    """The basis widths, degrees and kernel size (docs/algorithm.md section 2)."""
    if not config.scaleByFwhm:
        return basis_widths(config)
    bbox = exposure.bbox
    pos = exposure.psf.average_position or bbox.center
    t = _psf_sigma(exposure.psf, pos[0], pos[1], "exposure PSF")
    rpos = referencePsfModel.average_position or bbox.center
    r = _psf_sigma(referencePsfModel, rpos[0], rpos[1], "reference PSF")
    log.info("PSF FWHM: exposure %.3f px, reference %.3f px", t * SIGMA_TO_FWHM, r * SIGMA_TO_FWHM)
    return basis_widths(config, t, r)


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


# -- the stages -----------------------------------------------------------------------


def prepare(task, state, basis_for=alard_lupton_basis):
    """Input checks -> basis choice -> cell set -> basis (``state.times["cellSet"]``).

    ``basis_for(kernel_size, sigmas, degrees)`` builds the basis (None: none
    is built). ``state.reference`` is the reference the cell set used.
    """
    backend, config = task.array_backend, task.config
    # Hashed on a second thread while the stages run; recorded at the end.
    state.input_checksum = start_input_checksum(state.exposure)
    with timed(state, "cellSet", backend):
        state.kernel_sum = check_inputs(config, state.exposure, state.reference_model,
                                        state.kernel_sum)
        state.choice = choice = basis_choice(config, state.exposure, state.reference_model)
        _check_memory(config, state.exposure, state.reference_model, choice, backend.xp)
        state.cell_set, state.reference = build_cell_set(
            state.exposure, state.reference_model, config, choice.kernel_size, xp=backend.xp)
        # The model as given, not resized: what the output records as its reference.
        state.cell_set.reference_given = state.reference_model
        state.basis = None if basis_for is None else basis_for(choice.kernel_size, choice.sigmas,
                                                               choice.degrees)
        # Used by the normal equations only where it describes state.basis.
        state.basis_factors = None if basis_for is None else alard_lupton_factors(
            choice.kernel_size, choice.sigmas, choice.degrees)
    return state


def normal_equations(task, state):
    """Per-candidate normal equations and single-candidate kernels, then the spatial
    system (``times["normalEquations"]`` and ``times["spatialSolve"]``)."""
    backend = task.array_backend
    cell_set = state.cell_set
    with timed(state, "normalEquations", backend):
        M, b = backend.normal_equations(cell_set.templates, cell_set.targets, state.basis, 2.0,
                                        state.basis_factors)
        solutions = backend.solve_candidates(M, b)
    with timed(state, "spatialSolve"):
        spatial_system(task, state, M, b, solutions)
    return state


def spatial_system(task, state, M, b, solutions):
    """Store the candidates' normal equations ``M``, ``b`` and kernels on the cell set
    and assemble the spatial system from them: ``state.sf``, ``state.A``,
    ``state.rhs``, in the unknowns of ``sf.solve_functions()`` (docs/algorithm.md
    section 6; ``sf.from_solve_functions()`` converts the solution)."""
    cfg, xp = task.config, task.array_backend.xp
    cell_set = state.cell_set
    cell_set.normal_matrices, cell_set.normal_vectors = M, b
    cell_set.kernel_solutions = solutions
    cell_set.status = ["GOOD"] * len(cell_set)
    sf = SpatialFunctions(cfg.spatialModelType, cfg.spatialKernelOrder, cell_set.region)
    # A few numbers per candidate: made on the host, copied once.
    P = xp.asarray(sf.solve_functions().evaluate(cell_set.xs, cell_set.ys))
    state.A, state.rhs = assemble_spatial_system(M, b, P, xp=xp)
    cell_set.spatial_matrix = state.A  # kept for diagnostics (its conditioning, its eigenvalues)
    state.sf = sf
    return state


def solve(task, states):
    """The spatial solves of ``states`` (one batched call per system size), their
    seconds shared out into ``times["spatialSolve"]``. A state whose system has
    no solution gets its :class:`~gpumatch.errors.SolutionError` as ``error``."""
    backend = task.array_backend
    by_size = OrderedDict()
    for state in states:
        if state.error is None:
            by_size.setdefault((len(state.basis), state.sf.n_terms), []).append(state)
    for (nb, nkt), group in by_size.items():
        t0 = time.perf_counter()
        solved = backend.solve_spatial_many([s.A for s in group], [s.rhs for s in group], nb, nkt,
                                            [s.kernel_sum for s in group],
                                            task.config.conditionNumberType,
                                            to_models=[s.sf.from_solve_functions() for s in group])
        share = (time.perf_counter() - t0) / len(group)
        for state, sol in zip(group, solved):
            state.times["spatialSolve"] = state.times.get("spatialSolve", 0.0) + share
            if isinstance(sol, BaseException):
                state.error = sol
            else:
                state.solution = sol
    return states


def solve_exposure(task, exposure, referencePsfModel, kernelSum=1.0):
    """:func:`prepare`, :func:`normal_equations` and :func:`solve` of one exposure.

    Raises what the first failing stage raises.
    """
    state = MatchState(exposure, referencePsfModel, kernelSum)
    prepare(task, state)
    normal_equations(task, state)
    solve(task, [state])
    if state.error is not None:
        raise state.error
    return state


def start_apply(task, state, transfers=None):
    """The spatial kernel, and its application queued (on ``transfers``, see
    :meth:`gpumatch.backends.Backend.transfers`)."""
    state.kernel = SpatialKernel(state.basis, state.sf, state.solution.coefficients)
    t0 = time.perf_counter()
    state.pending = task.array_backend.start_apply(state.exposure, state.kernel, state.reference,
                                                   transfers)
    state.queue_time = time.perf_counter() - t0
    return state


def _noise_gains(kernel, bbox, n=5):
    """``noiseVarianceGain`` at the centre of ``bbox`` and its range on an
    ``n x n`` grid over it (see :meth:`SpatialKernel.noise_variance_gain`)."""
    xs, ys = np.meshgrid(np.linspace(bbox.x0, bbox.x1, n), np.linspace(bbox.y0, bbox.y1, n))
    grid = kernel.noise_variance_gain(xs.ravel(), ys.ravel())
    return {"noiseVarianceGain": kernel.noise_variance_gain(*bbox.center),
            "noiseVarianceGainMin": float(grid.min()), "noiseVarianceGainMax": float(grid.max())}


def complete(task, state):
    """Quality (while the application may still run on the device), the matched
    exposure, verdict and metadata: the :class:`ModelPsfMatchResult`."""
    backend = task.array_backend
    cell_set, choice, sf, solution, kernel = (
        state.cell_set, state.choice, state.sf, state.solution, state.kernel)
    times = dict(state.times)
    t0 = time.perf_counter()
    quality = candidate_residuals(cell_set, kernel)
    t1 = time.perf_counter()
    times["quality"] = t1 - t0
    matched = state.pending.result()
    backend.sync()
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
        "spatialSolveOn": backend.spatial_solve,
        "psfSize": cell_set.psf_size,
        "psfPadding": cell_set.pad,
        "backend": task.backend,
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
    judge(md, task.config, solution, matched.image)
    task.metadata = md
    record_match(matched, state.exposure, cell_set.reference_given, kernel, task.config,
                 task.backend, state.input_checksum)
    _log_solution(task.config, md, sf.n_terms)
    return ModelPsfMatchResult(matched, kernel, cell_set, state.reference, md)


def _log_solution(cfg, md, n_terms):
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
