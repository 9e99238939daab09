"""The fake's CUDA kernels: the sources of ``kernels/`` (through gpumatch's own
module loading) and the benchmarks' inline ones, compiled for the CPU by
:mod:`cuda_emulator` behind ``cupy.RawModule``."""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np


def install(ctx):
    """``ctx.cupy.RawModule`` running the CUDA sources on the emulator, with the
    thread order of ``$GPUMATCH_EMULATOR_ORDER``."""
    cupy, on_stream = ctx.cupy, ctx.on_stream
    import cuda_emulator

    order = int(os.environ.get("GPUMATCH_EMULATOR_ORDER", "0"))
    # GPUMATCH_FAKE_WRONG=<kernel name>: that kernel's output is made wrong
    # (tests of gpumatch's self-check).
    wrong = os.environ.get("GPUMATCH_FAKE_WRONG")

    class Launch:
        def __init__(self, fn):
            self.fn = fn

        @property
        def max_dynamic_shared_size_bytes(self):
            return self.fn.max_dynamic_shared_size_bytes

        @max_dynamic_shared_size_bytes.setter
        def max_dynamic_shared_size_bytes(self, value):
            self.fn.max_dynamic_shared_size_bytes = value

        def __call__(self, grid, block, args, **kwargs):
            def run(grid, block, args, **k):
                self.fn(grid, block, args, order=order, **k)
                if wrong == self.fn.name:
                    # A device that computes a wrong value: the kernel's last
                    # array argument (an output) is off by 1e-3 relative.
                    out = np.asarray([a for a in args if isinstance(a, np.ndarray)][-1])
                    np.multiply(out, 1.001, out=out)
            on_stream(run)(grid, block, args, **kwargs)

    # Private (0700) and removed when the process exits.
    sources = cuda_emulator._scratch_dir("gpumatch-rawmodule-")

    class RawModule:
        """CUDA source compiled for the CPU, ``-D`` options included: the
        kernels of ``kernels/`` (through gpumatch's own module loading) and
        the benchmarks' inline ones."""

        def __init__(self, code=None, *, path=None, options=(), backend="nvrtc",
                     translate_cucomplex=False, enable_cooperative_groups=False,
                     name_expressions=None, jitify=False):
            if code is None:
                code = pathlib.Path(path).read_text()
            name = hashlib.sha256(code.encode()).hexdigest()[:16] + ".cu"
            if not (sources / name).exists():
                (sources / name).write_text(code)
            self.filename = name
            self.defines = dict(o[2:].split("=", 1) for o in options if o.startswith("-D"))

        def get_function(self, name):
            return Launch(cuda_emulator.compile_kernel(self.filename, name, self.defines,
                                                       directory=sources))

    cupy.RawModule = RawModule
