"""The cell set (docs/algorithm.md section 3): region, centres, PSF survey, padding, stamps."""

import logging

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.cellset import build_cell_set, cell_centres, next_odd


@pytest.mark.parametrize("v, expect", [(12.6, 13), (13, 13), (14, 15), (29.4, 31), (12.0, 13),
                                       (9 * 1.4, 13), (21 * 1.4, 31), (35 * 1.4, 49)])
def test_next_odd(v, expect):
    assert next_odd(v) == expect


def test_region_and_centres_by_hand():
    # 200 x 300 (w x h) at xy0 = (17, -40), cells 64 x 96:
    # R = x in [17 - 64, 17 + 199 + 64] = [-47, 280], width 328 -> 5 cells
    #     y in [-40 - 96, -40 + 299 + 96] = [-136, 355], height 492 -> 5 cells
    # centres x = -47 + 64 col + 32, y = -136 + 96 row + 48
    cfg = gm.ModelPsfMatchConfig(sizeCellX=64, sizeCellY=96, kernelSize=9, kernelSizeMin=9)
    exposure = gm.Exposure(np.zeros((300, 200)), xy0=(17, -40), psf=gm.GaussianPsf(11, 11, 2.0))
    cs, _ = build_cell_set(exposure, gm.GaussianPsf(11, 11, 3.0), cfg)
    assert (cs.region.x0, cs.region.y0, cs.region.width, cs.region.height) == (-47, -136, 328, 492)
    assert (cs.n_cells_x, cs.n_cells_y) == (5, 5)
    expect = [(-47 + 64 * col + 32, -136 + 96 * row + 48) for row in range(5) for col in range(5)]
    assert list(zip(cs.xs.tolist(), cs.ys.tolist())) == expect
    assert len(cs) == 25 and len(cs.candidates) == 25
    cand = cs.candidates[7]
    assert (cand.x, cand.y) == expect[7] and cand.cell == (1, 2)


def test_non_square_cells_and_counts():
    # 100 x 37 with 128 x 32 cells: R = 356 x 101 -> 2 x 3 cells.
    xs, ys = cell_centres(gm.Box(0, 0, 100, 37).grown(128, 32), 128, 32)
    assert len(xs) == 6
    assert sorted(set(xs.tolist())) == [-128 + 64, 0 + 64]
    assert sorted(set(ys.tolist())) == [-32 + 16, 16, 32 + 16]


def test_insufficient_area():
    with pytest.raises(gm.InsufficientAreaError, match="insufficient area") as info:
        cell_centres(gm.Box(0, 0, 100, 20), 32, 32)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="insufficient area"):
        cell_centres(gm.Box(0, 0, 20, 100), 32, 32)


def test_stamps_are_the_psfs_centred_and_normalised(ref):
    psf = gm.VaryingGaussianPsf(11, 11, (0, 0, 99, 99), (2.0, 0.2, 0.1), (0.05,), (0.0, 0.02))
    exposure = gm.Exposure(np.zeros((100, 100)), psf=psf)
    cfg = gm.ModelPsfMatchConfig(kernelSize=9, kernelSizeMin=9, sizeCellX=64, sizeCellY=64)
    reference = gm.ImagePsf(ref.gaussian_stamp(9, 9, 3.0))
    cs, ref_used = build_cell_set(exposure, reference, cfg)
    assert cs.psf_size == 13 and cs.pad == 2   # nextOdd(9 * 1.4) = 13
    assert cs.templates.shape == (len(cs), 13, 13)
    for i in range(len(cs)):
        stamp = psf.compute_kernel_image(cs.xs[i], cs.ys[i])
        np.testing.assert_allclose(cs.templates[i], ref.center_in(stamp / stamp.sum(), 13),
                                   rtol=1e-13, atol=0)
        np.testing.assert_allclose(cs.targets[i],
                                   ref.center_in(ref.gaussian_stamp(9, 9, 3.0), 13), atol=1e-16)
        assert abs(cs.templates[i].sum() - 1) < 1e-13 and abs(cs.targets[i].sum() - 1) < 1e-13


class _GrowingPsf(gm.Psf):
    """Stamps 9x9 on the left half of the exposure, 15x15 on the right."""

    def compute_kernel_image(self, x, y):
        n = 9 if x < 50 else 15
        h = n // 2
        v, u = np.mgrid[-h:h + 1, -h:h + 1]
        g = np.exp(-(u ** 2 + v ** 2) / 8.0)
        return 3.0 * g / g.sum()   # not normalised: the cell set normalises


def test_psf_size_is_the_largest_stamp_seen(ref):
    exposure = gm.Exposure(np.zeros((100, 100)), psf=_GrowingPsf())
    cfg = gm.ModelPsfMatchConfig(kernelSize=9, kernelSizeMin=9, sizeCellX=64, sizeCellY=64,
                                 doAutoPadPsf=False, padPsfBy=2)
    cs, _ = build_cell_set(exposure, gm.GaussianPsf(11, 11, 3.0), cfg)
    assert cs.psf_size == 15 + 2
    h = 4
    v, u = np.mgrid[-h:h + 1, -h:h + 1]
    g9 = np.exp(-(u ** 2 + v ** 2) / 8.0)
    left = np.flatnonzero(cs.xs < 50)[0]
    np.testing.assert_allclose(cs.templates[left], ref.center_in(g9 / g9.sum(), 17), atol=1e-16)


@pytest.mark.parametrize("auto, pad, psf_size, expect_size, expect_pad", [
    (True, 0, 11, 13, 2),     # nextOdd(12.6) = 13
    (True, 0, 15, 15, 0),     # already large enough
    (True, 0, 13, 13, 0),
    (False, 0, 11, 11, 0),
    (False, 4, 11, 15, 4),
])
def test_padding_rules(auto, pad, psf_size, expect_size, expect_pad):
    cfg = gm.ModelPsfMatchConfig(kernelSize=9, kernelSizeMin=9, doAutoPadPsf=auto, padPsfBy=pad)
    exposure = gm.Exposure(np.zeros((40, 40)), psf=gm.GaussianPsf(psf_size, psf_size, 2.0))
    cs, reference = build_cell_set(exposure, gm.GaussianPsf(psf_size, psf_size, 3.0), cfg)
    assert cs.psf_size == expect_size and cs.pad == expect_pad
    assert reference.dimensions() == (expect_size, expect_size)


def test_auto_pad_uses_autoPadPsfTo():
    cfg = gm.ModelPsfMatchConfig(kernelSize=9, kernelSizeMin=9, autoPadPsfTo=2.0)
    exposure = gm.Exposure(np.zeros((40, 40)), psf=gm.GaussianPsf(11, 11, 2.0))
    cs, _ = build_cell_set(exposure, gm.GaussianPsf(11, 11, 3.0), cfg)
    assert cs.psf_size == 19  # nextOdd(18) = 19


def test_reference_resized_analytic_rerenders(ref):
    cfg = gm.ModelPsfMatchConfig()
    exposure = gm.Exposure(np.zeros((40, 40)), psf=gm.GaussianPsf(21, 21, 2.0))
    reference = gm.DoubleGaussianPsf(23, 23, 3.270, 8.175, 0.1)
    cs, used = build_cell_set(exposure, reference, cfg)
    assert cs.psf_size == 31
    assert isinstance(used, gm.DoubleGaussianPsf)
    assert (used.sigma1, used.sigma2, used.b) == (3.270, 8.175, 0.1)
    assert used.dimensions() == (31, 31)
    y, x = np.mgrid[-15:16, -15:16]
    r2 = x ** 2 + y ** 2
    prof = np.exp(-r2 / (2 * 3.27 ** 2)) + 0.1 * np.exp(-r2 / (2 * 8.175 ** 2))
    np.testing.assert_allclose(cs.targets[0], prof / prof.sum(), rtol=1e-12)


def test_reference_image_psf_padded_and_cropped_with_warning(caplog, ref):
    exposure = gm.Exposure(np.zeros((40, 40)), psf=gm.GaussianPsf(11, 11, 2.0))
    cfg = gm.ModelPsfMatchConfig(kernelSize=9, kernelSizeMin=9)
    small = ref.gaussian_stamp(9, 9, 3.0)
    with caplog.at_level(logging.WARNING, logger="gpumatch"):
        cs, used = build_cell_set(exposure, gm.ImagePsf(small), cfg)
    assert any("resize" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    np.testing.assert_allclose(cs.targets[0], ref.center_in(small, 13), atol=1e-16)
    big = ref.gaussian_stamp(17, 17, 3.0)
    cs, used = build_cell_set(exposure, gm.ImagePsf(big), cfg)
    crop = big[2:15, 2:15]
    np.testing.assert_allclose(cs.targets[0], crop / crop.sum(), rtol=1e-13)
    assert used.compute_kernel_image(0, 0).shape == (13, 13)


def test_reference_with_right_size_is_kept():
    exposure = gm.Exposure(np.zeros((40, 40)), psf=gm.GaussianPsf(11, 11, 2.0))
    reference = gm.GaussianPsf(13, 13, 3.0)
    cs, used = build_cell_set(exposure, reference, gm.ModelPsfMatchConfig(kernelSize=9,
                                                                           kernelSizeMin=9))
    assert used is reference


def test_build_cell_set_through_task(sec10):
    task = gm.ModelPsfMatchTask(sec10.config(), backend="numpy")
    out = task.buildCellSet(sec10.exposure, sec10.reference)
    cs, used = out
    assert out.kernelCellSet is cs and out.referencePsfModel is used
    assert len(cs) == 16 and cs.psf_size == 13
    assert used.dimensions() == (13, 13) and used.sigma1 == 3.7
    assert all(c.status != "GOOD" for c in cs)  # not solved yet
    res = task.run(sec10.exposure, sec10.reference)
    assert [c.status for c in res.kernelCellSet] == ["GOOD"] * 16
    md = res.metadata
    assert (md["numKernelCandidates"], md["numUsedCandidates"], md["numRejectedCandidates"]) == \
        (16, 16, 0)
