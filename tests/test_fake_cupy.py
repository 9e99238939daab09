"""The fake CuPy refuses what the real CuPy refuses, so the GPU code tested
against it in CI does not first fail on a GPU.

The checks follow CuPy 14.2.0 (``tests/cupy_api.json``, recorded from the real
package): names and parameters of its functions, its host/device boundary
(no implicit conversion to or from NumPy, 0-d arrays for scalars) and its
memory pool, which hands a dropped block to the next allocation at once.
"""

from __future__ import annotations

import ast

import pytest

from cupy_api import check_call, has, load
from fake_cupy import run_installed

_SCRIPT = r"""
import numpy as np
import cupy
import cupyx.scipy.ndimage

d = cupy.asarray(np.arange(6.0).reshape(2, 3))
h = np.ones((2, 3))
out = {}

def outcome(name, fn):
    try:
        value = fn()
    except Exception as exc:
        out[name] = type(exc).__name__
    else:
        out[name] = type(value).__module__ + "." + type(value).__name__ + f":{getattr(value, 'ndim', '-')}"

def setitem():
    d[...] = h

outcome("np.asarray(device)", lambda: np.asarray(d))
outcome("np.ascontiguousarray(device)", lambda: np.ascontiguousarray(d))
outcome("device.get()", lambda: d.get())
outcome("device + host", lambda: d + h)
outcome("host * device", lambda: h * d)
outcome("np.sin(device)", lambda: np.sin(d))
outcome("cupy.exp(host)", lambda: cupy.exp(h))
outcome("device[...] = host", setitem)
outcome("device.sum()", lambda: d.sum())
outcome("device[0, 1]", lambda: d[0, 1])
outcome("np.sum(device)", lambda: np.sum(d))
outcome("np.insert(device)", lambda: np.insert(d, 0, 1.0))
outcome("cupy.insert", lambda: cupy.insert)
outcome("cupy.sum(where=)", lambda: cupy.sum(d, where=d > 0))
outcome("device.sum(where=)", lambda: d.sum(where=d > 0))
outcome("device.ctypes", lambda: d.ctypes)
outcome("range(0-d)", lambda: range(d[0, 0]))
outcome("float(0-d)", lambda: float(d[0, 1]))
outcome("ndimage.correlate(host)", lambda: cupyx.scipy.ndimage.correlate(h, h))
outcome("Stream(ptr=)", lambda: cupy.cuda.Stream(ptr=5))
outcome("Event.done", lambda: cupy.cuda.Event().done)

# A Python number from a device array is a copy back (a synchronisation on a GPU).
import fake_cupy
before = fake_cupy.COUNTS["device->host copies"]
bool(d.sum() > 0), float(d[0, 0]), d.max().item()
out["copies for 3 numbers"] = fake_cupy.COUNTS["device->host copies"] - before

# The pool: a dropped small block is the next allocation of its size.
a = cupy.full(100, 1.0)
address = a.data.ptr
del a
b = cupy.full(100, 2.0)
out["pool reuse"] = b.data.ptr == address
print(out)
"""


@pytest.fixture(scope="module")
def outcomes():
    return ast.literal_eval(run_installed(_SCRIPT).strip().splitlines()[-1])


@pytest.mark.parametrize("case, expected", [
    # No implicit conversion between host and device, as with CuPy.
    ("np.asarray(device)", "TypeError"),
    ("np.ascontiguousarray(device)", "TypeError"),
    ("device.get()", "numpy.ndarray:2"),
    ("device + host", "TypeError"),
    ("host * device", "TypeError"),
    ("cupy.exp(host)", "TypeError"),
    ("device[...] = host", "ValueError"),
    ("ndimage.correlate(host)", "TypeError"),
    # NumPy functions on device arrays run CuPy's, where it has them.
    ("np.sin(device)", "cupy.ndarray:2"),
    ("np.sum(device)", "cupy.ndarray:0"),
    ("np.insert(device)", "TypeError"),
    # Scalars are 0-d device arrays; Python numbers only by conversion.
    ("device.sum()", "cupy.ndarray:0"),
    ("device[0, 1]", "cupy.ndarray:0"),
    ("range(0-d)", "TypeError"),
    ("float(0-d)", "builtins.float:-"),
    # Only CuPy's names and parameters.
    ("cupy.insert", "AttributeError"),
    ("cupy.sum(where=)", "TypeError"),
    ("device.sum(where=)", "TypeError"),
    ("device.ctypes", "AttributeError"),
    ("Stream(ptr=)", "TypeError"),
    ("Event.done", "builtins.bool:-"),
])
def test_fake_refuses_what_cupy_refuses(outcomes, case, expected):
    assert outcomes[case] == expected


def test_fake_counts_numbers_taken_from_the_device(outcomes):
    """Each is a synchronisation on a GPU, which the launch budget counts."""
    assert outcomes["copies for 3 numbers"] == 3


def test_fake_pool_reuses_dropped_blocks(outcomes):
    """What makes a kernel still queued on another stream read someone else's data
    when its arguments were dropped (tests/test_gpu.py::test_apply_in_flight...)."""
    assert outcomes["pool reuse"] is True


def test_record_is_cupy_14_2():
    version, api = load()
    assert version == "14.2.0"
    assert has("cupy.linalg.eigvalsh") and has("cupyx.empty_pinned")
    assert has("cupy.cuda.runtime.pointerGetAttributes") and not has("cupy.ndarray.ctypes")
    check_call("cupy.asarray", (1.0,), {"dtype": "f4", "blocking": True})
    with pytest.raises(TypeError, match="unexpected keyword"):
        check_call("cupy.zeros", ((2, 2),), {"like": None})
    with pytest.raises(TypeError, match="positional"):
        check_call("cupy.cuda.runtime.memcpyAsync", (0, 0, 0, 1, 0, 0), {})
    with pytest.raises(AttributeError, match="CuPy 14.2.0 has no cupy.insert"):
        check_call("cupy.insert", (), {})


def test_fake_is_split_by_concern():
    """tests/fake_cupy/ is a package whose parts each install one concern;
    ``install``, ``run_installed`` and ``COUNTS`` are where they were, and the
    kernels are the compiled CUDA sources only (no NumPy transcriptions)."""
    import importlib

    import fake_cupy

    assert set(fake_cupy.__all__) == {"install", "run_installed", "COUNTS"}
    for part in ("arrays", "memory", "streams", "device", "kernels", "api_check"):
        assert callable(getattr(importlib.import_module(f"fake_cupy.{part}"),
                                "check_against_cupy" if part == "api_check" else "install"))
    with pytest.raises(ValueError, match="compiled CUDA sources only"):
        fake_cupy.install("transcribed")
