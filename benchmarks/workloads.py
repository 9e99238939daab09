"""Benchmark workloads shared by the CPU and GPU runners."""

from __future__ import annotations

import os
import platform

import numpy as np

import gpumatch
from gpumatch import Box, DoubleGaussianPsf, Exposure, ModelPsfMatchConfig, VaryingGaussianPsf


def production_config():
    """docs/algorithm.md section 11: LSST PSF-matched warps."""
    return ModelPsfMatchConfig(kernelSize=21, alardSigGauss=(1.0, 2.0, 4.5),
                               alardDegGauss=(4, 2, 2), spatialKernelOrder=2)


def production_reference():
    """Reference double Gaussian of docs/algorithm.md section 11 (FWHM 7.7 px)."""
    return DoubleGaussianPsf(23, 23, 3.270, 8.175, 0.1)


def production_exposure(nx=2048, ny=None, seed=0, dtype=np.float32):
    """A noisy exposure with a spatially varying PSF (size and shear vary)."""
    ny = nx if ny is None else ny
    psf = VaryingGaussianPsf(25, 25, Box(0, 0, nx, ny),
                             sigma=(1.9, 0.12, -0.08, 0.05, 0.03, -0.04),
                             g1=(0.02, 0.03, -0.01), g2=(-0.01, 0.0, 0.02))
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, (ny, nx)).astype(dtype)
    variance = np.full((ny, nx), 100.0, dtype=dtype)
    mask = (rng.random((ny, nx)) < 1e-3).astype(np.int32) << 3
    return Exposure(image, variance, mask, psf=psf)


def machine_description():
    """One line naming the CPU, core count and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import scipy

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"numpy {np.__version__}, scipy {scipy.__version__}, gpumatch {gpumatch.__version__}")
