"""Write the lsst-images test fixtures of tests/test_lsst_images.py.

Run with a Python >= 3.12 that has the ``lsst-images`` package (it needs PEP 695
syntax), from the repository root::

    python3.13 tests/data/make_lsst_images_fixtures.py

The files are written by ``lsst.images`` itself; what the package reads back
from them (origin, units, the NO_DATA pixels, the PSF stamp) is saved beside
them in ``expected.json`` and ``expected.npz`` (the PSF stamp is the one the
package computes for the PSF object it wrote), so the tests need neither the
package nor Python 3.12. Keep the outputs small (tens of KB).

The committed fixtures were made with lsst-images 30.2026.4300 on Debian's
python3.13 (see expected.json for the version).
"""

import json
import os

import astropy.units as u
import numpy as np

import lsst.images as li
from lsst.images import fits as lfits
from lsst.images import psfs

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lsst_images")
Y0, X0 = 2100, 1868  # an origin far from (0, 0), as a real detector cut-out has
SHAPE = (24, 32)
PSF_AT = (1880.0, 2110.0)  # (x, y), parent pixels


def masked_image():
    # A schema unlike the afw default: NO_DATA on bit 3 (afw: 8), SUSPECT left
    # out, a reserved (None) slot, and more than 8 planes in uint8 elements.
    names = ["BAD", "SAT", None, "NO_DATA", "DETECTED", "CR", "EDGE", "INTRP", "STREAK",
             "CROSSTALK"]
    planes = [None if n is None else li.MaskPlane(n, f"{n.lower()} pixels") for n in names]
    schema = li.MaskSchema(planes, dtype=np.uint8)
    rng = np.random.default_rng(14)
    image = li.Image(rng.normal(10.0, 1.0, SHAPE).astype(np.float32), yx0=(Y0, X0),
                     unit=u.nJy)
    variance = li.Image(rng.uniform(0.5, 2.0, SHAPE).astype(np.float32), yx0=(Y0, X0),
                        unit=u.nJy ** 2)
    mask = li.Mask(0, schema=schema, bbox=image.bbox)
    for name, rows, cols in (("NO_DATA", slice(0, 2), slice(None)),
                             ("DETECTED", slice(10, 14), slice(5, 9)),
                             ("CROSSTALK", slice(20, 21), slice(0, 4))):
        bit = schema.bit(name)
        mask.array[rows, cols, bit.index] |= bit.mask
    path = os.path.join(HERE, "masked_image.fits")
    li.MaskedImage(image, mask=mask, variance=variance).write(path)
    return path


def gaussian_psf():
    bbox = li.Image(np.zeros(SHAPE, np.float32), yx0=(Y0, X0)).bbox
    psf = psfs.GaussianPointSpreadFunction(1.7, bounds=bbox, stamp_size=15)
    path = os.path.join(HERE, "gaussian_psf.fits")
    lfits.write(psf, path)
    return path, psf


def main():
    os.makedirs(HERE, exist_ok=True)
    for name in os.listdir(HERE):
        os.unlink(os.path.join(HERE, name))
    mi_path = masked_image()
    _, psf = gaussian_psf()
    # What the package reads back from its own files.
    back = li.MaskedImage.read(mi_path)
    planes = {}
    arrays = {}
    for name in back.mask.schema.names:
        bit = back.mask.schema.bit(name)
        arrays[f"plane_{name}"] = (back.mask.array[..., bit.index] & bit.mask) != 0
        planes[name] = int(np.count_nonzero(arrays[f"plane_{name}"]))
    # The stamp of the PSF object that was written (the package evaluates it).
    stamp = psf.compute_kernel_image(x=PSF_AT[0], y=PSF_AT[1])
    arrays["psf_stamp"] = np.asarray(stamp.array, dtype=np.float64)
    arrays["image"] = np.asarray(back.image.array)
    arrays["variance"] = np.asarray(back.variance.array)
    expected = {
        "lsst_images_version": getattr(li, "__version__", None) or li.version.__version__,
        "yx0": [int(v) for v in back.image.yx0],
        "image_unit": back.image.unit.to_string(),
        "variance_unit": back.variance.unit.to_string(),
        "plane_pixel_counts": planes,
        "psf_at": PSF_AT,
        "psf_stamp_bbox": str(stamp.bbox),
    }
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    np.savez_compressed(os.path.join(HERE, "expected.npz"), **arrays)


if __name__ == "__main__":
    main()
