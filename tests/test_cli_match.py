"""``gpumatch match`` and ``gpumatch example --science/--template`` on FITS files.

Small 256x256 exposures with a few stars are written with ``Exposure.write_fits``;
the command's outputs are compared with a direct ``ModelPsfMatchTask.run`` on the
same data (identical pixels), and with the physics (stars take the reference size).
"""

import hashlib
import math
import os
import shutil

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.cellset import next_odd
from gpumatch.cli import main
from gpumatch.distributed import SUMMARY_NAME
from gpumatch.errors import PsfEvaluationError
from gpumatch.moments import adaptive_moments, determinant_radius
from gpumatch.pipeline import match_file

DES_PSF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                       "des", "DECam_00154912_12_psfcat.psf")
needs_des = pytest.mark.skipif(
    not os.path.exists(DES_PSF),
    reason=f"DES PSFEx model not found at {os.path.normpath(DES_PSF)} (expected "
           "../shared/data/des beside the repository)")

PSF_SIGMA = 1.6
PSF_SPEC = "gaussian:sigma=1.6,size=15"
REF_SPEC = "gaussian:fwhm=6,size=21"
REF_SIGMA = 6.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
SHAPE = (256, 256)
XY0 = (100, 200)
# Array (x, y) of the stars: at least 30 px inside the border, sub-pixel positions.
STARS = [(40.3, 45.7), (200.6, 38.2), (52.1, 210.5), (190.5, 185.4), (128.2, 120.9)]
FLUX = 2.0e4
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("cells", "kernel_mosaic", "residual_map", "kernel_basis", "spatial_coefficients")


# -- inputs ---------------------------------------------------------------------


def _stars(sigma, stars=STARS, flux=FLUX):
    """Gaussian stars sampled at pixel centres (as GaussianPsf renders), each of ``flux``."""
    y, x = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(float)
    img = np.zeros(SHAPE)
    for sx, sy in stars:
        g = np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * sigma ** 2))
        img += flux * g / g.sum()
    return img


def _wcs():
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [128.5, 128.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def make_exposure(seed=0, sigma=PSF_SIGMA, xy0=XY0, meta=None, stars=STARS):
    rng = np.random.default_rng(seed)
    image = _stars(sigma, stars) + rng.normal(0.0, 1.0, SHAPE)
    variance = np.full(SHAPE, 1.0, np.float32)
    mask = np.zeros(SHAPE, np.int32)
    mask[rng.integers(20, 236, 6), rng.integers(20, 236, 6)] = 1 << 1  # SAT
    m = {"OBJECT": f"field {seed}"}
    m.update(meta or {})
    return gm.Exposure(image.astype(np.float32), variance, mask, xy0=xy0, wcs=_wcs(),
                       filter="r", meta=m)


def write_input(directory, name, seed=0, **kw):
    path = os.path.join(str(directory), name)
    make_exposure(seed, **kw).write_fits(path)
    return path


def direct(path, psf=None, config=None):
    """What the command should produce: Exposure.read_fits + ModelPsfMatchTask.run,
    with the settings recommended for the exposure (the command's default
    without --config or --lsst-defaults) unless ``config`` is given."""
    exposure = gm.Exposure.read_fits(path)
    exposure.psf = psf if psf is not None else gm.GaussianPsf(15, 15, PSF_SIGMA)
    reference = gm.parse_psf(REF_SPEC)
    if config is None:
        config = gm.ModelPsfMatchConfig.for_psfs(exposure.psf, reference, bbox=exposure.bbox)
    return gm.ModelPsfMatchTask(config, backend="numpy").run(exposure, reference)


def assert_same_pixels(path, expected):
    out = gm.Exposure.read_fits(path)
    exp = expected.psfMatchedExposure
    np.testing.assert_array_equal(out.image, np.asarray(exp.image))
    np.testing.assert_array_equal(out.variance, np.asarray(exp.variance))
    np.testing.assert_array_equal(out.mask, np.asarray(exp.mask))
    assert out.image.dtype == np.asarray(exp.image).dtype
    assert out.xy0 == exp.xy0
    return out


def star_sizes(image, stars=STARS, h=15):
    img = np.asarray(image, dtype=np.float64)
    out = []
    for sx, sy in stars:
        i, j = int(round(sx)), int(round(sy))
        _, _, ixx, iyy, ixy = adaptive_moments(img[j - h:j + h + 1, i - h:i + h + 1])
        out.append(determinant_radius(ixx, iyy, ixy))
    return np.array(out)


def run(capsys, *args, backend="numpy"):
    """Run ``gpumatch ARGS``; returns (exit code, stdout, stderr)."""
    argv = [str(a) for a in args]
    if backend and argv[0] in ("match", "example"):
        argv += ["--backend", backend]
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def files_under(directory):
    return sorted(os.path.relpath(os.path.join(d, f), directory)
                  for d, _, fs in os.walk(directory) for f in fs)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def error_lines(text, needle):
    return [line for line in text.splitlines() if needle in line]


# -- the model strings ----------------------------------------------------------------


def test_model_strings_mean_what_the_tests_assume():
    ref = gm.parse_psf(REF_SPEC)
    assert isinstance(ref, gm.GaussianPsf) and ref.dimensions() == (21, 21)
    assert ref.sigma == pytest.approx(REF_SIGMA, rel=1e-12)
    psf = gm.parse_psf(PSF_SPEC)
    assert psf.sigma == PSF_SIGMA and psf.dimensions() == (15, 15)


# -- one input, several inputs ----------------------------------------------------------


def test_single_input_with_output_file(tmp_path, capsys):
    inp = write_input(tmp_path, "a.fits", seed=1)
    out = tmp_path / "a_matched.fits"
    code, stdout, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                               "-o", out)
    assert code == 0, stderr
    expected = direct(inp)
    got = assert_same_pixels(out, expected)
    # The physics, independently: input stars have sigma 1.6, matched ones the reference's.
    np.testing.assert_allclose(star_sizes(make_exposure(1).image), PSF_SIGMA, rtol=0.01)
    np.testing.assert_allclose(star_sizes(got.image), REF_SIGMA, rtol=0.01)
    # Quality and provenance cards; metadata, WCS and filter carried through.
    md = expected.metadata
    assert got.meta["GPM_KSUM"] == pytest.approx(1.0, abs=1e-9)
    assert got.meta["GPM_RESL2"] == pytest.approx(md["matchedPsfRelL2Max"], rel=1e-12)
    assert got.meta["GPM_COND"] == pytest.approx(md["spatialConditionNum"], rel=1e-12)
    assert got.meta["OBJECT"] == "field 1" and got.filter == "r"
    np.testing.assert_allclose(got.wcs.wcs.crval, [150.1, 2.2])
    # The summary names the file; one input shows no progress bar.
    lines = stdout.splitlines()
    assert lines[0].split()[:2] == ["input", "status"]
    row = [ln for ln in lines if ln.startswith("a.fits")]
    assert len(row) == 1 and row[0].split()[1] == "ok"
    assert row[0].split()[2] == f"{md['spatialKernelSum']:.5f}"
    assert "%|" not in stderr
    assert files_under(tmp_path) == ["a.fits", "a_matched.fits"]


def test_several_inputs_show_progress_and_a_summary(tmp_path, capsys, monkeypatch):
    names = ["n1.fits", "n2.fits", "n3.fits"]
    inputs = [write_input(tmp_path, n, seed=10 + i) for i, n in enumerate(names)]
    outdir = tmp_path / "out"  # created by the command
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is for terminals only
    code, stdout, stderr = run(capsys, "match", *inputs, "--psf", PSF_SPEC, "--reference",
                               REF_SPEC, "--output-dir", outdir)
    assert code == 0, stderr
    # tqdm's bar on stderr, counting files.
    assert "3/3" in stderr and "file" in stderr and "%|" in stderr
    assert "ok 3, failed 0" in stderr
    table = stdout.splitlines()
    for n in names:
        rows = [ln for ln in table if ln.split() and ln.split()[0] == n]
        assert len(rows) == 1 and rows[0].split()[1] == "ok", stdout
    assert "FAILED" not in stdout
    assert files_under(outdir) == [SUMMARY_NAME] + names
    # Each output is its own input's result.
    for inp, n in zip(inputs, names):
        assert_same_pixels(outdir / n, direct(inp))


def test_failing_inputs_are_reported_and_do_not_stop_the_others(tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # with the progress bar
    good1 = write_input(tmp_path, "good1.fits", seed=3)
    good2 = write_input(tmp_path, "good2.fits", seed=4)
    truncated = tmp_path / "truncated.fits"
    with open(good1, "rb") as f:
        data = f.read()
    truncated.write_bytes(data[:len(data) // 2])  # header intact, data cut short
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"this is not FITS\n" * 200)
    missing = tmp_path / "missing.fits"
    outdir = tmp_path / "out"
    code, stdout, stderr = run(capsys, "match", good1, truncated, missing, garbage, good2,
                               "--psf", PSF_SPEC, "--reference", REF_SPEC, "--output-dir", outdir)
    assert code == 1
    for bad in (truncated, missing, garbage):
        # One line on stderr naming the file, as it happens ...
        lines = error_lines(stderr, f"{bad}: failed")
        assert len(lines) == 1, stderr
        # ... whose message names the file again and says what is wrong.
        assert str(bad) in lines[0].split("failed:", 1)[1]
        # ... and a FAILED row plus one line in the summary.
        assert len(error_lines(stdout, f"FAILED {bad}: ")) == 1, stdout
        assert [ln.split()[1] for ln in stdout.splitlines()
                if ln.split() and ln.split()[0] == bad.name] == ["FAILED"]
    assert "no such file" in error_lines(stderr, f"{missing}: failed")[0]
    assert "3 of 5 inputs failed" in stderr
    assert "ok 2, failed 3" in stderr
    # The good inputs were matched, before and after the failures.
    assert files_under(outdir) == ["good1.fits", "good2.fits", SUMMARY_NAME]
    assert_same_pixels(outdir / "good1.fits", direct(good1))
    assert_same_pixels(outdir / "good2.fits", direct(good2))


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("table", [True, False], ids=["config-table", "top-level"])
def test_config_file_and_set_overrides_take_effect(tmp_path, capsys, table):
    inp = write_input(tmp_path, "a.fits", seed=5)
    cfg = tmp_path / "match.toml"
    body = "kernelSize = 15\nspatialKernelOrder = 1\nalardSigGauss = [0.8, 1.6, 3.2]\n"
    cfg.write_text(("[config]\n" if table else "") + body)
    # The file alone.
    out1 = tmp_path / "file_only.fits"
    code, _, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                          "--config", cfg, "-o", out1, "--save-kernel")
    assert code == 0, stderr
    k1 = gm.SpatialKernel.read_fits(tmp_path / "file_only.kernel.fits")
    assert k1.dimensions[0] == 15 and k1.spatial_order == 1
    assert k1.config["kernelSize"] == 15 and list(k1.config["alardSigGauss"]) == [0.8, 1.6, 3.2]
    assert_same_pixels(out1, direct(inp, config=gm.ModelPsfMatchConfig(
        kernelSize=15, spatialKernelOrder=1, alardSigGauss=(0.8, 1.6, 3.2))))
    # --set wins over the file, field by field.
    out2 = tmp_path / "with_set.fits"
    code, _, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                          "--config", cfg, "--set", "kernelSize=17", "--set",
                          "spatialModelType=polynomial", "-o", out2, "--save-kernel")
    assert code == 0, stderr
    k2 = gm.SpatialKernel.read_fits(tmp_path / "with_set.kernel.fits")
    assert k2.dimensions[0] == 17 and k2.spatial_order == 1
    assert k2.spatial_model_type == "polynomial"
    assert k2.config["kernelSize"] == 17 and k2.config["spatialKernelOrder"] == 1
    expected = direct(inp, config=gm.ModelPsfMatchConfig(
        kernelSize=17, spatialKernelOrder=1, alardSigGauss=(0.8, 1.6, 3.2),
        spatialModelType="polynomial"))
    assert expected.metadata["ALKernelSize"] == 17
    assert_same_pixels(out2, expected)
    # docs/algorithm.md sections 3-4: stamps padded to nextOdd(17 * 1.4) = 25;
    # 15 + 6 + 6 bases; (256 + 256) / 128 squared = 16 candidates.
    assert expected.metadata["psfSize"] == 25
    assert k2.n_basis == 27 and expected.metadata["numKernelCandidates"] == 16


@pytest.mark.parametrize("how, field", [
    ("toml", "kernelSizee"),
    ("set", "spatialKernelOder"),
    ("set-value", "kernelSize"),
    ("toml-value", "alardDegGauss"),
])
def test_bad_config_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, how, field):
    inp = write_input(tmp_path, "a.fits", seed=6)
    extra = []
    if how == "toml":
        (tmp_path / "c.toml").write_text(f"{field} = 15\n")
        extra = ["--config", tmp_path / "c.toml"]
    elif how == "toml-value":
        (tmp_path / "c.toml").write_text("[config]\nalardDegGauss = [4, 2]\n")
        extra = ["--config", tmp_path / "c.toml"]
    elif how == "set":
        extra = ["--set", f"{field}=1"]
    else:
        extra = ["--set", "kernelSize=20"]
    outdir = tmp_path / "out"
    code, stdout, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                               "--output-dir", outdir, *extra)
    assert code != 0
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpumatch: error:"), stderr
    assert field in lines[0]
    if how == "toml":
        assert "c.toml" in lines[0] and "kernelSize" in lines[0].split(field, 1)[1]
    assert not outdir.exists()
    assert stdout == ""


@pytest.mark.parametrize("spec", ["gaussian:fwhm=six,size=21", "moffat:beta=2.5", "gaussian",
                                  "gaussian:fwhm=6,size=20", "gaussian:fwhm=6,sigma=2"])
def test_reference_that_does_not_parse(tmp_path, capsys, spec):
    inp = write_input(tmp_path, "a.fits", seed=7)
    out = tmp_path / "out.fits"
    code, stdout, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", spec,
                               "-o", out)
    assert code != 0
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpumatch: error:")
    assert repr(spec) in lines[0] and "Accepted forms" in lines[0]
    assert not out.exists() and files_under(tmp_path) == ["a.fits"]


# -- outputs that already exist -------------------------------------------------------------


def test_existing_output_needs_overwrite(tmp_path, capsys):
    inp = write_input(tmp_path, "a.fits", seed=8)
    out = tmp_path / "out.fits"
    out.write_bytes(b"an older result\n")
    before = os.stat(out).st_mtime_ns
    code, stdout, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                               "-o", out)
    assert code == 1
    assert out.read_bytes() == b"an older result\n" and os.stat(out).st_mtime_ns == before
    line = error_lines(stderr, f"{inp}: conflict")
    assert len(line) == 1 and str(out) in line[0] and "--overwrite" in line[0]
    assert "not a complete gpumatch output" in line[0]
    assert files_under(tmp_path) == ["a.fits", "out.fits"]  # no temporary files
    code, _, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                          "-o", out, "--overwrite")
    assert code == 0, stderr
    assert_same_pixels(out, direct(inp))
    assert files_under(tmp_path) == ["a.fits", "out.fits"]
    # Now it is this run's output: the same command again keeps it.
    before = os.stat(out).st_mtime_ns
    code, stdout, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                               "-o", out)
    assert code == 0, stderr
    assert os.stat(out).st_mtime_ns == before and "skipped" in stdout


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_the_input_is_refused(tmp_path, capsys, overwrite):
    inp = write_input(tmp_path, "a.fits", seed=9)
    before = digest(inp)
    flag = ["--overwrite"] if overwrite else []
    for where in (["-o", inp], ["-o", os.path.join(str(tmp_path), ".", "a.fits")],
                  ["--output-dir", tmp_path]):
        code, _, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                              *where, *flag)
        assert code != 0
        line = error_lines(stderr, f"{inp}: failed")
        assert len(line) == 1 and "input" in line[0].split("failed:", 1)[1], stderr
        assert digest(inp) == before
        # A run with --output-dir writes its summary there, failures included.
        assert files_under(tmp_path) == ["a.fits"] + [SUMMARY_NAME] * ("--output-dir" in where)


def test_one_output_for_several_inputs_is_refused(tmp_path, capsys):
    a = write_input(tmp_path, "a.fits", seed=1)
    b = write_input(tmp_path, "b.fits", seed=2)
    code, _, stderr = run(capsys, "match", a, b, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                          "-o", tmp_path / "x.fits")
    assert code != 0 and "--output-dir" in stderr
    assert files_under(tmp_path) == ["a.fits", "b.fits"]


# -- kernels and figures ---------------------------------------------------------------------


def test_lsst_defaults_flag_and_set_on_top_of_the_recommendation(tmp_path, capsys):
    inp = write_input(tmp_path, "a.fits", seed=12)
    lsst, rec = tmp_path / "lsst.fits", tmp_path / "rec.fits"
    code, _, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                          "-o", lsst, "--save-kernel", "--lsst-defaults")
    assert code == 0, stderr
    assert gm.SpatialKernel.read_fits(tmp_path / "lsst.kernel.fits").config == \
        gm.ModelPsfMatchConfig().to_dict()
    assert_same_pixels(lsst, direct(inp, config=gm.ModelPsfMatchConfig()))
    # --set applies on top of the recommended settings.
    code, _, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                          "-o", rec, "--save-kernel", "--set", "spatialKernelOrder=1")
    assert code == 0, stderr
    exposure = gm.Exposure.read_fits(inp)
    want = gm.ModelPsfMatchConfig.for_psfs(gm.parse_psf(PSF_SPEC), gm.parse_psf(REF_SPEC),
                                           bbox=exposure.bbox, spatialKernelOrder=1)
    assert gm.SpatialKernel.read_fits(tmp_path / "rec.kernel.fits").config == want.to_dict()
    assert want.spatialKernelOrder == 1 and want.kernelSize != 21
    assert_same_pixels(rec, direct(inp, config=want))


def test_saved_kernel_reads_back_and_reapplies_identically(tmp_path, capsys):
    inp = write_input(tmp_path, "a.fits", seed=11)
    outdir = tmp_path / "out"
    code, stdout, stderr = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                               "--output-dir", outdir, "--save-kernel", "--kernel-sum", "2.5")
    assert code == 0, stderr
    assert files_under(outdir) == ["a.fits", "a.kernel.fits", SUMMARY_NAME]
    kernel = gm.SpatialKernel.read_fits(outdir / "a.kernel.fits")
    expected = direct(inp)
    # The kernel sum asked for is the one stored (the output is normalised anyway).
    assert kernel.sum_at(*expected.kernelCellSet.region.center) == pytest.approx(2.5, rel=1e-9)
    np.testing.assert_array_equal(kernel.basis_images, expected.psfMatchingKernel.basis_images)
    # Without --config or --lsst-defaults the command uses the recommended settings for
    # this exposure: a 2-pixel ideal kernel needs less than LSST's 21 pixels.
    exposure = gm.Exposure.read_fits(inp)
    recommended = gm.ModelPsfMatchConfig.for_psfs(gm.parse_psf(PSF_SPEC), gm.parse_psf(REF_SPEC),
                                                  bbox=exposure.bbox)
    assert kernel.config == recommended.to_dict()
    assert kernel.config["kernelSize"] < 21
    # Applying the kernel read back to the input gives the command's output exactly.
    exposure = gm.Exposure.read_fits(inp)
    again = gm.apply_kernel(exposure, kernel)
    out = gm.Exposure.read_fits(outdir / "a.fits")
    np.testing.assert_array_equal(np.asarray(again.image), out.image)
    np.testing.assert_array_equal(np.asarray(again.variance), out.variance)
    np.testing.assert_array_equal(np.asarray(again.mask), out.mask)
    # The normalised kernel makes the kernel sum irrelevant to the pixels.
    np.testing.assert_allclose(out.image, np.asarray(expected.psfMatchedExposure.image),
                               rtol=2e-6, atol=2e-5)


def test_plots_writes_five_figures_per_input(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = write_input(tmp_path, "a.fits", seed=12)
    b = write_input(tmp_path, "b.fits", seed=13)
    plots = tmp_path / "figs"
    # One Gaussian of degree 2 (6 bases, sequences given with --set) keeps the basis and
    # coefficient figures small and quick; test_plots.py draws the default 27.
    small = ["--set", "alardNGauss=1", "--set", "alardSigGauss=(2.0,)", "--set",
             "alardDegGauss=[2]"]
    code, _, stderr = run(capsys, "match", a, b, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                          "--output-dir", tmp_path / "out", "--plots", plots, *small)
    assert code == 0, stderr
    assert gm.Exposure.read_fits(tmp_path / "out" / "a.fits").meta["GPM_KSUM"] == \
        pytest.approx(1.0, abs=1e-9)
    expected = sorted(f"{stem}_{name}.png" for stem in ("a", "b") for name in FIGURES)
    assert files_under(plots) == expected
    for name in expected:
        with open(plots / name, "rb") as f:
            head = f.read()
        assert head[:8] == PNG and len(head) > 10_000, name


_CUPY_CLI = r"""
from gpumatch.cellset import next_odd
from gpumatch.cli import main
from gpumatch.distributed import SUMMARY_NAME
sys.exit(main(ARGS))
"""


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="no host C++ compiler for the CUDA emulation")
def test_match_on_the_gpu_path_equals_numpy(tmp_path, capsys):
    """``gpumatch match --backend cupy`` with kernels and figures, against the fake
    CuPy (CUDA sources compiled for the CPU, checked against CuPy 14.2.0's API):
    the outputs equal the NumPy backend's to the GPU tests' tolerance."""
    pytest.importorskip("matplotlib")
    from fake_cupy import run_installed

    a = write_input(tmp_path, "a.fits", seed=14)
    b = write_input(tmp_path, "b.fits", seed=15)
    small = ["--set", "alardNGauss=1", "--set", "alardSigGauss=(2.0,)", "--set",
             "alardDegGauss=[2]"]
    common = [a, b, "--psf", PSF_SPEC, "--reference", REF_SPEC, "--save-kernel", *small]
    code, _, stderr = run(capsys, "match", *common, "--output-dir", tmp_path / "cpu")
    assert code == 0, stderr
    args = ["match", *map(str, common), "--output-dir", str(tmp_path / "gpu"), "--plots",
            str(tmp_path / "figs"), "--backend", "cupy"]
    run_installed(_CUPY_CLI.replace("ARGS", repr(args)))
    assert files_under(tmp_path / "gpu") == files_under(tmp_path / "cpu") == [
        "a.fits", "a.kernel.fits", "b.fits", "b.kernel.fits", SUMMARY_NAME]
    assert len(files_under(tmp_path / "figs")) == 2 * len(FIGURES)
    for name in ("a", "b"):
        got = gm.Exposure.read_fits(tmp_path / "gpu" / f"{name}.fits")
        want = gm.Exposure.read_fits(tmp_path / "cpu" / f"{name}.fits")
        np.testing.assert_array_equal(got.mask, want.mask)
        for plane in ("image", "variance"):
            g, w = getattr(got, plane), getattr(want, plane)
            np.testing.assert_array_equal(np.isfinite(g), np.isfinite(w))
            fin = np.isfinite(w)
            np.testing.assert_allclose(g[fin], w[fin], rtol=1e-5, atol=1e-6 * np.abs(w[fin]).max())
        assert got.meta["GPM_KSUM"] == pytest.approx(want.meta["GPM_KSUM"], abs=1e-9)
        kg = gm.SpatialKernel.read_fits(tmp_path / "gpu" / f"{name}.kernel.fits")
        kw = gm.SpatialKernel.read_fits(tmp_path / "cpu" / f"{name}.kernel.fits")
        for x, y in ((XY0[0], XY0[1]), (XY0[0] + 200.5, XY0[1] + 100.0)):
            kn = kw.compute_image(x, y)
            np.testing.assert_allclose(kg.compute_image(x, y), kn, rtol=0,
                                       atol=1e-5 * np.abs(kn).max())


# -- where the exposure's PSF comes from --------------------------------------------------------


def _des_exposure_file(directory, name, meta=None, seed=21):
    """A 256x256 cutout at parent (1000, 2000) of the DES CCD, stars drawn with its model."""
    psf = gm.PsfexPsf.read(DES_PSF)
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 1.0, SHAPE)
    xs = np.array([s[0] for s in STARS]) + 1000
    ys = np.array([s[1] for s in STARS]) + 2000
    stamps, x0, y0 = psf.compute_images(xs, ys)
    n = stamps.shape[1]
    for s, a, b in zip(stamps, x0 - 1000, y0 - 2000):
        image[b:b + n, a:a + n] += FLUX * s
    exposure = gm.Exposure(image.astype(np.float32), np.ones(SHAPE, np.float32),
                           xy0=(1000, 2000), meta=meta)
    path = os.path.join(str(directory), name)
    exposure.write_fits(path)
    return path


@needs_des
@pytest.mark.parametrize("how", ["header-card", "sidecar"])
def test_psf_found_from_header_card_or_sidecar(tmp_path, capsys, how):
    if how == "header-card":
        shutil.copy(DES_PSF, tmp_path / "ccd12_model.psf")
        inp = _des_exposure_file(tmp_path, "cutout.fits", meta={"PSF_FILE": "ccd12_model.psf"})
        model = tmp_path / "ccd12_model.psf"
    else:
        shutil.copy(DES_PSF, tmp_path / "cutout.psf")
        inp = _des_exposure_file(tmp_path, "cutout.fits")
        model = tmp_path / "cutout.psf"
    out = tmp_path / "matched.fits"
    code, _, stderr = run(capsys, "match", inp, "--reference", REF_SPEC, "-o", out,
                          *(["--psf-from-header"] if how == "header-card" else []))
    assert code == 0, stderr
    expected = direct(inp, psf=gm.PsfexPsf.read(model))
    got = assert_same_pixels(out, expected)
    # Not the Gaussian default of these tests: the DES model was used.
    assert not np.array_equal(np.asarray(direct(inp).psfMatchedExposure.image), got.image)
    # The 25-px PSFEx stamps, padded as recommended for the kernel (1.4 times it, or
    # more for an elongated kernel: docs/algorithm.md section 15.3).
    kernel_size = expected.metadata["ALKernelSize"]
    config = gm.ModelPsfMatchConfig.for_psfs(gm.PsfexPsf.read(model), gm.parse_psf(REF_SPEC),
                                             bbox=gm.Exposure.read_fits(inp).bbox)
    assert config.kernelSize == kernel_size and 1.4 <= config.autoPadPsfTo <= 2.0
    assert expected.metadata["psfSize"] == max(25, next_odd(config.autoPadPsfTo * kernel_size))
    np.testing.assert_allclose(star_sizes(got.image), REF_SIGMA, rtol=0.01)


def test_missing_psf_files_are_per_file_errors(tmp_path, capsys):
    card = write_input(tmp_path, "card.fits", seed=1, meta={"PSF_FILE": "gone.psf"})
    bare = write_input(tmp_path, "bare.fits", seed=2)
    outdir = tmp_path / "out"
    code, stdout, stderr = run(capsys, "match", card, bare, "--reference", REF_SPEC,
                               "--output-dir", outdir, "--psf-from-header")
    assert code == 1
    line = error_lines(stderr, f"{card}: failed")
    assert len(line) == 1 and "PSF_FILE" in line[0] and "gone.psf" in line[0]
    line = error_lines(stderr, f"{bare}: failed")
    assert len(line) == 1 and "--psf" in line[0] and "no PSF" in line[0]
    assert os.listdir(outdir) == [SUMMARY_NAME]


# -- PSF models that cannot be used ------------------------------------------------------------


class _BadPsf(gm.Psf):
    """A Gaussian model that misbehaves at parent x > 300 (the right half of the region)."""

    def __init__(self, kind):
        self.kind = kind

    def compute_kernel_image(self, x, y):
        h = 7
        v, u = np.mgrid[-h:h + 1, -h:h + 1].astype(float)
        stamp = np.exp(-(u * u + v * v) / (2 * PSF_SIGMA ** 2))
        stamp /= stamp.sum()
        if x > 300:
            if self.kind == "nan":
                stamp[3, 4] = np.nan
            elif self.kind == "even":
                stamp = stamp[:-1, :-1]
            elif self.kind == "empty":
                stamp = np.zeros((0, 0))
            elif self.kind == "zero":
                stamp = np.zeros_like(stamp)
        return stamp

    def __repr__(self):
        return f"_BadPsf({self.kind!r})"


@pytest.mark.parametrize("kind, words", [("nan", "NaN"), ("even", "even"), ("empty", "empty"),
                                         ("zero", "positive flux")])
def test_unusable_psf_model_is_a_clear_error_with_no_partial_output(tmp_path, kind, words):
    inp = write_input(tmp_path, "a.fits", seed=14)
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(PsfEvaluationError) as info:
        match_file(inp, REF_SPEC, str(outdir / "a.fits"), psf=_BadPsf(kind), backend="numpy",
                   save_kernel=True, plots_dir=str(outdir / "plots"))
    msg = str(info.value)
    assert "\n" not in msg and words in msg
    # The first cell centre past x = 300: region x0 = 100 - 128, centres every 128 from +64.
    assert "x=420.00" in msg
    assert files_under(outdir) == [] and os.listdir(outdir) == []


def test_unusable_psf_image_file(tmp_path, capsys):
    from astropy.io import fits

    inp = write_input(tmp_path, "a.fits", seed=15)
    fits.PrimaryHDU(np.ones((14, 14))).writeto(tmp_path / "even.fits")
    code, _, stderr = run(capsys, "match", inp, "--psf", f"image:{tmp_path / 'even.fits'}",
                          "--reference", REF_SPEC, "-o", tmp_path / "out.fits")
    assert code != 0
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "even.fits" in lines[0] and "odd" in lines[0]
    # A sidecar image PSF with a NaN: that input fails, the other is matched.
    nan = np.ones((15, 15))
    nan[2, 2] = np.nan
    fits.PrimaryHDU(nan).writeto(tmp_path / "b_psf.fits")
    b = write_input(tmp_path, "b.fits", seed=16)
    (tmp_path / "c.psf").write_bytes(b"not a PSFEx file: must not be read\n")
    c = write_input(tmp_path, "c.fits", seed=17, meta={"PSF_FILE": "c_psf.fits"})
    fits.PrimaryHDU(_stars_psf_image(2.0)).writeto(tmp_path / "c_psf.fits")
    outdir = tmp_path / "out"
    code, _, stderr = run(capsys, "match", b, c, "--reference", REF_SPEC, "--output-dir", outdir,
                          "--psf-from-header")
    assert code == 1
    line = error_lines(stderr, f"{b}: failed")
    assert len(line) == 1 and "b_psf.fits" in line[0] and "NaN" in line[0]
    assert files_under(outdir) == ["c.fits", SUMMARY_NAME]
    # The header card wins over a sidecar: c used the Gaussian image, not c.psf.
    assert_same_pixels(outdir / "c.fits", direct(c, psf=gm.ImagePsf(_stars_psf_image(2.0))))


def _stars_psf_image(sigma, size=15):
    h = size // 2
    v, u = np.mgrid[-h:h + 1, -h:h + 1].astype(float)
    g = np.exp(-(u * u + v * v) / (2 * sigma ** 2))
    return g / g.sum()


def test_failure_while_writing_removes_kernel_and_figures(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    inp = write_input(tmp_path, "a.fits", seed=18)
    outdir = tmp_path / "out"
    outdir.mkdir()

    def full_disk(self, path, overwrite=False):
        raise OSError(28, "No space left on device")

    small = gm.ModelPsfMatchConfig(alardNGauss=1, alardSigGauss=(2.0,), alardDegGauss=(2,))
    # The kernel and the five figures are written before the exposure, which fails.
    monkeypatch.setattr(gm.Exposure, "write_fits", full_disk)
    with pytest.raises(OSError, match="No space left"):
        match_file(inp, REF_SPEC, str(outdir / "a.fits"), psf=PSF_SPEC, backend="numpy",
                   save_kernel=True, plots_dir=str(outdir / "plots"), config=small)
    assert files_under(outdir) == []


# -- gpumatch example with FITS inputs ----------------------------------------------------------


@needs_des
def test_example_on_science_and_template_files(tmp_path, capsys):
    from astropy.io import fits

    # Science: DES PSF from a sidecar; template: a wider Gaussian image PSF named in its header.
    shutil.copy(DES_PSF, tmp_path / "science.psf")
    science = _des_exposure_file(tmp_path, "science.fits")
    fits.PrimaryHDU(_stars_psf_image(3.0, 25)).writeto(tmp_path / "template_psf_model.fits")
    template = write_input(tmp_path, "template.fits", seed=19, sigma=3.0,
                           meta={"PSF_FILE": "template_psf_model.fits"})
    out = tmp_path / "matched.fits"
    code, stdout, stderr = run(capsys, "example", "--science", science, "--template", template,
                               "--output", out, "--psf-from-header")
    assert code == 0, stderr
    assert "gpumatch example: 256x256 exposure" in stdout
    assert "PsfexPsf(" in stdout and "science.psf" in stdout
    assert "reference PSF : ImagePsf(31x31)" in stdout  # 25 px zero-padded to the stamps
    assert "kernel sum    : 1.000000" in stdout
    assert "candidates    : 16 used of 16" in stdout
    line = [ln for ln in stdout.splitlines() if "matched PSF vs reference" in ln][0]
    worst = float(line.rsplit("worst", 1)[1])
    assert 0 < worst < 0.02
    # The written output is the direct match of the science exposure to the template's PSF.
    sci = gm.Exposure.read_fits(science)
    sci.psf = gm.PsfexPsf.read(tmp_path / "science.psf")
    expected = gm.ModelPsfMatchTask(backend="numpy").run(
        sci, gm.ImagePsf(_stars_psf_image(3.0, 25)))
    got = gm.Exposure.read_fits(out)
    np.testing.assert_array_equal(got.image, np.asarray(expected.psfMatchedExposure.image))
    np.testing.assert_allclose(star_sizes(got.image), 3.0, rtol=0.01)
    # An existing --output is refused before any work.
    code, _, stderr = run(capsys, "example", "--science", science, "--template", template,
                          "--output", out)
    assert code != 0 and "already exists" in stderr


def test_example_needs_both_files(tmp_path):
    inp = write_input(tmp_path, "a.fits")
    with pytest.raises(SystemExit, match="both --science and --template"):
        main(["example", "--science", inp])
