"""Exact per-pixel application of a spatial kernel on the device (docs/algorithm.md section 7).

:func:`convolve_planes_cupy` is the device twin of
:func:`gpumatch.apply.convolve_planes`: one fused kernel
(``kernels/apply_spatial.cu``) evaluates the kernel at every output pixel,
normalises it there and produces image, variance and mask in a single pass,
with the edge rules of docs/algorithm.md section 7.

* CuPy planes in: everything stays on the device (current stream, no
  synchronisation) and CuPy arrays come out.
* NumPy planes in: each plane crosses once each way. The rows are cut into
  bands; band ``i + 1`` is copied in on one stream while band ``i`` is
  computed on a second and the finished rows of band ``i - 1`` are copied out
  on a third, straight into pinned output arrays that are returned as NumPy
  arrays (no extra host copy). Planes in pinned memory (:func:`pinned_empty`;
  :func:`gpumatch.match_many` reads files into it) are copied directly; the
  others are first staged into pinned buffers by host threads, a host copy
  that costs about as much as the transfer itself. Applications that share a
  :class:`HostTransfers` queue on the same streams, so one exposure's copies
  in overlap the previous exposure's compute
  (:func:`start_convolve_planes_cupy` returns once the work is queued).

The host-side packing of the kernel terms (:func:`pack_terms`) needs no GPU and
is tested on every machine.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading

import numpy as np

from ..apply import edge_planes
from ..backends import backend_for_arrays
from ..basis import polynomial_exponents

log = logging.getLogger("gpumatch")

__all__ = ["convolve_planes_cupy", "start_convolve_planes_cupy", "HostTransfers", "PendingPlanes",
           "pinned_empty", "is_pinned", "pack_terms", "PackedTerms", "apply_shared_bytes",
           "APPLY_BLOCK", "TILE_W", "choose_rows_per_thread", "band_plan"]

_SOURCE = "apply_spatial.cu"
_NAME = "gm_apply_spatial_kernel"

#: Threads per block (x, y) and output pixels per thread along x; must match
#: BLOCK_X, BLOCK_Y and PIX in the .cu file.
APPLY_BLOCK = (32, 8)
PIX = 4
TILE_W = APPLY_BLOCK[0] * PIX
_ROWS_CHOICES = (4, 2, 1)


def term_slot(a, c, order):
    """Slot of term ``x^a y^c`` in the packed layout (``SLOT`` in the .cu file)."""
    return a * (order + 1) - (a * (a - 1)) // 2 + c


def n_slots(order):
    """Number of packed slots: the term count rounded up to a multiple of 4."""
    nt = (order + 1) * (order + 2) // 2
    return (nt + 3) // 4 * 4


def apply_shared_bytes(kernel_size, order, mask_itemsize, rows_per_thread, block_y=None):
    """Dynamic shared memory of one block; mirrors the layout in the .cu file."""
    block_y = APPLY_BLOCK[1] if block_y is None else block_y
    k = kernel_size
    in_h = block_y * rows_per_thread + k - 1
    pitch = (TILE_W + k - 1 + 3) // 4 * 4
    ntaps = k * k
    q = ntaps * n_slots(order) * 4
    planes = 2 * in_h * pitch * 4
    mask = (in_h * pitch * mask_itemsize + 15) // 16 * 16
    supp = (ntaps + 15) // 16 * 16
    return q + planes + mask + supp


def choose_rows_per_thread(kernel_size, order, mask_itemsize, max_shared):
    """Largest tile height (rows per thread) whose shared memory fits, or None."""
    for r in _ROWS_CHOICES:
        if apply_shared_bytes(kernel_size, order, mask_itemsize, r) <= max_shared:
            return r
    return None


class PackedTerms:
    """The kernel's scaled term kernels in the layout the CUDA kernel reads.

    Attributes
    ----------
    kernel_size, order : int
    qpack : float32 array (k*k, n_slots)
        ``qpack[j*k + i, slot(a, c)] = Q_(a,c)[j, i]``.
    qsum : float64 array (n_slots,)
        Sum of each term kernel (for the normalisation, in float64).
    support : uint8 array (k*k,)
        1 where any term kernel is non-zero (the mask footprint).
    full_support : bool
    x_shift, y_shift, hx, hy : float
        ``X = (x_index + x_shift) / hx`` and likewise ``Y``.
    """

    def __init__(self, kernel, box):
        Q, exps, (cx, cy, hx, hy) = kernel.scaled_terms(box)
        Q = np.asarray(Q, dtype=np.float64)
        nt, k, _ = Q.shape
        order = kernel.spatial_order
        if list(map(tuple, exps)) != polynomial_exponents(order) or nt != len(exps):
            raise ValueError("unexpected term layout from SpatialKernel.scaled_terms")
        ns = n_slots(order)
        qpack = np.zeros((k * k, ns), dtype=np.float64)
        qsum = np.zeros(ns, dtype=np.float64)
        for t, (a, c) in enumerate(exps):
            s = term_slot(a, c, order)
            qpack[:, s] = Q[t].reshape(-1)
            qsum[s] = Q[t].sum()
        support = np.any(Q != 0, axis=0)
        self.kernel_size = int(k)
        self.order = int(order)
        self.qpack = np.ascontiguousarray(qpack.astype(np.float32))
        self.qsum = qsum
        self.support = np.ascontiguousarray(support.reshape(-1).astype(np.uint8))
        self.full_support = bool(support.all())
        self.x_shift = float(box.x0 - cx)
        self.y_shift = float(box.y0 - cy)
        self.hx = float(hx)
        self.hy = float(hy)


def pack_terms(kernel, box):
    """:class:`PackedTerms` of ``kernel`` for planes with parent bbox ``box``."""
    return PackedTerms(kernel, box)


# ---------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------


def _is_cupy(a):
    """True for a device array (its owner, asked of the registry, is on a device)."""
    return type(a) is not np.ndarray and backend_for_arrays(a).on_device


def _device_float(dtype):
    """Float dtype the kernel reads/writes for a plane of ``dtype``."""
    dt = np.dtype(dtype).newbyteorder("=")
    if dt in (np.dtype(np.float32), np.dtype(np.float64)):
        return dt
    if dt.kind == "f":
        return np.dtype(np.float32)
    raise TypeError(f"image/variance planes must be floating point, got {np.dtype(dtype)}")


def _device_mask(dtype):
    dt = np.dtype(dtype).newbyteorder("=")
    if dt.kind not in "iu":
        raise TypeError(f"mask plane must be an integer array, got {np.dtype(dtype)}")
    return dt


class _Launcher:
    """Compiled kernel, device constants and launch geometry for one application."""

    def __init__(self, kernel, box, shape, img_dtype, var_dtype, mask_dtype, no_data_bit):
        import cupy as cp

        from .module import ctype_name, device_limits, get_kernel

        self.packed = pack_terms(kernel, box)
        k, order = self.packed.kernel_size, self.packed.order
        self.ny, self.nx = shape
        self.h = k // 2
        self.img_dtype, self.var_dtype, self.mask_dtype = img_dtype, var_dtype, mask_dtype
        limits = device_limits()
        rows = choose_rows_per_thread(k, order, mask_dtype.itemsize, limits["max_shared_optin"])
        if rows is None:
            raise _NoFit(
                f"a {k}x{k} kernel of spatial order {order} needs "
                f"{apply_shared_bytes(k, order, mask_dtype.itemsize, 1)} B of shared memory per "
                f"block; the device allows {limits['max_shared_optin']} B"
            )
        self.rows_per_thread = rows
        self.tile_h = APPLY_BLOCK[1] * rows
        self.shared = apply_shared_bytes(k, order, mask_dtype.itemsize, rows)
        defines = {
            "KSIZE": k, "SPATIAL_ORDER": order, "IMG_T": ctype_name(img_dtype),
            "VAR_T": ctype_name(var_dtype), "MASK_T": ctype_name(mask_dtype),
            "ROWS_PER_THREAD": rows, "BLOCK_Y": APPLY_BLOCK[1],
        }
        self.fn = get_kernel(_SOURCE, _NAME, defines, self.shared)
        self.qpack = cp.asarray(self.packed.qpack)
        self.qsum = cp.asarray(self.packed.qsum)
        self.support = cp.asarray(self.packed.support)
        # Wrap like a C cast, so a top bit (e.g. 1 << 31 in int32) is kept.
        self.no_data = np.array(int(no_data_bit)).astype(mask_dtype)[()]

    def alloc_out(self):
        import cupy as cp

        shape = (self.ny, self.nx)
        return (cp.empty(shape, self.img_dtype), cp.empty(shape, self.var_dtype),
                cp.empty(shape, self.mask_dtype))

    def launch(self, planes, outs, row_begin, row_end, stream=None):
        """Compute output rows ``[row_begin, row_end)`` (inputs: rows around them)."""
        import cupy as cp

        if row_end <= row_begin:
            return
        img, var, msk = planes
        grid = (-(-self.nx // TILE_W), -(-(row_end - row_begin) // self.tile_h), 1)
        block = (APPLY_BLOCK[0], APPLY_BLOCK[1], 1)
        p = self.packed
        args = (
            img, var, msk,
            np.int64(img.strides[0] // img.itemsize), np.int64(var.strides[0] // var.itemsize),
            np.int64(msk.strides[0] // msk.itemsize),
            outs[0], outs[1], outs[2],
            np.int32(self.ny), np.int32(self.nx), np.int32(row_begin), np.int32(row_end),
            self.qpack, self.qsum, self.support, np.int32(1 if p.full_support else 0),
            np.float64(p.x_shift), np.float64(p.y_shift), np.float64(p.hx), np.float64(p.hy),
            self.no_data,
        )
        stream = cp.cuda.get_current_stream() if stream is None else stream
        with stream:
            self.fn(grid, block, args, shared_mem=self.shared)


class _NoFit(RuntimeError):
    pass


def _row_planes(a, dtype):
    """A device plane with unit column stride and whole-element row stride."""
    import cupy as cp

    if not _is_cupy(a):          # host plane among device planes: native byte order first
        a = np.ascontiguousarray(a, dtype=dtype)
    a = cp.asarray(a)
    if a.dtype != dtype:
        a = a.astype(dtype)
    if a.ndim != 2 or a.strides[1] != a.itemsize or a.strides[0] % a.itemsize or a.strides[0] < 0:
        a = cp.ascontiguousarray(a)
    return a


_pool = None
_pool_lock = threading.Lock()


def _staging_pool():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, min(3, os.cpu_count() or 1)), thread_name_prefix="gpumatch-stage")
        return _pool


def _bands(ny, tile_h, n_bands):
    """Output row bands ``[(r0, r1), ...]`` cut at multiples of the tile height."""
    if n_bands is None:
        n_bands = max(1, min(8, ny // 512))
    n_bands = max(1, int(n_bands))
    rows = max(tile_h, -(-math.ceil(ny / n_bands) // tile_h) * tile_h)
    return [(r0, min(ny, r0 + rows)) for r0 in range(0, ny, rows)]


def band_plan(ny, tile_h, h, n_bands=None):
    """Output bands and the input rows each one brings to the device.

    Returns
    -------
    bands : list of (r0, r1)
        Output rows computed by each launch, in order, covering ``[0, ny)``.
    uploads : list of (lo, hi)
        Input rows copied before each launch: contiguous, covering ``[0, ny)``,
        and by launch ``i`` every row up to ``min(ny, r1 + h)`` has arrived, which
        is all that outputs ``[r0, r1)`` read.
    """
    bands = _bands(ny, tile_h, n_bands)
    uploads = []
    done = 0
    for i, (_, r1) in enumerate(bands):
        need = ny if i == len(bands) - 1 else min(ny, r1 + h)
        uploads.append((done, max(done, need)))
        done = max(done, need)
    return bands, uploads


def pinned_empty(shape, dtype):
    """An empty host array in pinned (page-locked) memory, which the device reads
    and writes directly; pageable memory, with a warning, when the pinned
    allocation fails (results kept by the caller can pin tens of GB), at the
    cost of slower, staged copies."""
    import cupy as cp
    import cupyx

    global _warned_pageable
    try:
        return cupyx.empty_pinned(shape, dtype)
    except (MemoryError, cp.cuda.runtime.CUDARuntimeError) as exc:
        cp.get_default_pinned_memory_pool().free_all_blocks()
        # Once: a visit would otherwise repeat it for every plane.
        (log.debug if _warned_pageable else log.warning)(
            "no pinned host memory for a %s %s array (%s); using pageable memory (slower "
            "copies). Results held in memory keep their pinned planes: write and drop them "
            "to reuse that memory", "x".join(map(str, shape[::-1])), np.dtype(dtype).name,
            exc.__class__.__name__)
        _warned_pageable = True
        return np.empty(shape, dtype)


_warned_pageable = False


def is_pinned(a):
    """Whether NumPy array ``a`` lies in pinned host memory (a device copy can read
    or write it directly, with no staging)."""
    import cupy as cp

    if not isinstance(a, np.ndarray) or a.size == 0:
        return False
    try:
        attrs = cp.cuda.runtime.pointerGetAttributes(a.ctypes.data)
    except Exception:  # pageable memory on old drivers; no CUDA
        return False
    kind = getattr(attrs, "type", getattr(attrs, "memoryType", 0))
    return kind == getattr(cp.cuda.runtime, "memoryTypeHost", 1)


def _direct(plane, dtype):
    """Whether the rows of host ``plane`` can be copied to a ``dtype`` device plane as
    they are: pinned, C-contiguous and already of that (native) dtype."""
    return plane.dtype == dtype and plane.flags.c_contiguous and is_pinned(plane)


class HostTransfers:
    """The copy pipeline of host-resident applications: one stream copying in, one
    computing, one copying out.

    Consecutive applications given the same object queue on the same streams,
    so exposure ``n + 1``'s first copies in overlap exposure ``n``'s last
    bands of compute and copies out instead of waiting for them (see
    :func:`gpumatch.match_many`); a new object per application (the default)
    gives each its own streams.
    """

    def __init__(self):
        import cupy as cp

        self.copy_in, self.compute, self.copy_out = (cp.cuda.Stream(non_blocking=True)
                                                     for _ in range(3))

    def synchronize(self):
        """Wait for everything queued on the three streams."""
        self.copy_out.synchronize()
        self.compute.synchronize()
        self.copy_in.synchronize()


class PendingPlanes:
    """Output planes of an application still in flight; :meth:`result` waits for them."""

    def __init__(self, planes=None, done=None, keep=(), finish=None):
        self._planes, self._done, self._keep = planes, done, keep
        self._finish = finish

    def wait(self):
        """Wait until every copy of this application is complete."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
            self._keep = ()     # staging buffers and device planes may be reused now

    def result(self):
        """The output planes, once every copy of this application is complete."""
        self.wait()
        planes = self._planes
        return planes if self._finish is None else self._finish(planes)

    def __del__(self):
        # Dropped unfinished (an error, a closed generator): the pinned buffers
        # must not go back to their pool while a copy still reads or writes them.
        try:
            self.wait()
        except Exception:
            pass


def _host_staged(host_planes, launcher, bands, transfers, finish=None):
    """Queue NumPy planes in and out, each copied once each way.

    Pinned, contiguous planes of the device dtype are copied directly; the others
    are staged band by band into pinned buffers by host threads. Returns a
    :class:`PendingPlanes` (pinned output planes) once everything is queued;
    the host has then finished its staging copies but the device may still be
    working.
    """
    import cupy as cp

    rt = cp.cuda.runtime
    ny, nx, h = launcher.ny, launcher.nx, launcher.h
    in_dtypes = (launcher.img_dtype, launcher.var_dtype, launcher.mask_dtype)
    direct = [_direct(a, dt) for a, dt in zip(host_planes, in_dtypes)]
    d_in = [cp.empty((ny, nx), dt) for dt in in_dtypes]
    d_out = launcher.alloc_out()
    h_out = [pinned_empty((ny, nx), dt) for dt in in_dtypes]
    band_rows, ranges = band_plan(ny, launcher.tile_h, h, bands)
    max_rows = max(1, max(hi - lo for lo, hi in ranges))
    staged = [p for p in range(3) if not direct[p]]
    staging = [{p: pinned_empty((max_rows, nx), in_dtypes[p]) for p in staged} for _ in range(2)]
    s_in, s_comp, s_out = transfers.copy_in, transfers.compute, transfers.copy_out
    # The device buffers come from CuPy's pool on the current stream: order our
    # streams after everything already queued there.
    ready = cp.cuda.get_current_stream().record()
    for s in (s_in, s_comp, s_out):
        s.wait_event(ready)
    pool = _staging_pool()
    ev_in = [None] * len(band_rows)

    def stage(i):
        lo, hi = ranges[i]
        slot = staging[i % 2]
        return [pool.submit(np.copyto, slot[p][:hi - lo], host_planes[p][lo:hi])
                for p in staged if hi > lo]

    def source(p, i, lo):
        return host_planes[p][lo:].ctypes.data if direct[p] else staging[i % 2][p].ctypes.data

    pending = stage(0)
    done = None
    try:
        for i, (r0, r1) in enumerate(band_rows):
            for f in pending:
                f.result()
            pending = []
            lo, hi = ranges[i]
            for p in range(3):
                if hi > lo:
                    row_bytes = nx * in_dtypes[p].itemsize
                    rt.memcpyAsync(d_in[p].data.ptr + lo * row_bytes, source(p, i, lo),
                                   (hi - lo) * row_bytes, rt.memcpyHostToDevice, s_in.ptr)
            ev_in[i] = s_in.record()
            s_comp.wait_event(ev_in[i])
            launcher.launch(d_in, d_out, r0, r1, stream=s_comp)
            ev_c = s_comp.record()
            s_out.wait_event(ev_c)
            for p in range(3):
                row_bytes = nx * d_out[p].itemsize
                rt.memcpyAsync(h_out[p].ctypes.data + r0 * row_bytes, d_out[p].data.ptr + r0 * row_bytes,
                               (r1 - r0) * row_bytes, rt.memcpyDeviceToHost, s_out.ptr)
            if i + 1 < len(band_rows) and staged:
                if i >= 1:
                    ev_in[i - 1].synchronize()   # staging slot (i + 1) % 2 is free again
                pending = stage(i + 1)
        done = s_out.record()   # after every band's copies out, so after all the rest
    finally:
        if done is None:
            # A launch or copy raised part-way: every queued copy must be done before
            # the pinned buffers go back to the pool.
            for f in pending:
                f.exception()
            transfers.synchronize()
    # Everything the queued work reads or writes stays referenced until it is done:
    # CuPy's pool would hand a dropped buffer (the launcher's term kernels among
    # them) to the next allocation on the current stream at once.
    return PendingPlanes(tuple(h_out), done, keep=(staging, d_in, d_out, host_planes, launcher),
                         finish=finish)


def convolve_planes_cupy(image, variance, mask, kernel, box, no_data_bit, *, transfer="staged",
                         bands=None, transfers=None):
    """Device implementation of :func:`gpumatch.apply.convolve_planes`.

    Parameters
    ----------
    image, variance, mask : arrays (ny, nx), NumPy or CuPy
        The planes (float, float, integer), as the NumPy implementation takes them.
    kernel, box, no_data_bit : SpatialKernel, Box, int
        As for :func:`gpumatch.apply.convolve_planes`.
    transfer : {"staged", "pageable"}
        For NumPy planes: pipelined copies overlapped with the computation
        (default; planes already in pinned memory, see :func:`pinned_empty`,
        are copied directly, the others staged through pinned buffers), or
        plain synchronous copies (for comparison).
    bands : int, optional
        Row bands of the pipelined host path (default: up to 8).
    transfers : HostTransfers, optional
        Streams of the pipelined host path, shared with other applications
        (default: new ones).

    Returns
    -------
    image_out, variance_out, mask_out
        As :func:`gpumatch.apply.convolve_planes` gives them, to 1e-5 relative.
        Each output is a direct per-pixel sum, so a huge finite input (a -1e30
        sentinel) reaches only the outputs whose footprint covers it (the
        kernel's per-tile offset is chosen so that no such value can be it);
        those outputs are the huge value times a kernel tap evaluated in
        float32, good to ~1e-4 where the tap is small. Float64 inputs beyond
        the float32 range (``|x| > 3.4e38``) count as infinite, so the outputs
        covering them are infinite or NaN where the NumPy backend gives huge
        finite values.
        CuPy arrays when every input plane is a CuPy array (nothing crosses to
        the host), else NumPy arrays (pinned host memory). Dtypes are those of
        the inputs (native byte order).
    """
    return start_convolve_planes_cupy(image, variance, mask, kernel, box, no_data_bit,
                                      transfer=transfer, bands=bands,
                                      transfers=transfers).result()


def start_convolve_planes_cupy(image, variance, mask, kernel, box, no_data_bit, *,
                               transfer="staged", bands=None, transfers=None):
    """:func:`convolve_planes_cupy`, returned as soon as its work is queued.

    Returns
    -------
    PendingPlanes
        Its ``result()`` waits for the copies back to the host (NumPy planes
        in) and returns the planes; CuPy planes are ready at once (ordered on
        the current stream).
    """
    import cupy as cp

    shape = tuple(image.shape)
    if len(shape) != 2 or tuple(variance.shape) != shape or tuple(mask.shape) != shape:
        raise ValueError(f"planes must be 2-d and of one shape, got {image.shape}, "
                         f"{variance.shape}, {mask.shape}")
    if transfer not in ("staged", "pageable"):
        raise ValueError(f"transfer must be 'staged' or 'pageable', got {transfer!r}")
    out_dtypes = (np.dtype(image.dtype), np.dtype(variance.dtype), np.dtype(mask.dtype))
    dev_dtypes = (_device_float(image.dtype), _device_float(variance.dtype), _device_mask(mask.dtype))
    on_device = any(_is_cupy(a) for a in (image, variance, mask))
    ny, nx = shape
    k = kernel.dimensions[0]
    h = k // 2

    def finish(planes):
        return tuple(p if p.dtype == dt.newbyteorder("=") else p.astype(dt.newbyteorder("="))
                     for p, dt in zip(planes, out_dtypes))

    if ny - 2 * h <= 0 or nx - 2 * h <= 0:
        log.warning("exposure %dx%d is no larger than the %dx%d kernel: every pixel is edge",
                    nx, ny, k, k)
        xp = cp if on_device else np
        return PendingPlanes(edge_planes(shape, dev_dtypes, no_data_bit, xp), finish=finish)

    try:
        launcher = _Launcher(kernel, box, shape, *dev_dtypes, no_data_bit)
    except _NoFit as exc:
        from ..apply import convolve_planes
        from ..backend import to_numpy

        log.warning("%s; applying on the host instead", exc)
        out = convolve_planes(to_numpy(image), to_numpy(variance), to_numpy(mask), kernel, box,
                              no_data_bit)
        return PendingPlanes(tuple(cp.asarray(o) for o in out) if on_device else out)

    if on_device:
        planes = [_row_planes(a, dt) for a, dt in zip((image, variance, mask), dev_dtypes)]
        outs = launcher.alloc_out()
        launcher.launch(planes, outs, 0, ny)
        return PendingPlanes(outs, finish=finish)

    if transfer == "pageable":
        planes = [cp.asarray(np.ascontiguousarray(a, dtype=dt))
                  for a, dt in zip((image, variance, mask), dev_dtypes)]
        outs = launcher.alloc_out()
        launcher.launch(planes, outs, 0, ny)
        return PendingPlanes(tuple(o.get() for o in outs), finish=finish)
    host = [np.asarray(a) for a in (image, variance, mask)]
    return _host_staged(host, launcher, bands,
                        HostTransfers() if transfers is None else transfers, finish)
