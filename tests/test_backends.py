"""The backend registry, the stage API and the module graph.

- NumPy results are bit-identical to those recorded before the backend and
  stage refactoring (tests/bitwise_baseline.py);
- a backend added as one module plus one registry line (tests/numpy_test_backend.py)
  runs the whole pipeline, ``run`` and ``match_many``, with NumPy's results;
- no import cycle between gpumatch modules, at module or function level.
"""

from __future__ import annotations

import ast
import json
import pathlib

import bitwise_baseline
from test_many import small_exposure
import numpy as np
import pytest

import gpumatch as gm
from gpumatch import backends
from gpumatch.backend import array_namespace, resolve_backend, to_numpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_numpy_results_are_bit_identical_to_the_recorded_ones():
    recorded = json.loads(bitwise_baseline.BASELINE.read_text())
    if recorded.pop("versions") != bitwise_baseline.versions():
        pytest.skip("hashes recorded with other NumPy/SciPy versions "
                    "(rerun `python3 tests/bitwise_baseline.py record` on main)")
    assert bitwise_baseline.compute() == recorded


@pytest.fixture
def numpy_test_backend():
    backends.register_backend("numpy-test", "numpy_test_backend:NumpyTestBackend")
    yield "numpy-test"
    backends.unregister_backend("numpy-test")


def _same(got, want):
    """Every array of two results equal, and every metadata number but the timings."""
    for a, b in ((got.psfMatchedExposure.image, want.psfMatchedExposure.image),
                 (got.psfMatchedExposure.variance, want.psfMatchedExposure.variance),
                 (got.psfMatchedExposure.mask, want.psfMatchedExposure.mask),
                 (got.psfMatchingKernel.spatial_coefficients,
                  want.psfMatchingKernel.spatial_coefficients),
                 (got.kernelCellSet.normal_matrices, want.kernelCellSet.normal_matrices),
                 (got.kernelCellSet.kernel_solutions, want.kernelCellSet.kernel_solutions)):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    skip = ("timings", "backend")
    assert ({k: v for k, v in got.metadata.items() if k not in skip}
            == {k: v for k, v in want.metadata.items() if k not in skip})


def test_a_backend_added_by_one_module_and_one_line_runs_the_pipeline(numpy_test_backend):
    from gpumatch.cli import build_parser

    assert resolve_backend("numpy-test") == "numpy-test"
    assert "numpy-test" in gm.backend.backend_names()
    # The command line's choices come from the registry.
    args = build_parser().parse_args(["selftest", "--backend", "numpy-test"])
    assert args.backend == "numpy-test"

    ref = gm.GaussianPsf(**bitwise_baseline.REFERENCE)
    exposures = [small_exposure(*a) for a in bitwise_baseline.EXPOSURES[:2]]
    cfg = bitwise_baseline._config()
    task = gm.ModelPsfMatchTask(cfg, backend="numpy-test")
    assert task.backend == "numpy-test" and task.array_backend.name == "numpy-test"
    want = [gm.ModelPsfMatchTask(cfg, backend="numpy").run(e, ref, on_poor_match="ignore")
            for e in exposures]
    got = [task.run(e, ref, on_poor_match="ignore") for e in exposures]
    many = list(gm.match_many(exposures, ref, cfg, backend="numpy-test", batch_size=2,
                              on_poor_match="ignore"))
    for g, m, w in zip(got, many, want):
        assert g.metadata["backend"] == m.metadata["backend"] == "numpy-test"
        _same(g, w)
        _same(m, w)


def test_registry_answers_and_refuses():
    assert resolve_backend("numpy") == "numpy"
    with pytest.raises(ValueError, match="backend='jax' is not one of"):
        resolve_backend("jax")
    with pytest.raises(ValueError, match="reserved"):
        backends.register_backend("auto", "x:y")
    backends.register_backend("broken", "nowhere:Nothing", available=lambda: (False, "no device"))
    try:
        with pytest.raises(RuntimeError, match="backend='broken' was requested but no device"):
            resolve_backend("broken")
        assert backends.backend_status("broken") == (False, "no device")
    finally:
        backends.unregister_backend("broken")
    a = np.arange(3.0)
    assert array_namespace(a, [1, 2]) is np and to_numpy(a) is a
    assert np.array_equal(to_numpy([1, 2]), [1, 2])
    host = backends.backend_for_namespace(np)
    assert host.name == "numpy" and not host.on_device and host.free_memory() is None
    assert host.oom_errors == () and host.spatial_solve == "host"


def _module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph():
    """``{module: {gpumatch modules it imports anywhere in its source}}``."""
    files = {_module_name(p): p for p in (ROOT / "gpumatch").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in files and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """A cycle of ``graph`` as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    # Function-level and relative imports are seen.
    assert "gpumatch.stages" in graph["gpumatch.recommend"]  # inside evaluate_config
    assert "gpumatch.apply" in graph["gpumatch.cuda.apply"]


def test_no_import_cycles_between_gpumatch_modules():
    """Only gpumatch-internal edges count (a package's ``__init__`` is its own node),
    module- and function-level imports alike; backends named in the registry as
    strings are imported by the registry, not by an import statement, so the registry
    sits below every backend. The graph has no cycle: the readers are given the
    classes they build (``cls``, defaults set by :mod:`gpumatch.io`), ``Box`` and the
    mask planes sit in :mod:`gpumatch.pixels` below everything, FITS files are opened
    by :mod:`gpumatch.io._fitsfile` below every reader, and ``output_conflict`` sits in
    :mod:`gpumatch.pipeline`, above the provenance record it reads."""
    graph = {k: v - {"gpumatch"} for k, v in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
    for a, b in (("gpumatch.apply", "gpumatch.cuda.apply"),
                 ("gpumatch.moments", "gpumatch.cuda.moments"),
                 ("gpumatch.recommend", "gpumatch.task"),
                 ("gpumatch.io.fits", "gpumatch.exposure"),
                 ("gpumatch.io.nddata", "gpumatch.exposure"),
                 ("gpumatch.io.kernel_fits", "gpumatch.kernel"),
                 ("gpumatch.provenance", "gpumatch.config"),
                 ("gpumatch.provenance", "gpumatch.pipeline")):
        assert b not in graph[a], (a, b)
    # The low modules import no other gpumatch module at all.
    assert graph["gpumatch.pixels"] == set()


def test_backends_of_other_packages_come_from_entry_points(monkeypatch):
    """A distribution's ``gpumatch.backends`` entry point registers its backend, read
    once, lazily; a name gpumatch registers itself is not overridden."""
    from importlib.metadata import EntryPoint

    found = [EntryPoint("numpy-plugin", "numpy_test_backend:NumpyTestBackend",
                        backends.ENTRY_POINT_GROUP),
             EntryPoint("numpy", "nowhere:Nothing", backends.ENTRY_POINT_GROUP)]
    asked = []

    def entry_points(group):
        asked.append(group)
        return found

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    backends._entry_points_loaded.cache_clear()
    try:
        assert "numpy-plugin" in backends.backend_names() and asked == ["gpumatch.backends"]
        assert type(backends.get_backend("numpy-plugin")).__name__ == "NumpyTestBackend"
        assert type(backends.get_backend("numpy")).__name__ == "NumpyBackend"
        backends.backend_names()
        assert asked == ["gpumatch.backends"]  # read once
    finally:
        backends.unregister_backend("numpy-plugin")
        backends._entry_points_loaded.cache_clear()


def test_readers_build_the_class_they_are_given(tmp_path):
    """The readers import neither ``Exposure`` nor ``SpatialKernel``: the classes' read
    methods pass themselves, and :mod:`gpumatch.io` gives the readers the defaults."""
    from astropy.nddata import NDData

    class Tagged(gm.Exposure):
        pass

    class TaggedKernel(gm.SpatialKernel):
        pass

    rng = np.random.default_rng(3)
    image = rng.normal(size=(6, 7))
    path = gm.Exposure(image, xy0=(2, 5)).write_fits(tmp_path / "e.fits")
    plain, tagged = gm.io.read_exposure(path), Tagged.read_fits(path)
    assert type(plain) is gm.Exposure and type(tagged) is Tagged
    assert np.array_equal(tagged.image, image) and tagged.xy0 == plain.xy0 == (2, 5)
    assert type(gm.Exposure.read_fits(path)) is gm.Exposure
    with pytest.warns(gm.InputWarning, match="variance = 1"):
        assert type(Tagged.from_nddata(NDData(image))) is Tagged
    with pytest.warns(gm.InputWarning, match="variance = 1"):
        assert type(gm.io.exposure_from_nddata(NDData(image))) is gm.Exposure

    kpath = gm.SpatialKernel.constant(rng.normal(size=(5, 5))).write_fits(tmp_path / "k.fits")
    kernel, tagged_kernel = gm.io.read_kernel(kpath), TaggedKernel.read_fits(kpath)
    assert type(kernel) is gm.SpatialKernel and type(tagged_kernel) is TaggedKernel
    assert np.array_equal(kernel.basis_images, tagged_kernel.basis_images)
    assert np.array_equal(kernel.spatial_coefficients, tagged_kernel.spatial_coefficients)


def test_whole_runs_do_not_depend_on_the_number_of_host_threads(monkeypatch):
    # 256 candidates (four chunks of the normal equations, the solves and the
    # moments) and several bands of tiles, on 1 and on 3 threads.
    exposure = small_exposure(512, 512, (5, 9), seed=2)
    exposure.variance[:] = np.linspace(90.0, 110.0, 512, dtype=np.float32)[None, :]
    cfg = gm.ModelPsfMatchConfig(kernelSize=11, alardNGauss=2, alardSigGauss=(1.0, 2.0),
                                 alardDegGauss=(2, 1), spatialKernelOrder=2, sizeCellX=32,
                                 sizeCellY=32)
    ref = gm.GaussianPsf(**bitwise_baseline.REFERENCE)
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("GPUMATCH_THREADS", threads)
        results.append(gm.ModelPsfMatchTask(cfg, backend="numpy").run(exposure, ref,
                                                                      on_poor_match="ignore"))
    assert len(results[0].kernelCellSet) > 3 * 64
    _same(results[1], results[0])
    # Every pixel of the frame (filled by several jobs) holds the edge values.
    out, h = results[0].psfMatchedExposure, cfg.kernelSize // 2
    edge = np.ones(out.image.shape, bool)
    edge[h:-h, h:-h] = False
    assert np.isnan(out.image[edge]).all() and np.isposinf(out.variance[edge]).all()
    assert (out.mask[edge] == out.get_plane_bitmask("NO_DATA")).all()
    assert np.isfinite(out.variance[~edge]).all()
