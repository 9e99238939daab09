"""What a matched exposure records: its noise correlation, its provenance, and the
resume that trusts an existing output only when its provenance is this run's."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import gpumatch as gm
from gpumatch import Box
from gpumatch.cli import main
from gpumatch.distributed import SUMMARY_NAME
from gpumatch.kernel import box_variance_factor
from gpumatch.provenance import NOISE_CARDS

REFERENCE = "doublegaussian:sigma1=2.5,sigma2=5.0,b=0.1,size=21"


def small_config(**changes):
    cfg = gm.ModelPsfMatchConfig(kernelSize=11, alardNGauss=2, alardSigGauss=(1.0, 2.0),
                                 alardDegGauss=(2, 1), spatialKernelOrder=1, sizeCellX=32,
                                 sizeCellY=32)
    return cfg.copy(**changes)


def elliptical_psf(bbox, g1=0.25):
    """A constant elliptical Gaussian: the kernel, and the noise, differ along x and y."""
    return gm.VaryingGaussianPsf(15, 15, bbox, sigma=(1.5,), g1=(g1,), g2=(0.0,))


def sha256(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


# -- noise correlation ----------------------------------------------------------------


def bartlett_variance(rho, dy, dx, n):
    """Variance of the sample correlation at lag (dy, dx) of a Gaussian field with
    correlation ``rho`` (Bartlett's formula), from ``n`` pixel pairs."""
    m = rho.shape[0] // 2
    p = max(abs(dy), abs(dx))
    r = np.pad(rho, p)
    c = m + p

    def shifted(sy, sx):  # r(d + s) on the grid of d
        return r[p + sy:p + sy + rho.shape[0], p + sx:p + sx + rho.shape[1]]

    rh = rho[m + dy, m + dx]
    plus, minus = shifted(dy, dx), shifted(-dy, -dx)
    terms = rho ** 2 + plus * minus + 2 * rh ** 2 * rho ** 2 - 4 * rh * rho * plus
    assert r[c, c] == 1.0
    return terms.sum() / n


def test_reported_correlation_is_that_of_matched_white_noise():
    """1024x1024 pixels of unit white noise matched with a spatially constant kernel:
    the correlation the output reports is the one measured in its pixels, lag by lag,
    within Bartlett's statistical error, and so are the box-sum variance factors."""
    n = 1024
    rng = np.random.default_rng(12)
    bbox = Box(0, 0, n, n)
    exposure = gm.Exposure(rng.standard_normal((n, n)).astype(np.float32),
                           np.ones((n, n), np.float32), psf=elliptical_psf(bbox))
    cfg = small_config(spatialKernelOrder=0, sizeCellX=256, sizeCellY=256)
    result = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exposure, gm.parse_psf(REFERENCE))
    matched = result.psfMatchedExposure
    rho = matched.noise_correlation
    m = rho.shape[0] // 2
    assert rho.shape == (21, 21) and rho[m, m] == 1.0
    np.testing.assert_allclose(rho, rho[::-1, ::-1], rtol=0, atol=1e-14)

    image = np.asarray(matched.image, dtype=np.float64)
    valid = np.isfinite(image)
    rows, cols = np.where(valid.any(axis=1))[0], np.where(valid.any(axis=0))[0]
    img = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    assert np.isfinite(img).all() and img.size > 1.0e6
    img = img - img.mean()
    # The variance plane holds sum(K^2) of the unit input variance, uncorrelated.
    var = np.asarray(matched.variance, dtype=np.float64)[rows[0]:rows[-1] + 1,
                                                         cols[0]:cols[-1] + 1]
    assert abs(img.var() / var.mean() - 1) < 0.02
    for dy, dx in [(0, 1), (1, 0), (0, 2), (2, 0), (1, 1), (1, -1), (3, 0)]:
        a = img[:img.shape[0] - dy, max(0, -dx):img.shape[1] - max(0, dx)]
        b = img[dy:, max(0, dx):img.shape[1] + min(0, dx)]
        measured = (a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean())
        sigma = np.sqrt(bartlett_variance(rho, dy, dx, a.size))
        # A small error bar (smaller than 1/sqrt(N) where the correlation is near 1).
        assert 0 < sigma < 0.01
        assert abs(measured - rho[m + dy, m + dx]) < 4 * sigma, (dy, dx, measured, sigma)
    # The exposure PSF is longer along x (g1 > 0), so the kernel smooths less, and the
    # noise correlates less, along x: by far more than the errors, so swapped axes fail.
    assert rho[m + 1, m] - rho[m, m + 1] > 0.1

    for k in (5, 11):
        factor = box_variance_factor(rho, k)
        ny, nx = (s // k for s in img.shape)
        sums = img[:ny * k, :nx * k].reshape(ny, k, nx, k).sum(axis=(1, 3))
        naive = k * k * var.mean()  # the sum of the variance plane over a box
        # The error of a variance: the spread over 4x4 groups of boxes.
        groups = [g.var() for band in np.array_split(sums, 4, axis=0)
                  for g in np.array_split(band, 4, axis=1)]
        measured = np.mean(groups) / naive
        err = np.std(groups, ddof=1) / np.sqrt(len(groups)) / naive
        assert err < 0.05 * factor
        assert abs(measured - factor) < 4 * err, (k, measured, factor, err)
        assert factor > 5  # the variance plane alone is far off


# -- provenance ----------------------------------------------------------------------


def write_input(path, seed=0, shape=(96, 128)):
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, shape).astype(np.float32)
    gm.Exposure(image, np.full(shape, 100.0, np.float32), xy0=(10, -4),
                meta={"SEED": seed}).write_fits(path)
    return str(path)


def test_provenance_round_trip(tmp_path):
    inp = write_input(tmp_path / "in.fits", seed=3)
    exposure = gm.Exposure.read_fits(inp)
    exposure.psf = elliptical_psf(exposure.bbox)
    cfg = small_config()
    reference = gm.parse_psf(REFERENCE)
    t0 = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    result = gm.ModelPsfMatchTask(cfg, backend="numpy").run(exposure, reference)
    out = tmp_path / "out.fits"
    result.psfMatchedExposure.write_fits(out)
    back = gm.Exposure.read_fits(out)

    prov = back.provenance
    assert prov["version"] == gm.__version__
    assert t0 <= datetime.datetime.fromisoformat(prov["date"]) <= \
        datetime.datetime.now(datetime.timezone.utc)
    assert prov["input"] == inp and prov["inputChecksumOf"] == "file"
    assert prov["inputSha256"] == sha256(inp)
    assert gm.ModelPsfMatchConfig.from_dict(prov["config"]) == cfg
    assert prov["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert prov["backend"] == "numpy" and prov["kernelSum"] == 1.0
    assert prov["reference"] == "doublegaussian:sigma1=2.5,sigma2=5.0,b=0.1,width=21,height=21"
    assert prov["psf"].startswith("VaryingGaussianPsf(")
    # psf is the reference, rebuilt from its description.
    assert type(back.psf) is gm.DoubleGaussianPsf and repr(back.psf) == repr(reference)
    x, y = 10 + 63, -4 + 47  # the central pixel
    from astropy.io import fits

    with fits.open(out) as hdul:
        np.testing.assert_array_equal(hdul["REFPSF"].data, reference.compute_kernel_image(x, y))
        assert (hdul["REFPSF"].header["GPM_X"], hdul["REFPSF"].header["GPM_Y"]) == (x, y)
        header = hdul[0].header
        corr = hdul["NOISECORR"].data
    assert [h for h in ("IMAGE", "MASK", "VARIANCE")] == [fits.getheader(out, i)["EXTNAME"]
                                                          for i in (1, 2, 3)]
    # NOISECORR and its summary: the kernel's at the image centre.
    cx, cy = exposure.bbox.center
    want = result.psfMatchingKernel.noise_correlation(cx, cy)
    np.testing.assert_array_equal(corr, want)
    np.testing.assert_array_equal(back.noise_correlation, want)
    c = want.shape[0] // 2
    assert header["GPM_CX1"] == want[c, c + 1] and header["GPM_CY2"] == want[c + 2, c]
    assert header["GPM_BV5"] == box_variance_factor(want, 5)
    assert header["GPM_BV11"] == box_variance_factor(want, 11)
    assert all(len(k) <= 8 for k in NOISE_CARDS)
    assert not any(k.startswith("GPM_") and k not in ("GPM_KSUM",) for k in back.meta)
    assert back.meta["SEED"] == 3

    # Written again, it says the same; the reference of an in-memory input whose model
    # has no string form comes back from its stamp.
    again = tmp_path / "again.fits"
    back.write_fits(again)
    assert gm.Exposure.read_fits(again).provenance == prov
    image_ref = gm.ImagePsf(reference.compute_kernel_image(0, 0)[2:-2, 2:-2])
    memory = gm.Exposure(np.asarray(exposure.image), np.asarray(exposure.variance),
                         psf=exposure.psf)
    res2 = gm.ModelPsfMatchTask(cfg, backend="numpy").run(memory, image_ref)
    res2.psfMatchedExposure.write_fits(tmp_path / "mem.fits")
    mem = gm.Exposure.read_fits(tmp_path / "mem.fits")
    assert mem.provenance["input"] is None and mem.provenance["inputChecksumOf"] == "image"
    assert mem.provenance["inputSha256"] == hashlib.sha256(
        np.ascontiguousarray(memory.image).tobytes()).hexdigest()
    assert mem.provenance["reference"] == "ImagePsf(17x17)"
    assert type(mem.psf) is gm.ImagePsf
    np.testing.assert_array_equal(mem.psf.array, image_ref.array)


def test_apply_kernel_outputs_carry_provenance(tmp_path):
    inp = write_input(tmp_path / "in.fits", seed=4)
    exposure = gm.Exposure.read_fits(inp)
    exposure.psf = elliptical_psf(exposure.bbox)
    reference = gm.parse_psf(REFERENCE)
    kernel = gm.ModelPsfMatchTask(small_config(), backend="numpy").run(
        exposure, reference).psfMatchingKernel
    out = gm.apply_kernel(exposure, kernel, psf=reference)
    cx, cy = exposure.bbox.center
    np.testing.assert_array_equal(out.noise_correlation, kernel.noise_correlation(cx, cy))
    out.write_fits(tmp_path / "applied.fits")
    back = gm.Exposure.read_fits(tmp_path / "applied.fits")
    prov = back.provenance
    assert prov["input"] == inp and prov["inputSha256"] == sha256(inp)
    assert prov["config"] is None and prov["configMode"] == {"mode": "kernel"}
    assert prov["backend"] == "numpy" and prov["kernelSum"] == kernel.kernel_sum
    assert prov["reference"] == "doublegaussian:sigma1=2.5,sigma2=5.0,b=0.1,width=21,height=21"
    assert repr(back.psf) == repr(reference)
    np.testing.assert_array_equal(back.noise_correlation, out.noise_correlation)
    # An in-memory input: the checksum of its image.
    memory = gm.Exposure(np.asarray(exposure.image), np.asarray(exposure.variance),
                         psf=exposure.psf)
    prov = gm.apply_kernel(memory, kernel).provenance
    assert prov["inputChecksumOf"] == "image" and prov["inputSha256"] == hashlib.sha256(
        np.ascontiguousarray(memory.image).tobytes()).hexdigest()
    assert prov["reference"].startswith("VaryingGaussianPsf(")


def test_psf_descriptions_parse_back():
    from gpumatch.psf.parse import psf_description

    for spec in ("gaussian:fwhm=7.7,size=23", "gaussian:sigma=0.3", REFERENCE,
                 "doublegaussian:sigma1=3.27,size=23"):
        model = gm.parse_psf(spec)
        again = gm.parse_psf(psf_description(model))
        assert repr(again) == repr(model)
        np.testing.assert_array_equal(again.compute_kernel_image(5, 5),
                                      model.compute_kernel_image(5, 5))


# -- resume --------------------------------------------------------------------------------

PSF = "gaussian:sigma=1.6,size=15"
# A given configuration (LSST's defaults with these fields) and a reference that an
# 11-pixel kernel reaches (the ideal kernel's sigma is 1.5 px): every match is good.
SETS = ["--lsst-defaults", "--set", "kernelSize=11", "--set", "spatialKernelOrder=1",
        "--set", "sizeCellX=32", "--set", "sizeCellY=32", "--backend", "numpy", "--quiet"]
RESUME_REFERENCE = "gaussian:sigma=2.2,size=21"


def _statuses(out):
    summary = json.loads((out / SUMMARY_NAME).read_text())
    return [f["status"] for f in summary["files"]], summary


def resume_scenario(tmp_path, capsys, first, then):
    """The resume rules of ``gpumatch match --output-dir``, run with the options
    ``first`` for the first run and ``then`` for the others (serial or Dask)."""
    os.makedirs(tmp_path / "in")
    a = write_input(tmp_path / "in" / "a.fits", seed=1)
    b = write_input(tmp_path / "in" / "b.fits", seed=2)
    os.makedirs(tmp_path / "other")
    other = write_input(tmp_path / "other" / "a.fits", seed=5)  # another input, same name
    out = tmp_path / "out"
    base = ["match", a, b, "--psf", PSF, "--output-dir", str(out)] + SETS

    def stamp():
        return {n: (os.stat(out / n).st_mtime_ns, sha256(out / n)) for n in ("a.fits", "b.fits")}

    assert main(base + ["--reference", RESUME_REFERENCE] + first) == 0
    statuses, summary = _statuses(out)
    assert statuses == ["ok", "ok"] and summary["files_ok"] == 2
    row = summary["files"][0]
    assert row["error"] is None and row["seconds"] > 0 and abs(row["kernel_sum"] - 1) < 1e-9
    for key in ("condition_number", "residual_l2_max"):
        assert isinstance(row[key], float)
    kept = stamp()
    capsys.readouterr()

    # Unchanged: skipped, untouched.
    assert main(base + ["--reference", RESUME_REFERENCE] + then) == 0
    statuses, summary = _statuses(out)
    assert statuses == ["skipped", "skipped"] and stamp() == kept
    assert summary["files"][0]["kernel_sum"] == pytest.approx(1.0)

    def conflicts(extra, words):
        capsys.readouterr()
        assert main(base + extra + then) == 1
        cap = capsys.readouterr()
        statuses, summary = _statuses(out)
        assert stamp() == kept
        assert summary["files_conflict"] == statuses.count("conflict")
        for f in summary["files"]:
            if f["status"] == "conflict":
                assert "exists but" in f["error"] and "--overwrite" in f["error"]
                assert all(w in f["error"] for w in words), f["error"]
                assert "\n" not in f["error"]
        assert "conflict" in cap.err and "--overwrite" in cap.err
        return statuses

    # Another reference, another configuration: conflicts, nothing skipped or replaced.
    assert conflicts(["--reference", "gaussian:fwhm=6,size=21"],
                     ["reference", "gaussian:sigma="]) == ["conflict"] * 2
    assert conflicts(["--reference", RESUME_REFERENCE, "--set", "kernelSize=9"],
                     ["configuration", "kernelSize 11 -> 9"]) == ["conflict"] * 2
    # Another input's output copied in under the same name.
    foreign = tmp_path / "foreign"
    assert main(["match", other, "--psf", PSF, "--reference", RESUME_REFERENCE, "--output-dir",
                 str(foreign)] + SETS) == 0
    shutil.copyfile(foreign / "a.fits", out / "a.fits")
    kept["a.fits"] = (os.stat(out / "a.fits").st_mtime_ns, sha256(out / "a.fits"))
    assert conflicts(["--reference", RESUME_REFERENCE], ["another input", other]) == \
        ["conflict", "skipped"]
    # --overwrite recomputes them.
    assert main(base + ["--reference", RESUME_REFERENCE, "--overwrite"] + then) == 0
    assert _statuses(out)[0] == ["ok", "ok"]
    redone = gm.Exposure.read_fits(out / "a.fits")
    assert redone.provenance["inputSha256"] == sha256(a)


def test_resume_serial(tmp_path, capsys):
    resume_scenario(tmp_path, capsys, [], [])


def test_resume_in_the_recommended_mode(tmp_path, capsys):
    """Settings recommended per exposure follow from the input and the reference: a
    rerun in that mode keeps the output; other overrides on top are a conflict."""
    a = write_input(tmp_path / "a.fits", seed=1)
    out = tmp_path / "out"
    base = ["match", a, "--psf", PSF, "--reference", RESUME_REFERENCE, "--output-dir", str(out),
            "--backend", "numpy", "--quiet", "--set", "sizeCellX=32", "--set", "sizeCellY=32"]
    assert main(base) == 0
    recorded = gm.Exposure.read_fits(out / "a.fits").provenance
    assert recorded["configMode"] == {"mode": "recommended",
                                      "overrides": {"sizeCellX": 32, "sizeCellY": 32}}
    assert main(base) == 0 and _statuses(out)[0] == ["skipped"]
    capsys.readouterr()
    assert main(base + ["--set", "spatialKernelOrder=1"]) == 1
    assert _statuses(out)[0] == ["conflict"]
    assert "recommended" in capsys.readouterr().err
    # The same fields given explicitly are not the recommended mode's output either
    # way round: a given configuration is compared field by field.
    config = recorded["config"]
    explicit = [f"kernelSize={config['kernelSize']}"]
    assert main(base + ["--lsst-defaults", "--set", explicit[0]]) == 1


DES_PSF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                       "des", "DECam_00154912_12_psfcat.psf")


@pytest.mark.skipif(not os.path.exists(DES_PSF),
                    reason=f"DES PSFEx model not found at {os.path.normpath(DES_PSF)} "
                           "(expected ../shared/data/des beside the repository)")
@pytest.mark.parametrize("how", ["sidecar", "--psf"])
def test_resume_notices_a_rewritten_psf_model_file(tmp_path, capsys, how):
    """The same PSF file name with other contents (PSFEx run again) is a conflict,
    whether the file was given with --psf or found next to the exposure."""
    from astropy.io import fits

    a = write_input(tmp_path / "a.fits", seed=1)
    model = tmp_path / "a.psf"
    shutil.copyfile(DES_PSF, model)
    out = tmp_path / "out"
    base = ["match", a, "--reference", RESUME_REFERENCE, "--output-dir", str(out)] + SETS
    base += ["--psf", f"psfex:{model}"] if how == "--psf" else []
    assert main(base) in (0, 3)                       # good or poor, written either way
    prov = gm.Exposure.read_fits(out / "a.fits").provenance
    assert prov["psf"] == f"psfex:{model}" and prov["psfFile"] == str(model)
    assert prov["psfSha256"] == sha256(model)
    assert main(base) in (0, 3) and _statuses(out)[0] == ["skipped"]
    # Rewritten under the same name.
    with fits.open(model) as hdul:
        hdul[1].header["HISTORY"] = "PSFEx run again"
        hdul.writeto(model, overwrite=True)
    capsys.readouterr()
    assert main(base) == 1
    statuses, summary = _statuses(out)
    assert statuses == ["conflict"]
    error = summary["files"][0]["error"]
    assert "exposure PSF file" in error and str(model) in error and "changed" in error
    assert main(base + ["--overwrite"]) in (0, 3)
    assert gm.Exposure.read_fits(out / "a.fits").provenance["psfSha256"] == sha256(model)


def test_summary_carries_the_verdict_when_the_result_has_one(tmp_path, capsys, monkeypatch):
    """matchQuality and noiseVarianceGain, when the task reports them, reach the summary
    of the run that matched the file and, through the output's header, of a run that
    skipped it."""
    from gpumatch import stages

    real = stages._log_solution

    def with_verdict(cfg, md, n_terms):
        md.update(matchQuality="good", matchQualityReason="within 1%",
                  noiseVarianceGain={"centre": 0.031, "min": 0.03, "max": 0.032})
        return real(cfg, md, n_terms)

    monkeypatch.setattr(stages, "_log_solution", with_verdict)
    os.makedirs(tmp_path / "in")
    a = write_input(tmp_path / "in" / "a.fits", seed=1)
    out = tmp_path / "out"
    argv = ["match", a, "--psf", PSF, "--reference", REFERENCE, "--output-dir", str(out)] + SETS
    for status in ("ok", "skipped"):
        assert main(argv) == 0
        statuses, summary = _statuses(out)
        row = summary["files"][0]
        assert statuses == [status] and row["verdict"] == "good"
        assert row["verdict_reason"] == "within 1%"
        assert row["noise_variance_gain"] == {"centre": 0.031, "min": 0.03, "max": 0.032}


def test_device_input_checksum_is_taken_when_written():
    """An input on the GPU is hashed only if its output is written, through a weak
    reference (the matched exposure does not keep its input alive); stands in here
    for a device array: any array type that is not a NumPy array."""
    import gc
    import pickle

    from gpumatch.provenance import _LazyImageChecksum, image_sha256

    class DeviceLike:
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return self.a

    image = DeviceLike(np.arange(12.0).reshape(3, 4))
    lazy = _LazyImageChecksum(image)
    want = hashlib.sha256(np.arange(12.0).tobytes()).hexdigest()
    assert lazy.value() == want == image_sha256(image.a)
    assert pickle.loads(pickle.dumps(lazy)) == want
    del image
    gc.collect()
    assert lazy.value() is None


_DEVICE_SCRIPT = r"""
import hashlib, json
import numpy as np
import cupy, fake_cupy
import gpumatch as gm
from test_provenance import REFERENCE, small_config, elliptical_psf
rng = np.random.default_rng(4)
host = rng.normal(100.0, 10.0, (96, 128)).astype(np.float32)
exp = gm.Exposure(cupy.asarray(host), cupy.asarray(np.full_like(host, 100.0)),
                  psf=elliptical_psf(gm.Box(0, 0, 128, 96)))
task = gm.ModelPsfMatchTask(small_config(), backend="cupy")
fake_cupy.COUNTS.clear()
result = task.run(exp, gm.parse_psf(REFERENCE))
copied = fake_cupy.COUNTS["device->host bytes"]
result.psfMatchedExposure.write_fits(OUT)
back = gm.Exposure.read_fits(OUT)
print(json.dumps({"copied": copied, "sha": back.provenance["inputSha256"],
                  "want": hashlib.sha256(host.tobytes()).hexdigest(),
                  "backend": back.provenance["backend"]}))
"""


def test_device_input_is_hashed_when_its_output_is_written(tmp_path):
    """On the (fake) GPU: matching an in-memory device exposure copies none of its
    planes back for the checksum; writing the output records the SHA-256 of the
    input image's bytes."""
    from fake_cupy import run_installed

    code = f"OUT = {str(tmp_path / 'o.fits')!r}\n" + _DEVICE_SCRIPT
    got = json.loads(run_installed(code).strip().splitlines()[-1])
    assert got["backend"] == "cupy" and got["sha"] == got["want"]
    assert got["copied"] < 96 * 128 * 4  # no plane came back during the match
