"""The CUDA sources compile, and their host-side plumbing is right, without a GPU.

* Every ``kernels/*.cu`` compiles with ``nvcc`` for ``sm_90`` (skipped when
  ``nvcc`` is absent), as shipped and with other macro configurations.
* Where CuPy and NVRTC import (no device needed), the sources also compile with
  NVRTC and the options CuPy uses at run time.
* The packing of the kernel's terms for the apply kernel reproduces the
  kernel (the kernels themselves run on the emulator in
  ``tests/test_cuda_emulated.py``).
* ``tests/test_gpu.py`` runs in a subprocess against a fake, NumPy-backed
  ``cupy``: the whole file with the CUDA sources themselves compiled for the
  CPU by :mod:`cuda_emulator` (and a subset again with the threads of each
  block run in a shuffled order). This checks the Python side of the backend (argument
  types against the kernels' signatures, launch geometry, shared memory
  sizes, the pinned/banded host pipeline's pointer arithmetic, dtype and
  stride handling, the task wiring) and the CUDA code's indexing, barriers
  and memory bounds, without a GPU.
"""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.cuda import module as cmod
from gpumatch.cuda.apply import (APPLY_BLOCK, TILE_W, apply_shared_bytes, band_plan,
                                 choose_rows_per_thread, n_slots, pack_terms, term_slot)
from gpumatch.cuda.normal_equations import ne_launch_config, ne_shared_bytes
from random_kernels import random_kernel

NVCC = shutil.which("nvcc")
NO_DATA = 1 << 8

# Macro sets besides the defaults: small/large kernels, every spatial order the
# kernels unroll, both float types, every mask width.
APPLY_VARIANTS = [
    {"KSIZE": 9, "SPATIAL_ORDER": 0, "IMG_T": "double", "VAR_T": "float",
     "MASK_T": "unsigned short", "ROWS_PER_THREAD": 1},
    {"KSIZE": 5, "SPATIAL_ORDER": 1, "IMG_T": "float", "VAR_T": "double",
     "MASK_T": "unsigned char", "ROWS_PER_THREAD": 2},
    {"KSIZE": 29, "SPATIAL_ORDER": 3, "MASK_T": "long long", "ROWS_PER_THREAD": 4},
    {"KSIZE": 35, "SPATIAL_ORDER": 2, "MASK_T": "unsigned int", "ROWS_PER_THREAD": 2},
]
NE_VARIANTS = [
    {"NE_KSIZE": 9, "NE_STAMP": 13, "NE_NBASIS": 10},
    {"NE_KSIZE": 29, "NE_STAMP": 41, "NE_NBASIS": 27},
    {"NE_KSIZE": 35, "NE_STAMP": 49, "NE_NBASIS": 28},
    {"NE_KSIZE": 3, "NE_STAMP": 3, "NE_NBASIS": 1},
]


def _compile_cases():
    cases = [(name, {}) for name in cmod.kernel_files()]
    cases += [("apply_spatial.cu", d) for d in APPLY_VARIANTS]
    cases += [("normal_equations.cu", d) for d in NE_VARIANTS]
    return cases


def _case_id(case):
    name, defines = case
    return name + ("" if not defines else ":" + ",".join(f"{k}={v}" for k, v in defines.items()))


def test_kernel_sources_are_found():
    files = cmod.kernel_files()
    assert "apply_spatial.cu" in files and "normal_equations.cu" in files
    for f in files:
        assert "extern \"C\" __global__" in cmod.kernel_source(f)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: CUDA sources not compiled")
@pytest.mark.parametrize("case", _compile_cases(), ids=_case_id)
def test_nvcc_compiles_for_sm90(case, tmp_path):
    name, defines = case
    src = cmod.kernel_dir().joinpath(name)
    out = tmp_path / (name + ".o")
    cmd = [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(src), "-o", str(out), "-Xptxas", "-v"]
    cmd += [f"-D{k}={v}" for k, v in defines.items()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert out.stat().st_size > 0


def _nvrtc():
    """CuPy's NVRTC wrapper, when CuPy and libnvrtc load (no device needed)."""
    try:
        from cupy.cuda import compiler, nvrtc

        nvrtc.getVersion()
        return compiler
    except Exception as exc:  # ImportError, missing libnvrtc, broken install
        pytest.skip(f"CuPy/NVRTC not usable here ({exc.__class__.__name__}: {exc})")


@pytest.mark.parametrize("case", _compile_cases(), ids=_case_id)
def test_nvrtc_compiles_with_cupy_options(case):
    compiler = _nvrtc()
    name, defines = case
    opts = cmod._options(tuple(sorted((k, str(v)) for k, v in defines.items())))
    # What CuPy adds at run time for an sm_90 device (cupy/cuda/compiler.py).
    opts += ("-arch=sm_90", "--device-as-default-execution-space", "-ftz=true")
    prog = compiler._NVRTCProgram(cmod.kernel_source(name), "gpumatch.cu", (), (),
                                  name_expressions=None, method="cubin")
    obj, _ = prog.compile(opts)
    assert len(obj) > 0


def test_ctype_names():
    assert cmod.ctype_name(np.float32) == "float"
    assert cmod.ctype_name(np.dtype(">f8")) == "double"
    assert cmod.ctype_name(np.int32) == "int"
    assert cmod.ctype_name(np.uint16) == "unsigned short"
    with pytest.raises(TypeError):
        cmod.ctype_name(np.complex64)


# ---------------------------------------------------------------------------
# Launch geometry and shared memory
# ---------------------------------------------------------------------------


def test_apply_shared_memory_layout():
    # Production (k = 21, order 2, int32 mask, 4 rows per thread), by hand:
    # Q 441*8*4 + image/variance 2*52*148*4 + mask 52*148*4 + support 448.
    assert apply_shared_bytes(21, 2, 4, 4) == 441 * 8 * 4 + 3 * 52 * 148 * 4 + 448
    # Two blocks of it fit in an H100/H200 multiprocessor (228 KiB, 1 KiB per block reserved).
    assert 2 * (apply_shared_bytes(21, 2, 4, 4) + 1024) <= 228 * 1024
    h100_optin = 227 * 1024
    for k in (3, 9, 21, 29, 35):
        for order in range(4):
            assert choose_rows_per_thread(k, order, 4, h100_optin) is not None
    assert choose_rows_per_thread(21, 2, 4, 227 * 1024) == 4
    assert choose_rows_per_thread(201, 2, 4, 227 * 1024) is None
    assert TILE_W == 128 and APPLY_BLOCK == (32, 8)
    assert [n_slots(o) for o in range(5)] == [4, 4, 8, 12, 16]


def test_term_slots_are_a_permutation():
    for order in range(6):
        slots = [term_slot(a, c, order) for a in range(order + 1) for c in range(order + 1 - a)]
        assert sorted(slots) == list(range((order + 1) * (order + 2) // 2))


def test_ne_launch_config():
    assert ne_launch_config(21, 31, 27) == 160      # 297 items: 2 passes of 160 threads
    assert ne_launch_config(9, 13, 10) == 64         # 50 items
    assert ne_launch_config(3, 3, 1) == 32
    for k, s, nb in ((21, 31, 27), (29, 41, 27), (35, 49, 45)):
        t = ne_launch_config(k, s, nb)
        assert t % 32 == 0 and t <= 256
        assert math.ceil((s - k + 1) * nb / t) == math.ceil((s - k + 1) * nb / 256)
    # Production: 31*34 (template) + 122 (target) + 121*27 (C) doubles.
    assert ne_shared_bytes(21, 31, 27) == 8 * (31 * 34 + 122 + 121 * 27)


@pytest.mark.parametrize("ny, tile_h, h, n", [(4096, 32, 10, None), (100, 32, 4, 3), (33, 8, 16, 8),
                                              (1, 32, 10, None), (1000, 16, 2, 7)])
def test_band_plan_covers_rows(ny, tile_h, h, n):
    bands, uploads = band_plan(ny, tile_h, h, n)
    assert bands[0][0] == 0 and bands[-1][1] == ny
    assert all(b0[1] == b1[0] for b0, b1 in zip(bands, bands[1:]))
    assert all(r0 % tile_h == 0 and r1 > r0 for r0, r1 in bands)
    assert uploads[0][0] == 0 and uploads[-1][1] == ny
    assert all(u0[1] == u1[0] for u0, u1 in zip(uploads, uploads[1:]))
    for (_, r1), (_, hi) in zip(bands, uploads):
        assert hi >= min(ny, r1 + h)


# ---------------------------------------------------------------------------
# Packing of the kernel terms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["chebyshev1", "polynomial"])
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_packed_terms_reproduce_the_kernel(model_type, order):
    rng = np.random.default_rng(order)
    box = gm.Box(-40, 17, 90, 70)
    kernel = random_kernel(rng, 7, model_type, order, box.grown(20, 20))
    packed = pack_terms(kernel, box)
    assert packed.qpack.dtype == np.float32 and packed.qpack.flags.c_contiguous
    assert packed.qpack.shape == (49, n_slots(order))
    assert packed.full_support
    terms = [(a, c) for a in range(order + 1) for c in range(order + 1 - a)]
    for xi, yi in ((0, 0), (89, 69), (13, 51), (45, 35)):
        # The packed polynomial summed term by term (not in the kernel's Horner
        # order): X^a Y^c times the slot of (a, c).
        X = (xi + packed.x_shift) / packed.hx
        Y = (yi + packed.y_shift) / packed.hy
        K = sum(packed.qpack[:, term_slot(a, c, order)].astype(np.float64) * X ** a * Y ** c
                for a, c in terms).reshape(7, 7)
        norm = sum(packed.qsum[term_slot(a, c, order)] * X ** a * Y ** c for a, c in terms)
        ref = kernel.compute_image(xi + box.x0, yi + box.y0)
        np.testing.assert_allclose(norm, ref.sum(), rtol=1e-9)
        np.testing.assert_allclose(K, ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())
        np.testing.assert_allclose(K / norm, kernel.compute_image(xi + box.x0, yi + box.y0,
                                                                  normalize=True),
                                   rtol=1e-6, atol=1e-7 * np.abs(ref / norm).max())


def test_packed_support():
    k = 7
    support = np.ones((k, k))
    support[0, :3] = 0
    support[5, 6] = 0
    kernel = random_kernel(np.random.default_rng(1), k, "chebyshev1", 1, gm.Box(0, 0, 50, 50),
                            support=support)
    packed = pack_terms(kernel, gm.Box(0, 0, 40, 40))
    assert not packed.full_support
    np.testing.assert_array_equal(packed.support.reshape(k, k), support.astype(np.uint8))


# ---------------------------------------------------------------------------
# Helpers shared with tests/test_cuda_emulated.py (the apply kernel on the emulator)
# ---------------------------------------------------------------------------


def _assert_matches_numpy(got, want, h):
    gi, gv, gm_ = got
    wi, wv, wm = want
    ny, nx = wi.shape
    inner = (slice(h, ny - h), slice(h, nx - h))
    # Same non-finite pattern everywhere (edges and spread NaN/inf).
    np.testing.assert_array_equal(np.isnan(gi), np.isnan(wi))
    np.testing.assert_array_equal(np.isnan(gv), np.isnan(wv))
    np.testing.assert_array_equal(np.isposinf(gi), np.isposinf(wi))
    np.testing.assert_array_equal(np.isposinf(gv), np.isposinf(wv))
    np.testing.assert_array_equal(np.isneginf(gi), np.isneginf(wi))
    fi = np.isfinite(wi[inner])
    fv = np.isfinite(wv[inner])
    np.testing.assert_allclose(gi[inner][fi], wi[inner][fi], rtol=1e-5, atol=0)
    np.testing.assert_allclose(gv[inner][fv], wv[inner][fv], rtol=1e-5, atol=0)
    np.testing.assert_array_equal(gm_, wm)


EMU_CASES = [
    # model, order, xy0, (ny, nx), k, rows/thread, dtypes (image, variance, mask)
    ("chebyshev1", 2, (-13, 27), (70, 150), 7, 4, (np.float32, np.float32, np.int32)),
    ("polynomial", 3, (40, -7), (45, 131), 5, 2, (np.float64, np.float32, np.uint16)),
    ("chebyshev1", 0, (0, 0), (40, 100), 9, 1, (np.float32, np.float64, np.int64)),
    ("chebyshev1", 1, (5, 5), (37, 260), 3, 4, (np.float32, np.float32, np.uint8)),
]



# ---------------------------------------------------------------------------
# The GPU test-suite's plumbing, with a fake CuPy (tests/fake_cupy/) whose
# kernels are the CUDA sources compiled for the CPU
# ---------------------------------------------------------------------------


# Every test runs (about 30 s); a second pass runs the application and
# normal-equation tests with the threads of each block in a shuffled order,
# where a race on shared memory would change the results.
SHUFFLED_SUBSET = ("test_normal_equations_match or (test_apply_matches_numpy and device) "
                   "or test_apply_nonfinite or test_apply_inf")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="no host C++ compiler")
@pytest.mark.parametrize("subset, order", [(None, 0), (SHUFFLED_SUBSET, 7)],
                         ids=["compiled-kernels", "compiled-kernels-shuffled-threads"])
def test_gpu_suite_plumbing_with_fake_cupy(subset, order):
    """tests/test_gpu.py against the fake CuPy, in a subprocess: the whole file
    with the CUDA sources compiled for the CPU (:mod:`cuda_emulator`), then the
    kernel tests again with the threads of each block in a shuffled order."""
    import os

    from fake_cupy import run_installed

    here = os.path.dirname(os.path.abspath(__file__))
    args = ["-q", "-p", "no:cacheprovider", os.path.join(here, "test_gpu.py")]
    if subset:
        args += ["-k", subset]
    stdout = run_installed(f"import pytest; sys.exit(pytest.main({args!r}))",
                           env={"GPUMATCH_EMULATOR_ORDER": str(order)}, timeout=900)
    last = stdout.splitlines()[-1]
    assert " passed" in last and "skipped" not in last, stdout[-2000:]
    if subset is None:
        assert "deselected" not in last, last


_SYNC_SCRIPT = r"""
import numpy as np
import test_cuda_compile as T
import cupy
import gpumatch as gm
from gpumatch.apply import convolve_planes
from gpumatch.cuda.apply import convolve_planes_cupy
from random_kernels import random_kernel, random_planes

rng = np.random.default_rng(3)
shape, k = (150, 140), 7
box = gm.Box(4, -9, shape[1], shape[0])
kernel = random_kernel(rng, k, "chebyshev1", 2, box.grown(10, 10))
planes = random_planes(rng, shape)
want = convolve_planes(*planes, kernel, box, T.NO_DATA)

def ok():
    got = convolve_planes_cupy(*planes, kernel, box, T.NO_DATA, bands=4)
    try:
        T._assert_matches_numpy(got, want, k // 2)
        return True
    except AssertionError:
        return False

results = {"correct": [ok() for _ in range(6)]}
wait_event = cupy.cuda.Stream.wait_event
cupy.cuda.Stream.wait_event = lambda self, event: None
results["no wait_event"] = [ok() for _ in range(6)]
cupy.cuda.Stream.wait_event = wait_event
cupy.cuda.Event.synchronize = lambda self: None
results["no event synchronize"] = [ok() for _ in range(6)]
print(results)
"""


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="no host C++ compiler")
def test_fake_streams_catch_missing_synchronisation():
    """The fake CuPy's lazy streams make the banded host pipeline's
    synchronisation matter: it is right as written, and wrong when the kernel
    launches stop waiting for their input copies or a pinned staging buffer is
    refilled before the copy that reads it has run."""
    import ast

    from fake_cupy import run_installed

    results = ast.literal_eval(run_installed(_SYNC_SCRIPT).strip().splitlines()[-1])
    assert all(results["correct"]), results
    assert not all(results["no wait_event"]), results
    assert not any(results["no event synchronize"]), results
