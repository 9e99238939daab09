"""Run the CUDA kernels of ``kernels/`` on the CPU, from their own source.

:func:`compile_kernel` compiles one file of ``kernels/`` with the host C++
compiler after ``cuda_emulator.h`` (a small CPU runtime: every block in turn,
each thread a coroutine, ``__syncthreads`` a real barrier) and returns an
:class:`EmulatedKernel` that is called like a ``cupy.RawKernel``:
``kernel(grid, block, args, shared_mem=...)`` with NumPy arrays for the
pointers and NumPy scalars for the values.

So the source that NVRTC compiles for the GPU -- indexing, shared-memory
layout, barriers, vector loads, edge handling -- is tested on machines without
one. What it cannot show: timing, occupancy, register limits, warp-level
behaviour, and NVRTC-only compile errors (tests/test_cuda_compile.py runs
``nvcc`` for those).

Checks made on every launch, each raising :class:`EmulatorError` with what
went wrong:

- every argument against the kernel's signature: pointers get arrays; values
  get scalars of the parameter's size and kind (a Python ``int`` counts as 8
  bytes and a ``float`` as a double, as CuPy passes them);
- global-memory bounds: each array is copied into a buffer with 4 KiB guard
  bands of ``0xFF`` bytes on both sides (its alignment modulo 256 kept), so
  reads out of bounds give NaN (or -1 for integers) and writes out of bounds
  are found in the guard bands afterwards;
- arguments whose memory overlaps (the kernels declare them ``__restrict__``);
- shared memory read before it is written gives NaN (the buffer is filled
  with ``0xFF`` before each block), and writes past the launch's
  ``shared_mem`` are reported;
- a barrier reached by only part of a block.

``order`` runs the threads of a block in another order between barriers
(0 forward, 1 reverse, >= 2 a seeded shuffle): a kernel without races gives
the same bits for every order.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "cuda_emulator.h"
GUARD = 4096
FLAGS = ("-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
         "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-variable", "-Wno-unused-function")

_lock = threading.Lock()
_loaded = {}

__all__ = ["compiler", "compile_kernel", "EmulatedKernel", "EmulatorError", "kernel_names"]


class EmulatorError(RuntimeError):
    """A launch broke a rule of CUDA (or failed to compile)."""


def compiler():
    """Path of the host C++ compiler (``$CXX``, else g++ or c++), or None."""
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return shutil.which(cxx)
    for name in ("g++", "c++"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _kernel_dir():
    from gpumatch.cuda.module import kernel_dir

    return pathlib.Path(str(kernel_dir()))


def kernel_names(source):
    """``extern "C" __global__`` function names in a CUDA source text."""
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
                      r'(\w+)\s*\(', source)


def _shared_decls(source):
    """``(type, name)`` of every ``extern __shared__ T name[]`` in a source text."""
    return re.findall(r'extern\s+__shared__\s+(?:alignas\s*\(\s*\d+\s*\)\s*)?([\w:]+)\s+(\w+)\s*\[\s*\]',
                      source)


_private_dir = None


def _private_cache(d):
    """``d`` if it is a real directory of this user that no one else can write into, else None.

    ``lstat``, not ``stat``: a symbolic link planted at the path is refused
    rather than followed, since the libraries in the directory are loaded and
    run. Group or world write permission is refused (others could have put a
    library there); read permission is harmless.
    """
    import stat

    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d)
    except OSError:
        return None
    owner = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or st.st_mode & 0o022:
        return None
    return pathlib.Path(d)


def _build_dir():
    """Where the compiled libraries go: a directory only this user can read or write.

    ``GPUMATCH_EMULATOR_CACHE`` if set (refused unless private), else
    ``<tmp>/gpumatch-cuda-emulator-<uid>``, a lasting cache (kernels compile
    once across runs) used only if it is a directory of this user that no one
    else can write into (:func:`_private_cache`: a directory someone else
    created first, or a link planted there, is not trusted). Otherwise a fresh ``tempfile.mkdtemp``
    directory (0700, an unpredictable name) for this process, removed when it
    exits.
    """
    global _private_dir
    given = os.environ.get("GPUMATCH_EMULATOR_CACHE")
    if given:
        found = _private_cache(given)
        if found is None:
            raise EmulatorError(
                f"GPUMATCH_EMULATOR_CACHE={given} is not a directory of this user that only it "
                "can write into (chmod 700 it, or unset the variable)")
        return found
    uid = os.getuid() if hasattr(os, "getuid") else 0
    found = _private_cache(os.path.join(tempfile.gettempdir(), f"gpumatch-cuda-emulator-{uid}"))
    if found is not None:
        return found
    if _private_dir is None:
        _private_dir = _scratch_dir("gpumatch-cuda-emulator-")
    return _private_dir


def _scratch_dir(prefix):
    """A fresh private directory for this process's scratch files, removed when it exits."""
    import atexit

    d = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return pathlib.Path(d)


def _wrapper(filename, source_path, source):
    static = len(re.findall(r"__shared__", source)) - len(_shared_decls(source))
    if static:
        # A block-scope `__shared__` array would be a per-thread local here.
        raise EmulatorError(f"{filename}: static __shared__ arrays are not emulated; use the "
                            "dynamic (extern __shared__) shared memory")
    lines = [f'#include "{HEADER}"']
    for ctype, name in sorted(set(_shared_decls(source))):
        lines.append(f'extern "C" {ctype} {name}[emu::kSharedBytes / sizeof({ctype})] '
                     f'__attribute__((alias("emu_shared_buffer")));')
    lines.append(f'#include "{source_path}"')
    lines += [f"EMU_EXPORT({name})" for name in kernel_names(source)]
    return "\n".join(lines) + "\n"


def _library(filename, defines, directory=None):
    """Compile (once per source, macros and compiler) and load the shared library."""
    cxx = compiler()
    if cxx is None:
        raise EmulatorError("no host C++ compiler (g++ or c++) on PATH")
    source_path = (_kernel_dir() if directory is None else pathlib.Path(directory)) / filename
    source = source_path.read_text(encoding="utf-8")
    options = tuple(f"-D{k}={v}" for k, v in sorted((str(k), str(v)) for k, v in defines.items()))
    key = hashlib.sha256("\0".join((HEADER.read_text(), source, cxx, *FLAGS, *options))
                         .encode()).hexdigest()[:20]
    with _lock:
        if key in _loaded:
            return _loaded[key]
        out = _build_dir() / f"{pathlib.Path(filename).stem}-{key}.so"
        if not out.exists():
            wrapper = _wrapper(filename, source_path, source)
            fd, tmp_cpp = tempfile.mkstemp(suffix=".cpp", dir=out.parent)
            with os.fdopen(fd, "w") as f:
                f.write(wrapper)
            tmp_so = tmp_cpp[:-4] + ".so"
            try:
                res = subprocess.run([cxx, *FLAGS, *options, "-o", tmp_so, tmp_cpp],
                                     capture_output=True, text=True)
                if res.returncode != 0:
                    raise EmulatorError(f"{filename} with {' '.join(options)} does not compile on the "
                                        f"host:\n{res.stderr[-4000:]}")
                os.replace(tmp_so, out)  # atomic: parallel test processes may race here
            finally:
                for p in (tmp_cpp, tmp_so):
                    if os.path.exists(p):
                        os.unlink(p)
        lib = ctypes.CDLL(str(out))
        lib.emu_error.restype = ctypes.c_char_p
        _loaded[key] = lib
        return lib


def compile_kernel(filename, name, defines=None, directory=None):
    """The kernel ``name`` of ``kernels/filename`` (or ``directory/filename``)
    built with ``-D`` ``defines``, for the CPU."""
    return EmulatedKernel(_library(filename, dict(defines or {}), directory), filename, name)


def _span(a):
    """(lowest byte offset, byte length) of the memory an array's elements occupy."""
    if a.size == 0:
        return 0, 0
    lo = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s > 0) + a.itemsize
    return lo, hi - lo


class _Guarded:
    """A copy of an array's memory between two guard bands of 0xFF bytes."""

    def __init__(self, a):
        self.array = a
        lo, self.nbytes = _span(a)
        self.start = a.ctypes.data + lo
        self.offset = GUARD + self.start % 256
        raw = np.empty(self.offset + self.nbytes + GUARD + 256, np.uint8)
        pad = (-raw.ctypes.data) % 256
        self.buf = raw[pad:pad + self.offset + self.nbytes + GUARD]
        self.buf[:] = 0xFF
        ctypes.memmove(self.buf.ctypes.data + self.offset, self.start, self.nbytes)
        self.pointer = ctypes.c_void_p(self.buf.ctypes.data + self.offset - lo)

    def check_and_copy_back(self, index):
        head = self.buf[:self.offset]
        tail = self.buf[self.offset + self.nbytes:]
        for band, where in ((head, "before"), (tail, "after")):
            bad = np.flatnonzero(band != 0xFF)
            if bad.size:
                raise EmulatorError(
                    f"argument {index}: the kernel wrote {bad.size} byte(s) {where} the array "
                    f"{self.array.shape} {self.array.dtype} (out-of-bounds global memory write)")
        if self.nbytes:
            ctypes.memmove(self.start, self.buf.ctypes.data + self.offset, self.nbytes)


def _scalar(value, size, kind, index):
    if isinstance(value, np.ndarray):
        raise EmulatorError(f"argument {index}: the kernel takes a {size}-byte value, got an array")
    if isinstance(value, np.generic):
        dt = value.dtype
    elif isinstance(value, bool):
        dt = np.dtype(np.bool_)
    elif isinstance(value, int):
        dt = np.dtype(np.int64)  # what CuPy passes for a Python int
    elif isinstance(value, float):
        dt = np.dtype(np.float64)
    else:
        raise EmulatorError(f"argument {index}: unsupported type {type(value).__name__}")
    want = "floating point" if kind == 2 else "integer"
    got_kind = 2 if dt.kind == "f" else 1
    if dt.itemsize != size or got_kind != kind:
        raise EmulatorError(f"argument {index}: the kernel takes a {size}-byte {want} value, got "
                            f"{dt} ({type(value).__name__})")
    return np.array(value, dtype=dt)


class EmulatedKernel:
    """A kernel of ``kernels/`` compiled for the CPU; call it like ``cupy.RawKernel``."""

    def __init__(self, lib, filename, name):
        try:
            self._launch = getattr(lib, f"emu_launch_{name}")
            signature = getattr(lib, f"emu_signature_{name}")
        except AttributeError:
            raise EmulatorError(f"{filename} has no kernel {name!r}") from None
        self._lib, self.filename, self.name = lib, filename, name
        sizes, kinds = (ctypes.c_int * 64)(), (ctypes.c_int * 64)()
        n = signature(sizes, kinds)
        self.param_sizes = list(sizes[:n])
        self.param_kinds = list(kinds[:n])
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int]
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem=0, stream=None, order=0):
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        if len(args) != len(self.param_sizes):
            raise EmulatorError(f"{self.name} takes {len(self.param_sizes)} arguments, got {len(args)}")
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise EmulatorError(f"{self.name}: {shared_mem} B of dynamic shared memory but the "
                                f"kernel's limit is {self.max_dynamic_shared_size_bytes} B (raise "
                                "max_dynamic_shared_size_bytes first)")
        keep, guarded = [], []
        argv = (ctypes.c_void_p * len(args))()
        for i, (a, size, kind) in enumerate(zip(args, self.param_sizes, self.param_kinds)):
            if kind == 0:
                if not isinstance(a, np.ndarray):
                    raise EmulatorError(f"argument {i}: the kernel takes a pointer, got "
                                        f"{type(a).__name__}")
                g = _Guarded(a)
                guarded.append((i, g))
                keep.append(g)
                argv[i] = ctypes.cast(ctypes.pointer(g.pointer), ctypes.c_void_p)
            else:
                v = _scalar(a, size, kind, i)
                keep.append(v)
                argv[i] = v.ctypes.data
        spans = sorted((g.start, g.start + g.nbytes, i) for i, g in guarded if g.nbytes)
        for (_s0, e0, i0), (s1, _e1, i1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise EmulatorError(f"arguments {i0} and {i1} overlap in memory; the kernels "
                                    "declare their pointers __restrict__")
        with _lock:
            rc = self._launch(*grid, *block, int(shared_mem), ctypes.cast(argv, ctypes.c_void_p),
                              int(order))
            message = self._lib.emu_error().decode()
        if rc != 0:
            raise EmulatorError(f"{self.name}: {message}")
        for i, g in guarded:
            g.check_and_copy_back(i)
