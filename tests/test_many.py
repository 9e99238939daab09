"""gpumatch.match_many: batched matching equals ModelPsfMatchTask.run exactly."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import gpumatch as gm
from gpumatch import Box
from gpumatch.many import solve_spatial_systems
from gpumatch.spatial_solve import solve_spatial_system


def small_config(**changes):
    values = dict(kernelSize=11, alardNGauss=2, alardSigGauss=(1.0, 2.0), alardDegGauss=(2, 1),
                  spatialKernelOrder=1, sizeCellX=32, sizeCellY=32)
    values.update(changes)
    return gm.ModelPsfMatchConfig(**values)


def small_exposure(nx=160, ny=128, xy0=(0, 0), seed=0, scale=1.0):
    x0, y0 = xy0
    psf = gm.VaryingGaussianPsf(15, 15, Box(x0, y0, nx, ny),
                                sigma=(1.6 * scale, 0.12, -0.08, 0.05, 0.03, -0.04),
                                g1=(0.02, 0.03 * (seed % 3), -0.01), g2=(-0.01, 0.0, 0.02))
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, (ny, nx)).astype(np.float32)
    variance = np.full((ny, nx), 100.0, dtype=np.float32)
    mask = (rng.random((ny, nx)) < 2e-3).astype(np.int32) << 3
    image[5, 7] = np.nan
    return gm.Exposure(image, variance, mask, xy0=xy0, psf=psf, meta={"SEED": seed})


REFERENCE = gm.GaussianPsf(21, 21, 2.6)


def mixed_exposures():
    return [small_exposure(160, 128, seed=0), small_exposure(128, 96, (10, -4), seed=1),
            small_exposure(160, 128, seed=2), small_exposure(96, 160, (300, 200), seed=3),
            small_exposure(160, 128, seed=4)]


def assert_same_result(got, want):
    k1, k2 = got.psfMatchingKernel, want.psfMatchingKernel
    assert np.array_equal(k1.spatial_coefficients, k2.spatial_coefficients)
    assert np.array_equal(k1.basis_images, k2.basis_images)
    assert k1.spatial_functions.region == k2.spatial_functions.region
    e1, e2 = got.psfMatchedExposure, want.psfMatchedExposure
    assert np.array_equal(e1.image, e2.image, equal_nan=True)
    assert np.array_equal(e1.variance, e2.variance, equal_nan=True)
    assert np.array_equal(e1.mask, e2.mask)
    assert e1.xy0 == e2.xy0 and e1.meta == e2.meta and e1.psf.__class__ is e2.psf.__class__
    c1, c2 = got.kernelCellSet, want.kernelCellSet
    assert np.array_equal(c1.templates, c2.templates) and np.array_equal(c1.targets, c2.targets)
    assert np.array_equal(c1.normal_matrices, c2.normal_matrices)
    assert np.array_equal(c1.normal_vectors, c2.normal_vectors)
    assert np.array_equal(c1.kernel_solutions, c2.kernel_solutions)
    assert c1.status == c2.status
    m1 = {k: v for k, v in got.metadata.items() if k != "timings"}
    m2 = {k: v for k, v in want.metadata.items() if k != "timings"}
    assert m1 == m2
    assert set(got.metadata["timings"]) == set(want.metadata["timings"])
    assert type(got.referencePsfModel) is type(want.referencePsfModel)


def serial(exposures, config, reference=REFERENCE, kernel_sum=1.0):
    task = gm.ModelPsfMatchTask(config, backend="numpy")
    return [task.run(e, reference, kernelSum=kernel_sum) for e in exposures]


@pytest.mark.parametrize("batch_size", [None, 1, 2, 5])
def test_equals_run_exactly_mixed_sizes(batch_size):
    cfg = small_config()
    exposures = mixed_exposures()
    want = serial(exposures, cfg)
    got = gm.match_many(exposures, REFERENCE, cfg, backend="numpy", batch_size=batch_size)
    got = list(got)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_same_result(g, w)


def test_candidates_of_several_exposures_cross_chunk_boundaries():
    # 4 x 42 candidates > the 64-candidate chunk of the normal equations.
    cfg = small_config()
    exposures = [small_exposure(seed=s) for s in range(4)]
    want = serial(exposures, cfg, kernel_sum=0.8)
    got = list(gm.match_many(exposures, REFERENCE, cfg, backend="numpy", kernel_sum=0.8,
                             batch_size=4))
    assert sum(len(r.kernelCellSet) for r in got) > 128
    for g, w in zip(got, want):
        assert_same_result(g, w)


def test_scale_by_fwhm_mixes_bases_in_one_batch():
    cfg = small_config(scaleByFwhm=True, kernelSizeMin=9, kernelSizeMax=15)
    exposures = [small_exposure(seed=0, scale=1.0), small_exposure(seed=1, scale=0.8),
                 small_exposure(seed=2, scale=1.0), small_exposure(128, 96, seed=3, scale=1.2)]
    want = serial(exposures, cfg)
    assert len({w.metadata["ALKernelSize"] for w in want}) > 1  # several bases
    got = list(gm.match_many(exposures, REFERENCE, cfg, backend="numpy"))
    for g, w in zip(got, want):
        assert_same_result(g, w)


def test_shares_basis_and_reference_realisation(monkeypatch):
    cfg = small_config()
    calls = {"basis": 0, "ref": 0}
    import gpumatch.many as many

    real_basis = many.alard_lupton_basis

    def counting_basis(*a, **k):
        calls["basis"] += 1
        return real_basis(*a, **k)

    monkeypatch.setattr(many, "alard_lupton_basis", counting_basis)

    class CountingReference(gm.GaussianPsf):
        def compute_kernel_images(self, xs, ys, **kw):
            calls["ref"] += 1
            return super().compute_kernel_images(xs, ys, **kw)

    ref = CountingReference(17, 17, 2.6)  # the stamp size: no resize
    exposures = [small_exposure(seed=s) for s in range(4)] + [small_exposure(128, 96, seed=9)]
    got = list(gm.match_many(exposures, ref, cfg, backend="numpy", batch_size=2))
    assert calls["basis"] == 1
    assert calls["ref"] == 2  # one cell grid for the four equal exposures, one for the other
    want = serial(exposures, cfg, reference=gm.GaussianPsf(17, 17, 2.6))
    for g, w in zip(got, want):
        assert np.array_equal(g.psfMatchedExposure.image, w.psfMatchedExposure.image,
                              equal_nan=True)


def test_paths_in_order(tmp_path):
    cfg = small_config()
    psf = gm.GaussianPsf(15, 15, 1.7)
    paths = []
    exposures = []
    for i, e in enumerate(mixed_exposures()):
        e.psf = None
        p = tmp_path / f"exp{i}.fits"
        e.write_fits(p)
        paths.append(str(p) if i % 2 else p)  # str and PathLike
        back = gm.Exposure.read_fits(p)
        back.psf = psf
        exposures.append(back)
    want = serial(exposures, cfg)
    got = gm.match_many(iter(paths), REFERENCE, cfg, backend="numpy", psf=psf, batch_size=3)
    results = list(got)
    assert len(results) == len(want)
    for g, w in zip(results, want):
        assert_same_result(g, w)
    assert [r.psfMatchedExposure.meta["SEED"] for r in results] == [0, 1, 2, 3, 4]


def test_paths_and_exposures_mixed_psf_string(tmp_path):
    cfg = small_config()
    e0 = small_exposure(seed=0)
    p = tmp_path / "one.fits"
    e0.write_fits(p)
    got = list(gm.match_many([p, small_exposure(seed=1)], REFERENCE, cfg, backend="numpy",
                             psf="gaussian:sigma=1.7,size=15"))
    back = gm.Exposure.read_fits(p)
    back.psf = gm.parse_psf("gaussian:sigma=1.7,size=15")
    want = serial([back, small_exposure(seed=1)], cfg)
    for g, w in zip(got, want):
        assert_same_result(g, w)


def test_a_failing_exposure(tmp_path):
    cfg = small_config()
    bad = small_exposure(seed=1)
    bad.psf = None
    exposures = [small_exposure(seed=0), bad, small_exposure(seed=2)]
    out = list(gm.match_many(exposures, REFERENCE, cfg, backend="numpy", on_error="yield"))
    assert isinstance(out[1], gm.MissingPsfError)
    want = serial([exposures[0], exposures[2]], cfg)
    assert_same_result(out[0], want[0])
    assert_same_result(out[2], want[1])

    gen = gm.match_many(exposures, REFERENCE, cfg, backend="numpy")
    first = next(gen)
    assert_same_result(first, want[0])
    with pytest.raises(gm.MissingPsfError):
        next(gen)

    missing = tmp_path / "missing.fits"
    out = list(gm.match_many([missing], REFERENCE, cfg, backend="numpy", on_error="yield"))
    assert isinstance(out[0], FileNotFoundError)


def test_bad_arguments_fail_at_call():
    with pytest.raises(ValueError, match="backend"):
        gm.match_many([], REFERENCE, backend="tpu")
    with pytest.raises(ValueError, match="batch_size"):
        gm.match_many([], REFERENCE, batch_size=0)
    with pytest.raises(ValueError, match="on_error"):
        gm.match_many([], REFERENCE, on_error="ignore")
    with pytest.raises(ValueError, match="read_workers"):
        gm.match_many([], REFERENCE, read_workers=-1)
    assert list(gm.match_many([], REFERENCE, backend="numpy")) == []


@pytest.mark.parametrize("kind", ["EIGENVALUE", "SVD"])
def test_batched_spatial_solve_equals_single(kind):
    rng = np.random.default_rng(3)
    nb, nkt = 4, 3
    nt = (nb - 1) * nkt + 1
    As, rhss = [], []
    for i in range(6):
        X = rng.normal(size=(40, nt)) * rng.uniform(0.1, 100.0, nt)
        if i == 2:  # rank deficient: two equal columns
            X[:, 3] = X[:, 4]
        if i == 4:
            X[:, :] = 0.0
            X[:5, 0] = 1.0
        As.append(X.T @ X)
        rhss.append(X.T @ rng.normal(size=40))
    got = solve_spatial_systems(As, rhss, nb, nkt, [1.0, 0.5, 1.0, 2.0, 1.0, 1.0], kind)
    for A, rhs, ks, g in zip(As, rhss, [1.0, 0.5, 1.0, 2.0, 1.0, 1.0], got):
        w = solve_spatial_system(A, rhs, nb, nkt, ks, kind)
        assert np.array_equal(g.coefficients, w.coefficients)
        assert (g.condition_number, g.method, g.rank, g.n_unknowns) == \
            (w.condition_number, w.method, w.rank, w.n_unknowns)
    assert {g.method for g in got} >= {"cholesky", "eigen-pseudo-inverse"}


def test_batched_spatial_solve_reports_non_finite():
    nb, nkt = 2, 1
    A = np.array([[1.0, np.nan], [np.nan, 1.0]])
    good = np.eye(2)
    got = solve_spatial_systems([good, A], [np.ones(2), np.ones(2)], nb, nkt, [1.0, 1.0])
    assert not isinstance(got[0], Exception)
    assert isinstance(got[1], Exception)


def test_out_of_memory_halves_the_batch_and_retries(monkeypatch):
    """The device path's retry logic, driven on the CPU by a stand-in error."""
    import gpumatch.many as many

    cfg = small_config()
    exposures = [small_exposure(seed=s) for s in range(5)]
    want = serial(exposures, cfg)

    class FakeOutOfMemory(Exception):
        pass

    task = gm.ModelPsfMatchTask(cfg, backend="numpy")
    matcher = many._ManyMatcher(task, REFERENCE, 1.0, None, None)
    matcher.oom = (FakeOutOfMemory,)
    real = task.array_backend.normal_equations
    sizes = []

    def limited(templates, targets, basis, variance, factors=None):
        sizes.append(len(templates))
        if len(templates) > 2 * 42:  # room for two exposures' candidates
            raise FakeOutOfMemory()
        return real(templates, targets, basis, variance, factors)

    monkeypatch.setattr(task.array_backend, "normal_equations", limited)
    monkeypatch.setattr(matcher, "_batch_limit", lambda first: matcher._device_limit or 5)
    got = list(matcher.run(exposures, "raise"))
    # 5 fail; halves of 2 (fit) and 3 (fail, then 1 and 2 fit); later batches stay small.
    assert sizes == [5 * 42, 2 * 42, 3 * 42, 42, 2 * 42]
    assert matcher._device_limit == 1
    for g, w in zip(got, want):
        assert_same_result(g, w)


def test_a_failing_batch_call_retries_each_exposure_alone(monkeypatch):
    """A library error (not out-of-memory) in the batch's per-candidate solves fails
    no exposure that succeeds alone: each is retried alone, results unchanged; an
    exposure whose own solve fails still fails, alone."""
    import gpumatch.many as many

    cfg = small_config()
    exposures = [small_exposure(seed=s) for s in range(4)]
    want = serial(exposures, cfg)
    task = gm.ModelPsfMatchTask(cfg, backend="numpy")
    real = task.array_backend.solve_candidates
    sizes = []

    class SolverError(RuntimeError):      # as CuPy's CUSOLVERError
        pass

    def failing(M, b):
        sizes.append(len(M))
        if len(M) > 42 or np.array_equal(M, bad_M[0]):
            raise SolverError("CUSOLVER_STATUS_INVALID_VALUE")
        return real(M, b)

    bad_M = [None]
    monkeypatch.setattr(task.array_backend, "solve_candidates", failing)
    monkeypatch.setattr(many, "ModelPsfMatchTask", lambda *a, **k: task)
    got = list(gm.match_many(exposures, REFERENCE, cfg, backend="numpy", batch_size=4))
    assert sizes == [4 * 42, 42, 42, 42, 42]
    for g, w in zip(got, want):
        assert_same_result(g, w)
    # Exposure 2 fails alone too: only it fails.
    bad_M[0] = want[2].kernelCellSet.normal_matrices
    got = list(gm.match_many(exposures, REFERENCE, cfg, backend="numpy", batch_size=4,
                             on_error="yield"))
    assert isinstance(got[2], SolverError)
    for i in (0, 1, 3):
        assert_same_result(got[i], want[i])


def test_device_batch_size_from_free_memory(monkeypatch):
    """The device batch-size arithmetic, with a stand-in for CuPy's memory queries."""
    import types

    import gpumatch.many as many

    free = {"bytes": 0}
    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            runtime=types.SimpleNamespace(memGetInfo=lambda: (free["bytes"], 80 << 30)),
            memory=types.SimpleNamespace(OutOfMemoryError=MemoryError)),
        get_default_memory_pool=lambda: types.SimpleNamespace(free_bytes=lambda: 0))
    from gpumatch.backends.cupy_backend import CupyBackend

    task = gm.ModelPsfMatchTask(many.ModelPsfMatchTask.ConfigClass(sizeCellX=128, sizeCellY=128),
                                backend="numpy")
    task.array_backend = CupyBackend(xp=fake)  # only _batch_limit asks it here
    monkeypatch.setattr(task.array_backend, "transfers", lambda: None)  # no streams here
    matcher = many._ManyMatcher(task, REFERENCE, 1.0, None, None)

    def job_of(source, exposure):
        job = many._job(source)
        job.exposure = exposure
        return job

    job = job_of("visit", gm.Exposure(np.zeros((4000, 4096), np.float32)))
    per = matcher._phase1_bytes(job.exposure)
    assert 20e6 < per < 200e6  # ~34 x 33 candidates of 31 x 31 stamps and 27 x 27 systems
    free["bytes"] = 40 << 30
    limit = matcher._batch_limit(job)
    expected = int((0.6 * (40 << 30) - 64 * 4000 * 4096) // per)
    assert 1 <= limit <= expected and limit <= many.MAX_DEVICE_BATCH
    free["bytes"] = 1 << 30  # less than one exposure needs: still one at a time
    assert matcher._batch_limit(job) == 1
    # Host memory bounds batches of files to be read, not exposures already in memory.
    free["bytes"] = 40 << 30
    page = 4096
    avail = {"SC_AVPHYS_PAGES": (8 << 30) // page, "SC_PAGE_SIZE": page}  # 8 GiB available
    monkeypatch.setattr(many.os, "sysconf", lambda name: avail[name])
    planes = 3 * 4000 * 4096 * 4
    assert matcher._batch_limit(job) == int(0.25 * (8 << 30) // planes) == 10
    # CuPy's pinned pool rounds blocks up to a power of two: planes just over 64 MiB
    # take 128 MiB each.
    big = job_of("visit", gm.Exposure(np.zeros((4100, 4096), np.float32)))
    assert matcher._batch_limit(big) == int(0.25 * (8 << 30) // (3 << 27)) == 5
    in_memory = job_of(job.exposure, job.exposure)
    assert matcher._batch_limit(in_memory) == min(expected, many.MAX_DEVICE_BATCH) > 10
    matcher._device_limit = 3  # after an out-of-memory error
    assert matcher._batch_limit(job) == 3
    assert many._ManyMatcher(task, REFERENCE, 1.0, None, 5)._batch_limit(job) == 5


# -- read-ahead of files -------------------------------------------------------------


def write_files(tmp_path, exposures, psf):
    """The exposures written without PSF; their paths and what reading gives back."""
    paths, back = [], []
    for i, e in enumerate(exposures):
        e.psf = None
        p = tmp_path / f"exp{i}.fits"
        e.write_fits(p)
        paths.append(p)
        b = gm.Exposure.read_fits(p)
        b.psf = psf
        back.append(b)
    return paths, back


def read_threads():
    import gpumatch.many as many

    return {t for t in threading.enumerate() if t.name.startswith(many.READ_THREAD_PREFIX)}


def test_read_ahead_gives_the_same_results_in_order(tmp_path):
    cfg = small_config()
    psf = gm.GaussianPsf(15, 15, 1.7)
    paths, back = write_files(tmp_path, mixed_exposures(), psf)
    inline = small_exposure(128, 96, seed=7)  # an exposure object among the paths
    items = paths[:2] + [inline] + paths[2:]
    want = serial(back[:2] + [inline] + back[2:], cfg)
    runs = {w: list(gm.match_many(items, REFERENCE, cfg, backend="numpy", psf=psf,
                                  batch_size=2, read_workers=w)) for w in (0, 2)}
    for got in runs.values():
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same_result(g, w)
    for g0, g2 in zip(*runs.values()):
        assert_same_result(g2, g0)
    assert [r.psfMatchedExposure.meta["SEED"] for r in runs[2]] == [0, 1, 7, 2, 3, 4]


class Recorder:
    """Named stand-in files: ``_read`` of ``"e3"`` gives the small exposure of seed 3.

    Records, in order, what the input iterator, the reads, the solves and the
    consumer do, with the thread each ran in.
    """

    def __init__(self, monkeypatch, n, on_read=None):
        import gpumatch.many as many

        self.names = [f"e{i}" for i in range(n)]
        self.exposures = {name: small_exposure(96, 96, seed=i)
                          for i, name in enumerate(self.names)}
        self.events = []
        self.pulled = []
        self.batches = []
        self._lock = threading.Lock()
        recorder = self
        real_solve = many._ManyMatcher._solve

        def read(matcher, path):
            recorder.record("read", path)
            if on_read is not None:
                on_read(path)
            return recorder.exposures[path]

        def solve(matcher, jobs):
            names = [j.source for j in jobs]
            recorder.batches.append((names, len(recorder.pulled)))
            recorder.record("solve", names)
            real_solve(matcher, jobs)
            recorder.record("solved", names)

        monkeypatch.setattr(many._ManyMatcher, "_read", read)
        monkeypatch.setattr(many._ManyMatcher, "_solve", solve)

    def record(self, what, arg):
        with self._lock:
            self.events.append((what, arg, threading.current_thread()))

    def items(self):
        for name in self.names:
            self.pulled.append((name, threading.current_thread()))
            yield name

    def index(self, what, arg):
        return next(i for i, (w, a, _) in enumerate(self.events) if (w, a) == (what, arg))

    def serial(self, cfg):
        return serial([self.exposures[n] for n in self.names], cfg)


@pytest.mark.parametrize("read_workers", [0, 2])
def test_next_batch_is_read_while_this_one_is_computed(monkeypatch, read_workers):
    cfg = small_config()
    ahead_started = threading.Event()
    ahead = set()

    def on_read(name):
        if name in ("e2", "e3"):
            ahead.add(name)
            if len(ahead) == 2:
                ahead_started.set()

    rec = Recorder(monkeypatch, 5, on_read)
    import gpumatch.many as many

    real_solve = many._ManyMatcher._solve
    waited = []

    def solve(matcher, jobs):
        if jobs[0].source == "e0" and read_workers:
            # Hold the first batch's solve until the next batch's reads have begun:
            # returns at once when it reads ahead, times out when it does not.
            waited.append(ahead_started.wait(10))
        real_solve(matcher, jobs)

    monkeypatch.setattr(many._ManyMatcher, "_solve", solve)
    gen = gm.match_many(rec.items(), REFERENCE, cfg, backend="numpy", batch_size=2,
                        read_workers=read_workers)
    got = []
    for result in gen:
        rec.record("yield", len(got))
        if not got:  # the first result: nothing beyond the next batch was pulled
            assert [n for n, _ in rec.pulled] == \
                (["e0", "e1", "e2", "e3"] if read_workers else ["e0", "e1"])
        got.append(result)

    for g, w in zip(got, rec.serial(cfg)):
        assert_same_result(g, w)
    main = threading.current_thread()
    assert {t for _, t in rec.pulled} == {main}  # the iterator: the calling thread only
    assert all(t is main for w, _, t in rec.events if w in ("solve", "solved", "yield"))
    reads = [t for w, _, t in rec.events if w == "read"]
    first_solved = rec.index("solved", ["e0", "e1"])
    if read_workers:
        assert waited == [True]
        assert all(t.name.startswith(many.READ_THREAD_PREFIX) for t in reads)
        # Both reads of batch 2 began before batch 1 was solved, so before its results.
        assert rec.index("read", "e2") < first_solved
        assert rec.index("read", "e3") < first_solved
        # Batch 3 is read ahead during batch 2, not earlier.
        assert rec.index("read", "e4") > rec.index("yield", 1)
    else:
        assert all(t is main for t in reads)
        assert rec.index("read", "e2") > rec.index("yield", 1)
    assert [names for names, _ in rec.batches] == [["e0", "e1"], ["e2", "e3"], ["e4"]]


def test_exposures_given_as_objects_are_not_pulled_ahead():
    """Only paths are read ahead: an in-memory exposure gains nothing from being
    pulled early, so a generator of exposures is consumed one batch at a time."""
    cfg = small_config()
    exposures = mixed_exposures()
    pulled = []

    def generate():
        for i, e in enumerate(exposures):
            pulled.append(i)
            yield e

    seen = []
    for _ in gm.match_many(generate(), REFERENCE, cfg, backend="numpy", batch_size=2,
                           read_workers=2):
        seen.append(len(pulled))
    # Items pulled when each result is yielded: its own batch, nothing of the next.
    assert seen == [2, 2, 4, 4, 5]


def test_read_ahead_follows_a_shrinking_batch_limit(monkeypatch):
    """A smaller limit later (after an out-of-memory error) leaves the extra reads pending."""
    import gpumatch.many as many

    cfg = small_config()
    rec = Recorder(monkeypatch, 8)
    limits = iter([3] + [1] * 10)
    monkeypatch.setattr(many._ManyMatcher, "_batch_limit", lambda self, first: next(limits))
    got = list(gm.match_many(rec.items(), REFERENCE, cfg, backend="numpy", read_workers=2))
    for g, w in zip(got, rec.serial(cfg)):
        assert_same_result(g, w)
    names = [names for names, _ in rec.batches]
    assert names == [["e0", "e1", "e2"], ["e3"], ["e4"], ["e5"], ["e6"], ["e7"]]
    # Items pulled when each batch is solved: the batch and at most one batch ahead.
    assert [pulled for _, pulled in rec.batches] == [6, 6, 6, 7, 8, 8]


def test_iterator_error_comes_after_the_items_before_it(monkeypatch):
    cfg = small_config()
    rec = Recorder(monkeypatch, 3)

    def items():
        yield from rec.items()
        raise RuntimeError("the listing broke")

    gen = gm.match_many(items(), REFERENCE, cfg, backend="numpy", batch_size=2,
                        read_workers=2, on_error="yield")
    got = [next(gen) for _ in range(3)]
    with pytest.raises(RuntimeError, match="listing broke"):
        next(gen)
    for g, w in zip(got, rec.serial(cfg)):
        assert_same_result(g, w)


@pytest.mark.parametrize("read_workers", [0, 2])
def test_a_corrupt_file_fails_in_its_place(tmp_path, read_workers):
    from gpumatch.io import FitsFormatError

    cfg = small_config()
    psf = gm.GaussianPsf(15, 15, 1.7)
    paths, back = write_files(tmp_path, [small_exposure(96, 96, seed=s) for s in range(5)], psf)
    paths[3].write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)  # batch 2, read ahead
    want = serial(back, cfg)
    before = read_threads()

    out = list(gm.match_many(paths, REFERENCE, cfg, backend="numpy", psf=psf, batch_size=2,
                             read_workers=read_workers, on_error="yield"))
    assert len(out) == 5 and isinstance(out[3], FitsFormatError)
    assert str(paths[3]) in str(out[3])
    for i in (0, 1, 2, 4):
        assert_same_result(out[i], want[i])

    gen = gm.match_many(paths, REFERENCE, cfg, backend="numpy", psf=psf, batch_size=2,
                        read_workers=read_workers)
    for i in range(3):
        assert_same_result(next(gen), want[i])
    with pytest.raises(FitsFormatError):
        next(gen)
    assert read_threads() <= before  # the generator stopped: its readers are gone


def test_closing_early_stops_the_reads(monkeypatch):
    import gpumatch.many as many

    cfg = small_config()
    started, release = threading.Event(), threading.Event()

    def on_read(name):
        if name == "e3":  # the first read ahead: still running when the generator closes
            started.set()
            release.wait(10)

    rec = Recorder(monkeypatch, 9, on_read)
    real_cancel = many._Input._cancel

    def cancel(source):
        real_cancel(source)
        release.set()  # the running read ends only once the others are cancelled

    monkeypatch.setattr(many._Input, "_cancel", cancel)
    before = read_threads()
    gen = gm.match_many(rec.items(), REFERENCE, cfg, backend="numpy", batch_size=3,
                        read_workers=1)
    assert_same_result(next(gen), rec.serial(cfg)[0])
    assert started.wait(10)
    assert read_threads() - before  # the pool is there
    gen.close()
    assert read_threads() <= before
    assert [a for w, a, _ in rec.events if w == "read"] == ["e0", "e1", "e2", "e3"]
    assert len(rec.pulled) == 6  # e4 and e5 pulled for the next batch, never read


def test_dropping_the_generator_or_failing_consumer_stops_the_reads(monkeypatch):
    cfg = small_config()
    rec = Recorder(monkeypatch, 6)
    before = read_threads()
    gen = gm.match_many(rec.items(), REFERENCE, cfg, backend="numpy", batch_size=2,
                        read_workers=2)
    next(gen)
    assert read_threads() - before
    del gen
    gc.collect()
    assert read_threads() <= before

    def consume():
        for _ in gm.match_many(rec.items(), REFERENCE, cfg, backend="numpy", batch_size=2,
                               read_workers=2):
            assert read_threads() - before
            raise KeyError("the consumer fails")

    with pytest.raises(KeyError):
        consume()
    gc.collect()
    assert read_threads() <= before


def test_parallel_reads_leave_the_warning_filters_alone(tmp_path):
    """Reads run in parallel; the FITS readers' catch_warnings() blocks, which
    are not thread-safe, are serialised (gpumatch._warnings).

    Without that lock, 40 reads in 4 threads leave an "ignore" filter behind
    (every time in 6 tries).
    """
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    import gpumatch.many as many

    path = tmp_path / "tiny.fits"
    gm.Exposure(np.zeros((8, 8), np.float32)).write_fits(path)
    matcher = many._ManyMatcher(gm.ModelPsfMatchTask(small_config(), backend="numpy"),
                                REFERENCE, 1.0, REFERENCE, None)
    before = list(warnings.filters)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: matcher._read(path), range(40)))
    assert warnings.filters == before


def _record_finishing(monkeypatch):
    """Record the order in which match_many queues and completes applications."""
    from gpumatch import stages
    from gpumatch.apply import PendingExposure

    events = []
    start, complete = stages.start_apply, stages.complete
    wait = PendingExposure.wait

    def started(task, state, *args, **kwargs):
        events.append(("start", state.exposure.meta["SEED"]))
        return start(task, state, *args, **kwargs)

    def completed(task, state):
        events.append(("complete", state.exposure.meta["SEED"]))
        return complete(task, state)

    def waited(self):
        events.append(("wait", self._exposure.meta["SEED"]))
        return wait(self)

    monkeypatch.setattr(stages, "start_apply", started)
    monkeypatch.setattr(stages, "complete", completed)
    monkeypatch.setattr(PendingExposure, "wait", waited)
    return events


def test_next_application_is_queued_before_a_result_is_yielded(monkeypatch):
    """Exposure i + 1's application is queued before exposure i is completed and
    yielded (on the GPU its copies then overlap i's compute), one ahead, never
    across batches; results unchanged."""
    events = _record_finishing(monkeypatch)
    cfg = small_config()
    exposures = [small_exposure(seed=s) for s in range(5)]
    want = serial(exposures, cfg)
    events.clear()
    gen = gm.match_many(exposures, REFERENCE, cfg, backend="numpy", batch_size=3)
    got = []
    for result in gen:
        events.append(("yield", result.psfMatchedExposure.meta["SEED"]))
        got.append(result)
    for g, w in zip(got, want):
        assert_same_result(g, w)
    steps = [e for e in events if e[0] != "wait"]
    assert steps == [("start", 0), ("start", 1), ("complete", 0), ("yield", 0),
                     ("start", 2), ("complete", 1), ("yield", 1), ("complete", 2), ("yield", 2),
                     ("start", 3), ("start", 4), ("complete", 3), ("yield", 3),
                     ("complete", 4), ("yield", 4)]


def test_closing_waits_for_the_application_in_flight(monkeypatch):
    """Closing the generator while the next exposure's application is queued waits
    for it (its pinned buffers must not be reused while copies run); a failing
    exposure in the batch is yielded in its place as before."""
    events = _record_finishing(monkeypatch)
    cfg = small_config()
    exposures = [small_exposure(seed=s) for s in range(4)]
    exposures[2].psf = None
    gen = gm.match_many(exposures, REFERENCE, cfg, backend="numpy", batch_size=4,
                        on_error="yield")
    assert next(gen).psfMatchedExposure.meta["SEED"] == 0
    assert events[-1] == ("wait", 0) and ("start", 1) in events
    gen.close()
    assert events[-1] == ("wait", 1)
    assert ("complete", 1) not in events
    out = list(gm.match_many(exposures, REFERENCE, cfg, backend="numpy", batch_size=4,
                             on_error="yield"))
    assert isinstance(out[2], gm.MissingPsfError)
    assert_same_result(out[3], serial([exposures[3]], cfg)[0])
