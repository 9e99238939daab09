"""LSST-compatible versus recommended settings: residual, FWHM ratio and noise gain.

Prints a Markdown table (the one in benchmarks/RESULTS.md) for the cases of the
recommended mode (``ModelPsfMatchConfig.for_psfs``):

(a) the README's varying Gaussian over a 2048 x 1024 detector matched to LSST's
    production double Gaussian (3.27 / 8.175 px, b = 0.1);
(b) the real DES PSFEx model (../shared/data/des) matched to a Gaussian of 1.2 times
    its largest FWHM, on a cutout of the CCD;
(c) Moffat references (beta = 3) of 1.3 times the exposure PSF's FWHM, for both;
and the Gaussian-to-Gaussian match of ``gpumatch example`` (2.0 -> 3.0 px), whose
ideal kernel's noise gain is 1 / (4 pi (r^2 - t^2)).

Each row is a real run (NumPy backend) on an empty image: the numbers are the
worst matched-PSF residual and FWHM ratio over the candidates, and the noise
variance gain at the image centre, with that of the ideal matching kernel (the
reference deconvolved by the exposure PSF at the centre; "unbounded" where the
reference has more power than the exposure PSF at high frequencies, so that exact
matching would deconvolve).

    python3 benchmarks/recommended_settings.py [--des-size 512]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import gpumatch as gm  # noqa: E402
from gpumatch.moments import SIGMA_TO_FWHM  # noqa: E402
from gpumatch.recommend import _stamps, ideal_noise_gain  # noqa: E402

DES_PSF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                       "des", "DECam_00154912_12_psfcat.psf")


def des_psfs():
    """Case (b)'s PSFs: the DES PSFEx model, the Gaussian of 1.2 times its largest
    FWHM over a 5 x 5 grid of the CCD, and that FWHM (pixels)."""
    des = gm.PsfexPsf.read(DES_PSF)
    xs, ys = np.meshgrid(np.linspace(22, 2024, 5), np.linspace(22, 4072, 5))
    fwhm = max(des.fwhm(x, y) for x, y in zip(xs.ravel(), ys.ravel()))
    return des, gm.GaussianPsf(25, 25, 1.2 * fwhm / SIGMA_TO_FWHM), fwhm


def _ideal_gain(psf, reference, x, y):
    t, r = _stamps(psf, [x], [y], 151)[0], _stamps(reference, [x], [y], 151)[0]
    return ideal_noise_gain(t, r)


def _num(value, fmt):
    return "unbounded" if math.isnan(value) else format(value, fmt)


def _row(name, settings, config, psf, reference, shape, xy0=(0, 0)):
    exposure = gm.Exposure(np.zeros(shape, np.float32), np.ones(shape, np.float32), xy0=xy0,
                           psf=psf)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = gm.ModelPsfMatchTask(config, backend="numpy").run(exposure, reference).metadata
    cx, cy = exposure.bbox.center
    ideal = _ideal_gain(psf, reference, cx, cy)
    widths = "/".join(f"{s:.2g}" for s in config.alardSigGauss)
    degrees = "/".join(str(d) for d in config.alardDegGauss)
    return (f"| {name} | {settings} | {config.kernelSize} | {widths} | {degrees} | "
            f"{md['matchedPsfRelL2Max']:.4f} | {md['matchedPsfFwhmRatioWorst']:.4f} | "
            f"{md['noiseVarianceGain']:.5f} | {_num(ideal, '.5f')} | "
            f"{_num(md['noiseVarianceGain'] / ideal, '.3f')} |"
            f" {time.perf_counter() - t0:.1f} |")


def _case(name, psf, reference, shape, xy0=(0, 0), bbox=None, extra=()):
    rows = [_row(name, "LSST defaults", gm.ModelPsfMatchConfig(), psf, reference, shape, xy0)]
    for label, cfg in extra:
        rows.append(_row(name, label, cfg, psf, reference, shape, xy0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        rec = gm.ModelPsfMatchConfig.for_psfs(psf, reference, bbox=bbox)
        took = time.perf_counter() - t0
    label = f"recommended ({took:.1f} s to choose"
    if (rec.autoPadPsfTo, rec.spatialKernelOrder) != (1.4, 2):  # LSST's padding and order
        label += f"; autoPadPsfTo {rec.autoPadPsfTo:g}, spatial order {rec.spatialKernelOrder}"
    rows.append(_row(name, label + ")", rec, psf, reference, shape, xy0))
    if not rec.recommendation.reached:
        rows.append(f"| {name} | | | | | {rec.recommendation.summary()} | | | | | |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--des-size", type=int, default=512,
                   help="side of the DES cutout at the CCD's origin (pixels; default 512)")
    args = p.parse_args(argv)
    print("| case | settings | kernel | widths (px) | degrees | worst residual | worst FWHM "
          "ratio | noise gain | ideal gain | gain / ideal | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    readme_psf = gm.VaryingGaussianPsf(25, 25, gm.Box(0, 0, 2048, 1024), sigma=(1.9, 0.1, -0.05),
                                       g1=(0.02,), g2=(-0.01,))
    production = gm.DoubleGaussianPsf(23, 23, sigma1=3.27, sigma2=8.175, b=0.1)
    old = gm.ModelPsfMatchConfig(kernelSize=21, alardSigGauss=(1.0, 2.0, 4.5))
    rows = _case("(a) README", readme_psf, production, (1024, 2048),
                 extra=[("README before (21 px, 1/2/4.5)", old)])
    fwhm_a = readme_psf.fwhm(1024, 512)
    moffat_a = gm.MoffatPsf(61, 61, 1.3 * fwhm_a, 3.0)
    rows += _case("(c) README -> Moffat", readme_psf, moffat_a, (1024, 2048))

    if os.path.exists(DES_PSF):
        des, gauss, fwhm = des_psfs()
        n = args.des_size
        box = gm.Box(0, 0, n, n)
        rows += _case(f"(b) DES {n}px", des, gauss, (n, n), bbox=box)
        rows += _case(f"(c) DES {n}px -> Moffat", des, gm.MoffatPsf(61, 61, 1.3 * fwhm, 3.0),
                      (n, n), bbox=box)
    else:
        rows.append(f"| (b), (c) DES | skipped: {DES_PSF} not found | | | | | | | | | |")

    example_psf, example_ref = gm.DoubleGaussianPsf(21, 21, 2.0), gm.DoubleGaussianPsf(21, 21, 3.0)
    rows += _case("gpumatch example (2 -> 3 px)", example_psf, example_ref, (384, 384),
                  bbox=gm.Box(0, 0, 384, 384))
    print("\n".join(rows))
    print(f"\nideal gain of the example: 1 / (4 pi (3^2 - 2^2)) = {1 / (20 * math.pi):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
