"""The CuPy/CUDA backend against the NumPy backend, stage by stage.

Skipped, with the reason, when CuPy does not import or no CUDA device answers,
so CI (no GPU) never fails here. On a GPU machine:

    python3 -m pytest -q tests/test_gpu.py

Tolerances: float64 stages (stamps, M and b, spatial system) to 1e-9
relative; kernel images and matched image/variance to 1e-5 relative (the
application computes in float32; for the deliberately ill-normalised random
kernels an absolute floor of 1e-6 of the plane's scale is allowed where the
result itself cancels); masks and edge pixels identical. The spatial solve
on the device against LAPACK: random systems to 1e-12 of their largest
unknown, a run's spatial coefficients to 1e-8.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.apply import convolve_planes
from gpumatch.backend import cupy_usable, single_threaded_blas, to_numpy
from gpumatch.backends import cupy_status  # noqa: E402
from gpumatch.basis import alard_lupton_basis
from gpumatch.cellset import build_cell_set
from gpumatch.normal_equations import candidate_normal_equations, solve_candidates
from gpumatch.spatial import SpatialFunctions
from gpumatch.spatial_solve import assemble_spatial_system
from random_kernels import (assert_symmetric_solutions, random_kernel, random_planes,
                            random_symmetric_systems)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_usable(), reason=f"no usable GPU: {cupy_status()[1]}"),
]

if cupy_usable():
    import cupy as cp
else:  # pragma: no cover - the module is skipped
    cp = None

NO_DATA = 1 << 8


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _config(**kw):
    """A well-conditioned configuration (spatial condition number ~1e6): the
    backends' float64 rounding differences stay below 1e-10 in the kernel.

    With degrees (4, 2, 2) and only 36 candidates the spatial system's condition
    number is ~1e13 and a 1e-16 relative change of M moves the kernel images by
    1e-4 (measured with NumPy alone), so no two summation orders can agree to
    1e-5 there; :func:`test_run_ill_conditioned` covers that case with
    tolerances that follow from it.
    """
    fields = dict(kernelSize=11, alardSigGauss=(0.8, 1.6, 3.2), alardDegGauss=(2, 1, 1),
                  spatialKernelOrder=2, sizeCellX=64, sizeCellY=64)
    fields.update(kw)
    return gm.ModelPsfMatchConfig(**fields)


def _exposure(nx=300, ny=260, xy0=(17, -40), seed=0, dtype=np.float32, xp=np, width=1.6):
    """Random planes and a varying PSF (``width``: its sigma at the centre, pixels)."""
    bbox = gm.Box(xy0[0], xy0[1], nx, ny)
    psf = gm.VaryingGaussianPsf(13, 13, bbox, sigma=(width, 0.15, -0.1, 0.05, 0.02, -0.03),
                                g1=(0.02, 0.04, -0.02), g2=(-0.01, 0.0, 0.03))
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, (ny, nx)).astype(dtype)
    variance = rng.uniform(50.0, 150.0, (ny, nx)).astype(dtype)
    mask = np.zeros((ny, nx), dtype=np.int32)
    hit = rng.random((ny, nx)) < 0.01
    mask[hit] = 1 << rng.integers(0, 8, hit.sum())
    planes = [xp.asarray(a) for a in (image, variance, mask)]
    return gm.Exposure(*planes, xy0=xy0, psf=psf, wcs={"CRVAL1": 1.0}, photo_calib=27.0,
                       filter="r", visit_info="visit", id=42, meta={"A": 1})


def _reference():
    return gm.DoubleGaussianPsf(13, 13, 2.6, 5.0, 0.1)


def _assert_planes(got, want, h, strict=False):
    """Image/variance to 1e-5 relative, identical non-finite pattern and mask."""
    gi, gv, gmask = (to_numpy(a) for a in got)
    wi, wv, wmask = (to_numpy(a) for a in want)
    assert gi.shape == wi.shape and gi.dtype == wi.dtype.newbyteorder("=")
    assert gv.dtype == wv.dtype.newbyteorder("=") and gmask.dtype == wmask.dtype.newbyteorder("=")
    for g, w in ((gi, wi), (gv, wv)):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        np.testing.assert_array_equal(np.isposinf(g), np.isposinf(w))
        np.testing.assert_array_equal(np.isneginf(g), np.isneginf(w))
        fin = np.isfinite(w)
        scale = 0.0 if strict else 1e-6 * float(np.abs(w[fin]).max(initial=0.0))
        np.testing.assert_allclose(g[fin], w[fin], rtol=1e-5, atol=scale)
    np.testing.assert_array_equal(gmask, wmask)
    # Edges: NaN, +inf and NO_DATA only.
    ny, nx = wi.shape
    edge = np.ones((ny, nx), bool)
    edge[h:ny - h, h:nx - h] = False
    assert np.all(np.isnan(gi[edge])) and np.all(gv[edge] == np.inf)


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------


def test_backend_auto_picks_cupy():
    assert gm.ModelPsfMatchTask(backend="auto").backend == "cupy"
    task = gm.ModelPsfMatchTask(backend="cupy")
    assert task.array_backend.name == "cupy" and task.array_backend.xp is cp


def test_stamps_rendered_on_device_match():
    exp = _exposure()
    cfg = _config()
    cs_np, ref_np = build_cell_set(exp, _reference(), cfg, cfg.kernelSize, xp=np)
    cs_cp, ref_cp = build_cell_set(exp, _reference(), cfg, cfg.kernelSize, xp=cp)
    assert isinstance(cs_cp.templates, cp.ndarray) and isinstance(cs_cp.targets, cp.ndarray)
    assert cs_cp.psf_size == cs_np.psf_size and cs_cp.pad == cs_np.pad
    np.testing.assert_allclose(cs_cp.templates.get(), cs_np.templates, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cs_cp.targets.get(), cs_np.targets, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(cs_cp.xs, cs_np.xs)


def _psfex(bbox):
    """A degree-2 PSFEx model sampled at 0.8 px, wider towards one corner of ``bbox``."""
    d = np.arange(25) - 12
    r2 = (d[None, :] ** 2 + d[:, None] ** 2) * 0.8 ** 2

    def g(s):
        return np.exp(-0.5 * r2 / s ** 2)

    comps = [g(1.7), 0.08 * (g(1.9) - g(1.7)), -0.05 * (g(1.85) - g(1.7)),
             0.02 * (g(2.0) - g(1.7)), 0.01 * g(1.2), 0.03 * (g(1.6) - g(1.7))]
    return gm.PsfexPsf(comps, 0.8, degree=2, polzero=bbox.center,
                       polscal=(bbox.width / 2, bbox.height / 2), size=13)


def test_psfex_stamps_rendered_on_device_match():
    exp = _exposure()
    exp.psf = _psfex(exp.bbox)
    rng = np.random.default_rng(4)
    xs = rng.uniform(exp.bbox.x0, exp.bbox.x1, 40)
    ys = rng.uniform(exp.bbox.y0, exp.bbox.y1, 40)
    want = exp.psf.compute_kernel_images(xs, ys)
    got = exp.psf.compute_kernel_images(cp.asarray(xs), cp.asarray(ys), xp=cp)
    assert isinstance(got, cp.ndarray) and got.shape == want.shape == (40, 13, 13)
    np.testing.assert_allclose(got.get(), want, rtol=1e-12, atol=1e-15)


def test_run_psfex_exposure_matches_numpy():
    exp = _exposure()
    exp.psf = _psfex(exp.bbox)
    ref = _reference()
    res_np = gm.ModelPsfMatchTask(_config(), backend="numpy").run(exp, ref)
    res_cp = gm.ModelPsfMatchTask(_config(), backend="cupy").run(exp, ref)
    assert isinstance(res_cp.kernelCellSet.templates, cp.ndarray)
    _compare_results(res_cp, res_np, exp)


@pytest.mark.parametrize("k, size, sigmas, degrees, n", [
    (21, 31, (1.0, 2.0, 4.5), (4, 2, 2), 37),     # production shape
    (9, 13, (0.7, 1.5, 3.0), (4, 2, 2), 5),       # more bases than some good pixels
    (5, 5, (1.0,), (2,), 3),                        # one good pixel
    (35, 49, (1.0, 2.0, 4.5), (4, 3, 3), 4),      # > 48 KiB of shared memory
])
def test_normal_equations_match(k, size, sigmas, degrees, n):
    from gpumatch.cuda.normal_equations import candidate_normal_equations_cupy

    rng = np.random.default_rng(k)
    basis = alard_lupton_basis(k, sigmas, degrees)
    templates = rng.random((n, size, size))
    targets = rng.random((n, size, size))
    M_ref, b_ref = candidate_normal_equations(templates, targets, basis, 2.0)
    M, b = candidate_normal_equations_cupy(cp.asarray(templates), cp.asarray(targets), basis, 2.0)
    assert isinstance(M, cp.ndarray) and M.dtype == cp.float64
    np.testing.assert_allclose(M.get(), M_ref, rtol=1e-10, atol=1e-13 * np.abs(M_ref).max())
    np.testing.assert_allclose(b.get(), b_ref, rtol=1e-10, atol=1e-13 * np.abs(b_ref).max())
    assert np.array_equal(M.get(), M.get().transpose(0, 2, 1))


def test_candidate_solutions_and_spatial_system_match():
    exp = _exposure()
    cfg = _config()
    cs, _ = build_cell_set(exp, _reference(), cfg, cfg.kernelSize, xp=np)
    basis = alard_lupton_basis(cfg.kernelSize, cfg.alardSigGauss, cfg.alardDegGauss)
    M, b = candidate_normal_equations(cs.templates, cs.targets, basis, 2.0)
    sol_ref = solve_candidates(M, b)
    task = gm.ModelPsfMatchTask(cfg, backend="cupy")
    sol = task.array_backend.solve_candidates(cp.asarray(M), cp.asarray(b)).get()
    # Single-candidate systems are ill-conditioned (1e5..1e13): compare how well
    # each solution satisfies its normal equations, not the solutions.
    res = np.linalg.norm(np.einsum("nij,nj->ni", M, sol) - b, axis=1)
    res_ref = np.linalg.norm(np.einsum("nij,nj->ni", M, sol_ref) - b, axis=1)
    assert np.all(res <= 10 * res_ref + 1e-10 * np.linalg.norm(b, axis=1))
    assert np.all(np.isfinite(sol))
    sf = SpatialFunctions(cfg.spatialModelType, cfg.spatialKernelOrder, cs.region)
    P = sf.evaluate(cs.xs, cs.ys)
    A_ref, r_ref = assemble_spatial_system(M, b, P)
    A, r = assemble_spatial_system(cp.asarray(M), cp.asarray(b), cp.asarray(P), xp=cp)
    np.testing.assert_allclose(A.get(), A_ref, rtol=1e-10, atol=1e-13 * np.abs(A_ref).max())
    np.testing.assert_allclose(r.get(), r_ref, rtol=1e-10, atol=1e-13 * np.abs(r_ref).max())


# ---------------------------------------------------------------------------
# The spatial solve on the device
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["EIGENVALUE", "SVD"])
@pytest.mark.parametrize("m", [14, 157])
def test_solve_symmetric_many_on_device_matches_host(kind, m):
    """cuSOLVER's stacked factorisations against LAPACK system by system, and both
    against the answers known by construction: every kind of system (Cholesky,
    badly scaled, rank deficient, indefinite, zero) in one stack and alone."""
    from gpumatch.linalg import solve_symmetric_many

    with single_threaded_blas():     # as in a run; threaded BLAS is slow on these sizes
        systems = random_symmetric_systems(np.random.default_rng(m), m)
        host = solve_symmetric_many(systems.A, systems.b, kind)
        device = solve_symmetric_many(cp.asarray(systems.A), cp.asarray(systems.b), kind)
        alone = [solve_symmetric_many(A[None], b[None], kind, xp=cp)[0]
                 for A, b in zip(systems.A, systems.b)]
    assert all(type(s.x) is np.ndarray for s in device)
    assert_symmetric_solutions(host, systems)
    assert_symmetric_solutions(device, systems)
    assert_symmetric_solutions(alone, systems)


def test_spatial_solve_setting():
    from gpumatch.backends.cupy_backend import CupyBackend as CupyStages

    stages = CupyStages(spatial_solve="device")
    assert stages.spatial_solve == "device"
    other = CupyStages()
    other.spatial_solve = "host"
    assert (other.spatial_solve, stages.spatial_solve) == ("host", "device")
    with pytest.raises(ValueError, match="spatial_solve='gpu' is not one of"):
        stages.spatial_solve = "gpu"
    with pytest.raises(ValueError, match="spatial_solve='cpu' is not one of"):
        CupyStages(spatial_solve="cpu")
    assert stages.spatial_solve == "device"
    task = gm.ModelPsfMatchTask(_config(), backend="cupy", spatial_solve="device")
    assert task.spatial_solve == task.array_backend.spatial_solve == "device"
    task.spatial_solve = "host"
    assert task.array_backend.spatial_solve == "host"
    assert gm.ModelPsfMatchTask(_config(), backend="cupy").spatial_solve == CupyStages._spatial_solve


def _run_both_solves(cfg, exposure, reference):
    """Results of the CuPy backend with the spatial system solved on the host and on
    the device."""
    out = []
    for where in ("host", "device"):
        task = gm.ModelPsfMatchTask(cfg, backend="cupy", spatial_solve=where)
        out.append(task.run(exposure, reference))
    return out


@pytest.mark.parametrize("resident", ["host", "device"])
def test_run_spatial_solve_on_device_matches_host(resident):
    """The same run with the spatial system solved by cuSOLVER instead of LAPACK:
    the coefficients agree to rounding times the condition number (~1e6), so
    kernels and planes as strictly as the backends agree."""
    xp = cp if resident == "device" else np
    exp = _exposure(xp=xp)
    res_host, res_dev = _run_both_solves(_config(), exp, _reference())
    _compare_results(res_dev, res_host, _exposure())
    coeffs = res_host.psfMatchingKernel.spatial_coefficients
    np.testing.assert_allclose(res_dev.psfMatchingKernel.spatial_coefficients, coeffs, rtol=0,
                               atol=1e-8 * np.abs(coeffs).max())
    md_host, md_dev = res_host.metadata, res_dev.metadata
    assert (md_host["spatialSolveOn"], md_dev["spatialSolveOn"]) == ("host", "device")
    assert md_dev["spatialSolveMethod"] == md_host["spatialSolveMethod"] == "cholesky"
    assert md_dev["spatialSolveRank"] == md_host["spatialSolveRank"] \
        == md_host["numSpatialUnknowns"]
    assert md_dev["spatialConditionNum"] == pytest.approx(md_host["spatialConditionNum"], rel=1e-8)


def test_run_spatial_solve_on_device_rank_deficient(sec10):
    """docs/algorithm.md section 10's rank-deficient setup (25 good pixels for 27 basis
    functions): the pseudo-inverse on the device too, and as useful a kernel.
    Its equilibrated system has eigenvalues on both sides of the rank tolerance
    within a factor 1.5 (measured with LAPACK), so the rank itself may differ
    by a few between eigensolvers and is not compared."""
    res_host, res_dev = _run_both_solves(sec10.config(), sec10.exposure, sec10.reference)
    for res in (res_host, res_dev):
        md = res.metadata
        assert md["spatialSolveMethod"] == "eigen-pseudo-inverse"
        assert md["spatialSolveRank"] < md["numSpatialUnknowns"]
        assert np.all(np.isfinite(res.psfMatchingKernel.spatial_coefficients))
        assert np.all(np.isfinite(to_numpy(res.psfMatchedExposure.image)[4:-4, 4:-4]))
        # gpumatch's own check: the matched PSF against the reference, per candidate.
        assert md["matchedPsfRelL2Max"] < 0.02, md["matchedPsfRelL2Max"]


# ---------------------------------------------------------------------------
# Application
# ---------------------------------------------------------------------------

APPLY_CASES = [
    # model, order, xy0, (ny, nx), k, dtypes (image, variance, mask)
    ("chebyshev1", 2, (-13, 27), (130, 301), 21, (np.float32, np.float32, np.int32)),
    ("polynomial", 3, (40, -7), (97, 258), 9, (np.float64, np.float32, np.uint16)),
    ("chebyshev1", 0, (0, 0), (64, 64), 7, (np.float32, np.float64, np.int64)),
    ("chebyshev1", 1, (5, 5), (41, 131), 3, (np.float32, np.float32, np.uint8)),
    ("chebyshev1", 3, (0, 0), (150, 170), 35, (np.float32, np.float32, np.int32)),
]


@pytest.mark.parametrize("model_type, order, xy0, shape, k, dtypes", APPLY_CASES)
@pytest.mark.parametrize("where", ["device", "host-staged", "host-pageable"])
def test_apply_matches_numpy(model_type, order, xy0, shape, k, dtypes, where):
    from gpumatch.cuda.apply import convolve_planes_cupy

    rng = np.random.default_rng(k + order)
    ny, nx = shape
    box = gm.Box(xy0[0], xy0[1], nx, ny)
    kernel = random_kernel(rng, k, model_type, order, box.grown(17, 11))
    image, variance, mask = random_planes(rng, shape, *dtypes)
    no_data = 1 << 5 if mask.dtype == np.uint8 else NO_DATA
    want = convolve_planes(image, variance, mask, kernel, box, no_data)
    if where == "device":
        got = convolve_planes_cupy(cp.asarray(image), cp.asarray(variance), cp.asarray(mask),
                                   kernel, box, no_data)
        assert all(isinstance(a, cp.ndarray) for a in got)
    else:
        transfer = where.split("-")[1]
        got = convolve_planes_cupy(image, variance, mask, kernel, box, no_data, transfer=transfer,
                                   bands=3)
        assert all(isinstance(a, np.ndarray) for a in got)
    _assert_planes(got, want, k // 2)


def test_apply_nonfinite_inputs_and_partial_support():
    from gpumatch.cuda.apply import convolve_planes_cupy

    rng = np.random.default_rng(3)
    k = 9
    shape = (90, 203)
    box = gm.Box(3, -4, shape[1], shape[0])
    support = np.ones((k, k))
    support[0, :4] = 0
    support[3, 8] = 0
    support[8, 0] = 0
    kernel = random_kernel(rng, k, "chebyshev1", 2, box.grown(20, 20), support=support)
    image, variance, mask = random_planes(rng, shape)
    image[20, 30] = np.nan
    variance[60, 70] = np.nan
    mask[0, 5] = 1 << 30
    want = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    got = convolve_planes_cupy(cp.asarray(image), cp.asarray(variance), cp.asarray(mask), kernel,
                               box, NO_DATA)
    _assert_planes(got, want, k // 2)


def test_apply_host_output_falls_back_to_pageable_memory(monkeypatch, caplog):
    """When pinned host memory runs out (a caller keeping many results), the output
    planes are pageable and the result is unchanged."""
    import cupyx

    from gpumatch.cuda import apply as ca
    from gpumatch.cuda.apply import convolve_planes_cupy

    rng = np.random.default_rng(5)
    k, shape = 7, (120, 150)
    box = gm.Box(0, 0, shape[1], shape[0])
    kernel = random_kernel(rng, k, "chebyshev1", 2, box)
    planes = random_planes(rng, shape)
    want = convolve_planes(*planes, kernel, box, NO_DATA)
    pinned = cupyx.empty_pinned

    def no_large_pinned(shp, dtype=np.float64):
        if tuple(shp) == shape:
            raise MemoryError("pinned host memory exhausted (test)")
        return pinned(shp, dtype)

    monkeypatch.setattr(cupyx, "empty_pinned", no_large_pinned)
    monkeypatch.setattr(ca, "_warned_pageable", False)
    with caplog.at_level("WARNING", logger="gpumatch"):
        got = convolve_planes_cupy(*planes, kernel, box, NO_DATA, bands=3)
    assert "no pinned host memory" in caplog.text
    assert all(type(g) is np.ndarray for g in got)
    _assert_planes(got, want, k // 2)


def _staging_spy(monkeypatch):
    """Record the dtype of every plane band the host threads stage into pinned memory."""
    from gpumatch.cuda import apply as ca

    staged, real = [], ca._staging_pool

    class Spy:
        def submit(self, fn, dst, src):
            staged.append(src.dtype)
            return real().submit(fn, dst, src)

    monkeypatch.setattr(ca, "_staging_pool", Spy)
    return staged


def test_apply_pinned_inputs_are_copied_without_staging(monkeypatch):
    """Host planes in pinned memory of the device dtype go to the device as they
    are; only the others are staged through pinned buffers. Results unchanged."""
    from gpumatch.cuda import apply as ca

    rng = np.random.default_rng(11)
    k, shape = 9, (150, 170)
    box = gm.Box(-3, 8, shape[1], shape[0])
    kernel = random_kernel(rng, k, "chebyshev1", 2, box)
    planes = random_planes(rng, shape)
    want = convolve_planes(*planes, kernel, box, NO_DATA)
    pinned = []
    for a in planes:
        pinned.append(ca.pinned_empty(a.shape, a.dtype))
        pinned[-1][...] = a
    assert all(ca.is_pinned(p) for p in pinned) and ca.is_pinned(pinned[0][40:])
    assert not any(ca.is_pinned(a) for a in planes)
    staged = _staging_spy(monkeypatch)
    _assert_planes(ca.convolve_planes_cupy(*pinned, kernel, box, NO_DATA, bands=3), want, k // 2)
    assert staged == []
    # A pageable plane, and a pinned plane of another byte order, are staged.
    swapped = pinned[2].astype(pinned[2].dtype.newbyteorder(">"))
    _assert_planes(ca.convolve_planes_cupy(pinned[0], planes[1], swapped, kernel, box, NO_DATA,
                                           bands=3), want, k // 2)
    assert staged and set(staged) == {planes[1].dtype, swapped.dtype}


def test_apply_two_exposures_in_flight_on_shared_transfers():
    """Two host-resident applications queued on one HostTransfers before either is
    waited for (as match_many overlaps them), waited for in reverse order: both
    exact. The fake CuPy's lazy streams run nothing before a wait, so a missing
    dependency between the two would show."""
    from gpumatch.cuda import apply as ca

    rng = np.random.default_rng(12)
    shapes, ks = [(140, 160), (97, 131)], [9, 7]
    boxes = [gm.Box(0, 0, s[1], s[0]) for s in shapes]
    kernels = [random_kernel(rng, k, "chebyshev1", 2, b) for k, b in zip(ks, boxes)]
    planes = [random_planes(rng, s) for s in shapes]
    wants = [convolve_planes(*p, kn, b, NO_DATA) for p, kn, b in zip(planes, kernels, boxes)]
    transfers = ca.HostTransfers()
    pending = [ca.start_convolve_planes_cupy(*p, kn, b, NO_DATA, bands=3, transfers=transfers)
               for p, kn, b in zip(planes, kernels, boxes)]
    for i in (1, 0):
        _assert_planes(pending[i].result(), wants[i], ks[i] // 2)


def test_apply_in_flight_survives_device_memory_reuse():
    """CuPy's memory pool gives a dropped block to the next allocation of its size
    on the stream that allocated it at once, whatever other streams still have
    queued. While a host-resident application runs on its own streams, device
    memory freed and written on the current stream must not be any it uses (its
    term kernels, normalisation and footprint among them)."""
    import gc

    from gpumatch.cuda import apply as ca

    rng = np.random.default_rng(5)
    shape, k = (150, 170), 9
    box = gm.Box(3, -2, shape[1], shape[0])
    kernel = random_kernel(rng, k, "chebyshev1", 2, box.grown(8, 8))
    planes = random_planes(rng, shape)
    want = convolve_planes(*planes, kernel, box, NO_DATA)
    pending = ca.start_convolve_planes_cupy(*planes, kernel, box, NO_DATA, bands=4)
    gc.collect()
    packed = ca.pack_terms(kernel, box)
    sizes = {a.nbytes for a in (packed.qpack, packed.qsum, packed.support)}
    # Blocks of each size, poisoned: NaN where a float fits, else all bits set.
    junk = [cp.full(n // 8, np.nan) if n % 8 == 0 else cp.full(n, 255, dtype=np.uint8)
            for n in sorted(sizes) for _ in range(4)]
    got = pending.result()
    del junk
    _assert_planes(got, want, k // 2)


def test_apply_inf_with_positive_kernel():
    """With a positive kernel the direct sum over an infinity is +inf (no sign ambiguity)."""
    from gpumatch.cuda.apply import convolve_planes_cupy

    k = 7
    h = k // 2
    v, u = np.mgrid[-h:h + 1, -h:h + 1]
    basis = np.array([np.exp(-(u ** 2 + v ** 2) / 4.0), np.exp(-(u ** 2 + v ** 2) / 9.0)])
    basis /= basis.sum(axis=(1, 2), keepdims=True)
    box = gm.Box(0, 0, 80, 60)
    sf = SpatialFunctions("chebyshev1", 1, box.grown(5, 5))
    kernel = gm.SpatialKernel(basis, sf, np.array([[1.0, 0.0, 0.0], [0.5, 0.2, -0.1]]))
    rng = np.random.default_rng(0)
    image, variance, mask = random_planes(rng, (60, 80))
    image[30, 40] = np.inf
    variance[10, 10] = np.inf
    want = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    got = convolve_planes_cupy(image, variance, mask, kernel, box, NO_DATA)
    _assert_planes(got, want, h)
    assert np.isposinf(got[0][30, 40]) and np.isposinf(got[1][10, 10])


def test_apply_non_contiguous_device_input_and_all_edge():
    from gpumatch.cuda.apply import convolve_planes_cupy

    rng = np.random.default_rng(5)
    k = 11
    big = random_planes(rng, (120, 260))
    image, variance, mask = (a[10:110, 3:250] for a in big)   # row stride != width
    box = gm.Box(0, 0, image.shape[1], image.shape[0])
    kernel = random_kernel(rng, k, "chebyshev1", 2, box.grown(8, 8))
    want = convolve_planes(np.ascontiguousarray(image), np.ascontiguousarray(variance),
                           np.ascontiguousarray(mask), kernel, box, NO_DATA)
    dev = [cp.asarray(a)[10:110, 3:250] for a in big]
    got = convolve_planes_cupy(*dev, kernel, box, NO_DATA)
    _assert_planes(got, want, k // 2)
    # Smaller than the kernel: every pixel is edge.
    tiny = [a[:8, :8] for a in big]
    out = convolve_planes_cupy(*(cp.asarray(a) for a in tiny), kernel, gm.Box(0, 0, 8, 8), NO_DATA)
    assert bool(cp.isnan(out[0]).all()) and bool((out[1] == cp.inf).all())
    assert bool((out[2] == NO_DATA).all())


def test_apply_production_size_strict():
    """A production-like kernel on a 1024 x 1024 exposure: 1e-5 relative everywhere."""
    from gpumatch.cuda.apply import convolve_planes_cupy

    exp = _exposure(nx=1024, ny=1024, xy0=(0, 0))
    cfg = gm.ModelPsfMatchConfig(kernelSize=21, alardSigGauss=(1.0, 2.0, 4.5),
                                 alardDegGauss=(4, 2, 2), spatialKernelOrder=2)
    res = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exp, gm.DoubleGaussianPsf(23, 23, 3.27, 8.175, 0.1))
    kernel = res.psfMatchingKernel
    want = (res.psfMatchedExposure.image, res.psfMatchedExposure.variance,
            res.psfMatchedExposure.mask)
    got = convolve_planes_cupy(exp.image, exp.variance, exp.mask, kernel, exp.bbox, NO_DATA)
    _assert_planes(got, want, 10, strict=True)


def test_quality_on_device_matches_numpy():
    """Matched-PSF residuals and sizes computed where the stamps are (device FFTs
    and adaptive moments), with only per-candidate numbers coming back."""
    from gpumatch.moments import adaptive_moments_batch
    from gpumatch.quality import candidate_residuals, matched_psf_stamps

    exp, ref, cfg = _exposure(), _reference(), _config()
    res = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exp, ref)
    cs_np = res.kernelCellSet
    cs_cp, _ = build_cell_set(exp, ref, cfg, cfg.kernelSize, xp=cp)
    m_cp, t_cp = matched_psf_stamps(cs_cp, res.psfMatchingKernel, cp)
    m_np, t_np = matched_psf_stamps(cs_np, res.psfMatchingKernel)
    assert isinstance(m_cp, cp.ndarray) and isinstance(t_cp, cp.ndarray)
    np.testing.assert_allclose(m_cp.get(), m_np, rtol=0, atol=1e-12 * np.abs(m_np).max())
    mom_cp = adaptive_moments_batch(m_cp)
    assert isinstance(mom_cp, cp.ndarray)
    np.testing.assert_allclose(mom_cp.get(), adaptive_moments_batch(m_np), rtol=1e-7)
    q_cp = candidate_residuals(cs_cp, res.psfMatchingKernel)
    q_np = candidate_residuals(cs_np, res.psfMatchingKernel)
    assert set(q_cp) == set(q_np)
    for key, want in q_np.items():
        got = q_cp[key]
        assert type(got) is type(want), key          # NumPy arrays and floats come back
        np.testing.assert_allclose(got, want, rtol=1e-7, err_msg=key)


# ---------------------------------------------------------------------------
# The whole task
# ---------------------------------------------------------------------------


def _kernel_points(b):
    """Corners, centre and a few random points of bbox ``b`` (parent pixels)."""
    rng = np.random.default_rng(1)
    pts = [(b.x0, b.y0), (b.x1, b.y1), (b.x0, b.y1), b.center]
    return pts + [(float(x), float(y))
                  for x, y in zip(rng.uniform(b.x0, b.x1, 5), rng.uniform(b.y0, b.y1, 5))]


def _kernel_difference(kernel_a, kernel_b, bbox):
    """Largest difference of two kernels' images over :func:`_kernel_points`,
    relative to the peak of ``kernel_b``'s image at each point."""
    return max(float(np.abs(kernel_a.compute_image(x, y) - kb).max() / np.abs(kb).max())
               for x, y in _kernel_points(bbox) for kb in [kernel_b.compute_image(x, y)])


def _compare_results(res_cp, res_np, exposure, kernel_tol=1e-5, strict=True):
    k = res_np.psfMatchingKernel.dimensions[0]
    diff = _kernel_difference(res_cp.psfMatchingKernel, res_np.psfMatchingKernel, exposure.bbox)
    assert diff <= kernel_tol, diff
    mn, mc = res_np.psfMatchedExposure, res_cp.psfMatchedExposure
    if strict:
        _assert_planes((mc.image, mc.variance, mc.mask), (mn.image, mn.variance, mn.mask), k // 2,
                       strict=True)
    assert set(res_cp.metadata) == set(res_np.metadata)
    assert res_cp.metadata["backend"] == "cupy"
    for key in ("ALKernelSize", "ALBasisNGauss", "ALBasisDegGauss", "ALBasisMode",
                "numKernelCandidates", "numUsedCandidates", "spatialSolveMethod", "psfSize"):
        assert res_cp.metadata[key] == res_np.metadata[key], key
    np.testing.assert_allclose(res_cp.metadata["spatialKernelSum"],
                               res_np.metadata["spatialKernelSum"], rtol=1e-9)
    np.testing.assert_allclose(res_cp.metadata["spatialConditionNum"],
                               res_np.metadata["spatialConditionNum"], rtol=1e-3)
    for attr in ("xy0", "wcs", "photo_calib", "filter", "visit_info", "id", "meta", "mask_planes"):
        assert getattr(mc, attr) == getattr(mn, attr), attr
    assert mc.psf is res_cp.referencePsfModel


@pytest.mark.parametrize("kernel_sum", [1.0, 2.7])
def test_run_host_resident_matches_numpy(kernel_sum):
    exp = _exposure()
    ref = _reference()
    res_np = gm.ModelPsfMatchTask(_config(), backend="numpy").run(exp, ref, kernel_sum)
    res_cp = gm.ModelPsfMatchTask(_config(), backend="cupy").run(exp, ref, kernel_sum)
    assert isinstance(res_cp.psfMatchedExposure.image, np.ndarray)
    _compare_results(res_cp, res_np, exp)
    assert isinstance(res_cp.kernelCellSet.templates, cp.ndarray)
    M = res_cp.kernelCellSet.normal_matrices
    np.testing.assert_allclose(to_numpy(M), res_np.kernelCellSet.normal_matrices, rtol=1e-10,
                               atol=1e-13 * np.abs(res_np.kernelCellSet.normal_matrices).max())


def test_run_device_resident_stays_on_device():
    exp_np = _exposure()
    exp_cp = _exposure(xp=cp)
    assert isinstance(exp_cp.image, cp.ndarray)
    before = [a.copy() for a in (exp_cp.image, exp_cp.variance, exp_cp.mask)]
    ref = _reference()
    res_np = gm.ModelPsfMatchTask(_config(), backend="numpy").run(exp_np, ref)
    res_cp = gm.ModelPsfMatchTask(_config(), backend="cupy").run(exp_cp, ref)
    out = res_cp.psfMatchedExposure
    assert all(isinstance(a, cp.ndarray) for a in (out.image, out.variance, out.mask))
    assert out.image.dtype == exp_cp.image.dtype and out.mask.dtype == exp_cp.mask.dtype
    for a, b in zip(before, (exp_cp.image, exp_cp.variance, exp_cp.mask)):
        assert bool(cp.array_equal(a, b, equal_nan=True))          # input untouched
    _compare_results(res_cp, res_np, exp_np)


def test_run_user_psf_model_rendered_on_host():
    """A model without device support is realised on the host once and copied."""
    class HostOnly(gm.Psf):
        def compute_kernel_image(self, x, y):
            return gm.GaussianPsf(13, 13, 1.7 + 1e-4 * (x + y)).compute_kernel_image(x, y)

    exp = _exposure()
    exp.psf = HostOnly()
    ref = _reference()
    res_np = gm.ModelPsfMatchTask(_config(), backend="numpy").run(exp, ref)
    res_cp = gm.ModelPsfMatchTask(_config(), backend="cupy").run(exp, ref)
    _compare_results(res_cp, res_np, exp)


def test_run_production_configuration_strict():
    """docs/algorithm.md section 11 on 1024 x 1024 (100 candidates): well enough conditioned
    (a 1e-16 change of M moves the kernel by ~4e-7 on the CPU) for the issue's
    1e-5 criterion on kernels and matched planes."""
    exp = _exposure(nx=1024, ny=1024, xy0=(0, 0))
    cfg = gm.ModelPsfMatchConfig(kernelSize=21, alardSigGauss=(1.0, 2.0, 4.5),
                                 alardDegGauss=(4, 2, 2), spatialKernelOrder=2)
    ref = gm.DoubleGaussianPsf(23, 23, 3.27, 8.175, 0.1)
    res_np = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exp, ref)
    res_cp = gm.ModelPsfMatchTask(cfg, backend="cupy").run(exp, ref)
    _compare_results(res_cp, res_np, exp, kernel_tol=1e-5, strict=True)


def test_run_ill_conditioned():
    """Degrees (4, 2, 2), 36 candidates: spatial condition number ~1e13, so the
    kernel is determined only to what a rounding error of the inputs moves it.
    That is measured here with NumPy alone (the exposure PSF's width changed by
    a few parts in 1e16 moves the kernels by ~1e-4 of their peak), and the GPU's
    kernels must agree with NumPy's to 10 times that (to 1e-5 where the problem
    allows it); the matched images are compared through the quality of the
    match, and the stages that do not depend on the conditioning (stamps, M, b,
    application) exactly as elsewhere."""
    exp = _exposure()
    ref = _reference()
    cfg = _config(alardDegGauss=(4, 2, 2))
    res_np = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exp, ref)
    sensitivity = 0.0
    for eps in (4e-16, -1e-15, 1e-15):
        again = gm.ModelPsfMatchTask(cfg, backend="numpy").run(_exposure(width=1.6 * (1 + eps)), ref)
        sensitivity = max(sensitivity, _kernel_difference(again.psfMatchingKernel,
                                                          res_np.psfMatchingKernel, exp.bbox))
    assert 1e-6 < sensitivity < 1e-3, sensitivity     # ill-posed, not broken
    task = gm.ModelPsfMatchTask(cfg, backend="cupy")
    res_cp = task.run(exp, ref)
    _compare_results(res_cp, res_np, exp, kernel_tol=max(1e-5, 10 * sensitivity), strict=False)
    np.testing.assert_allclose(to_numpy(res_cp.kernelCellSet.normal_matrices),
                               res_np.kernelCellSet.normal_matrices, rtol=1e-10,
                               atol=1e-13 * np.abs(res_np.kernelCellSet.normal_matrices).max())
    q_np = gm.ModelPsfMatchTask(cfg, backend="numpy").diagnostic(res_np.kernelCellSet,
                                                                 res_np.psfMatchingKernel)
    q_cp = task.diagnostic(res_cp.kernelCellSet, res_cp.psfMatchingKernel)
    np.testing.assert_allclose(q_cp["relative_l2"], q_np["relative_l2"], rtol=1e-2, atol=1e-6)
    # The application of the GPU's own kernel, against NumPy's application of it.
    mc = res_cp.psfMatchedExposure
    want = convolve_planes(exp.image, exp.variance, exp.mask, res_cp.psfMatchingKernel, exp.bbox,
                           NO_DATA)
    _assert_planes((mc.image, mc.variance, mc.mask), want, cfg.kernelSize // 2, strict=True)


# ---------------------------------------------------------------------------
# Many exposures on the device
# ---------------------------------------------------------------------------


def _visit(xp=np):
    """Four exposures, one of another size, with their own PSFs."""
    exps = [_exposure(seed=s, xp=xp) for s in range(3)]
    exps.append(_exposure(nx=257, ny=301, xy0=(0, 0), seed=3, xp=xp))
    return exps


def _assert_identical(got, want):
    """Bitwise the same result (timings aside); candidate kernels to rounding."""
    np.testing.assert_array_equal(got.psfMatchingKernel.spatial_coefficients,
                                  want.psfMatchingKernel.spatial_coefficients)
    for a, b in zip((got.psfMatchedExposure.image, got.psfMatchedExposure.variance,
                     got.psfMatchedExposure.mask),
                    (want.psfMatchedExposure.image, want.psfMatchedExposure.variance,
                     want.psfMatchedExposure.mask)):
        assert type(a) is type(b)
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    for name in ("templates", "targets", "normal_matrices", "normal_vectors"):
        np.testing.assert_array_equal(to_numpy(getattr(got.kernelCellSet, name)),
                                      to_numpy(getattr(want.kernelCellSet, name)), err_msg=name)
    # Single-candidate kernels (diagnostics only) come from one batched
    # eigensolver call per batch, whose rounding may depend on the batch.
    np.testing.assert_allclose(to_numpy(got.kernelCellSet.kernel_solutions),
                               to_numpy(want.kernelCellSet.kernel_solutions), rtol=1e-9, atol=1e-12)
    assert set(got.metadata) == set(want.metadata)
    for key in got.metadata:
        if key != "timings":
            assert got.metadata[key] == want.metadata[key], key


@pytest.mark.parametrize("resident", ["host", "device"])
def test_match_many_equals_run_on_device(resident):
    xp = cp if resident == "device" else np
    cfg, ref = _config(), _reference()
    exps = _visit(xp)
    task = gm.ModelPsfMatchTask(cfg, backend="cupy")
    want = [task.run(e, ref) for e in exps]
    got = list(gm.match_many(exps, ref, cfg, backend="cupy"))
    assert len(got) == len(exps)
    for g, w in zip(got, want):
        _assert_identical(g, w)
        assert isinstance(g.psfMatchedExposure.image, cp.ndarray if resident == "device" else np.ndarray)
    # and the backends agree, as for run
    res_np = gm.ModelPsfMatchTask(cfg, backend="numpy").run(_visit()[3], ref)
    _compare_results(got[3], res_np, _visit()[3])


def test_match_many_reads_files_into_pinned_memory(tmp_path, monkeypatch):
    """Exposures given as paths are read straight into pinned memory, so their
    planes reach the device with no staging copy; results equal run's on the
    same files."""
    cfg, ref = _config(), _reference()
    exps = _visit()
    psf = exps[0].psf
    paths = [e.write_fits(tmp_path / f"e{i}.fits") for i, e in enumerate(exps)]
    task = gm.ModelPsfMatchTask(cfg, backend="cupy")
    want = [task.run(gm.Exposure.read_fits(p, psf=psf), ref) for p in paths]
    staged = _staging_spy(monkeypatch)
    got = list(gm.match_many(paths, ref, cfg, backend="cupy", psf=psf, batch_size=3))
    assert staged == []
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _assert_identical(g, w)


def test_match_file_reads_into_pinned_memory(tmp_path, monkeypatch):
    """``gpumatch match`` on the GPU (pipeline.match_file) reads the planes into
    pinned memory: no staging copy, and the output equals a run on the same file."""
    from gpumatch.pipeline import match_file

    cfg, ref = _config(), _reference()
    exposure = _exposure()
    path = exposure.write_fits(tmp_path / "in.fits")
    want = gm.ModelPsfMatchTask(cfg, backend="cupy").run(
        gm.Exposure.read_fits(path, psf=exposure.psf), ref)
    staged = _staging_spy(monkeypatch)
    match_file(path, ref, str(tmp_path / "out.fits"), psf=exposure.psf, config=cfg,
               backend="cupy")
    assert staged == []
    got = gm.Exposure.read_fits(tmp_path / "out.fits")
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(got, plane),
                                      getattr(want.psfMatchedExposure, plane))


def test_match_many_batch_size_from_free_device_memory():
    from gpumatch import many

    cfg, ref = _config(), _reference()
    task = gm.ModelPsfMatchTask(cfg, backend="cupy")
    matcher = many._ManyMatcher(task, ref, 1.0, None, None)
    job = many._job(None)
    job.exposure = _exposure()
    limit = matcher._batch_limit(job)
    free, _ = cp.cuda.runtime.memGetInfo()
    free += cp.get_default_memory_pool().free_bytes()
    per_exposure = matcher._phase1_bytes(job.exposure)
    assert 1 <= limit <= many.MAX_DEVICE_BATCH
    assert limit == many.MAX_DEVICE_BATCH or \
        limit * per_exposure <= many.DEVICE_MEMORY_FRACTION * free


def test_match_many_device_out_of_memory_halves_the_batch(monkeypatch):
    """A real CuPy out-of-memory error in a batch's normal equations: the batch
    is halved and retried, the device pools are emptied, results unchanged."""
    from gpumatch import many

    cfg, ref = _config(), _reference()
    exps = _visit()
    want = [gm.ModelPsfMatchTask(cfg, backend="cupy").run(e, ref) for e in exps]
    n_cand = len(want[0].kernelCellSet)
    original = many._ManyMatcher._solve
    sizes, frees = [], []

    def limited(self, jobs):
        sizes.append(len(jobs))
        if len(jobs) > 2:
            raise cp.cuda.memory.OutOfMemoryError(1 << 40, 1 << 34, 0)
        return original(self, jobs)

    from gpumatch.backends.cupy_backend import CupyBackend

    real_free = CupyBackend.release_cached_memory
    monkeypatch.setattr(many._ManyMatcher, "_solve", limited)
    monkeypatch.setattr(CupyBackend, "release_cached_memory",
                        lambda self: (frees.append(1), real_free(self)))
    got = list(gm.match_many(exps, ref, cfg, backend="cupy", batch_size=4))
    assert sizes[0] == 4 and max(sizes[1:]) <= 2 and frees
    assert n_cand > 0
    for g, w in zip(got, want):
        _assert_identical(g, w)


@pytest.mark.parametrize("failing", ["large", "all"])
def test_match_many_device_solver_error_falls_back(monkeypatch, failing, caplog):
    """A cuSOLVER (or cuBLAS) error that is not out-of-memory in the batch's per-candidate
    solves: the failing device calls are redone in smaller chunks ("large": only
    calls on more than one exposure's candidates fail), then on the host ("all":
    every device call fails); no exposure fails and every result equals run's."""
    import cupy_backends.cuda.libs.cublas as cublas
    import cupy_backends.cuda.libs.cusolver as cusolver

    from gpumatch import linalg

    cfg, ref = _config(), _reference()
    exps = _visit()
    want = [gm.ModelPsfMatchTask(cfg, backend="cupy").run(e, ref) for e in exps]
    n_cand = len(want[0].kernelCellSet)
    real = cp.linalg.cholesky
    sizes = []

    def cholesky(a):
        sizes.append(len(a))
        if failing == "all":
            raise cublas.CUBLASError(13)
        if len(a) > n_cand:
            raise cusolver.CUSOLVERError(3)
        return real(a)

    monkeypatch.setattr(cp.linalg, "cholesky", cholesky)
    monkeypatch.setattr(linalg, "_MIN_DEVICE_CHUNK", 8 if failing == "large" else 1 << 20)
    with caplog.at_level("WARNING", logger="gpumatch"):
        got = list(gm.match_many(exps, ref, cfg, backend="cupy", batch_size=len(exps)))
    assert sizes[0] > n_cand                       # the batch's call, which failed
    if failing == "large":
        assert 0 < max(sizes[1:]) <= n_cand        # then smaller chunks, which worked
        assert "retrying in chunks" in caplog.text
    else:
        assert "on the host" in caplog.text
    assert len(got) == len(exps)
    for g, w in zip(got, want):
        assert not isinstance(g, Exception)
        _assert_identical(g, w)
