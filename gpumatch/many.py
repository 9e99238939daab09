"""Many exposures on one device: :func:`match_many`.

A camera visit is a few hundred exposures matched to one reference model with
one configuration. :func:`match_many` runs them in batches and, compared with
calling :meth:`ModelPsfMatchTask.run` in a loop,

- measures and realises the reference model once: its stamps at the candidate
  positions, its size and its resized form are shared by every exposure with
  the same cell grid (all the detectors of a visit);
- builds each Alard-Lupton basis once (exposures whose basis choice is the
  same share it);
- puts the candidates of all the exposures of a batch into one
  normal-equation call and one batched single-candidate solve (one kernel
  launch each on the GPU), grouped by basis and stamp size;
- solves the spatial systems of the batch in one batched float64 call
  (:func:`solve_spatial_systems`; grouped by system size, so exposures of
  different sizes mix freely).

Every per-candidate and per-exposure computation is the one ``run`` does, in
the same order, so the results are *identical* to ``run``'s (kernel
coefficients, matched pixels, metadata other than timings).

On the CuPy backend the batch size comes from the free device memory, and an
out-of-memory error while a batch is solved halves the batch and retries.

TODO(GPU): overlap the host-to-device copy of the next exposure with the
compute of the current one (pinned host buffers and a second stream). Not
done yet: it cannot be verified without a device and is the kind of
complexity that must be measured before it is kept. The batching above is
independent of it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .backend import single_threaded_blas, to_numpy
from .basis import alard_lupton_basis
from .cellset import build_cell_set, next_odd
from .errors import GpumatchError
from .linalg import SymmetricSolution
from .psf.base import Psf
from .spatial import SpatialFunctions
from .spatial_solve import SpatialSolution, assemble_spatial_system, solve_spatial_system
from .task import ModelPsfMatchTask

log = logging.getLogger("gpumatch")

__all__ = ["match_many", "solve_spatial_systems"]

#: Exposures per batch on the CPU (NumPy) backend.
DEFAULT_CPU_BATCH = 8
#: Upper bound of the batch size on the device.
MAX_DEVICE_BATCH = 256
#: Share of the free device memory a batch may plan to use.
DEVICE_MEMORY_FRACTION = 0.6
#: Share of the available host memory that a batch of exposures may hold.
HOST_MEMORY_FRACTION = 0.25
#: Device bytes per exposure pixel reserved for applying the kernel to one
#: exposure (input planes, float64 work planes, output planes).
APPLY_BYTES_PER_PIXEL = 64
#: Reference realisations kept (one per distinct cell grid and stamp size).
_REFERENCE_CACHE = 8


# -- the shared reference model ---------------------------------------------------


class _SharedReference(Psf):
    """The reference model, with its evaluations memoised.

    It answers exactly what the wrapped model answers (the first answer is
    kept and returned again), so cell sets built with it equal cell sets
    built with the model itself; :attr:`model` is what results report.
    """

    def __init__(self, model):
        self.model = model
        self.average_position = model.average_position
        self.supports_device = getattr(model, "supports_device", False)
        self._stamps = OrderedDict()
        self._radius = {}
        self._dims = {}
        self._resized = {}

    def compute_kernel_image(self, x, y):
        return self.model.compute_kernel_image(x, y)

    def compute_kernel_images(self, xs, ys, xp=None):
        key = (to_numpy(xs).tobytes(), to_numpy(ys).tobytes(),
               None if xp is None else xp.__name__)
        hit = self._stamps.get(key)
        if hit is None:
            hit = (self.model.compute_kernel_images(xs, ys) if xp is None
                   else self.model.compute_kernel_images(xs, ys, xp=xp))
            self._stamps[key] = hit
            if len(self._stamps) > _REFERENCE_CACHE:
                self._stamps.popitem(last=False)
        else:
            self._stamps.move_to_end(key)
        return hit

    def dimensions(self, x=None, y=None):
        key = (x, y)
        if key not in self._dims:
            self._dims[key] = self.model.dimensions(x, y)
        return self._dims[key]

    def determinant_radius(self, x=None, y=None):
        key = (x, y)
        if key not in self._radius:
            self._radius[key] = self.model.determinant_radius(x, y)
        return self._radius[key]

    def compute_shape(self, x=None, y=None):
        return self.model.compute_shape(x, y)

    def fwhm(self, x=None, y=None):
        return self.model.fwhm(x, y)

    def resized(self, width, height):
        key = (width, height)
        if key not in self._resized:
            self._resized[key] = _SharedReference(self.model.resized(width, height))
        return self._resized[key]

    def __repr__(self):
        return repr(self.model)


def _unwrap(psf):
    return psf.model if isinstance(psf, _SharedReference) else psf


# -- the batched spatial solve ----------------------------------------------------


def _batched_symmetric_solves(A, b, condition_type):
    """:func:`gpumatch.linalg.solve_symmetric` for a stack ``(n, m, m)``.

    The eigen-decompositions (the cost) are one stacked LAPACK call each;
    every matrix is treated exactly as ``solve_symmetric`` treats it alone,
    so the solutions are bitwise the same.
    """
    import scipy.linalg

    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = A.shape[-1]
    if condition_type == "SVD":
        s = np.linalg.svd(A, compute_uv=False)
    else:
        s = np.abs(np.linalg.eigvalsh(A))
    smax, smin = s.max(axis=-1), s.min(axis=-1)
    conds = []
    for hi, lo in zip(smax, smin):
        if hi == 0:
            conds.append(float("inf"))
        else:
            conds.append(float(hi / lo) if lo > 0 else float("inf"))
    diag = np.diagonal(A, axis1=1, axis2=2)
    d = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
    As = A * d[:, :, None] * d[:, None, :]
    bs = b * d
    lam, vec = np.linalg.eigh(As)
    tol = np.abs(lam).max(axis=-1) * n * np.finfo(np.float64).eps
    out = []
    for i in range(len(A)):
        keep = np.abs(lam[i]) > tol[i]
        rank = int(keep.sum())
        if rank == n:
            try:
                y = scipy.linalg.cho_solve(scipy.linalg.cho_factor(As[i], lower=True), bs[i])
                method = "cholesky"
            except np.linalg.LinAlgError:
                y = scipy.linalg.solve(As[i], bs[i], assume_a="sym")
                method = "lu"
            if np.all(np.isfinite(y)):
                out.append(SymmetricSolution(y * d[i], method, conds[i], rank))
                continue
        inv = np.where(keep, 1.0 / np.where(keep, lam[i], 1.0), 0.0)
        y = vec[i] @ (inv * (vec[i].T @ bs[i]))
        out.append(SymmetricSolution(y * d[i], "eigen-pseudo-inverse", conds[i], rank))
    return out


def solve_spatial_systems(As, rhss, nb, nkt, kernel_sums, condition_type="EIGENVALUE"):
    """Solve many spatial systems of one size in one batched float64 call.

    The batched form of :func:`gpumatch.spatial_solve.solve_spatial_system`,
    with the same results.

    Parameters
    ----------
    As : sequence of arrays (nt, nt)
    rhss : sequence of arrays (nt,)
    nb, nkt : int
        Basis images and spatial terms (``nt = (nb - 1) nkt + 1``).
    kernel_sums : sequence of float
        One per system.

    Returns
    -------
    list
        One :class:`SpatialSolution` per system, or the exception (a
        :class:`~gpumatch.errors.SolutionError`) that the single solve raises.
    """
    if not len(As):
        return []
    A = np.stack([to_numpy(a) for a in As])
    rhs = np.stack([to_numpy(r) for r in rhss])
    out = []
    for i, sol in enumerate(_batched_symmetric_solves(A, rhs, condition_type)):
        if not np.all(np.isfinite(sol.x)):
            # Rare: let the single solve build its error message.
            try:
                out.append(solve_spatial_system(A[i], rhs[i], nb, nkt, kernel_sums[i],
                                                condition_type))
            except Exception as exc:
                out.append(exc)
            continue
        coeffs = np.zeros((nb, nkt))
        coeffs[0, 0] = kernel_sums[i]
        coeffs[1:] = kernel_sums[i] * sol.x[1:].reshape(nb - 1, nkt)
        out.append(SpatialSolution(coeffs, sol.condition_number, sol.method, sol.rank,
                                   len(rhs[i])))
    return out


# -- one exposure's state through a batch -----------------------------------------


@dataclass
class _Job:
    source: object
    exposure: object = None
    error: BaseException = None
    kernel_sum: float = 1.0
    choice: object = None
    basis_key: tuple = None
    basis: object = None
    cell_set: object = None
    reference: object = None
    sf: object = None
    A: object = None
    rhs: object = None
    solution: object = None
    times: dict = field(default_factory=dict)


def _oom_errors(backend):
    if backend != "cupy":
        return ()
    import cupy

    return (cupy.cuda.memory.OutOfMemoryError,)


def _free_device_memory():
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


class _ManyMatcher:
    def __init__(self, task, reference, kernel_sum, psf, batch_size):
        self.task = task
        self.reference = reference
        self.shared = _SharedReference(reference) if hasattr(reference, "compute_kernel_image") \
            else reference
        self.kernel_sum = kernel_sum
        self.psf = psf
        self.batch_size = batch_size
        self.stages = task._stages
        self.xp = task._stages.xp
        self.oom = _oom_errors(task.backend)
        self._bases = {}
        self._device_limit = None  # shrinks after an out-of-memory error

    # -- batching ------------------------------------------------------------------

    def _phase1_bytes(self, exposure):
        """Device bytes one exposure holds from its cell set to its spatial solve."""
        cfg = self.task.config
        ny, nx = exposure.shape
        cells = (((nx + 2 * cfg.sizeCellX) // cfg.sizeCellX)
                 * ((ny + 2 * cfg.sizeCellY) // cfg.sizeCellY))
        k = cfg.kernelSizeMax if cfg.scaleByFwhm else cfg.kernelSize
        size = max(next_odd(k * cfg.autoPadPsfTo) if cfg.doAutoPadPsf else k + 2 + cfg.padPsfBy,
                   k + 2)
        nb = sum((d + 1) * (d + 2) // 2 for d in cfg.alardDegGauss)
        # Template and target stamps (and one temporary copy of each while they
        # are normalised and concatenated), M, b and the candidate solutions.
        return cells * 8 * (4 * size * size + 2 * nb * nb + 3 * nb)

    def _batch_limit(self, first):
        if self.batch_size is not None:
            return max(1, int(self.batch_size))
        if self.task.backend != "cupy":
            return DEFAULT_CPU_BATCH
        if self._device_limit is not None:
            return self._device_limit
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
        free += cupy.get_default_memory_pool().free_bytes()
        exposure = first.exposure
        if exposure is None:
            return 1
        budget = DEVICE_MEMORY_FRACTION * free - APPLY_BYTES_PER_PIXEL * exposure.image.size
        limit = int(budget // max(1, self._phase1_bytes(exposure)))
        # A batch of inputs read from files is held in host memory too.
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            planes = exposure.image.nbytes + exposure.variance.nbytes + exposure.mask.nbytes
            limit = min(limit, int(HOST_MEMORY_FRACTION * host // max(1, planes)))
        except (ValueError, OSError, AttributeError):
            pass
        return max(1, min(MAX_DEVICE_BATCH, limit))

    def run(self, exposures, on_error):
        items = iter(exposures)
        end = object()
        while True:
            item = next(items, end)
            if item is end:
                return
            jobs = [self._load(item)]
            limit = self._batch_limit(jobs[0])
            while len(jobs) < limit:
                item = next(items, end)
                if item is end:
                    break
                jobs.append(self._load(item))
            # Not held across the yields: the caller's own code keeps its BLAS threads.
            with single_threaded_blas():
                self._solve_with_retry(jobs)
            for job in jobs:
                if job.error is None:
                    try:
                        with single_threaded_blas():
                            result = self._finish(job)
                    except self.oom:
                        raise
                    except Exception as exc:
                        job.error = exc
                if job.error is not None:
                    if on_error == "raise":
                        raise job.error
                    result = job.error
                # Drop what the batch no longer needs before the next result.
                job.exposure = job.cell_set = job.A = job.rhs = None
                yield result

    def _load(self, item):
        job = _Job(item)
        try:
            if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
                job.exposure = self._read(item)
            else:
                job.exposure = item
        except Exception as exc:
            job.error = exc
        return job

    def _read(self, path):
        from .exposure import Exposure
        from .pipeline import PSF_SIDECARS, _psf_from_file, find_psf

        path = os.fspath(path)
        exposure = Exposure.read_fits(path)
        if self.psf is not None:
            exposure.psf = self.psf
        elif exposure.psf is None:
            found = find_psf(path, exposure.meta)
            if found is None:
                raise GpumatchError(
                    f"{path}: no PSF model; give psf=..., put a PSF_FILE card in the header, or "
                    f"place a PSFEx file next to it "
                    f"({', '.join(p.format(stem='<stem>') for p in PSF_SIDECARS)})")
            exposure.psf = _psf_from_file(found)
        return exposure

    def _solve_with_retry(self, jobs):
        try:
            self._solve(jobs)
        except self.oom:
            _free_device_memory()
            if len(jobs) == 1:
                raise
            half = len(jobs) // 2
            self._device_limit = half
            log.warning("device out of memory on a batch of %d exposures; retrying in "
                        "batches of %d", len(jobs), half)
            for job in jobs:  # start again from the cell sets
                job.cell_set = job.A = job.rhs = job.solution = None
            self._solve_with_retry(jobs[:half])
            self._solve_with_retry(jobs[half:])

    # -- the batched part: cell sets, normal equations, spatial solves ------------------

    def _basis(self, choice):
        key = (int(choice.kernel_size), tuple(float(s) for s in choice.sigmas),
               tuple(int(d) for d in choice.degrees))
        basis = self._bases.get(key)
        if basis is None:
            basis = self._bases[key] = alard_lupton_basis(choice.kernel_size, choice.sigmas,
                                                          choice.degrees)
        return key, basis

    def _prepare(self, job):
        task = self.task
        t0 = time.perf_counter()
        job.kernel_sum = task._check_inputs(job.exposure, self.reference, self.kernel_sum)
        job.choice = task._basis_choice(job.exposure, self.shared)
        job.cell_set, reference = build_cell_set(job.exposure, self.shared, task.config,
                                                 job.choice.kernel_size, xp=self.xp)
        job.reference = _unwrap(reference)
        job.basis_key, job.basis = self._basis(job.choice)
        self.stages.sync()
        job.times["cellSet"] = time.perf_counter() - t0

    def _guard(self, job, fn, *args):
        """Run ``fn``; a failure belongs to ``job`` (out-of-memory goes up)."""
        if job.error is not None:
            return
        try:
            fn(*args)
        except self.oom:
            raise
        except Exception as exc:
            job.error = exc

    def _solve(self, jobs):
        xp, stages, cfg = self.xp, self.stages, self.task.config
        for job in jobs:
            self._guard(job, self._prepare, job)

        # Normal equations and single-candidate solves: one call per (basis, stamp size).
        groups = OrderedDict()
        for job in jobs:
            if job.error is None:
                groups.setdefault((job.basis_key, job.cell_set.psf_size), []).append(job)
        for group in groups.values():
            t0 = time.perf_counter()
            try:
                if len(group) == 1:
                    templates, targets = group[0].cell_set.templates, group[0].cell_set.targets
                else:
                    templates = xp.concatenate([j.cell_set.templates for j in group])
                    targets = xp.concatenate([j.cell_set.targets for j in group])
                M, b = stages.normal_equations(templates, targets, group[0].basis, 2.0)
                solutions = stages.solve_candidates(M, b)
                stages.sync()
            except self.oom:
                raise
            except Exception as exc:
                for job in group:
                    job.error = exc
                continue
            del templates, targets
            share = (time.perf_counter() - t0) / len(group)
            start = 0
            for job in group:
                cs = job.cell_set
                stop = start + len(cs)
                if len(group) == 1:
                    cs.normal_matrices, cs.normal_vectors = M, b
                    cs.kernel_solutions = solutions
                else:
                    cs.normal_matrices = M[start:stop].copy()
                    cs.normal_vectors = b[start:stop].copy()
                    cs.kernel_solutions = solutions[start:stop].copy()
                cs.status = ["GOOD"] * len(cs)
                job.times["normalEquations"] = share
                start = stop
            del M, b, solutions

        # Spatial systems: assembled per exposure (sums over its own candidates),
        # solved in one batched call per system size.
        by_size = OrderedDict()
        for job in jobs:
            if job.error is not None:
                continue
            t0 = time.perf_counter()

            def assemble(job=job):
                cs = job.cell_set
                job.sf = SpatialFunctions(cfg.spatialModelType, cfg.spatialKernelOrder, cs.region)
                P = job.sf.evaluate(xp.asarray(cs.xs), xp.asarray(cs.ys), xp=xp)
                job.A, job.rhs = assemble_spatial_system(cs.normal_matrices, cs.normal_vectors,
                                                         P, xp=xp)

            self._guard(job, assemble)
            job.times["spatialSolve"] = time.perf_counter() - t0
            if job.error is None:
                by_size.setdefault((len(job.basis), job.sf.n_terms), []).append(job)
        for (nb, nkt), group in by_size.items():
            t0 = time.perf_counter()
            solved = solve_spatial_systems([j.A for j in group], [j.rhs for j in group], nb, nkt,
                                           [j.kernel_sum for j in group], cfg.conditionNumberType)
            share = (time.perf_counter() - t0) / len(group)
            for job, sol in zip(group, solved):
                job.times["spatialSolve"] += share
                if isinstance(sol, BaseException):
                    job.error = sol
                else:
                    job.solution = sol

    # -- per exposure: application, quality, metadata ---------------------------------

    def _apply(self, job, kernel):
        try:
            return self.stages.apply(job.exposure, kernel, job.reference)
        except self.oom:
            # The batch's stamps are small next to one exposure's planes, so
            # shrinking the batch does not help here; free the pool and retry once.
            _free_device_memory()
            log.warning("device out of memory applying the kernel; retrying once")
            return self.stages.apply(job.exposure, kernel, job.reference)

    def _finish(self, job):
        return self.task._finish(job.exposure, job.cell_set, job.choice, job.basis, job.sf,
                                 job.solution, job.reference, dict(job.times),
                                 apply=lambda exposure, kernel, psf: self._apply(job, kernel))


def match_many(exposures, referencePsfModel, config=None, backend="auto", kernel_sum=1.0, *,
               psf=None, batch_size=None, on_error="raise"):
    """PSF-match many exposures to one reference model, in batches.

    Parameters
    ----------
    exposures : iterable of Exposure or path
        Exposures, or FITS paths read with :meth:`Exposure.read_fits` (their
        PSF from ``psf``, else the header card or the file next to them, as
        ``gpumatch match`` finds it). Read lazily, one batch at a time.
    referencePsfModel : Psf
        The PSF to match to; measured and realised once for all exposures.
    config : ModelPsfMatchConfig, optional
    backend : {"auto", "numpy", "cupy"}
    kernel_sum : float
        As ``kernelSum`` of :meth:`ModelPsfMatchTask.run`.
    psf : Psf or str, optional
        PSF of the exposures given as paths.
    batch_size : int, optional
        Exposures per batch. Default: 8 on the CPU; on the GPU as many as fit
        in 60% of the free device memory and 25% of the available host memory
        (at most 256; halved after an out-of-memory error).
    on_error : {"raise", "yield"}
        ``"raise"``: an exposure that fails raises its error when its turn
        comes (the results before it have been yielded; the generator then
        stops). ``"yield"``: the exception object is yielded in its place and
        the others go on.

    Yields
    ------
    ModelPsfMatchResult
        One per exposure, in input order, equal to what
        ``ModelPsfMatchTask(config, backend).run(exposure, referencePsfModel,
        kernel_sum)`` returns (``metadata["timings"]`` aside: the batched
        stages' time is shared out evenly within the batch).
    """
    if on_error not in ("raise", "yield"):
        raise ValueError(f"on_error={on_error!r} must be 'raise' or 'yield'")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    task = ModelPsfMatchTask(config, backend=backend)
    if psf is not None:
        from .pipeline import resolve_psf

        psf = resolve_psf(psf)
    matcher = _ManyMatcher(task, referencePsfModel, kernel_sum, psf, batch_size)
    return matcher.run(exposures, on_error)
