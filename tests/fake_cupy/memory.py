"""The fake's memory: a device pool that reuses dropped small blocks at once as
CuPy's does, array creation on it, CuPy's (empty) memory pools and its
out-of-memory error, and pinned host allocations that
``cupy.cuda.runtime.pointerGetAttributes`` tells from pageable memory."""

from __future__ import annotations

import ctypes
import sys
import types
import weakref

import numpy as np


def install(ctx):
    """Define the pools, creation functions and pinned memory on ``ctx`` and ``ctx.cupy``."""
    cupy, COUNTS = ctx.cupy, ctx.COUNTS
    ndarray, unwrap, wrap, on_device = ctx.ndarray, ctx.unwrap, ctx.wrap, ctx.on_device
    _any_host, _checked, api = ctx._any_host, ctx._checked, ctx.api

    class DevicePool:
        """Small device allocations reused as CuPy's memory pool reuses them: a
        block whose arrays are all gone goes to the next allocation of its size
        (rounded to 512 B) at once, whatever work queued on other streams still
        reads it. A kernel queued on a stream does not keep its arguments'
        blocks (see :func:`on_stream`), so code that drops device arrays a
        pending kernel uses reads what the next allocation wrote, as on a GPU.
        Stricter than CuPy in one way: streams are not recorded, so a block is
        reused at once even where CuPy would order its reuse after the work of
        the stream that freed it. Blocks are never given back (the memory stays
        valid for the fake's late-running kernels); large allocations are
        ordinary NumPy arrays."""

        LIMIT = 1 << 20

        def __init__(self):
            self.blocks = []
            self.index = {}

        def empty(self, shape, dtype, order="C"):
            shape = tuple(shape) if np.iterable(shape) else (int(shape),)
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if nbytes > self.LIMIT:
                return np.empty(shape, dtype, order=order)
            size = max(512, -(-nbytes // 512) * 512)
            for i in range(len(self.blocks)):
                # Only the pool's own reference (and getrefcount's) left: free.
                if self.blocks[i].nbytes == size and sys.getrefcount(self.blocks[i]) == 2:
                    break
            else:
                self.blocks.append(np.zeros(size, np.uint8))
                i = len(self.blocks) - 1
                self.index[id(self.blocks[i])] = i
            return np.ndarray(shape, dtype, buffer=self.blocks[i], order=order)

        def detach(self, a):
            """A stand-in for device array ``a`` that does not keep its block."""
            if not isinstance(a, ndarray):
                return a
            base = a.base
            while isinstance(base, np.ndarray) and id(base) not in self.index:
                base = base.base
            i = self.index.get(id(base))
            if i is None:
                return a
            offset = a.__array_interface__["data"][0] - self.blocks[i].ctypes.data
            spec = (a.shape, a.dtype, offset, a.strides)
            return lambda: np.ndarray(spec[0], spec[1], buffer=self.blocks[i], offset=spec[2],
                                      strides=spec[3]).view(ndarray)

    device_pool = DevicePool()

    def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
        host = _any_host(a)      # a copy to the device (always a new array, as in CuPy)
        if not host:
            return on_device(np.array(unwrap(a), dtype=dtype, order=order or "K", copy=copy))
        src = np.asarray(a)
        COUNTS["host->device copies"] += 1
        COUNTS["host->device bytes"] += src.nbytes
        src = src.astype(dtype, copy=False) if dtype is not None else src
        out = device_pool.empty(src.shape, src.dtype, "F" if order == "F" else "C")
        out[...] = src
        return wrap(out)

    cupy.asarray = _checked("cupy.asarray", asarray)
    # No kernel: a view (or a copy) and an allocation.
    cupy.ascontiguousarray = api("cupy.ascontiguousarray", np.ascontiguousarray, launches=0)

    def empty(shape, dtype=np.float64, order="C"):
        out = device_pool.empty(shape, dtype, order)
        ctypes.memset(out.ctypes.data, 77, out.nbytes)     # poisoned: never written yet
        return out

    def full(shape, fill_value, dtype=None, order="C"):
        out = device_pool.empty(shape, np.result_type(fill_value) if dtype is None else dtype,
                                order)
        out[...] = fill_value
        return out

    cupy.empty = api("cupy.empty", empty, launches=0)
    cupy.zeros = api("cupy.zeros", lambda shape, dtype=np.float64, order="C":
                     full(shape, 0, dtype, order))
    cupy.full = api("cupy.full", full)
    cupy.array_equal = api("cupy.array_equal", np.array_equal)

    class OutOfMemoryError(MemoryError):
        def __init__(self, size, total, limit=0):
            super().__init__(f"out of memory allocating {size} bytes")

    class MemoryPool:
        def free_bytes(self):
            return 0

        def used_bytes(self):
            return 0

        def total_bytes(self):
            return 0

        def free_all_blocks(self):
            pass

    pools = (MemoryPool(), MemoryPool())
    cupy.get_default_memory_pool = lambda: pools[0]
    cupy.get_default_pinned_memory_pool = lambda: pools[1]

    # Pinned allocations are remembered (until freed), so that
    # pointerGetAttributes tells them from pageable memory as CUDA does.
    pinned = {}

    def empty_pinned(shape, dtype=np.float64, order="C"):
        a = np.full(shape, 55, dtype=dtype, order=order)
        start = a.ctypes.data
        pinned[start] = start + a.nbytes
        weakref.finalize(a, pinned.pop, start, None)
        COUNTS["pinned allocations"] += 1
        return a

    def pointer_attributes(ptr):
        host = any(lo <= ptr < hi for lo, hi in list(pinned.items()))
        return types.SimpleNamespace(type=1 if host else 0, device=-1)


    ctx.__dict__.update(device_pool=device_pool, OutOfMemoryError=OutOfMemoryError,
                        empty_pinned=empty_pinned, pointer_attributes=pointer_attributes)
