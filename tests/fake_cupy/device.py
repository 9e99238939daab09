"""The fake's device: ``cupy.cuda`` (the runtime with an H100's attributes,
``Device``) and CuPy's cuSOLVER/cuBLAS error classes."""

from __future__ import annotations

import sys
import types


def install(ctx):
    """Assemble ``ctx.cupy.cuda`` and ``ctx.cupyx.empty_pinned`` from the other parts."""
    cupy, cupyx = ctx.cupy, ctx.cupyx
    Stream, Event, streams, current_stream = ctx.Stream, ctx.Event, ctx.streams, ctx.current_stream
    run_until, memcpy_async, get_elapsed_time = ctx.run_until, ctx.memcpy_async, ctx.get_elapsed_time
    OutOfMemoryError, empty_pinned = ctx.OutOfMemoryError, ctx.empty_pinned
    pointer_attributes = ctx.pointer_attributes

    # An H100's attributes (cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
    # cudaDevAttrMultiProcessorCount = 16).
    attributes = {97: 227 * 1024, 16: 132}
    class CUDARuntimeError(RuntimeError):
        pass

    runtime = types.SimpleNamespace(memcpyAsync=memcpy_async, memcpyHostToDevice=1,
                                    CUDARuntimeError=CUDARuntimeError,
                                    memcpyDeviceToHost=2, getDeviceCount=lambda: 1,
                                    cudaDevAttrMaxSharedMemoryPerBlockOptin=97,
                                    cudaDevAttrMultiProcessorCount=16,
                                    deviceGetAttribute=lambda attr, dev: attributes[attr],
                                    memGetInfo=lambda: (60 << 30, 80 << 30),
                                    getDeviceProperties=lambda dev: {
                                        "name": b"NVIDIA H100 (fake: CPU emulation)",
                                        "totalGlobalMem": 80 << 30})

    class Device:
        def __init__(self, device=None):
            self.id = 0 if device is None else int(device)
            self.compute_capability = "90"

        def synchronize(self):
            run_until(lambda: all(st.done == st.queued for st in streams.values()))

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    cupy.cuda = types.SimpleNamespace(
        Stream=Stream, Event=Event, runtime=runtime, get_current_stream=current_stream,
        get_elapsed_time=get_elapsed_time, Device=Device,
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError))
    runtime.pointerGetAttributes = pointer_attributes
    runtime.memoryTypeHost = 1
    cupyx.empty_pinned = empty_pinned
    install_library_errors()


def install_library_errors():
    """CuPy's cuSOLVER and cuBLAS errors, where CuPy keeps them
    (``cupy_backends.cuda.libs.cusolver.CUSOLVERError``, ``...cublas.CUBLASError``:
    RuntimeErrors made from the library's status, named in the message), for
    tests that make a library call fail."""
    for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
        sys.modules[name] = types.ModuleType(name)
    for lib, cls in (("cusolver", "CUSOLVERError"), ("cublas", "CUBLASError")):
        prefix = f"{lib.upper()}_STATUS_"
        status = {3: "INVALID_VALUE" if lib == "cusolver" else "ALLOC_FAILED",
                  7: "INVALID_VALUE" if lib == "cublas" else "INTERNAL_ERROR",
                  13: "EXECUTION_FAILED"}

        def __init__(self, code, _prefix=prefix, _status=status):
            self.status = code
            RuntimeError.__init__(self, _prefix + _status.get(code, str(code)))

        module = types.ModuleType(f"cupy_backends.cuda.libs.{lib}")
        setattr(module, cls, type(cls, (RuntimeError,), {"__init__": __init__}))
        sys.modules[module.__name__] = module
        setattr(sys.modules["cupy_backends.cuda.libs"], lib, module)
