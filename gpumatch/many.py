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

Overlap of input and compute
----------------------------
- Exposures given as paths are read ahead: while a batch is solved and
  applied, a small thread pool (``read_workers``) reads the files of the next
  batch, at most one batch ahead (the next batch is taken to be as large as
  the current one; a smaller limit later, after an out-of-memory error for
  example, leaves the extra reads for the batches after it). Exposures
  given as objects are not pulled ahead (nothing to read; it would only hold
  them in memory longer). Reading a
  4k x 4k three-plane FITS file takes longer than the device needs to match
  it, so this is what keeps the device busy on a visit read from disk. The
  input iterable is only advanced in the calling thread, the results stay in
  input order and equal those read in the calling thread (``read_workers=0``),
  and closing the generator cancels the reads not started and waits for
  those running.
- On the GPU, files are read straight into pinned host memory, so their
  planes go to the device with no host staging copy (exposures given as
  NumPy arrays in pageable memory are staged through pinned buffers, a host
  copy that costs about as much as the transfer itself).
- Within one exposure, the CUDA application overlaps its host-device copies
  with compute (the banded pipeline of :mod:`gpumatch.cuda.apply`). Across
  exposures, the applications of a batch share one set of streams, and
  exposure ``i + 1``'s application is queued before exposure ``i``'s result
  is waited for and yielded: its copies in overlap exposure ``i``'s last
  compute and copies out, and the caller's handling of result ``i``. Two
  applications are in flight at a time (the batch size reserves device
  memory for both).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor

from . import stages
from .backend import single_threaded_blas, to_numpy
from .backends import Backend
from .basis import alard_lupton_basis
from .cellset import next_odd
from .psf.base import Psf
from .spatial_solve import solve_spatial_systems
from .stages import MatchState, captured, timed
from .task import ModelPsfMatchTask
from .verdict import apply_policy, check_on_poor_match

log = logging.getLogger("gpumatch")

__all__ = ["match_many", "solve_spatial_systems"]

#: Exposures per batch on a host backend (``Backend.default_batch``).
DEFAULT_CPU_BATCH = Backend.default_batch
#: Upper bound of the batch size on a device (``Backend.max_batch``).
MAX_DEVICE_BATCH = Backend.max_batch
#: Share of the free device memory a batch may plan to use.
DEVICE_MEMORY_FRACTION = 0.6
#: Share of the available host memory that a batch of exposures may hold.
HOST_MEMORY_FRACTION = 0.25
#: Device bytes per exposure pixel reserved for applying the kernel to one
#: exposure (input planes, float64 work planes, output planes).
APPLY_BYTES_PER_PIXEL = 64
#: Reference realisations kept (one per distinct cell grid and stamp size).
_REFERENCE_CACHE = 8
#: Threads reading the next batch's files while a batch is computed.
DEFAULT_READ_WORKERS = min(4, os.cpu_count() or 1)
#: Name prefix of those threads.
READ_THREAD_PREFIX = "gpumatch-read"


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
        self.renders_on_device = isinstance(model, Psf) and model.renders_on_device
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


# -- one exposure's state through a batch: a gpumatch.stages.MatchState -------------


def _job(source):
    return MatchState(source=source)


def _is_path(item):
    return isinstance(item, (str, bytes)) or hasattr(item, "__fspath__")


class _Input:
    """The input of :func:`match_many`, in order, with paths read ahead.

    Items are pulled from the iterable in the calling thread only (it may be a
    generator that is not thread-safe). With ``workers``, exposures given as
    paths are read by a thread pool; otherwise, and for exposures given as
    objects, they are loaded when pulled. ``pending`` holds what was pulled and not yet taken:
    jobs, or futures of jobs.
    """

    def __init__(self, exposures, load, workers):
        self._items = iter(exposures)
        self._load = load
        self._workers = workers
        self._pool = None
        self.pending = deque()
        self._failure = None  # the iterable's own error, raised after the items before it
        self._exhausted = False
        self._last_was_path = True
        self._closed = threading.Event()

    def fill(self, n, ahead=0):
        """Pull items until ``n`` are pending or the input ends; then up to ``ahead``
        more while they are paths (read in the background). An exposure given as
        an object gains nothing from being pulled early, so it ends the read-ahead."""
        while not self._exhausted and (
                len(self.pending) < n or (len(self.pending) < n + ahead and self._last_was_path)):
            try:
                item = next(self._items)
            except StopIteration:
                self._exhausted = True
                break
            except Exception as exc:
                self._exhausted, self._failure = True, exc
                break
            self._last_was_path = _is_path(item)
            if self._workers and self._last_was_path:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._workers,
                                                    thread_name_prefix=READ_THREAD_PREFIX)
                self.pending.append(self._pool.submit(self._read_ahead, item))
            else:
                self.pending.append(self._load(item))

    def _read_ahead(self, item):
        if self._closed.is_set():  # closed before this read started
            return None
        return self._load(item)

    def take(self):
        """The next pending job, once it is read."""
        job = self.pending.popleft()
        return job.result() if isinstance(job, Future) else job

    def raise_failure(self):
        """At the end of the pending items: raise the iterable's error, if it had one."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _cancel(self):
        for job in self.pending:
            if isinstance(job, Future):
                job.cancel()
        self.pending.clear()

    def close(self):
        """Cancel the reads not started and wait for those running; no thread is left."""
        self._closed.set()
        self._cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class _ManyMatcher:
    def __init__(self, task, reference, kernel_sum, psf, batch_size, read_workers=0,
                 psf_from_header=False):
        self.task = task
        self.reference = reference
        self.shared = _SharedReference(reference) if hasattr(reference, "compute_kernel_image") \
            else reference
        self.kernel_sum = kernel_sum
        self.psf = psf
        self.psf_from_header = psf_from_header
        self.batch_size = batch_size
        self.read_workers = int(read_workers)
        self.on_poor_match = "warn"  # match_many's on_poor_match
        self.backend = task.array_backend
        self.xp = self.backend.xp
        self.oom = self.backend.oom_errors
        self._bases = {}
        self._device_limit = None  # shrinks after an out-of-memory error
        self.transfers = self.backend.transfers()

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
        if not self.backend.on_device:
            return self.backend.default_batch
        if self._device_limit is not None:
            return self._device_limit
        free = self.backend.free_memory()
        exposure = first.exposure
        if exposure is None:
            return 1
        # Two applications are in flight at a time (one queued while the other ends).
        budget = DEVICE_MEMORY_FRACTION * free - 2 * APPLY_BYTES_PER_PIXEL * exposure.image.size
        limit = int(budget // max(1, self._phase1_bytes(exposure)))
        if not _is_path(first.source):
            return max(1, min(self.backend.max_batch, limit))
        # A batch of inputs read from files is held in host memory too (and, with
        # read-ahead, the next batch's): together within the host share. Exposures
        # given as objects exist already; batching them costs no host memory.
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            # Read into pinned memory, whose pool rounds each block up to a power of two.
            planes = sum(1 << max(0, a.nbytes - 1).bit_length()
                         for a in (exposure.image, exposure.variance, exposure.mask))
            held = 2 if self.read_workers else 1
            limit = min(limit, int(HOST_MEMORY_FRACTION * host // max(1, held * planes)))
        except (ValueError, OSError, AttributeError):
            pass
        return max(1, min(self.backend.max_batch, limit))

    def run(self, exposures, on_error):
        source = _Input(exposures, self._load, self.read_workers)
        try:
            yield from self._batches(source, on_error)
        finally:  # also on close(), garbage collection or an error: no read goes on
            source.close()

    def _batches(self, source, on_error):
        while True:
            source.fill(1)
            if not source.pending:
                source.raise_failure()
                return
            jobs = [source.take()]
            # Decided from the batch's first exposure, before the next batch is read.
            limit = self._batch_limit(jobs[0])
            # With read-ahead, the next batch too, read while this one is computed: taken
            # to be as large as this one (a smaller limit then, after an out-of-memory
            # error for example, leaves the rest for the batches after it).
            source.fill(limit - 1, limit if self.read_workers else 0)
            while len(jobs) < limit and source.pending:
                jobs.append(source.take())
            # Not held across the yields: the caller's own code keeps its BLAS threads.
            with single_threaded_blas():
                self._solve_with_retry(jobs)
            # Exposure i + 1's application is queued before exposure i's result is
            # waited for and yielded, so its copies in overlap i's last compute and
            # copies out, and the caller's handling of result i.
            try:
                for i, job in enumerate(jobs):
                    if i == 0:
                        self._start(job)
                    if i + 1 < len(jobs):
                        self._start(jobs[i + 1])
                    yield self._result(job, on_error)
            finally:
                for job in jobs:  # on an error or close(): nothing left in flight
                    if job.pending is not None:
                        job.pending.wait()
                        job.pending = None

    def _start(self, job):
        """Queue ``job``'s application (a failure is the job's; out-of-memory goes up)."""
        if job.error is not None:
            return
        with captured(job, self.oom), single_threaded_blas():
            stages.start_apply(self.task, job, transfers=self.transfers)

    def _result(self, job, on_error):
        """``job``'s result (or its error, as ``on_error`` says), its memory released."""
        result = None
        if job.error is None:
            with captured(job, self.oom), single_threaded_blas():
                result = apply_policy(stages.complete(self.task, job), self.on_poor_match,
                                      stacklevel=5)
        # Drop what the batch no longer needs before the next result.
        if job.pending is not None:
            job.pending.wait()
        job.exposure = job.cell_set = job.A = job.rhs = job.pending = job.kernel = None
        if job.error is not None:
            if on_error == "raise":
                raise job.error
            result = job.error
        return result

    def _load(self, item):
        job = _job(item)
        with captured(job):
            job.exposure = self._read(item) if _is_path(item) else item
        return job

    def _read(self, path):
        from .pipeline import read_exposure_with_psf

        return read_exposure_with_psf(path, self.psf, psf_hint="give psf=...",
                                      empty=self.backend.empty_host,
                                      psf_from_header=self.psf_from_header,
                                      header_hint="pass psf_from_header=True")

    def _solve_with_retry(self, jobs):
        try:
            self._solve(jobs)
        except self.oom:
            self.backend.release_cached_memory()
            if len(jobs) == 1:
                raise
            half = len(jobs) // 2
            self._device_limit = half
            log.warning("device out of memory on a batch of %d exposures; retrying in "
                        "batches of %d", len(jobs), half)
            for job in jobs:  # start again from the cell sets
                job.cell_set = job.A = job.rhs = job.solution = None
                job.times = {}
            self._solve_with_retry(jobs[:half])
            self._solve_with_retry(jobs[half:])

    # -- the batched part: cell sets, normal equations, spatial solves ------------------

    def _basis(self, kernel_size, sigmas, degrees):
        """:func:`alard_lupton_basis`, built once per distinct basis (one object each)."""
        key = (int(kernel_size), tuple(float(s) for s in sigmas), tuple(int(d) for d in degrees))
        basis = self._bases.get(key)
        if basis is None:
            basis = self._bases[key] = alard_lupton_basis(kernel_size, sigmas, degrees)
        return basis

    def _solve(self, jobs):
        xp, backend = self.xp, self.backend
        for job in jobs:
            if job.error is None:
                job.reference_model, job.kernel_sum = self.shared, self.kernel_sum
                with captured(job, self.oom):
                    stages.prepare(self.task, job, basis_for=self._basis)
                    job.reference = _unwrap(job.reference)

        # Normal equations and single-candidate solves: one call per (basis, stamp size);
        # equal bases are one cached object.
        groups = OrderedDict()
        for job in jobs:
            if job.error is None:
                groups.setdefault((id(job.basis), job.cell_set.psf_size), []).append(job)
        pending = deque(groups.values())
        while pending:
            group = pending.popleft()
            if len(group) == 1:  # a batch of one is a run
                with captured(group[0], self.oom):
                    stages.normal_equations(self.task, group[0])
                continue
            t0 = time.perf_counter()
            try:
                templates = xp.concatenate([j.cell_set.templates for j in group])
                targets = xp.concatenate([j.cell_set.targets for j in group])
                M, b = backend.normal_equations(templates, targets, group[0].basis, 2.0,
                                                group[0].basis_factors)
                solutions = backend.solve_candidates(M, b)
                backend.sync()
            except self.oom:
                raise
            except Exception as exc:
                # A failure of the batch's call is no exposure's own: each is
                # tried alone, so only those that fail alone fail.
                log.warning("candidate normal equations or solves of %d exposures together "
                            "failed (%s: %s); "
                            "retrying them one by one", len(group), type(exc).__name__, exc)
                pending.extendleft([job] for job in reversed(group))
                continue
            del templates, targets
            share = (time.perf_counter() - t0) / len(group)
            start = 0
            for job in group:
                job.times["normalEquations"] = share
                stop = start + len(job.cell_set)
                parts = (M[start:stop].copy(), b[start:stop].copy(), solutions[start:stop].copy())
                start = stop
                # Spatial system: assembled per exposure (sums over its own candidates).
                with captured(job, self.oom), timed(job, "spatialSolve"):
                    stages.spatial_system(self.task, job, *parts)
            del M, b, solutions, parts

        # Spatial solves: one batched call per system size.
        stages.solve(self.task, jobs)


def match_many(exposures, referencePsfModel, config=None, backend="auto", kernel_sum=1.0, *,
               psf=None, batch_size=None, on_error="raise", read_workers=None,
               spatial_solve=None, on_poor_match="warn", psf_from_header=False):
    """PSF-match many exposures to one reference model, in batches.

    Parameters
    ----------
    exposures : iterable of Exposure or path
        Exposures, or FITS paths read with :meth:`Exposure.read_fits` (their
        PSF from ``psf``, else the header card or the file next to them, as
        ``gpumatch match`` finds it). Pulled from the iterable in the calling
        thread, one batch at a time (and, with ``read_workers``, the next batch
        while one is computed); an error raised by the iterable itself comes
        after the results of the items before it.
    referencePsfModel : Psf
        The PSF to match to; measured and realised once for all exposures.
    config : ModelPsfMatchConfig, optional
        The configuration (default: LSST's, ``ModelPsfMatchConfig()``).
    backend : str
        ``"auto"`` or a registered backend (:func:`gpumatch.backend.backend_names`).
    kernel_sum : float
        As ``kernelSum`` of :meth:`ModelPsfMatchTask.run`.
    psf : Psf or str, optional
        PSF of the exposures given as paths.
    batch_size : int, optional
        Exposures per batch. Default: 8 on the CPU; on the GPU as many as fit
        in 60% of the free device memory and, for exposures read from files,
        25% of the available host memory (with read-ahead, that share holds
        the batch and the next one); at most 256; halved after an
        out-of-memory error.
    on_error : {"raise", "yield"}
        ``"raise"``: an exposure that fails raises its error when its turn
        comes (the results before it have been yielded; the generator then
        stops). ``"yield"``: the exception object is yielded in its place and
        the others go on. A file that cannot be read fails in its own place.
    read_workers : int, optional
        Threads that read the next batch's files (exposures given as paths)
        while the current batch is solved and applied, so that the device does
        not wait for the disk; at most one batch is read ahead, and the results
        are the same as without. Default: ``min(4, os.cpu_count())``; 0 reads
        each batch in the calling thread when its turn comes. Closing the
        generator (or dropping it) cancels the reads not started and waits for
        those running.
    spatial_solve : {"host", "device"}, optional
        As for :class:`ModelPsfMatchTask`: where the GPU backend solves the
        spatial systems.
    on_poor_match : {"warn", "raise", "ignore"}
        As for :meth:`ModelPsfMatchTask.run`, exposure by exposure. With
        ``"raise"`` a poor or failed verdict is that exposure's error
        (:class:`~gpumatch.errors.PoorMatchError`, its ``result`` the whole
        result), handled as ``on_error`` says.
    psf_from_header : bool
        For exposures given as paths without ``psf``: read the PSF file their
        ``PSF_FILE`` header card names (a relative path inside the exposure's
        directory only; see :func:`gpumatch.pipeline.find_psf`). Off by default.

    Returns
    -------
    generator of ModelPsfMatchResult
        One result per exposure, in input order, equal to what
        ``ModelPsfMatchTask(config, backend).run(exposure, referencePsfModel,
        kernel_sum)`` returns (``metadata["timings"]`` aside: the batched
        stages' time is shared out evenly within the batch).
    """
    if on_error not in ("raise", "yield"):
        raise ValueError(f"on_error={on_error!r} must be 'raise' or 'yield'")
    check_on_poor_match(on_poor_match)
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if read_workers is None:
        read_workers = DEFAULT_READ_WORKERS
    if int(read_workers) < 0:
        raise ValueError(f"read_workers={read_workers!r} must be 0 or a positive integer")
    task = ModelPsfMatchTask(config, backend=backend, spatial_solve=spatial_solve)
    if psf is not None:
        from .pipeline import resolve_psf

        psf = resolve_psf(psf)
    matcher = _ManyMatcher(task, referencePsfModel, kernel_sum, psf, batch_size,
                           read_workers=int(read_workers), psf_from_header=psf_from_header)
    matcher.on_poor_match = on_poor_match
    return matcher.run(exposures, on_error)
