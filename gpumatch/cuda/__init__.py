"""The CUDA backend: CuPy arrays and the CUDA C++ kernels of ``kernels/``.

Importing this package needs nothing beyond NumPy; CuPy is imported by the
modules that launch kernels (:mod:`.apply`, :mod:`.moments`,
:mod:`.normal_equations`) when they are used.

The backend object behind ``ModelPsfMatchTask(backend="cupy")`` is
:class:`gpumatch.backends.cupy_backend.CupyBackend`; this package is its CUDA
host code.

* :func:`gpumatch.cuda.apply.convolve_planes_cupy`: the fused application
  kernel on image, variance and mask planes.
* :func:`gpumatch.cuda.apply.pinned_empty`: host arrays in pinned memory,
  which the device copies from and to directly.
* :func:`gpumatch.cuda.normal_equations.candidate_normal_equations_cupy`: the
  fused per-candidate normal equations.
* :mod:`gpumatch.cuda.module`: source lookup, NVRTC compilation and caching.
"""

__all__ = ["convolve_planes_cupy", "candidate_normal_equations_cupy",
           "pinned_empty"]


def __getattr__(name):  # lazy, so that importing the package does not import cupy
    if name in ("convolve_planes_cupy", "pinned_empty"):
        from . import apply

        return getattr(apply, name)
    if name == "candidate_normal_equations_cupy":
        from .normal_equations import candidate_normal_equations_cupy

        return candidate_normal_equations_cupy
    raise AttributeError(f"module 'gpumatch.cuda' has no attribute {name!r}")
