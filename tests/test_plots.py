"""Diagnostic figures, saved with matplotlib.

The exposure is deliberately not square (320 x 448 pixels) and has a non-zero,
partly negative origin, so that swapped axes or a forgotten ``xy0`` show up in
the figures' data, which is checked against independent computations.
"""

import os
import struct

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import gpumatch as gm  # noqa: E402
from gpumatch import plots  # noqa: E402
from gpumatch.quality import candidate_residuals  # noqa: E402

NAMES = ("cells", "kernel_mosaic", "residual_map", "kernel_basis", "spatial_coefficients")
PNG = b"\x89PNG\r\n\x1a\n"
NX, NY = 320, 448
XY0 = (-37, 1200)


@pytest.fixture(scope="module")
def run():
    rng = np.random.default_rng(5)
    image = rng.normal(0.0, 1.0, (NY, NX))
    image[100:105, 60:65] += 500.0  # something to see under the cells
    bbox = gm.Box(XY0[0], XY0[1], NX, NY)
    # A PSF that grows across the detector, so the kernel varies with position.
    psf = gm.VaryingGaussianPsf(15, 15, bbox, sigma=(1.7, 0.15, 0.25), g1=(0.0, 0.05),
                                g2=(0.02,))
    exposure = gm.Exposure(image.astype(np.float32), np.ones((NY, NX), np.float32), xy0=XY0,
                           psf=psf)
    result = gm.ModelPsfMatchTask(backend="numpy").run(exposure, gm.GaussianPsf(21, 21, 3.0))
    return exposure, result


def _png_size(path):
    """(width, height) from the IHDR chunk; checks the signature and the IEND trailer."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG, path
    assert data[12:16] == b"IHDR"
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path} is truncated"
    return struct.unpack(">II", data[16:24]), len(data)


def test_five_png_files_written_atomically(run, tmp_path, monkeypatch):
    exposure, result = run
    real_replace = os.replace
    renames = []

    def spy(src, dst):
        # At the moment a figure gets its final name it must be complete and new.
        with open(src, "rb") as f:
            data = f.read()
        renames.append((os.path.basename(str(dst)), os.path.exists(dst), data[:8] == PNG
                        and data.endswith(b"IEND\xaeB`\x82"), os.path.dirname(str(src))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "figs" / "sub"  # created on demand
    paths = plots.save_diagnostic_figures(result, str(target), exposure=exposure, prefix="v1_")
    monkeypatch.undo()
    expected = [str(target / f"v1_{n}.png") for n in NAMES]
    assert paths == expected
    assert sorted(os.listdir(target)) == sorted(f"v1_{n}.png" for n in NAMES)  # no temp files
    assert [r[0] for r in renames] == [f"v1_{n}.png" for n in NAMES]
    assert all(not existed and complete and where == str(target)
               for _, existed, complete, where in renames), renames
    for p in paths:
        (w, h), size = _png_size(p)
        assert w > 300 and h > 200 and size > 10_000, (p, w, h, size)
        pixels = matplotlib.image.imread(p)
        assert pixels.shape[:2] == (h, w) and pixels[..., :3].std() > 0.01


def test_a_failing_figure_leaves_nothing(run, tmp_path, monkeypatch):
    exposure, result = run

    def broken(kernel):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots, "plot_basis", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        plots.save_diagnostic_figures(result, str(tmp_path), exposure=exposure)
    assert os.listdir(tmp_path) == []  # the three figures saved before are removed
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # and every figure was closed


def test_cells_figure_places_cells_and_candidates_in_parent_pixels(run):
    exposure, result = run
    cells = result.kernelCellSet
    res = candidate_residuals(cells, result.psfMatchingKernel)
    fig = plots.plot_cells(exposure, cells, res)
    try:
        ax = fig.axes[0]
        # docs/algorithm.md section 3: region = bbox grown by 128 px on every side (576 x 704 px),
        # holding 576 // 128 = 4 by 704 // 128 = 5 cells; the axes show the whole region.
        assert (cells.n_cells_x, cells.n_cells_y) == (4, 5)
        assert ax.get_xlim() == pytest.approx((XY0[0] - 128 - 0.5, XY0[0] + NX + 128 - 0.5))
        assert ax.get_ylim() == pytest.approx((XY0[1] - 128 - 0.5, XY0[1] + NY + 128 - 0.5))
        # The cell boundaries: vertical lines every 128 px from the region's left edge.
        vlines = sorted(ln.get_xdata()[0] for ln in ax.lines
                        if len(set(ln.get_xdata())) == 1 and ln.get_color() != "r")
        assert vlines == pytest.approx(XY0[0] - 128 - 0.5 + 128 * np.arange(5))
        img = ax.images[0]
        assert img.get_extent() == pytest.approx(
            [XY0[0] - 0.5, XY0[0] + NX - 0.5, XY0[1] - 0.5, XY0[1] + NY - 0.5])
        assert img.get_array().shape == (NY, NX)
        centres = ax.collections[0].get_offsets()
        xs = XY0[0] - 128 + 64 + 128 * np.arange(4)
        ys = XY0[1] - 128 + 64 + 128 * np.arange(5)
        gx, gy = np.meshgrid(xs, ys)
        np.testing.assert_array_equal(np.asarray(centres), np.c_[gx.ravel(), gy.ravel()])
        np.testing.assert_allclose(ax.collections[0].get_array(), res["relative_l2"])
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert len(fig.axes) == 3  # the image and the residual each have a colour bar
    finally:
        matplotlib.pyplot.close(fig)


def test_residual_map_puts_each_candidate_in_its_cell(run):
    _, result = run
    cells = result.kernelCellSet
    res = candidate_residuals(cells, result.psfMatchingKernel)
    fig = plots.plot_residual_map(cells, res)
    try:
        reg = cells.region
        for ax, values in zip(fig.axes[:3],
                              (res["relative_l2"], res["max_abs"],
                               100 * (res["fwhm_matched"] / res["fwhm_reference"] - 1))):
            arr = np.asarray(ax.images[0].get_array())
            assert arr.shape == (5, 4)  # rows = y cells, columns = x cells
            for x, y, v in zip(cells.xs, cells.ys, values):
                col, row = int((x - reg.x0) // 128), int((y - reg.y0) // 128)
                assert arr[row, col] == pytest.approx(v, rel=1e-12)
            assert ax.images[0].get_extent() == pytest.approx(
                [reg.x0 - 0.5, reg.x0 + 4 * 128 - 0.5, reg.y0 - 0.5, reg.y0 + 5 * 128 - 0.5])
        # The signed FWHM panel is centred on zero.
        lo, hi = fig.axes[2].images[0].get_clim()
        assert lo == pytest.approx(-hi)
        # The kernel varies, so do the residuals: the colour range spans them.
        lo, hi = fig.axes[0].images[0].get_clim()
        assert lo <= res["relative_l2"].min() and hi >= res["relative_l2"].max()
        assert res["relative_l2"].max() > res["relative_l2"].min()
    finally:
        matplotlib.pyplot.close(fig)


def test_kernel_mosaic_and_coefficients_follow_the_detector(run):
    exposure, result = run
    kernel = result.psfMatchingKernel
    bb = exposure.bbox
    fig = plots.plot_kernel_mosaic(kernel, bb, n=3)
    try:
        grid = np.array(fig.axes[:9]).reshape(3, 3)
        # Bottom-left panel: the kernel at the exposure's first pixel; top-right: its last.
        for ax, (x, y) in ((grid[2, 0], (bb.x0, bb.y0)), (grid[0, 2], (bb.x1, bb.y1)),
                           (grid[2, 2], (bb.x1, bb.y0))):
            assert ax.get_title() == f"({x:.0f}, {y:.0f})"
            k = kernel.compute_image(x, y)
            np.testing.assert_allclose(ax.images[0].get_array(), k / k.sum(), rtol=1e-10,
                                       atol=1e-15)
        corners = [np.asarray(ax.images[0].get_array()) for ax in (grid[2, 0], grid[0, 2])]
        assert np.abs(corners[0] - corners[1]).max() > 1e-4  # it does vary
    finally:
        matplotlib.pyplot.close(fig)

    fig = plots.plot_spatial_coefficients(kernel, bb, n=16)
    try:
        axes = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("basis")]
        assert len(axes) == kernel.n_basis
        coef = np.array([np.asarray(ax.images[0].get_array()) for ax in axes])  # (nb, 16, 16)
        assert axes[0].images[0].get_extent() == pytest.approx(
            [bb.x0 - 0.5, bb.x1 + 0.5, bb.y0 - 0.5, bb.y1 + 0.5])
        # Recombining the basis with the plotted coefficients gives the kernel there:
        # [0, 0] is the first pixel, [0, -1] the end of the first row (x = x1, y = y0).
        for (j, i), (x, y) in (((0, 0), (bb.x0, bb.y0)), ((0, -1), (bb.x1, bb.y0)),
                               ((-1, 0), (bb.x0, bb.y1))):
            k = np.einsum("b,bij->ij", coef[:, j, i], kernel.basis_images)
            np.testing.assert_allclose(k, kernel.compute_image(x, y), rtol=1e-9, atol=1e-14)
    finally:
        matplotlib.pyplot.close(fig)

    fig = plots.plot_basis(kernel)
    try:
        axes = [ax for ax in fig.axes if ax.images]
        assert len(axes) == kernel.n_basis == 27
        for b, ax in enumerate(axes):
            np.testing.assert_array_equal(ax.images[0].get_array(), kernel.basis_images[b])
    finally:
        matplotlib.pyplot.close(fig)


def test_limits_of_a_constant_map_are_readable():
    lo, hi = plots._limits(np.full(10, 1.7931431e-3))
    assert lo < 1.7931431e-3 < hi and (hi - lo) == pytest.approx(1.7931431e-5)
    assert plots._limits([0.0, 0.0]) == (-0.5, 0.5)
    assert plots._limits([1.0, 3.0]) == (1.0, 3.0)
    assert plots._limits([np.nan, 2.0, 4.0]) == (2.0, 4.0)
