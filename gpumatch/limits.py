"""Bounds on the values that drive memory, and the memory a run will take.

Every size-driving configuration field and PSF input is bounded when it is
read (:data:`LIMITS`); what remains, the product of sizes that are each
reasonable, is caught by :func:`check_run_memory`, which estimates the bytes a
match will hold at once and stops the run before anything large is allocated
if the estimate exceeds the memory available.
"""

from __future__ import annotations

import math
import os

from .errors import GpumatchError
from .tiles import choose_tile

__all__ = ["LIMITS", "MAX_PSF_STAMP", "MAX_PSFEX_DEGREE", "ResourceLimitError", "estimate_run_bytes",
           "available_memory", "check_run_memory", "check_stamp_size", "format_bytes", "device_free_memory"]

#: Largest accepted value of each size-driving input (pixels, or a polynomial
#: degree/order, or a count). Each is far above what a matching run uses
#: (LSST's defaults: kernelSize 21-35, spatial order 2, degrees up to 4).
LIMITS = {
    "kernelSize": 255,          # pixels (odd)
    "kernelSizeMax": 255,       # pixels
    "spatialKernelOrder": 10,   # 66 spatial terms
    "spatialBgOrder": 10,
    "alardNGauss": 10,
    "alardDegGauss": 10,        # 66 basis functions per Gaussian
    "padPsfBy": 256,            # pixels
}
#: Largest PSF stamp accepted, pixels on a side (after PSFEx sampling).
MAX_PSF_STAMP = 1001
#: Largest PSFEx polynomial degree accepted (``POLDEG1``).
MAX_PSFEX_DEGREE = 10


class ResourceLimitError(GpumatchError, MemoryError):
    """An input or a run would need more memory than gpumatch accepts or the machine has."""


def format_bytes(n):
    """``n`` bytes as a short human-readable string (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} PiB"  # pragma: no cover


def check_stamp_size(size, what):
    """Refuse a PSF stamp wider than :data:`MAX_PSF_STAMP` pixels (``what`` names it)."""
    limit = MAX_PSF_STAMP
    if not size <= limit:
        raise ResourceLimitError(
            f"{what}: a {size:g}-pixel PSF stamp exceeds gpumatch's limit of {limit} pixels "
            f"({format_bytes(8.0 * size * size)} per stamp); give a smaller size= or a PSF "
            "model of a sensible size")
    return size


def available_memory():
    """Bytes of host memory available to a new allocation (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _n_basis(degrees):
    return sum((d + 1) * (d + 2) // 2 for d in degrees)


def estimate_run_bytes(config, shape, psf_size, kernel_size=None, degrees=None):
    """Bytes a match of one exposure holds at its peak (an upper estimate, float64).

    Parameters
    ----------
    config : ModelPsfMatchConfig
    shape : (int, int)
        Exposure shape ``(height, width)``, pixels.
    psf_size : int
        Width of the larger of the two PSF stamps before padding, pixels.
    kernel_size, degrees :
        The basis actually used (default the configuration's).

    Returns
    -------
    int
        Stamps (template, target and each basis function convolved with
        every template), per-candidate normal equations, the spatial system,
        the exposure planes with one image per spatial term, and the FFT
        tiles of the application. Measured against ``tracemalloc`` peaks in
        the tests (an upper estimate, within a small factor).
    """
    k = int(kernel_size or config.kernelSize)
    degrees = tuple(degrees if degrees is not None else config.alardDegGauss)
    pad = (max(0, _next_odd(k * config.autoPadPsfTo) - psf_size) if config.doAutoPadPsf
           else config.padPsfBy)
    p = psf_size + pad
    h, w = (int(v) for v in shape)
    cells = max(1, math.ceil(w / config.sizeCellX)) * max(1, math.ceil(h / config.sizeCellY))
    nb = _n_basis(degrees)
    ns = (config.spatialKernelOrder + 1) * (config.spatialKernelOrder + 2) // 2
    f8 = 8
    stamps = cells * p * p * f8 * (2 + nb)
    basis = nb * k * k * f8
    normal = cells * (nb * nb + nb) * f8
    spatial = 2 * (nb * ns) ** 2 * f8
    planes = h * w * f8 * (6 + ns)
    # Application (overlap-save FFTs on t x t tiles, docs/algorithm.md section 7): the
    # spectra of the image and variance kernels, and the tiles in flight (bounded
    # by a band's worth; the host now works on groups of four tiles per thread).
    t = choose_tile(h, w, k)
    nv = (2 * config.spatialKernelOrder + 1) * (2 * config.spatialKernelOrder + 2) // 2
    spectra = (ns + nv) * t * (t // 2 + 1) * 2 * f8
    tiles = 8 * (w + t) * t * 2 * f8
    # What does not grow with the sizes above (FFT plans, quality measurements,
    # the kernel images): a 256x256 run peaks at ~35 MB under tracemalloc.
    fixed = 40 * 2 ** 20
    return int(stamps + basis + normal + spatial + planes + spectra + tiles + fixed)


def _next_odd(x):
    n = int(math.ceil(x))
    return n if n % 2 == 1 else n + 1


def device_free_memory(xp):
    """Free bytes on the current device when ``xp``'s backend is on one, else None."""
    from .backends import backend_for_namespace

    try:
        free = backend_for_namespace(xp).free_memory()
    except Exception:  # no device query on this CuPy: the host check still holds
        return None
    return None if free is None else int(free)


def check_run_memory(config, shape, psf_size, kernel_size=None, degrees=None, what="the run",
                     xp=None):
    """Stop a run whose estimated memory exceeds what the machine has available.

    The estimate is checked against the host's available memory and, on the
    GPU (``xp`` is CuPy), the device's free memory as well.

    Raises
    ------
    ResourceLimitError
        One line with the estimate, what is available and the fix.
    """
    need = estimate_run_bytes(config, shape, psf_size, kernel_size, degrees)
    for have, where in ((available_memory(), "memory"), (device_free_memory(xp), "GPU memory")):
        if have is not None and need > have:
            _refuse(what, need, have, where, shape, psf_size, kernel_size, config)
    return need


def _refuse(what, need, have, where, shape, psf_size, kernel_size, config):
    raise ResourceLimitError(
        f"{what} needs about {format_bytes(need)} of {where} but {format_bytes(have)} is "
        f"available ({shape[1]}x{shape[0]} exposure, {psf_size}-pixel PSF stamps, kernelSize "
        f"{kernel_size or config.kernelSize}, spatialKernelOrder {config.spatialKernelOrder}); "
        "lower kernelSize, spatialKernelOrder or alardDegGauss (--set FIELD=VALUE), use "
        "larger cells (--set sizeCellX=... sizeCellY=...), or split the exposure")
