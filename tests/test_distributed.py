"""gpumatch.distributed.match_files on a local Dask cluster (2 worker processes, CPU)."""

from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

import gpumatch as gm
from gpumatch import Box
from gpumatch.distributed import SUMMARY_NAME, match_files, output_complete, stale_temporaries
from gpumatch.pipeline import match_file

try:
    import distributed  # noqa: F401

    HAVE_DASK = True
except ImportError:  # pragma: no cover - the test extra installs it
    HAVE_DASK = False

needs_dask = pytest.mark.skipif(
    not HAVE_DASK, reason="dask.distributed is not installed (pip install 'gpumatch[distributed]')")

N_FILES = 12
REFERENCE = "gaussian:sigma=2.6,size=21"


def small_config():
    return gm.ModelPsfMatchConfig(kernelSize=11, alardNGauss=2, alardSigGauss=(1.0, 2.0),
                                  alardDegGauss=(2, 1), spatialKernelOrder=1, sizeCellX=32,
                                  sizeCellY=32)


def psf_model():
    return gm.VaryingGaussianPsf(15, 15, Box(0, 0, 160, 128),
                                 sigma=(1.6, 0.12, -0.08, 0.05, 0.03, -0.04),
                                 g1=(0.02, 0.03, -0.01), g2=(-0.01, 0.0, 0.02))


def write_inputs(directory, n=N_FILES):
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        image = rng.normal(100.0, 10.0, (128, 160)).astype(np.float32)
        variance = np.full((128, 160), 100.0, dtype=np.float32)
        mask = (rng.random((128, 160)) < 2e-3).astype(np.int32) << 3
        p = os.path.join(directory, f"exp{i:02d}.fits")
        gm.Exposure(image, variance, mask, meta={"INDEX": i}).write_fits(p)
        paths.append(p)
    return paths


def read_planes(path):
    e = gm.Exposure.read_fits(path)
    return e.image, e.variance, e.mask


def assert_same_pixels(out_dir, serial_dir, names):
    for name in names:
        got = read_planes(os.path.join(out_dir, name))
        want = read_planes(os.path.join(serial_dir, name))
        for g, w in zip(got, want):
            assert np.array_equal(g, w, equal_nan=True), name


def no_temporaries(directory):
    return glob.glob(os.path.join(directory, ".*.tmp*")) == []


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A dozen inputs and their serial (in-process) outputs."""
    root = tmp_path_factory.mktemp("dist")
    paths = write_inputs(str(root / "in"))
    serial = root / "serial"
    serial.mkdir()
    cfg = small_config()
    for p in paths:
        match_file(p, REFERENCE, str(serial / os.path.basename(p)), psf=psf_model(), config=cfg,
                   backend="numpy")
    return paths, str(serial)


@pytest.fixture(scope="module")
def client():
    if not HAVE_DASK:
        pytest.skip("dask.distributed is not installed")
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           memory_limit="1GiB", dashboard_address=":0")
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def run(paths, out, client, **kw):
    kw.setdefault("psf", psf_model())
    kw.setdefault("config", small_config())
    kw.setdefault("backend", "numpy")
    kw.setdefault("progress", False)
    return match_files(paths, REFERENCE, str(out), client=client, **kw)


# -- completeness (no cluster) -------------------------------------------------------


def test_output_complete(tmp_path, inputs):
    paths, serial = inputs
    good = os.path.join(serial, os.path.basename(paths[0]))
    assert output_complete(good) == (True, "")
    assert output_complete(good, verify_checksums=False) == (True, "")
    # An input exposure is a valid FITS file but lacks the completion card.
    ok, why = output_complete(paths[0])
    assert not ok and "GPM_KSUM" in why
    data = open(good, "rb").read()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(data[:len(data) - 4000])
    for verify in (True, False):
        ok, why = output_complete(cut, verify_checksums=verify)
        assert not ok, why
    flipped = bytearray(data)
    flipped[-3000] ^= 0xFF
    (tmp_path / "flip.fits").write_bytes(bytes(flipped))
    assert not output_complete(tmp_path / "flip.fits")[0]
    (tmp_path / "junk.fits").write_bytes(b"junk" * 100)
    assert not output_complete(tmp_path / "junk.fits")[0]
    assert output_complete(tmp_path / "none.fits") == (False, "no such file")


def test_output_check_reads_data_outside_the_warnings_lock(tmp_path, inputs, monkeypatch):
    """Checksums (the whole file's data) are computed without holding gpumatch's
    process-wide warnings lock, so the worker's other threads can read FITS files
    meanwhile; a flipped data byte is still found."""
    import threading

    from astropy.io.fits.hdu.base import _ValidHDU

    from gpumatch import _warnings

    paths, serial = inputs
    good = os.path.join(serial, os.path.basename(paths[0]))
    free = []
    real = _ValidHDU.verify_datasum

    def try_lock():
        if _warnings._LOCK.acquire(blocking=False):
            _warnings._LOCK.release()
            free.append(True)
        else:
            free.append(False)

    def spy(self):
        t = threading.Thread(target=try_lock)
        t.start()
        t.join()
        return real(self)

    monkeypatch.setattr(_ValidHDU, "verify_datasum", spy)
    assert output_complete(good) == (True, "")
    assert free and all(free)
    flipped = bytearray(open(good, "rb").read())
    flipped[-3000] ^= 0xFF
    (tmp_path / "flip.fits").write_bytes(bytes(flipped))
    ok, why = output_complete(tmp_path / "flip.fits")
    assert not ok and "checksum" in why


def test_stale_temporaries_pattern(tmp_path):
    out = tmp_path / "a[1].fits"
    mine = [tmp_path / ".a[1].fits.x8k2.tmp.fits", tmp_path / ".a[1].kernel.fits.q1.tmp.fits"]
    other = [tmp_path / ".b.fits.x8k2.tmp.fits", tmp_path / "a[1].fits"]
    for p in mine + other:
        p.write_bytes(b"x")
    assert stale_temporaries(str(out)) == sorted(str(p) for p in mine)


# -- on the cluster -------------------------------------------------------------------


@needs_dask
def test_dozen_files_same_pixels_as_serial(tmp_path, inputs, client):
    paths, serial = inputs
    out = tmp_path / "out"
    rows = run(paths, out, client)
    assert [r["status"] for r in rows] == ["ok"] * N_FILES
    assert [r["input"] for r in rows] == paths
    assert_same_pixels(str(out), serial, [os.path.basename(p) for p in paths])
    assert len({r["worker"] for r in rows}) == 2  # both workers took part
    assert no_temporaries(str(out))
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["files_total"] == N_FILES and summary["files_ok"] == N_FILES
    assert summary["files_failed"] == 0 and summary["config"]["sizeCellX"] == 32
    for row in summary["files"]:
        assert row["status"] == "ok" and row["error"] is None
        assert row["seconds"] > 0 and row["backend"] == "numpy"
        assert abs(row["kernel_sum"] - 1.0) < 1e-9
        assert isinstance(row["condition_number"], float) and row["residual_l2_max"] < 0.1


@needs_dask
def test_corrupt_file_reported_others_succeed(tmp_path, inputs, client):
    paths, serial = inputs
    chosen = paths[:4]
    corrupt = tmp_path / "corrupt.fits"
    corrupt.write_bytes(b"SIMPLE  =                    T" + b"\0" * 500)
    out = tmp_path / "out"
    rows = run(chosen[:2] + [str(corrupt)] + chosen[2:], out, client)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "ok"]
    assert "corrupt.fits" in rows[2]["error"] and "FITS" in rows[2]["error"]
    assert not (out / "corrupt.fits").exists()
    assert_same_pixels(str(out), serial, [os.path.basename(p) for p in chosen])
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert (summary["files_ok"], summary["files_failed"]) == (4, 1)
    assert summary["files"][2]["error"] == rows[2]["error"]
    assert no_temporaries(str(out))


@needs_dask
def test_resume_skips_complete_outputs(tmp_path, inputs, client):
    paths, serial = inputs
    chosen = paths[:5]
    out = tmp_path / "out"
    first = run(chosen[:3], out, client)
    assert [r["status"] for r in first] == ["ok"] * 3
    names = [os.path.basename(p) for p in chosen]
    before = {n: os.stat(out / n).st_mtime_ns for n in names[:3]}
    # Left by a writer that was killed: removed, never mistaken for an output.
    stale = out / f".{names[3]}.k1l3d.tmp.fits"
    stale.write_bytes(b"half a file")
    time.sleep(0.01)
    rows = run(chosen, out, client)
    assert [r["status"] for r in rows] == ["skipped"] * 3 + ["ok"] * 2
    assert {n: os.stat(out / n).st_mtime_ns for n in names[:3]} == before
    assert rows[0]["kernel_sum"] == pytest.approx(1.0)
    assert not stale.exists() and no_temporaries(str(out))
    assert_same_pixels(str(out), serial, names)

    # A foreign or damaged file at an output path is reported, not skipped or replaced...
    damaged = out / names[4]
    data = damaged.read_bytes()
    damaged.write_bytes(data[:len(data) // 2])
    rows = run(chosen, out, client)
    assert [r["status"] for r in rows] == ["skipped"] * 4 + ["conflict"]
    assert "not a complete gpumatch output" in rows[4]["error"]
    assert damaged.read_bytes() == data[:len(data) // 2]
    # ... unless overwrite is asked for, which recomputes everything.
    rows = run(chosen, out, client, overwrite=True)
    assert [r["status"] for r in rows] == ["ok"] * 5
    assert_same_pixels(str(out), serial, names)


@needs_dask
def test_killed_worker_then_rerun_finishes_job(tmp_path, inputs, client):
    paths, serial = inputs
    out = tmp_path / "out"
    names = [os.path.basename(p) for p in paths]
    client.wait_for_workers(2)
    pids = sorted(client.run(os.getpid).values())
    done = {}
    thread = threading.Thread(target=lambda: done.update(rows=run(paths, out, client)))
    thread.start()
    deadline = time.monotonic() + 60
    while not any((out / n).exists() for n in names) and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(pids[0], signal.SIGKILL)  # mid-run: the other tasks are queued or running
    thread.join(120)
    assert not thread.is_alive()
    first = done["rows"]
    # Dask reruns the killed worker's task on the other worker ("skipped" when the
    # kill came after its output was in place); whatever failed is finished by
    # running again.
    statuses = [r["status"] for r in first]
    assert set(statuses) <= {"ok", "skipped", "failed"}, statuses
    assert no_temporaries(str(out)) or "failed" in statuses
    finished = [n for n in names if (out / n).exists()]
    assert len(finished) == statuses.count("ok") + statuses.count("skipped")
    client.wait_for_workers(2)
    assert pids[0] not in client.run(os.getpid).values()
    rows = run(paths, out, client)
    assert all(r["status"] in ("ok", "skipped") for r in rows)
    assert [r["status"] == "skipped" for r in rows] == [n in finished for n in names]
    assert_same_pixels(str(out), serial, names)
    assert no_temporaries(str(out))
    assert sorted(os.listdir(out)) == sorted(names + [SUMMARY_NAME])


@needs_dask
def test_cli_scheduler_and_workers(tmp_path, inputs, client, capsys):
    from gpumatch.cli import main

    paths, serial = inputs
    chosen = paths[:3]
    names = [os.path.basename(p) for p in chosen]
    options = ["--reference", REFERENCE, "--psf", "gaussian:sigma=1.7,size=15", "--backend",
               "numpy", "--set", "sizeCellX=32", "--set", "sizeCellY=32", "--set",
               "kernelSize=11", "--set", "spatialKernelOrder=1", "--quiet"]
    common = ["match", *chosen] + options
    # An existing scheduler.
    out1 = tmp_path / "a"
    assert main(common + ["--output-dir", str(out1), "--scheduler",
                          client.scheduler.address]) == 0
    # A local cluster of one worker process.
    out2 = tmp_path / "b"
    assert main(common + ["--output-dir", str(out2), "--workers", "1"]) == 0
    assert_same_pixels(str(out1), str(out2), names)
    serial_cli = tmp_path / "serial"
    assert main(common + ["--output-dir", str(serial_cli)]) == 0
    assert_same_pixels(str(out1), str(serial_cli), names)
    # Serial and Dask runs write the same summary.
    assert (out2 / SUMMARY_NAME).exists() and (serial_cli / SUMMARY_NAME).exists()
    # Resumed: everything skipped, exit code 0; a failure gives 1 and a table.
    capsys.readouterr()
    assert main(common + ["--output-dir", str(out1), "--scheduler",
                          client.scheduler.address]) == 0
    bad = tmp_path / "missing.fits"
    assert main(["match", *chosen, str(bad)] + options + ["--output-dir", str(out1),
                                                          "--scheduler",
                                                          client.scheduler.address]) == 1
    err = capsys.readouterr()
    assert "missing.fits" in err.out and "skipped" in err.out
    assert "1 of 4 inputs failed" in err.err
    assert main(common + ["--output-dir", str(out1), "--workers", "0"]) == 2
    assert main(common + ["-o", str(tmp_path / "x.fits"), "--workers", "2"]) == 2


@needs_dask
@pytest.mark.parametrize("retried", [True, False], ids=["retried", "reported"])
def test_worker_dying_mid_write_leaves_no_partial_file(tmp_path, inputs, client, retried):
    paths, serial = inputs
    chosen = paths[:6]
    names = [os.path.basename(p) for p in chosen]
    out = tmp_path / "out"

    def die_while_writing():
        # On one worker: the next exposure write stops half way and the
        # process dies at once (no clean-up runs), as under a kill -9.
        import os

        import gpumatch.io.fits as fits_io

        real = fits_io.atomic_write

        def dying(path, writer, overwrite=False, what="file"):
            def half(tmp):
                writer(tmp)
                with open(tmp, "r+b") as fh:
                    fh.truncate(os.path.getsize(tmp) // 2)
                os._exit(1)

            return real(path, half, overwrite=overwrite, what=what)

        fits_io.atomic_write = dying
        return os.getpid()

    scheduler = client.cluster.scheduler
    allowed = scheduler.allowed_failures
    client.wait_for_workers(2)
    victim = sorted(client.scheduler_info()["workers"])[0]
    pid = client.run(die_while_writing, workers=[victim])[victim]
    try:
        if not retried:  # the death is the task's failure
            scheduler.allowed_failures = 0
        rows = run(chosen, out, client)
    finally:
        scheduler.allowed_failures = allowed
    client.wait_for_workers(2)
    assert pid not in client.run(os.getpid).values()  # it did die
    statuses = [r["status"] for r in rows]
    if retried:
        # The task it was running went to another worker (or the restarted one).
        assert statuses == ["ok"] * len(chosen), [r["error"] for r in rows]
    else:
        # The task being written and any queued on the same worker are lost with it.
        bad = [i for i, st in enumerate(statuses) if st == "failed"]
        assert 1 <= len(bad) < len(chosen) and set(statuses) == {"ok", "failed"}
        for i in bad:
            assert "KilledWorker" in rows[i]["error"]
            assert not (out / names[i]).exists()  # no partial output at its path ...
        assert no_temporaries(str(out))  # ... nor a temporary left behind
        rows = run(chosen, out, client)
        assert [r["status"] for r in rows] == ["ok" if i in bad else "skipped"
                                               for i in range(len(chosen))]
    assert no_temporaries(str(out))
    assert sorted(os.listdir(out)) == sorted(names + [SUMMARY_NAME])
    assert_same_pixels(str(out), serial, names)


@needs_dask
def test_dask_cuda_check_script_passes_on_cpu():
    """benchmarks/dask_cuda_check.py, which a GPU session runs on a dask-cuda cluster,
    passes here with --cpu (a LocalCluster of 2 processes, backend numpy)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join("benchmarks", "dask_cuda_check.py"), "--cpu",
                          "--files", "3", "--size", "256"], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "dask_cuda_check: PASSED" in res.stdout
    assert "3 files of 256x256, backend auto -> numpy expected" in res.stdout


@needs_dask
def test_resume_checks_provenance_like_serial_runs(tmp_path, client, capsys):
    """The resume rules of the serial test (tests/test_provenance.py) on Dask: an
    unchanged rerun skips; a changed reference, a changed configuration and another
    input's output under the same name are conflicts. On the module's local cluster
    of two worker processes: ``--workers 2`` would start another one (20 s on a busy
    machine) to reach the same ``match_files`` (test_cli_scheduler_and_workers runs it)."""
    from test_provenance import resume_scenario

    dask = ["--scheduler", client.scheduler.address]
    resume_scenario(tmp_path, capsys, dask, dask)


def test_local_workers_share_the_cores(monkeypatch):
    from gpumatch.distributed import worker_environment

    monkeypatch.delenv("GPUMATCH_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert worker_environment(4) == {"GPUMATCH_THREADS": "4"}
    assert worker_environment(2, threads_per_worker=2) == {"GPUMATCH_THREADS": "4"}
    assert worker_environment(None) == {"GPUMATCH_THREADS": "1"}     # one worker per core
    assert worker_environment(32) == {"GPUMATCH_THREADS": "1"}
    monkeypatch.setenv("GPUMATCH_THREADS", "3")                       # the user's choice stands
    assert worker_environment(4) == {}
