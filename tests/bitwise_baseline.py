"""Hashes of whole NumPy runs, to show that a refactoring changes no bit.

``python3 tests/bitwise_baseline.py record`` writes ``tests/data/bitwise_baseline.json``
(the output planes, kernel coefficients, candidate arrays and every metadata
number but the timings, of ``ModelPsfMatchTask.run`` and ``match_many`` on
small synthetic exposures); ``tests/test_backends.py`` recomputes and compares
them. Hashes depend on the NumPy/SciPy versions (FFT and LAPACK rounding), so
they are recorded with those versions and compared only when they match.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

import numpy as np

import gpumatch as gm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_many import small_exposure  # noqa: E402  (the exposures of the match_many tests)

HERE = pathlib.Path(__file__).resolve().parent
BASELINE = HERE / "data" / "bitwise_baseline.json"


def _config():
    return gm.ModelPsfMatchConfig(kernelSize=11, alardNGauss=2, alardSigGauss=(1.0, 2.0),
                                  alardDegGauss=(2, 1), spatialKernelOrder=1, sizeCellX=32,
                                  sizeCellY=32)


EXPOSURES = ((160, 128, (0, 0), 0), (128, 96, (10, -4), 1), (96, 160, (300, 200), 3))
REFERENCE = dict(width=21, height=21, sigma=2.6)


def _digest(result):
    h = hashlib.sha256()
    e = result.psfMatchedExposure
    k = result.psfMatchingKernel
    c = result.kernelCellSet
    for a in (e.image, e.variance, e.mask, k.spatial_coefficients, k.basis_images,
              c.templates, c.targets, c.normal_matrices, c.normal_vectors, c.kernel_solutions):
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    md = {key: value for key, value in result.metadata.items() if key != "timings"}
    h.update(json.dumps(md, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def compute(backend="numpy"):
    """The digests of one ``run`` per exposure and of ``match_many`` over all of them."""
    ref = gm.GaussianPsf(**REFERENCE)
    exposures = [small_exposure(nx, ny, xy0, seed) for nx, ny, xy0, seed in EXPOSURES]
    task = gm.ModelPsfMatchTask(_config(), backend=backend)
    runs = [_digest(task.run(e, ref, on_poor_match="ignore")) for e in exposures]
    many = [_digest(r) for r in gm.match_many(exposures, ref, _config(), backend=backend,
                                              batch_size=2, on_poor_match="ignore")]
    return {"run": runs, "match_many": many}


def versions():
    import scipy

    return {"numpy": np.__version__, "scipy": scipy.__version__}


if __name__ == "__main__":
    if sys.argv[1:] == ["record"]:
        BASELINE.parent.mkdir(exist_ok=True)
        BASELINE.write_text(json.dumps({"versions": versions(), **compute()}, indent=1) + "\n")
    print(json.dumps(compute(), indent=1))
