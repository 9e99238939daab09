"""A NumPy-backed stand-in for ``cupy``/``cupyx``, for tests without a GPU.

:func:`install` puts it in ``sys.modules`` (use it in a subprocess only: it
also patches ``gpumatch.backend`` to report a usable device). Arrays are an
``ndarray`` subclass from a module named ``cupy``, so gpumatch treats them as
device arrays, and NumPy functions reached through the fake keep them so;
raw copies (``memcpyAsync``) are real ``memmove``s between the pointers
gpumatch computes.

Streams run lazily and adversarially (:mod:`fake_cupy.streams`), and the CUDA
kernels are the sources of ``kernels/`` compiled for the CPU
(:mod:`cuda_emulator`, :mod:`fake_cupy.kernels`), behind gpumatch's own
module loading. Enough of the rest of CuPy is there
for ``tests/test_gpu.py`` and the benchmark scripts (events with elapsed
times, ``RawModule`` for inline sources, ``cupyx.scipy.ndimage`` and ``.linalg``, device
properties of an H100) to run end to end on a CPU; timings mean nothing.

It refuses what CuPy 14.2.0 refuses (:mod:`cupy_api` holds that release's
names and parameters): implicit conversions between host and device arrays,
NumPy arrays in device operations, names and keywords CuPy lacks; scalars
are 0-d device arrays, and small device blocks are reused as soon as they are
dropped, as CuPy's memory pool does. ``GPUMATCH_FAKE_STRICT=0`` turns the
boundary and API checks off (for debugging a failure).

The parts, by concern: :mod:`~fake_cupy.arrays` (the device array and the
host/device boundary), :mod:`~fake_cupy.memory` (pools, pinned memory),
:mod:`~fake_cupy.streams` (streams, events), :mod:`~fake_cupy.device`
(``cupy.cuda.runtime``, ``Device``, library errors), :mod:`~fake_cupy.kernels`
(``RawModule`` on the emulator) and :mod:`~fake_cupy.api_check` (nothing
beyond the recorded CuPy). Each ``install(ctx)`` reads what the earlier ones
left on the shared ``ctx`` namespace and adds its own.
"""

from __future__ import annotations

import collections
import os
import pathlib
import subprocess
import sys
import types

__all__ = ["install", "run_installed", "COUNTS"]

_TESTS = pathlib.Path(__file__).resolve().parent.parent
_ROOT = _TESTS.parent

#: What the code under test asked of the "device" since :func:`install`:
#: array operations (each a kernel launch on a GPU), gpumatch's own kernel
#: launches, and copies between host and device. A proxy for the host-side
#: launch overhead a GPU run pays, which no CPU timing can show.
COUNTS = collections.Counter()


def install(kernels="compiled"):
    """Put a NumPy-backed stand-in for ``cupy``/``cupyx`` in ``sys.modules``.

    Arrays are an ``ndarray`` subclass from a module named ``cupy`` (so
    gpumatch treats them as device arrays) and raw copies are real
    ``memmove``s between the pointers gpumatch computes. The CUDA kernels are
    the sources of ``kernels/`` themselves compiled for the CPU by
    :mod:`cuda_emulator` behind gpumatch's own module loading
    (:func:`gpumatch.cuda.module.get_kernel`, :func:`device_limits`), with
    the thread order of ``$GPUMATCH_EMULATOR_ORDER``. Streams run in the
    order of ``$GPUMATCH_FAKE_STREAM_SEED``.
    """
    if kernels != "compiled":
        raise ValueError(f"kernels={kernels!r}: the fake runs the compiled CUDA sources only")
    import cupy_api

    from . import api_check, arrays, device, kernels as kernel_part, memory, streams

    ctx = types.SimpleNamespace(cupy=types.ModuleType("cupy"), cupyx=types.ModuleType("cupyx"),
                                cupy_api=cupy_api, version=cupy_api.load()[0], COUNTS=COUNTS,
                                strict=os.environ.get("GPUMATCH_FAKE_STRICT", "1") != "0")
    for part in (arrays, memory, streams, device):
        part.install(ctx)
    cupy, cupyx = ctx.cupy, ctx.cupyx
    sys.modules.update({"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": cupyx.scipy})

    import gpumatch.backend as gb

    import gpumatch.backends as gbs

    gbs.cupy_status = lambda: (True, "ok")
    gb.cupy_usable = lambda: True
    kernel_part.install(ctx)
    api_check.check_against_cupy(cupy, cupyx)


def run_installed(code, kernels="compiled", env=None, timeout=600):
    """Run ``code`` in a fresh Python with the fake installed, and return its output.

    The tests, the repository root and ``benchmarks/`` are on ``sys.path``;
    ``env`` adds to the environment (``GPUMATCH_EMULATOR_ORDER``...). A
    non-zero exit fails the calling test with the end of the output.
    """
    paths = [str(_TESTS), str(_ROOT), str(_ROOT / "benchmarks")]
    prelude = f"import sys; sys.path[:0] = {paths!r}; import fake_cupy; fake_cupy.install({kernels!r})\n"
    res = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                         timeout=timeout, cwd=_ROOT, env=dict(os.environ, **(env or {})))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-4000:]
    return res.stdout
