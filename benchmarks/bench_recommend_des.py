"""Case (b) of the recommended settings on the whole DES CCD.

The DES PSFEx model of ../shared/data/des matched to a Gaussian of 1.2 times its
largest FWHM, on an empty 2048 x 4096 exposure (the CCD's size in its header;
612 candidates with the default 128-pixel cells), NumPy backend. Rows, as in
``recommended_settings.py`` (worst matched-PSF residual and FWHM ratio over every
candidate of the real run, noise variance gain at the centre and that of the
ideal kernel, wall time): LSST's defaults, the setting the recommended mode chose
before it shaped elongated kernels (59 px, widths 0.7/1.4/2.9/5.8, degrees
4/2/2/2, autoPadPsfTo 1.4, spatial order 2), and the recommended mode's choice;
with ``--moffat``, the same against case (c)'s Moffat (beta = 3, FWHM 1.3 times
the model's largest). Seconds on two cores with main's separable normal
equations (``--moffat`` 61-px kernels: minutes and gigabytes without them).

    python3 benchmarks/bench_recommend_des.py [--moffat]
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

import gpumatch as gm  # noqa: E402
from recommended_settings import DES_PSF, _case, des_psfs  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moffat", action="store_true",
                   help="also case (c), the Moffat reference (61-px kernels)")
    moffat = p.parse_args(argv).moffat
    if not os.path.exists(DES_PSF):
        print(f"skipped: {DES_PSF} not found")
        return 0
    des, gauss, fwhm = des_psfs()
    before = gm.ModelPsfMatchConfig(kernelSize=59, alardNGauss=4,
                                    alardSigGauss=(0.702, 1.404, 2.862, 5.833),
                                    alardDegGauss=(4, 2, 2, 2))
    ccd = gm.Box(0, 0, 2048, 4096)
    rows = _case("(b) DES whole CCD", des, gauss, (4096, 2048), bbox=ccd,
                 extra=[("recommended before (59 px, pad 1.4, order 2)", before)])
    if moffat:
        rows += _case("(c) DES whole CCD -> Moffat", des, gm.MoffatPsf(61, 61, 1.3 * fwhm, 3.0),
                      (4096, 2048), bbox=ccd)
    print(f"largest FWHM of the model {fwhm:.3f} px; reference Gaussian FWHM {1.2 * fwhm:.3f} px")
    print("| case | settings | kernel | widths (px) | degrees | worst residual | worst FWHM "
          "ratio | noise gain | ideal gain | gain / ideal | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
