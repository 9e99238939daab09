"""The fake offers only what the recorded CuPy release offers."""

from __future__ import annotations

#: The fake's own helpers, not part of the CuPy it stands in for.
FAKE_ONLY = {"cupy.cuda.Stream.enqueue"}


def check_against_cupy(cupy, cupyx):
    """The fake offers nothing that the recorded CuPy lacks (else code could
    pass here and fail on a GPU)."""
    import cupy_api

    spaces = {"cupy": cupy, "cupy.cuda": cupy.cuda, "cupy.cuda.runtime": cupy.cuda.runtime,
              "cupy.cuda.memory": cupy.cuda.memory, "cupyx": cupyx,
              "cupy.cuda.Stream": cupy.cuda.Stream, "cupy.cuda.Event": cupy.cuda.Event,
              "cupy.cuda.Device": cupy.cuda.Device}
    extra = [f"{prefix}.{name}" for prefix, space in spaces.items()
             for name in (vars(space) if not isinstance(space, type) else space.__dict__)
             if not name.startswith("_") and not cupy_api.has(f"{prefix}.{name}")]
    extra = [e for e in extra if e not in FAKE_ONLY]
    if extra:
        raise AssertionError(f"the fake CuPy offers what CuPy {cupy_api.load()[0]} lacks: {extra}")
