"""Files written by Rubin's lsst-images package (fixtures made by the package itself
with tests/data/make_lsst_images_fixtures.py; what the package reads back from them is
in expected.json / expected.npz)."""

import json
import os

import numpy as np
import pytest
from astropy.io import fits

import gpumatch as gm
from gpumatch.errors import InputWarning

HERE = os.path.join(os.path.dirname(__file__), "data", "lsst_images")
MASKED = os.path.join(HERE, "masked_image.fits")
PSF = os.path.join(HERE, "gaussian_psf.fits")


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(HERE, "expected.json")) as f:
        scalars = json.load(f)
    with np.load(os.path.join(HERE, "expected.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return scalars, arrays


def test_origin_units_and_planes_as_the_package_reads_them(expected):
    scalars, arrays = expected
    exp = gm.Exposure.read_fits(MASKED)
    y0, x0 = scalars["yx0"]
    assert exp.xy0 == (x0, y0) == (1868, 2100)
    assert exp.meta["BUNIT"] == scalars["image_unit"] == "nJy"
    np.testing.assert_array_equal(exp.image, arrays["image"])
    np.testing.assert_array_equal(exp.variance, arrays["variance"])
    # Every plane the package defines marks the same pixels here; NO_DATA is not
    # on the afw default bit (8), and is not read as SUSPECT.
    assert exp.mask_planes["NO_DATA"] != 8 and "SUSPECT" not in exp.mask_planes
    for name, count in scalars["plane_pixel_counts"].items():
        mine = (exp.mask & exp.get_plane_bitmask(name)) != 0
        np.testing.assert_array_equal(mine, arrays[f"plane_{name}"], err_msg=name)
        assert np.count_nonzero(mine) == count
    assert scalars["plane_pixel_counts"]["NO_DATA"] == 64
    # The container's byte offsets do not become metadata of an output.
    assert not {"INDXADDR", "JSONADDR", "DATAMODL"} & set(exp.meta)


def test_written_back_keeps_origin_planes_and_unit(tmp_path, expected):
    exp = gm.Exposure.read_fits(MASKED)
    out = exp.write_fits(str(tmp_path / "o.fits"))
    back = gm.Exposure.read_fits(out)
    assert back.xy0 == exp.xy0 and back.mask_planes == exp.mask_planes
    np.testing.assert_array_equal(back.mask, exp.mask)
    assert fits.getheader(out)["BUNIT"] == "nJy"
    assert "INDXADDR" not in fits.getheader(out)


def test_gaussian_psf_file_against_the_package_stamp(expected):
    scalars, arrays = expected
    psf = gm.parse_psf(f"lsstimages:{PSF}")
    assert isinstance(psf, gm.GaussianPsf) and psf.sigma == 1.7
    x, y = scalars["psf_at"]
    want = arrays["psf_stamp"]
    np.testing.assert_allclose(psf.compute_kernel_image(x, y), want / want.sum(), atol=1e-15)


def _with_tree(tmp_path, change, name="changed.fits"):
    """A copy of the masked image whose JSON tree is changed by ``change(tree)``."""
    with fits.open(MASKED) as h:
        tree = json.loads(bytes(bytearray(h["JSON"].data[0][0])).decode())
        change(tree)
        blob = np.frombuffer(json.dumps(tree).encode(), dtype=np.uint8)
        col = fits.Column(name="JSON", format=f"PB({blob.size})",
                          array=np.array([blob], dtype=object))
        table = fits.BinTableHDU.from_columns([col], name="JSON")
        hdus = [h[i].copy() if i != 4 else table for i in range(len(h))]
        path = str(tmp_path / name)
        fits.HDUList(hdus).writeto(path)
    return path


def test_psf_in_the_tree_and_components_not_understood(tmp_path):
    gauss = {"schema_version": "1.0.0", "sigma": 2.5, "stamp_size": 21,
             "schema_url": "https://images.lsst.io/schemas/gaussian_psf-1.0.0"}
    path = _with_tree(tmp_path, lambda t: t.update(psf=gauss, detector={"x": 1}))
    with pytest.warns(InputWarning, match="not read by gpumatch: detector"):
        exp = gm.Exposure.read_fits(path)
    assert isinstance(exp.psf, gm.GaussianPsf) and exp.psf.sigma == 2.5
    assert exp.psf_source == "lsst-images (gaussian_psf-1.0.0)"
    other = dict(gauss, schema_url="https://images.lsst.io/schemas/psfex_psf-1.0.0")
    path = _with_tree(tmp_path, lambda t: t.update(psf=other), "psfex.fits")
    with pytest.warns(InputWarning, match="psfex_psf-1.0.0, which gpumatch does not read"):
        exp = gm.Exposure.read_fits(path)
    assert exp.psf is None


def test_lsst_images_psf_object_through_the_adapter():
    class Interval:
        def __init__(self, start):
            self.start = start

    class Box:
        y, x = Interval(-2), Interval(-1)  # centre at [2, 1]: not the middle

    class Stamp:
        array = np.arange(15.0).reshape(5, 3) + 1
        bbox = Box()

    class GaussianPointSpreadFunction:  # what parse_psf recognises: the package's module
        kernel_bbox = Box()

        def compute_kernel_image(self, *, x, y):
            return Stamp()

    GaussianPointSpreadFunction.__module__ = "lsst.images.psfs._gaussian"
    psf = gm.parse_psf(GaussianPointSpreadFunction())
    assert isinstance(psf, gm.psf.LsstImagesPsf)
    stamp = psf.compute_kernel_image(3.0, 4.0)
    want = np.zeros((5, 5))
    want[:, 1:4] = Stamp.array
    np.testing.assert_allclose(stamp, want / want.sum(), atol=1e-15)
