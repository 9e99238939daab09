"""The CUDA sources compile, and their host-side plumbing is right, without a GPU.

* Every ``kernels/*.cu`` compiles with ``nvcc`` for ``sm_90`` (skipped when
  ``nvcc`` is absent), as shipped and with other macro configurations.
* Where CuPy and NVRTC import (no device needed), the sources also compile with
  NVRTC and the options CuPy uses at run time.
* NumPy transcriptions of the two kernels (same grid, tiles, halos, zero fill,
  slot layout, Horner order, mask passes, edges and row bands; float32 where
  the kernel computes in float32) agree with the NumPy backend. They check
  the index arithmetic the CUDA code is built on; the GPU tests
  (``tests/test_gpu.py``) check the CUDA code itself on a device.
* ``tests/test_gpu.py`` runs in a subprocess against a fake, NumPy-backed
  ``cupy``: a fast subset with those transcriptions as the kernels, then the
  whole file with the CUDA sources themselves compiled for the CPU by
  :mod:`cuda_emulator` (and a subset again with the threads of each block run
  in a shuffled order). This checks the Python side of the backend (argument
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
from gpumatch.apply import convolve_planes
from gpumatch.basis import alard_lupton_basis
from gpumatch.cuda import module as cmod
from gpumatch.cuda.apply import (APPLY_BLOCK, TILE_W, apply_shared_bytes, band_plan,
                                 choose_rows_per_thread, n_slots, pack_terms, term_slot)
from gpumatch.cuda.normal_equations import ne_launch_config, ne_shared_bytes
from gpumatch.normal_equations import candidate_normal_equations
from random_kernels import random_kernel, random_planes

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
    for (r0, r1), (_, hi) in zip(bands, uploads):
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
    for xi, yi in ((0, 0), (89, 69), (13, 51), (45, 35)):
        ref = kernel.compute_image(xi + box.x0, yi + box.y0)
        K64, norm = packed.kernel_at(xi, yi, np.float64)
        np.testing.assert_allclose(norm, ref.sum(), rtol=1e-9)
        np.testing.assert_allclose(K64, ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())
        K32, _ = packed.kernel_at(xi, yi, np.float32)
        np.testing.assert_allclose(K32, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


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
# NumPy transcription of gm_apply_spatial_kernel (kernels/apply_spatial.cu)
# ---------------------------------------------------------------------------


def _tile_offset(img, read, ty0, tx0, tile_h, tile_w, row_begin, row_end):
    """The .cu file's image offset of one tile: the median of five of its pixels
    (non-finite ones as 0) clamped to +-2 min |finite value| of ``read`` (the
    pixels the tile reads), all in float32."""
    ny, nx = img.shape
    with np.errstate(over="ignore"):
        mag = np.abs(read.astype(np.float32))
    mag = mag[np.isfinite(mag)]
    bound = 2.0 * float(mag.min()) if mag.size else math.inf
    samples = []
    for fy, fx in ((tile_h // 2, tile_w // 2), (tile_h // 4, tile_w // 4),
                   (tile_h // 4, 3 * tile_w // 4), (3 * tile_h // 4, tile_w // 4),
                   (3 * tile_h // 4, 3 * tile_w // 4)):
        my = min(max(ty0 + fy, row_begin), row_end - 1)
        mx = min(tx0 + fx, nx - 1)
        with np.errstate(over="ignore"):
            w = np.float32(img[my, mx])
        samples.append(float(w) if np.isfinite(w) else 0.0)
    return min(max(sorted(samples)[2], -bound), bound)


def emulate_apply_kernel(img, var, msk, packed, no_data, row_begin, row_end, rows_per_thread,
                         outs):
    """Run the CUDA kernel's algorithm block by block, writing into ``outs``.

    Mirrors the .cu file: per-tile offset (:func:`_tile_offset`), tile origin and halo, zero fill outside
    [row_lo, row_hi) x [0, nx) and beyond IN_W, the horizontal mask pass over
    TILE_W columns, per-thread groups of 4 columns with the any-interior test,
    float32 Horner evaluation of K with per-row float32 partial sums, float64
    normalisation, and writes limited to [row_begin, row_end) x [0, nx).
    """
    k, o = packed.kernel_size, packed.order
    H = k // 2
    bx_, by_ = APPLY_BLOCK
    pix = 4
    tile_w, tile_h = bx_ * pix, by_ * rows_per_thread
    in_h, in_w = tile_h + k - 1, tile_w + k - 1
    pitch = (in_w + 3) // 4 * 4
    ny, nx = img.shape
    ns = n_slots(o)
    q = packed.qpack.reshape(k, k, ns)
    img_out, var_out, msk_out = outs
    row_lo, row_hi = max(0, row_begin - H), min(ny, row_end + H)
    grid = (-(-nx // tile_w), -(-(row_end - row_begin) // tile_h))
    r = np.arange(in_h)[:, None]
    c = np.arange(pitch)[None, :]
    f32 = np.float32
    for by in range(grid[1]):
        for bx in range(grid[0]):
            tx0, ty0 = bx * tile_w, row_begin + by * tile_h
            gy, gx = ty0 - H + r, tx0 - H + c
            ok = (c < in_w) & (gy >= row_lo) & (gy < row_hi) & (gx >= 0) & (gx < nx)
            cy, cx = np.clip(gy, 0, ny - 1), np.clip(gx, 0, nx - 1)
            moff = _tile_offset(img, img[cy, cx][ok], ty0, tx0, tile_h, tile_w, row_begin, row_end)
            with np.errstate(invalid="ignore"):
                s_img = np.where(ok, (img[cy, cx].astype(np.float64) - moff).astype(f32), f32(0))
                s_var = np.where(ok, var[cy, cx].astype(f32), f32(0))
            s_msk = np.where(ok, msk[cy, cx], 0).astype(msk.dtype)
            if packed.full_support:
                hor = np.zeros((in_h, tile_w), dtype=msk.dtype)
                for i in range(k):
                    hor |= s_msk[:, i:i + tile_w]
                s_msk[:, :tile_w] = hor
            lcol = np.arange(tile_w)
            gxs = tx0 + lcol
            gx0 = tx0 + (lcol // pix) * pix                 # each thread's first column
            any_x = (gx0 + pix - 1 >= H) & (gx0 < nx - H)
            Xd = (gxs + packed.x_shift) / packed.hx
            Xf = Xd.astype(f32)
            for ly in range(tile_h):
                gyo = ty0 + ly
                if gyo >= row_end or gyo >= ny:
                    continue
                oi = np.full(tile_w, np.nan)
                ov = np.full(tile_w, np.inf)
                om = np.full(tile_w, no_data, dtype=np.int64)
                if H <= gyo < ny - H and any_x.any():
                    Yd = (gyo + packed.y_shift) / packed.hy
                    Yf = f32(Yd)
                    acc_i = np.zeros(tile_w, f32)
                    acc_v = np.zeros(tile_w, f32)
                    with np.errstate(invalid="ignore", over="ignore"):
                        for j in range(k):
                            ri = np.zeros(tile_w, f32)
                            rv = np.zeros(tile_w, f32)
                            for i in range(k):
                                A = []
                                for a in range(o + 1):
                                    s = q[j, i, term_slot(a, o - a, o)]
                                    for cc in range(o - a - 1, -1, -1):
                                        s = f32(s * Yf + q[j, i, term_slot(a, cc, o)])
                                    A.append(s)
                                kk = np.full(tile_w, A[o], f32)
                                for a in range(o - 1, -1, -1):
                                    kk = kk * Xf + A[a]
                                wi = s_img[ly + j, lcol + i]
                                wv = s_var[ly + j, lcol + i]
                                ri = ri + kk * wi
                                rv = rv + kk * (kk * wv)
                            acc_i = acc_i + ri
                            acc_v = acc_v + rv
                    Ad = []
                    for a in range(o + 1):
                        s = packed.qsum[term_slot(a, o - a, o)]
                        for cc in range(o - a - 1, -1, -1):
                            s = s * Yd + packed.qsum[term_slot(a, cc, o)]
                        Ad.append(s)
                    norm = np.full(tile_w, Ad[o])
                    for a in range(o - 1, -1, -1):
                        norm = norm * Xd + Ad[a]
                    mk = np.zeros(tile_w, dtype=np.int64)
                    if packed.full_support:
                        for j in range(k):
                            mk |= s_msk[ly + j, lcol].astype(np.int64)
                    else:
                        sup = packed.support.reshape(k, k)
                        for j in range(k):
                            for i in range(k):
                                if sup[j, i]:
                                    mk |= s_msk[ly + j, lcol + i].astype(np.int64)
                    inner = (gxs >= H) & (gxs < nx - H) & any_x
                    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                        oi = np.where(inner, moff + acc_i.astype(np.float64) / norm, oi)
                        ov = np.where(inner, acc_v.astype(np.float64) / (norm * norm), ov)
                    om = np.where(inner, mk, om)
                w = gxs < nx
                img_out[gyo, gxs[w]] = oi[w]
                var_out[gyo, gxs[w]] = ov[w]
                msk_out[gyo, gxs[w]] = om[w]


def _poisoned(shape, dtypes):
    return (np.full(shape, -12345.0, dtype=dtypes[0]), np.full(shape, -12345.0, dtype=dtypes[1]),
            np.full(shape, 0x5A5A, dtype=dtypes[2]))


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


@pytest.mark.parametrize("model_type, order, xy0, shape, k, rows, dtypes", EMU_CASES)
def test_emulated_apply_kernel_matches_numpy(model_type, order, xy0, shape, k, rows, dtypes):
    rng = np.random.default_rng(k * 10 + order)
    ny, nx = shape
    box = gm.Box(xy0[0], xy0[1], nx, ny)
    kernel = random_kernel(rng, k, model_type, order, box.grown(17, 11))
    image, variance, mask = random_planes(rng, shape, *dtypes)
    no_data = 1 << 5 if mask.dtype == np.uint8 else NO_DATA
    want = convolve_planes(image, variance, mask, kernel, box, no_data)
    packed = pack_terms(kernel, box)
    got = _poisoned(shape, (np.float64, np.float64, np.int64))
    emulate_apply_kernel(image, variance, mask, packed, no_data, 0, ny, rows, got)
    _assert_matches_numpy(got, want, k // 2)


def test_emulated_apply_kernel_nonfinite_and_partial_support():
    rng = np.random.default_rng(7)
    k = 7
    shape = (50, 140)
    box = gm.Box(3, -4, shape[1], shape[0])
    support = np.ones((k, k))
    support[0, :4] = 0
    support[3, 6] = 0
    support[6, 0] = 0
    kernel = random_kernel(rng, k, "chebyshev1", 2, box.grown(20, 20), support=support)
    image, variance, mask = random_planes(rng, shape)
    image[20, 30] = np.nan
    image[10, 100] = np.inf
    variance[30, 70] = np.nan
    variance[40, 20] = np.inf
    mask[0, 5] = 1 << 30          # a high bit, inside the footprint of interior pixels
    want = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    packed = pack_terms(kernel, box)
    assert not packed.full_support
    got = _poisoned(shape, (np.float64, np.float64, np.int64))
    emulate_apply_kernel(image, variance, mask, packed, NO_DATA, 0, shape[0], 2, got)
    # inf meets taps of mixed sign in this random kernel, so compare where the
    # direct sum has one sign; NaN and the mask must agree exactly everywhere.
    np.testing.assert_array_equal(np.isnan(got[0]), np.isnan(want[0]))
    np.testing.assert_array_equal(got[2], want[2])
    ok = np.isfinite(want[0])
    np.testing.assert_allclose(got[0][ok], want[0][ok], rtol=1e-5)
    ok = np.isfinite(want[1])
    np.testing.assert_allclose(got[1][ok], want[1][ok], rtol=1e-5)
    np.testing.assert_array_equal(np.isinf(got[1]), np.isinf(want[1]))


@pytest.mark.parametrize("n_bands", [2, 3, 5])
def test_emulated_bands_read_only_their_rows(n_bands):
    """Each band reads input rows [r0 - h, r1 + h) only: rows not yet uploaded
    (poisoned here) never reach the outputs it writes."""
    rng = np.random.default_rng(n_bands)
    k, rows = 9, 1
    shape = (75, 130)
    box = gm.Box(0, 0, shape[1], shape[0])
    kernel = random_kernel(rng, k, "chebyshev1", 2, box.grown(10, 10))
    image, variance, mask = random_planes(rng, shape)
    want = convolve_planes(image, variance, mask, kernel, box, NO_DATA)
    packed = pack_terms(kernel, box)
    got = _poisoned(shape, (np.float64, np.float64, np.int64))
    bands, uploads = band_plan(shape[0], APPLY_BLOCK[1] * rows, k // 2, n_bands)
    assert len(bands) > 1
    for (r0, r1), (_, hi) in zip(bands, uploads):
        seen_i, seen_v, seen_m = image.copy(), variance.copy(), mask.copy()
        seen_i[hi:] = np.nan
        seen_v[hi:] = np.nan
        seen_m[hi:] = -1
        emulate_apply_kernel(seen_i, seen_v, seen_m, packed, NO_DATA, r0, r1, rows, got)
    _assert_matches_numpy(got, want, k // 2)


# ---------------------------------------------------------------------------
# NumPy transcription of gm_candidate_normal_equations (kernels/normal_equations.cu)
# ---------------------------------------------------------------------------


def emulate_normal_equations_kernel(templates, targets, basis, weight, threads):
    """The kernel's item loop ((basis, good row) items, stamp-row windows, basis
    reads) and its M/b phase, in NumPy."""
    n, S, _ = templates.shape
    nb, k, _ = basis.shape
    g = S - k + 1
    h = k // 2
    win = (S + 1) // 2 * 2
    tpitch = win if (win // 2) % 2 == 1 else win + 2
    M = np.full((n, nb, nb), np.nan)
    b = np.full((n, nb), np.nan)
    for cand in range(n):
        sT = np.zeros((S, tpitch))
        sT[:, :S] = templates[cand]
        sS = targets[cand, h:h + g, h:h + g].reshape(-1)
        sC = np.full((g * g, nb), np.nan)
        for start in range(0, g * nb, threads):
            for item in range(start, min(start + threads, g * nb)):
                bb, py = divmod(item, g)
                acc = np.zeros(g)
                for j in range(k):
                    w = sT[py + j, :win]
                    for i in range(k):
                        acc += w[i:i + g] * basis[bb, j, i]
                sC[py * g:(py + 1) * g, bb] = acc
        for e in range(nb * nb + nb):
            if e < nb * nb:
                m1, m2 = divmod(e, nb)
                if m1 > m2:
                    continue
                s = (sC[:, m1] * sC[:, m2]).sum() * weight
                M[cand, m1, m2] = M[cand, m2, m1] = s
            else:
                m = e - nb * nb
                b[cand, m] = (sC[:, m] * sS).sum() * weight
    return M, b


@pytest.mark.parametrize("k, size, sigmas, degrees", [(7, 11, (1.0, 2.0), (2, 1)),
                                                      (9, 13, (0.8, 1.6, 3.0), (3, 2, 1)),
                                                      (5, 5, (1.0,), (2,))])
def test_emulated_normal_equations_kernel_matches_numpy(k, size, sigmas, degrees):
    rng = np.random.default_rng(size)
    n = 3
    basis = alard_lupton_basis(k, sigmas, degrees)
    templates = rng.random((n, size, size))
    targets = rng.random((n, size, size))
    M_ref, b_ref = candidate_normal_equations(templates, targets, basis, 2.0)
    threads = ne_launch_config(k, size, len(basis))
    M, b = emulate_normal_equations_kernel(templates, targets, basis, 0.5, threads)
    np.testing.assert_allclose(M, M_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b, b_ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# The GPU test-suite's plumbing, with a fake CuPy (tests/fake_cupy.py) whose
# kernels are the NumPy transcriptions above or the compiled sources
# ---------------------------------------------------------------------------


FAKE_SUBSET = ("test_backend or test_stamps or (test_normal_equations_match and not 21 and not 35) "
               "or (test_apply_matches_numpy and not 21 and not 35 and not 7) "
               "or test_apply_nonfinite or test_run_host_resident_matches_numpy[1.0] "
               "or test_run_device_resident or test_apply_non_contiguous "
               "or test_solve_symmetric_many_on_device or test_spatial_solve_setting")
# With the compiled sources every test runs (about 30 s); a second pass runs
# the application and normal-equation tests with the threads of each block in
# a shuffled order, where a race on shared memory would change the results.
SHUFFLED_SUBSET = ("test_normal_equations_match or (test_apply_matches_numpy and device) "
                   "or test_apply_nonfinite or test_apply_inf")


@pytest.mark.parametrize("kernels, subset, order", [
    ("transcribed", FAKE_SUBSET, 0),
    pytest.param("compiled", None, 0, marks=pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None, reason="no host C++ compiler")),
    pytest.param("compiled", SHUFFLED_SUBSET, 7, marks=pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None, reason="no host C++ compiler")),
], ids=["transcribed-kernels", "compiled-kernels", "compiled-kernels-shuffled-threads"])
def test_gpu_suite_plumbing_with_fake_cupy(kernels, subset, order):
    """tests/test_gpu.py against the fake CuPy, in a subprocess: a fast subset
    with the NumPy transcriptions of the kernels, and the whole file with the
    CUDA sources compiled for the CPU (:mod:`cuda_emulator`)."""
    import os

    from fake_cupy import run_installed

    here = os.path.dirname(os.path.abspath(__file__))
    args = ["-q", "-p", "no:cacheprovider", os.path.join(here, "test_gpu.py")]
    if subset:
        args += ["-k", subset]
    stdout = run_installed(f"import pytest; sys.exit(pytest.main({args!r}))", kernels,
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
