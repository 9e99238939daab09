"""GriddedPsf: stamps on a grid of positions, bilinearly interpolated."""

import numpy as np
import pytest

import gpumatch
from gpumatch import GriddedPsf
from gpumatch.psf import parse_psf


def _gauss(n, sigma):
    d = np.arange(n) - n // 2
    g = np.exp(-0.5 * (d[None, :] ** 2 + d[:, None] ** 2) / sigma ** 2)
    return g / g.sum()


GX = np.array([0.0, 100.0, 300.0])
GY = np.array([50.0, 250.0])


def _grid(n=15, shuffle=True):
    xs, ys = np.meshgrid(GX, GY)
    xs, ys = xs.ravel(), ys.ravel()
    sig = 1.5 + xs / 300.0 + ys / 500.0
    stamps = np.stack([_gauss(n, s) * (2.0 + i) for i, s in enumerate(sig)])  # any flux
    order = np.random.default_rng(0).permutation(len(xs)) if shuffle else np.arange(len(xs))
    return stamps[order], xs[order], ys[order], sig[order]


def test_grid_points_and_bilinear_interpolation():
    stamps, xs, ys, sig = _grid()
    psf = GriddedPsf(stamps, xs, ys)
    assert psf.dimensions() == (15, 15)
    assert psf.average_position == (150.0, 150.0)
    for s, x, y, _sg in zip(stamps, xs, ys, sig):
        np.testing.assert_allclose(psf.compute_kernel_image(x, y), s / s.sum(), atol=1e-15)
    g = {(x, y): s / s.sum() for s, x, y in zip(stamps, xs, ys)}
    # Inside the cell [100, 300] x [50, 250] at fractions (0.25, 0.6).
    x, y = 150.0, 170.0
    expected = (0.75 * 0.4 * g[(100.0, 50.0)] + 0.25 * 0.4 * g[(300.0, 50.0)]
                + 0.75 * 0.6 * g[(100.0, 250.0)] + 0.25 * 0.6 * g[(300.0, 250.0)])
    np.testing.assert_allclose(psf.compute_kernel_image(x, y), expected, atol=1e-15)
    # Outside the grid: the nearest edge, no extrapolation.
    np.testing.assert_allclose(psf.compute_kernel_image(-500.0, 1000.0), g[(0.0, 250.0)],
                               atol=1e-15)
    np.testing.assert_allclose(psf.compute_kernel_image(400.0, 150.0),
                               0.5 * (g[(300.0, 50.0)] + g[(300.0, 250.0)]), atol=1e-15)
    # Batched equals single, and every stamp sums to 1.
    qx = np.array([0.0, 150.0, 299.0, -10.0, 1e4])
    qy = np.array([50.0, 170.0, 60.0, 400.0, -1e4])
    batch = psf.compute_kernel_images(qx, qy)
    np.testing.assert_allclose(batch.sum(axis=(1, 2)), 1.0, atol=1e-14)
    for i in range(len(qx)):
        np.testing.assert_allclose(batch[i], psf.compute_kernel_image(qx[i], qy[i]), atol=1e-15)


def test_single_row_grid_and_constant():
    stamps = np.stack([_gauss(11, 1.5), _gauss(11, 2.5)])
    psf = GriddedPsf(stamps, [0.0, 200.0], [10.0, 10.0])
    np.testing.assert_allclose(psf.compute_kernel_image(100.0, -999.0),
                               0.5 * (stamps[0] + stamps[1]), atol=1e-15)
    one = GriddedPsf(_gauss(9, 2.0), [5.0], [5.0])
    np.testing.assert_allclose(one.compute_kernel_image(1e3, -1e3), _gauss(9, 2.0), atol=1e-15)


def test_bad_grids():
    stamps, xs, ys, _ = _grid(shuffle=False)
    with pytest.raises(ValueError, match="full grid"):
        GriddedPsf(stamps[:5], xs[:5], ys[:5])
    xs2 = xs.copy()
    xs2[1] = xs2[0]
    with pytest.raises(ValueError, match="full grid|repeat"):
        GriddedPsf(stamps, xs2, ys)
    with pytest.raises(ValueError, match="odd"):
        GriddedPsf(np.ones((6, 10, 10)), xs, ys)
    bad = stamps.copy()
    bad[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match="stamp 2"):
        GriddedPsf(bad, xs, ys)
    with pytest.raises(ValueError, match="positions"):
        GriddedPsf(stamps, xs[:3], ys)


class _FakeGriddedModel:
    """The attributes of photutils' GriddedPSFModel that gpumatch reads."""

    def __init__(self, data, grid_xypos, oversampling):
        self.data = data
        self.grid_xypos = grid_xypos
        self.oversampling = np.broadcast_to(np.asarray(oversampling), (2,))


def test_photutils_style_model_with_oversampling():
    # Oversampled by 3: sampling every third value from the centre gives image pixels.
    fine = [_gauss(45, 3 * s) for s in (1.5, 2.0, 2.5, 3.0)]
    model = _FakeGriddedModel(np.stack(fine), [(0, 0), (100, 0), (0, 100), (100, 100)], 3)
    psf = GriddedPsf(model)
    assert psf.dimensions() == (15, 15)
    np.testing.assert_allclose(psf.compute_kernel_image(0, 0), _gauss(15, 1.5), atol=1e-12)
    shifted = GriddedPsf.from_photutils(model, xy0=(1000, 2000))
    np.testing.assert_allclose(shifted.compute_kernel_image(1100, 2100), _gauss(15, 3.0),
                               atol=1e-12)
    assert isinstance(parse_psf(model), GriddedPsf)
    with pytest.raises(ValueError, match="even"):
        GriddedPsf(_FakeGriddedModel(np.ones((4, 44, 44)), model.grid_xypos, 2))


def test_real_photutils_model():
    photutils_psf = pytest.importorskip("photutils.psf")
    from astropy.nddata import NDData

    fine = np.stack([_gauss(25, s) for s in (1.6, 2.0, 2.4, 3.0)])
    pos = [(0, 0), (200, 0), (0, 300), (200, 300)]
    model = photutils_psf.GriddedPSFModel(NDData(fine, meta={"grid_xypos": pos,
                                                               "oversampling": 1}))
    psf = GriddedPsf(model)
    x, y = 60.0, 210.0
    stamp = psf.compute_kernel_image(x, y)
    # photutils' own evaluation at whole-pixel offsets from the source position.
    d = np.arange(25) - 12
    ref = model.evaluate(x + d[None, :], y + d[:, None], 1.0, x, y)
    np.testing.assert_allclose(stamp, ref / ref.sum(), atol=1e-10)


def test_task_accepts_a_gridded_psf():
    # A grid spanning the cell-set region (the exposure grown by one cell).
    xs, ys = np.meshgrid([-128.0, 383.0], [-128.0, 383.0])
    stamps = np.stack([_gauss(15, 1.7 + 0.0005 * (x + y)) for x, y in zip(xs.ravel(), ys.ravel())])
    psf = GriddedPsf(stamps, xs.ravel(), ys.ravel())
    exposure = gpumatch.Exposure(np.zeros((256, 256)), psf=psf)
    task = gpumatch.ModelPsfMatchTask(
        gpumatch.ModelPsfMatchConfig(kernelSize=11, kernelSizeMin=11, spatialKernelOrder=2),
        backend="numpy")
    result = task.run(exposure, gpumatch.GaussianPsf(17, 17, 2.6))
    res = task.diagnostic(result.kernelCellSet, result.psfMatchingKernel)
    assert res["relative_l2_max"] < 0.02
