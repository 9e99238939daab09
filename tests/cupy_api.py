"""The public API of a real CuPy release, for the fake CuPy's strict checks.

CuPy cannot run without a GPU, but it imports without one, so the names and
parameters of its functions can be recorded anywhere. ``cupy_api.json`` beside
this file holds that record for the CuPy the GPU machines have (cupy-cuda13x
14.2.0); to record another release, run with that CuPy installed::

    python tests/cupy_api.py > tests/cupy_api.json

:mod:`fake_cupy` refuses, like the real CuPy, any name this record lacks and
any keyword argument the recorded parameters do not take.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import pathlib
import re

RECORD = pathlib.Path(__file__).with_name("cupy_api.json")

MODULES = ("cupy", "cupy.linalg", "cupy.fft", "cupy.random", "cupy.lib", "cupy.lib.stride_tricks",
           "cupy.cuda", "cupy.cuda.runtime", "cupy.cuda.memory", "cupyx", "cupyx.scipy",
           "cupyx.scipy.ndimage", "cupyx.scipy.linalg")
CLASSES = ("cupy.ndarray", "cupy.cuda.Stream", "cupy.cuda.Event", "cupy.cuda.Device",
           "cupy.RawModule", "cupy.RawKernel", "cupy.cuda.MemoryPool", "cupy.cuda.PinnedMemoryPool",
           "cupy.cuda.MemoryPointer", "cupy.cuda.Function", "cupy.cuda.runtime.PointerAttributes")
# Parameter kinds, one letter each.
_KINDS = {"POSITIONAL_ONLY": "o", "POSITIONAL_OR_KEYWORD": "p", "VAR_POSITIONAL": "v",
          "KEYWORD_ONLY": "k", "VAR_KEYWORD": "w"}


def _split_arguments(text):
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in parts + [current] if p.strip()]


def _signature_from_doc(obj):
    """Parameters from the ``name(args)`` first line of a Cython docstring."""
    for line in (getattr(obj, "__doc__", None) or "").splitlines()[:3]:
        m = re.match(r"\s*(?:\w+\.)*\w+\((.*)\)\s*(->.*)?$", line)
        if not m:
            continue
        params, keyword_only = [], False
        for arg in _split_arguments(m.group(1).replace("\\*", "*")):
            default = "=" in arg
            arg = arg.split("=")[0].strip()
            if arg == "/":
                params = [["o"] + p[1:] if p[0] == "p" else p for p in params]
                continue
            if arg == "*":
                keyword_only = True
                continue
            kind = "k" if keyword_only else "p"
            if arg.startswith("**"):
                kind, arg = "w", arg[2:]
            elif arg.startswith("*"):
                kind, arg, keyword_only = "v", arg[1:], True
            name = arg.split()[-1]          # "intptr_t ptr" -> "ptr"
            if name != "self":
                params.append([kind, name, default])
        return params
    return None


def _parameters(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return _signature_from_doc(obj)
    return [[_KINDS[p.kind.name], p.name, p.default is not inspect.Parameter.empty]
            for p in sig.parameters.values() if p.name != "self"]


def record():
    """The record of the CuPy importable here (no GPU needed)."""
    import cupy

    api = {}

    def add(name, obj):
        api[name] = _parameters(obj) if callable(obj) else None

    for modname in MODULES:
        module = importlib.import_module(modname)
        for name in dir(module):
            if not name.startswith("__"):
                add(f"{modname}.{name}", getattr(module, name))
    for qualname in CLASSES:
        cls = functools.reduce(getattr, qualname.split(".")[1:], cupy)
        add(qualname, cls)
        for name in dir(cls):
            add(f"{qualname}.{name}", getattr(cls, name))
    return {"cupy": cupy.__version__, "api": api}


@functools.cache
def load():
    """``(version, {qualified name: parameters or None})`` from the record."""
    data = json.loads(RECORD.read_text())
    return data["cupy"], data["api"]


def has(qualname):
    return qualname in load()[1]


def check_call(qualname, args, kwargs):
    """Raise ``TypeError``, as CuPy would, for arguments ``qualname`` does not take."""
    version, api = load()
    if qualname not in api:
        raise AttributeError(f"CuPy {version} has no {qualname}")
    params = api[qualname]
    if params is None:
        return
    positional = [p for p in params if p[0] in "op"]
    if len(args) > len(positional) and not any(p[0] == "v" for p in params):
        raise TypeError(f"{qualname}() takes at most {len(positional)} positional arguments "
                        f"in CuPy {version} ({len(args)} given)")
    names = {p[1] for p in params if p[0] in "pk"}
    if not any(p[0] == "w" for p in params):
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"{qualname}() got unexpected keyword arguments {unknown} "
                            f"in CuPy {version} (it takes {sorted(names)})")


if __name__ == "__main__":
    print(json.dumps(record(), indent=0, sort_keys=True, separators=(",", ":")))
