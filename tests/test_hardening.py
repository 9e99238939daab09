"""Hostile files, shared machines and the command line.

Outputs are only ever regular files; header-named PSF files are opt-in and
confined; local clusters listen on the loopback with TLS; sizes are bounded
before anything is allocated; one run per output directory.
"""

import os
import sys
import stat

import numpy as np
import pytest

import gpumatch as gm
from gpumatch.cli import main
from gpumatch.io._atomic import atomic_write, check_output_path

from test_cli_match import REF_SPEC, PSF_SPEC, files_under, run, write_input

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a match is computed (refusals must come before the work)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the match was computed before the refusal")

    monkeypatch.setattr(gm.ModelPsfMatchTask, "run", refuse)


# -- outputs: regular files only ---------------------------------------------------------


@needs_fifo
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_path_that_is_a_fifo_is_never_replaced(tmp_path, overwrite):
    fifo = tmp_path / "device"  # stands in for /dev/null: a non-regular file
    os.mkfifo(fifo)
    with pytest.raises(FileExistsError, match="not a regular file"):
        check_output_path(fifo, overwrite=overwrite)
    with pytest.raises(FileExistsError, match="not a regular file"):
        atomic_write(fifo, lambda tmp: open(tmp, "w").write("x"), overwrite=overwrite)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["device"]  # no temporary left


@needs_fifo
def test_symlink_to_a_fifo_is_refused_too(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.symlink(fifo, tmp_path / "link.fits")
    with pytest.raises(FileExistsError, match="not a regular file"):
        check_output_path(tmp_path / "link.fits", overwrite=True)
    assert os.path.islink(tmp_path / "link.fits")


@needs_fifo
def test_cli_refuses_a_fifo_output_before_computing(tmp_path, capsys, no_compute):
    inp = write_input(tmp_path, "in.fits")
    fifo = tmp_path / "out.fits"
    os.mkfifo(fifo)
    code, out, err = run(capsys, "match", inp, "--reference", REF_SPEC, "--psf", PSF_SPEC,
                         "-o", fifo, "--overwrite")
    assert code != 0
    lines = [line for line in err.splitlines() if "not a regular file" in line]
    assert len(lines) == 1 and str(fifo) in lines[0] and "Traceback" not in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_read_only_output_directory_is_refused_before_computing(tmp_path, capsys, monkeypatch,
                                                                no_compute):
    inp = write_input(tmp_path, "in.fits")
    outdir = tmp_path / "ro"
    outdir.mkdir()
    real_access = os.access

    def access(path, mode, *a, **kw):  # root ignores permission bits: simulate a read-only mount
        if os.path.abspath(path) == str(outdir) and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    code, out, err = run(capsys, "match", inp, "--reference", REF_SPEC, "--psf", PSF_SPEC,
                         "--output-dir", outdir)
    assert code != 0
    line = [x for x in err.splitlines() if "not writable" in x]
    assert len(line) == 1 and str(outdir) in line[0] and "--output-dir" in line[0]
    assert ".tmp" not in err and ".gpumatch.lock" not in err  # not a hidden file's name
    assert os.listdir(outdir) == []
    pytest.importorskip("distributed")
    code, out, err = run(capsys, "match", inp, "--reference", REF_SPEC, "--psf", PSF_SPEC,
                         "--output-dir", outdir, "--workers", "1")
    assert code == 2 and "not writable" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(outdir) == []


@needs_fifo
def test_summary_path_that_is_a_fifo_is_refused_before_the_work(tmp_path, capsys, no_compute):
    pytest.importorskip("distributed")
    from gpumatch.distributed import SUMMARY_NAME

    inp = write_input(tmp_path, "a.fits")
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / SUMMARY_NAME)
    code, _, err = run(capsys, "match", inp, "--reference", REF_SPEC, "--psf", PSF_SPEC,
                       "--output-dir", out, "--workers", "1")
    assert code == 2 and "not a regular file" in err and SUMMARY_NAME in err
    assert files_under(out) == [SUMMARY_NAME]


@pytest.mark.skipif(os.name != "posix" or os.getuid() == 0,
                    reason="root writes in read-only directories")
def test_really_read_only_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            check_output_path(d / "x.fits", overwrite=False)
    finally:
        d.chmod(0o755)


def test_atomic_write_syncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "a.txt"
    atomic_write(path, lambda tmp: open(tmp, "w").write("hello"))
    assert synced == [False, True]  # the file's data, then the directory entry
    assert path.read_text() == "hello"


# -- PSF files named in headers ------------------------------------------------------------


def _psf_image_file(path, sigma=1.6, size=15):
    from astropy.io import fits

    h = size // 2
    v, u = np.mgrid[-h:h + 1, -h:h + 1].astype(float)
    g = np.exp(-(u * u + v * v) / (2 * sigma ** 2))
    fits.PrimaryHDU(g / g.sum()).writeto(path)
    return g / g.sum()


def test_header_card_is_not_followed_unless_asked(tmp_path, capsys, no_compute):
    _psf_image_file(tmp_path / "model_psf.fits")
    inp = write_input(tmp_path, "a.fits", meta={"PSF_FILE": "model_psf.fits"})
    code, _, err = run(capsys, "match", inp, "--reference", REF_SPEC, "-o", tmp_path / "o.fits")
    assert code != 0
    line = [x for x in err.splitlines() if "no PSF model" in x]
    assert len(line) == 1 and "--psf-from-header" in line[0] and "PSF_FILE" in line[0]
    from gpumatch.pipeline import read_exposure_with_psf
    with pytest.raises(gm.errors.GpumatchError, match="psf_from_header=True"):
        read_exposure_with_psf(inp, psf_hint="give psf=...", header_hint="pass psf_from_header=True")


def test_header_card_followed_when_asked_gives_the_named_model(tmp_path):
    from gpumatch.pipeline import read_exposure_with_psf

    expected = _psf_image_file(tmp_path / "model_psf.fits", sigma=2.0)
    inp = write_input(tmp_path, "a.fits", meta={"PSFMODEL": "model_psf.fits"})
    exposure = read_exposure_with_psf(inp, psf_from_header=True)
    np.testing.assert_allclose(exposure.psf.compute_kernel_image(0.0, 0.0), expected, rtol=1e-12)


@pytest.mark.parametrize("key", ["PSF_FILE", "PSFFILE", "PSFMODEL"])
def test_header_card_refusals_share_one_wording(tmp_path, key):
    from gpumatch.io.safety import UnsafePathError
    from gpumatch.pipeline import find_psf

    data = tmp_path / "data"
    data.mkdir()
    inp = data / "a.fits"
    _psf_image_file(tmp_path / "outside_psf.fits")  # exists, but outside the directory
    _psf_image_file(data / "inside_psf.fits")
    (data / "sub").mkdir()
    os.symlink(tmp_path / "outside_psf.fits", data / "escape.fits")
    big = data / "big.fits"
    with open(big, "wb") as fh:  # sparse: no disk space used
        fh.truncate(65 * 2 ** 20)
    names = ["/etc/passwd", "../outside_psf.fits", "sub/../../outside_psf.fits",
             str(tmp_path / "outside_psf.fits"), "missing.fits", "escape.fits", "big.fits",
             "sub", "/dev/zero", "~/x.psf", ""]
    if hasattr(os, "mkfifo"):
        os.mkfifo(data / "fifo.psf")
        names.append("fifo.psf")
    messages = set()
    for name in names:
        with pytest.raises(UnsafePathError) as info:
            find_psf(str(inp), {key: name}, psf_from_header=True)
        messages.add(str(info.value).replace(repr(name), "NAME"))
    assert len(messages) == 1, messages  # nothing tells which files exist
    (message,) = messages
    assert str(inp) in message and key in message and "--psf" in message
    assert find_psf(str(inp), {key: "inside_psf.fits"}, psf_from_header=True) == \
        os.path.realpath(data / "inside_psf.fits")
    # Without the flag the card is ignored and nothing is opened.
    assert find_psf(str(inp), {key: "/dev/zero"}) is None


@needs_fifo
def test_sidecar_that_is_a_fifo_is_not_opened(tmp_path):
    from gpumatch.pipeline import find_psf

    os.mkfifo(tmp_path / "a.psf")
    assert find_psf(str(tmp_path / "a.fits")) is None


# -- the local Dask cluster ------------------------------------------------------------------


def _listening(pids):
    """``(host, port)`` of every TCP socket in LISTEN state owned by ``pids``."""
    import psutil

    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid in pids and c.status == psutil.CONN_LISTEN:
            out.append((c.laddr.ip, c.laddr.port))
    return out


def test_local_cluster_listens_on_loopback_with_tls_and_no_dashboard():
    pytest.importorskip("distributed")
    pytest.importorskip("cryptography")
    psutil = pytest.importorskip("psutil")
    from distributed import Client

    from gpumatch.distributed import _open_client

    client, owned = _open_client(None, 1, 1, "1GiB")
    try:
        cluster = client.cluster
        assert owned and cluster.scheduler_address.startswith("tls://127.0.0.1:")
        workers = list(client.scheduler_info()["workers"])
        assert len(workers) == 1 and all(w.startswith("tls://127.0.0.1:") for w in workers)
        assert client.submit(lambda x: x + 1, 41).result() == 42  # TLS works end to end
        # The scheduler's HTTP server (loopback, a free port) serves no dashboard pages.
        import urllib.error
        import urllib.request

        http = cluster.scheduler.http_server
        assert http.address == "127.0.0.1" and http.port != 8787
        for page in ("/status", "/info/main/workers.html", "/health", "/metrics"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://127.0.0.1:{http.port}{page}", timeout=5)
            assert info.value.code == 404, page
        ports = client.run(lambda dask_worker: dask_worker.http_server.port)
        for port in ports.values():
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            assert info.value.code == 404
        # A client without the cluster's certificate cannot attach (the TLS
        # scheduler closes a plain-TCP comm: CommClosedError, or a timeout).
        with pytest.raises(OSError):
            Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout="2s")
        pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        sockets = _listening(pids)
        assert sockets, "no listening sockets found"
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets
        assert 8787 not in {port for _, port in sockets}
    finally:
        client.close()
        client.cluster.close()


# -- the test suite's emulator cache -----------------------------------------------------------


def test_emulator_cache_is_private(tmp_path, monkeypatch):
    import cuda_emulator

    monkeypatch.setattr(cuda_emulator, "_private_dir", None)
    # A directory others can write into, or a planted link, is never the cache.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (tmp_path / "real").mkdir(mode=0o700)
    os.symlink(tmp_path / "real", tmp_path / "link")
    for bad in (shared, tmp_path / "link"):
        assert cuda_emulator._private_cache(str(bad)) is None
        monkeypatch.setenv("GPUMATCH_EMULATOR_CACHE", str(bad))
        with pytest.raises(cuda_emulator.EmulatorError, match="only it can write"):
            cuda_emulator._build_dir()
    # The default path, planted by "someone else" (world-writable): a fresh private directory.
    monkeypatch.delenv("GPUMATCH_EMULATOR_CACHE")
    monkeypatch.setattr(cuda_emulator.tempfile, "gettempdir", lambda: str(tmp_path))
    uid = os.getuid()
    planted = tmp_path / f"gpumatch-cuda-emulator-{uid}"
    planted.mkdir()
    planted.chmod(0o777)
    got = cuda_emulator._build_dir()
    assert got != planted and stat.S_IMODE(os.lstat(got).st_mode) == 0o700
    assert os.path.basename(got).startswith("gpumatch-cuda-emulator-")
    assert cuda_emulator._build_dir() == got  # one per process
    # A fresh default is created 0700 and used.
    planted.chmod(0o700)
    planted.rmdir()
    monkeypatch.setattr(cuda_emulator, "_private_dir", None)
    assert cuda_emulator._build_dir() == planted
    assert stat.S_IMODE(os.lstat(planted).st_mode) & 0o022 == 0


def test_fake_cupy_rawmodule_sources_leave_nothing_behind(tmp_path):
    import subprocess
    import sys

    code = ("import sys, tempfile; sys.path.insert(0, 'tests'); import cuda_emulator;"
            "d = cuda_emulator._scratch_dir('gpumatch-rawmodule-'); (d / 'k.cu').write_text('x');"
            "print(d)")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out.startswith(str(tmp_path)) and not os.path.exists(out)
    assert os.listdir(tmp_path) == []


# -- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("kernelSize", 10001), ("spatialKernelOrder", 1000000),
                                         ("alardDegGauss", [100, 2, 2]), ("padPsfBy", 2000),
                                         ("kernelSizeMax", 100001), ("alardNGauss", 11)])
def test_size_driving_fields_are_bounded(field, value):
    from gpumatch.limits import LIMITS

    extra = ({"alardSigGauss": [1.0] * 11, "alardDegGauss": [1] * 11}
             if field == "alardNGauss" else {})
    with pytest.raises(gm.errors.ConfigError, match=f"{field}=.* at most {LIMITS[field]}"):
        gm.ModelPsfMatchConfig(**{field: value}, **extra)
    # The limit itself is accepted.
    at_limit = {"alardSigGauss": [1.0] * 10, "alardDegGauss": [1] * 10} \
        if field == "alardNGauss" else {}
    gm.ModelPsfMatchConfig(**{field: LIMITS[field] if field != "alardDegGauss" else [10, 2, 2]},
                           **at_limit, **({"kernelSizeMax": 255} if field == "kernelSize" else {}))


@pytest.mark.parametrize("spec", ["gaussian:fwhm=1e6", "gaussian:sigma=1,size=100001",
                                  "doublegaussian:sigma1=1,sigma2=1e5,b=0.1"])
def test_huge_psf_strings_are_refused_before_rendering(spec):
    from gpumatch.limits import ResourceLimitError

    with pytest.raises(ResourceLimitError, match="exceeds gpumatch's limit of 1001 pixels"):
        gm.parse_psf(spec)


def test_psfex_sampling_that_asks_for_huge_stamps_is_refused(tmp_path):
    from test_psfex import _gauss, write_psfex

    path = write_psfex(tmp_path / "m.psf", [_gauss(25, 2.0)], samp=100.0, degree=0)
    with pytest.raises(ValueError, match="PSF_SAMP = 100 .*2500-pixel stamps"):
        gm.PsfexPsf.read(path)


def test_truncated_psfex_names_the_file(tmp_path):
    from test_psfex import _gauss, write_psfex

    path = write_psfex(tmp_path / "m.psf", [_gauss(25, 2.0)], samp=1.0, degree=0)
    data = path.read_bytes()
    cut = tmp_path / "cut.psf"
    cut.write_bytes(data[:len(data) - 2880])  # the table's data block is gone
    with pytest.raises(ValueError) as info:
        gm.PsfexPsf.read(cut)
    message = str(info.value)
    assert str(cut) in message and "truncated" in message and "reshape" not in message


@pytest.mark.parametrize("shape", [(256, 256), (300, 1100)])
def test_estimate_bounds_the_measured_peak_of_a_small_run(shape):
    import tracemalloc

    from gpumatch.limits import estimate_run_bytes

    rng = np.random.default_rng(0)
    exposure = gm.Exposure(rng.normal(100.0, 1.0, shape).astype(np.float32),
                           np.ones(shape, np.float32), np.zeros(shape, np.int32))
    exposure.psf = gm.parse_psf(PSF_SPEC)
    task = gm.ModelPsfMatchTask(backend="numpy")
    tracemalloc.start()
    try:
        task.run(exposure, gm.parse_psf(REF_SPEC))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = estimate_run_bytes(task.config, shape, 21)
    assert peak <= estimate <= 10 * peak, (peak, estimate)


def test_run_larger_than_memory_stops_before_allocating(tmp_path, capsys, monkeypatch):
    import gpumatch.limits as limits
    import gpumatch.stages as task_module

    monkeypatch.setattr(limits, "available_memory", lambda: 4 * 2 ** 20)  # 4 MiB "free"

    def no_cell_set(*a, **k):
        raise AssertionError("the cell set was built before the memory check")

    monkeypatch.setattr(task_module, "build_cell_set", no_cell_set)
    inp = write_input(tmp_path, "a.fits")
    exposure = gm.Exposure.read_fits(inp)
    exposure.psf = gm.parse_psf(PSF_SPEC)
    with pytest.raises(limits.ResourceLimitError, match=r"needs about .*MiB of memory but 4\.0 "
                                                        r"MiB is available"):
        gm.ModelPsfMatchTask(backend="numpy").run(exposure, gm.parse_psf(REF_SPEC))
    # --lsst-defaults: the recommended mode would build cell sets of its own (for
    # its coarse check) before the run, which this test's stand-in refuses.
    code, _, err = run(capsys, "match", inp, "--reference", REF_SPEC, "--psf", PSF_SPEC,
                       "--lsst-defaults", "-o", tmp_path / "o.fits")
    assert code != 0
    line = [x for x in err.splitlines() if "needs about" in x]
    assert len(line) == 1 and "--set" in line[0] and str(inp) in err
    assert not (tmp_path / "o.fits").exists()


def test_gpu_runs_are_checked_against_free_device_memory(monkeypatch):
    import types

    import gpumatch.limits as limits

    config = gm.ModelPsfMatchConfig()
    need = limits.estimate_run_bytes(config, (256, 256), 21)
    monkeypatch.setattr(limits, "available_memory", lambda: 100 * need)
    fake = types.SimpleNamespace(__name__="cupy", cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(memGetInfo=lambda: (need // 2, 80 << 30))),
        get_default_memory_pool=lambda: types.SimpleNamespace(free_bytes=lambda: 0))
    with pytest.raises(limits.ResourceLimitError, match="of GPU memory but"):
        limits.check_run_memory(config, (256, 256), 21, xp=fake)
    assert limits.check_run_memory(config, (256, 256), 21, xp=np) == need
    fake.cuda.runtime.memGetInfo = lambda: (2 * need, 80 << 30)
    assert limits.check_run_memory(config, (256, 256), 21, xp=fake) == need


@needs_fifo
def test_fifo_given_as_an_exposure_is_refused_not_opened(tmp_path):
    os.mkfifo(tmp_path / "x.fits")
    with pytest.raises(gm.io.fits.FitsFormatError, match="not a regular file"):
        gm.Exposure.read_fits(tmp_path / "x.fits")


def test_task_timeout_reports_a_hanging_file_and_the_batch_finishes(tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    import json
    import threading
    import time

    from distributed import Client, LocalCluster

    import gpumatch.pipeline as pipeline
    from gpumatch.distributed import SUMMARY_NAME, match_files

    fast = write_input(tmp_path, "fast.fits", seed=1)
    slow = write_input(tmp_path, "slow.fits", seed=2)
    release = threading.Event()
    real = pipeline.match_file

    def match_file(path, *a, **k):
        if path == slow:
            release.wait(60)  # a read that never returns, until the test ends
        return real(path, *a, **k)

    monkeypatch.setattr(pipeline, "match_file", match_file)
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                           dashboard_address=None)
    client = Client(cluster)
    try:
        t0 = time.monotonic()
        rows = match_files([slow, fast], REF_SPEC, tmp_path / "out", client=client, psf=PSF_SPEC,
                           backend="numpy", progress=False, task_timeout=2)
        took = time.monotonic() - t0
        written = files_under(tmp_path / "out")  # before the stuck thread is let go
    finally:
        release.set()
        client.close()
        cluster.close()
    assert took < 30
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "TimeoutError" in rows[0]["error"] and "--task-timeout" in rows[0]["error"]
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["files_failed"] == 1 and summary["files_ok"] == 1
    assert written == ["fast.fits", SUMMARY_NAME]
    with pytest.raises(ValueError, match="task_timeout"):
        match_files([fast], REF_SPEC, tmp_path / "o2", client=client, task_timeout=0)


# -- one run per output directory; names that collide ---------------------------------------


def test_second_run_into_a_locked_directory_is_refused(tmp_path, capsys, no_compute):
    import socket

    from gpumatch.io.rundir import LOCK_NAME, run_lock

    inp = write_input(tmp_path, "a.fits")
    out = tmp_path / "out"
    out.mkdir()
    with run_lock(out) as lock:  # a live run (this process) holds the directory
        code, _, err = run(capsys, "match", inp, "--reference", REF_SPEC, "--psf", PSF_SPEC,
                           "--output-dir", out)
        assert code == 2
        line = [x for x in err.splitlines() if "in use by another gpumatch run" in x]
        assert len(line) == 1 and f"pid {os.getpid()} on {socket.gethostname()}" in line[0]
        assert os.path.exists(lock)
        pytest.importorskip("distributed")
        from gpumatch.distributed import match_files
        with pytest.raises(gm.io.rundir.RunLockedError):
            match_files([inp], REF_SPEC, out, psf=PSF_SPEC, progress=False)
    assert os.listdir(out) == []  # released, nothing written
    assert not os.path.exists(out / LOCK_NAME)


def test_stale_lock_is_detected_and_replaced(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from gpumatch.errors import GpumatchWarning
    from gpumatch.io.rundir import LOCK_NAME, RunLockedError, run_lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    with pytest.warns(GpumatchWarning, match=f"stale lock .*pid {pid}"):
        with run_lock(tmp_path):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    # Another host's lock cannot be checked: it is respected.
    lock.write_text(json.dumps({"pid": pid, "host": "elsewhere.example", "started": "then"}))
    with pytest.raises(RunLockedError, match="elsewhere.example"):
        with run_lock(tmp_path):
            pass
    assert json.loads(lock.read_text())["host"] == "elsewhere.example"


def test_two_concurrent_runs_one_writes_the_other_is_refused(tmp_path):
    """Two real processes into one directory at once: exactly one matches the file."""
    import subprocess
    import sys

    inp = write_input(tmp_path, "a.fits")
    out = tmp_path / "out"
    out.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    # The first takes the lock, says so, and waits to be released before matching.
    hold = ("import os, sys, time, contextlib, gpumatch.io.rundir as r; real = r.run_lock\n"
            "@contextlib.contextmanager\ndef held(d):\n"
            "    with real(d) as p:\n"
            "        open(sys.argv[1], 'w').close()\n"
            "        t0 = time.monotonic()\n"
            "        while not os.path.exists(sys.argv[2]) and time.monotonic() - t0 < 120:\n"
            "            time.sleep(0.05)\n"
            "        yield p\n"
            "r.run_lock = held\n"
            "from gpumatch.cli import main; sys.exit(main(sys.argv[3:]))")
    args = ["match", str(inp), "--reference", REF_SPEC, "--psf", PSF_SPEC, "--output-dir",
            str(out), "--backend", "numpy", "-q"]
    started, release = tmp_path / "started", tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", hold, str(started), str(release), *args],
                             env=env, stderr=subprocess.PIPE, text=True)
    import time
    t0 = time.monotonic()
    while not started.exists() and time.monotonic() - t0 < 120 and first.poll() is None:
        time.sleep(0.05)
    assert started.exists(), first.stderr.read()
    second = subprocess.run([sys.executable, "-m", "gpumatch", *args], env=env,
                            capture_output=True, text=True)
    release.touch()
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and "in use by another gpumatch run" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert files_under(out) == ["a.fits", "gpumatch_summary.json"]
    gm.Exposure.read_fits(out / "a.fits")


def test_serial_run_removes_its_stale_temporaries(tmp_path, capsys):
    inp = write_input(tmp_path, "a.fits")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".a.fits.0123456789ab.tmp.fits"
    stale.write_bytes(b"half a file")
    other = out / ".b.fits.0123456789ab.tmp.fits"  # not an output of this run: kept
    other.write_bytes(b"x")
    code, _, err = run(capsys, "match", inp, "--reference", REF_SPEC, "--psf", PSF_SPEC,
                       "--output-dir", out)
    assert code == 0, err
    assert files_under(out) == [".b.fits.0123456789ab.tmp.fits", "a.fits",
                                "gpumatch_summary.json"]


def test_temporaries_name_their_writer_and_a_live_writers_are_spared(tmp_path, capsys):
    """Temporary files carry ``{host}-{pid}``: a sweep removes those of dead writers
    (and of names without an owner, from older versions) but not a live process's."""
    import subprocess

    from gpumatch.distributed import _remove_stale
    from gpumatch.io._atomic import _HOST, _create_temporary, temporary_owner

    out = tmp_path / "x.fits"
    mine = _create_temporary(str(out))
    assert temporary_owner(mine) == (_HOST, os.getpid())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".x.fits.{_HOST}-{sleeper.pid}.00aa11.tmp.fits"
        dead = tmp_path / f".x.fits.{_HOST}-{2 ** 22 + 7}.00bb22.tmp.fits"  # no such pid
        old = tmp_path / ".x.fits.0123456789ab.tmp.fits"
        for p in (live, dead, old):
            p.write_bytes(b"partial")
        removed = sorted(os.path.basename(p) for p in _remove_stale(str(out)))
        assert removed == sorted(os.path.basename(p) for p in (mine, dead, old))
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [os.path.basename(p) for p in _remove_stale(str(out))] == [live.name]


@pytest.mark.parametrize("mode", ["serial", "workers"])
@pytest.mark.parametrize("case", ["same-name", "kernel", "summary"])
def test_output_name_collisions_are_refused_up_front(tmp_path, capsys, no_compute, mode, case):
    if mode == "workers":
        pytest.importorskip("distributed")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if case == "same-name":
        inputs = [write_input(tmp_path / "a", "x.fits"), write_input(tmp_path / "b", "x.fits")]
        extra, clash = [], "x.fits"
    elif case == "kernel":
        inputs = [write_input(tmp_path / "a", "x.fits"),
                  write_input(tmp_path / "b", "x.kernel.fits")]
        extra, clash = ["--save-kernel"], "x.kernel.fits"
    else:
        if mode == "serial":
            pytest.skip("a serial run writes no summary")
        inputs = [write_input(tmp_path / "a", "gpumatch_summary.json")]
        extra, clash = [], "gpumatch_summary.json"
    out = tmp_path / "out"
    code, _, err = run(capsys, "match", *inputs, "--reference", REF_SPEC, "--psf", PSF_SPEC,
                       "--output-dir", out, "--overwrite", *extra,
                       *(["--workers", "1"] if mode == "workers" else []))
    assert code == 2
    line = [x for x in err.splitlines() if "would both be written" in x]
    assert len(line) == 1 and clash in line[0] and inputs[-1] in line[0]
    assert not out.exists() or files_under(out) == []


# -- reading: planes of a primary-HDU image, CCDData files, TOML ----------------------------


def _planes(shape=(12, 10), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 5.0, shape).astype(np.float32)
    variance = rng.uniform(1.0, 9.0, shape).astype(np.float32)
    mask = (rng.random(shape) < 0.2).astype(np.int32) * 4
    return image, variance, mask


def test_primary_image_with_mask_and_variance_extensions(tmp_path, caplog):
    from astropy.io import fits

    image, variance, mask = _planes()
    path = tmp_path / "p.fits"
    fits.HDUList([fits.PrimaryHDU(image), fits.ImageHDU(mask, name="MASK"),
                  fits.ImageHDU(variance, name="VARIANCE")]).writeto(path)
    exposure = gm.Exposure.read_fits(path)
    np.testing.assert_array_equal(exposure.image, image)
    np.testing.assert_array_equal(exposure.variance, variance)
    np.testing.assert_array_equal(exposure.mask, mask)
    assert "plain image without" not in caplog.text


@pytest.mark.parametrize("kind", ["StdDevUncertainty", "VarianceUncertainty", "InverseVariance"])
def test_ccddata_file_mask_and_uncertainty(tmp_path, kind):
    nddata = pytest.importorskip("astropy.nddata")
    image, variance, mask = _planes(seed=1)
    uncert = {"StdDevUncertainty": nddata.StdDevUncertainty(np.sqrt(variance.astype(float))),
              "VarianceUncertainty": nddata.VarianceUncertainty(variance.astype(float)),
              "InverseVariance": nddata.InverseVariance(1.0 / variance.astype(float))}[kind]
    ccd = nddata.CCDData(image.astype(float), unit="adu", uncertainty=uncert, mask=mask > 0)
    path = tmp_path / "ccd.fits"
    ccd.write(path)
    exposure = gm.Exposure.read_fits(path)
    np.testing.assert_array_equal(exposure.image, image.astype(float))
    np.testing.assert_allclose(exposure.variance, variance, rtol=1e-6)
    bad = exposure.mask_planes["BAD"]
    np.testing.assert_array_equal(exposure.mask, (mask > 0).astype(int) << bad)


def test_toml_with_a_config_table_and_top_level_fields_is_refused(tmp_path, capsys):
    from gpumatch.pipeline import load_config

    cfg = tmp_path / "match.toml"
    cfg.write_text("kernelSize = 25\n\n[config]\nspatialKernelOrder = 1\n")
    with pytest.raises(gm.errors.ConfigError, match=r"\[config\] table and top-level fields "
                                                    r"\(kernelSize\)"):
        load_config(str(cfg))
    inp = write_input(tmp_path, "a.fits")
    code, _, err = run(capsys, "match", inp, "--reference", REF_SPEC, "--psf", PSF_SPEC,
                       "-o", tmp_path / "o.fits", "--config", cfg)
    assert code == 2 and str(cfg) in err and len(err.strip().splitlines()) == 1
    # Either place alone keeps every field.
    cfg.write_text("[config]\nkernelSize = 25\nspatialKernelOrder = 1\n")
    assert (load_config(str(cfg)).kernelSize, load_config(str(cfg)).spatialKernelOrder) == (25, 1)
    cfg.write_text("kernelSize = 25\nspatialKernelOrder = 1\n")
    assert (load_config(str(cfg)).kernelSize, load_config(str(cfg)).spatialKernelOrder) == (25, 1)


def test_set_takes_lower_case_booleans():
    from gpumatch.pipeline import load_config, parse_overrides

    assert parse_overrides(["scaleByFwhm=true", "doAutoPadPsf=False"]) == \
        {"scaleByFwhm": True, "doAutoPadPsf": False}
    assert load_config(None, parse_overrides(["scaleByFwhm=true"])).scaleByFwhm is True


@pytest.mark.parametrize("fraction", [0.2, 0.36, 0.45, 0.6, 0.95])
def test_truncated_exposure_is_reported_as_truncated(tmp_path, capsys, fraction, no_compute):
    full = write_input(tmp_path, "full.fits")
    data = open(full, "rb").read()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(gm.io.fits.FitsFormatError, match="is truncated"):
        gm.Exposure.read_fits(cut)
    code, _, err = run(capsys, "match", cut, "--reference", REF_SPEC, "--psf", PSF_SPEC,
                       "-o", tmp_path / "o.fits")
    assert code != 0
    line = [x for x in err.splitlines() if "truncated" in x]
    assert len(line) == 1 and str(cut) in line[0] and "variance=" not in err


# -- the command line -----------------------------------------------------------------------


def test_bare_psf_paths_are_read_by_extension(tmp_path, capsys):
    from test_psfex import _gauss, write_psfex

    inp = write_input(tmp_path, "a.fits")
    write_psfex(tmp_path / "model.psf", [_gauss(15, 1.6)], samp=1.0, degree=0)
    ref = _psf_image_file(tmp_path / "ref.fits", sigma=2.55, size=21)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for psf, reference, out in (("model.psf", "ref.fits", "bare.fits"),
                                    ("./model.psf", "./ref.fits", "dot.fits"),
                                    ("psfex:model.psf", "image:ref.fits", "prefixed.fits")):
            code, _, err = run(capsys, "match", inp, "--psf", psf, "--reference", reference,
                               "-o", out, "-q")
            assert code == 0, err
        code, _, err = run(capsys, "match", inp, "--psf", "model.txt", "--reference",
                           "ref.fits", "-o", "x.fits")
    finally:
        os.chdir(cwd)
    bare = gm.Exposure.read_fits(tmp_path / "bare.fits").image
    np.testing.assert_array_equal(bare, gm.Exposure.read_fits(tmp_path / "prefixed.fits").image)
    np.testing.assert_array_equal(bare, gm.Exposure.read_fits(tmp_path / "dot.fits").image)
    assert ref.shape == (21, 21)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.txt" in err and "psfex:PATH" in err and ".psf" in err


def test_backend_cupy_without_cupy_is_one_line(tmp_path, capsys, monkeypatch, no_compute):
    import gpumatch.backends as backends

    monkeypatch.setattr(backends, "cupy_status", lambda: (False, "cupy does not import"))
    inp = write_input(tmp_path, "a.fits")
    code, _, err = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                       "-o", tmp_path / "o.fits", backend="cupy")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--backend numpy" in err and "Traceback" not in err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    import gpumatch.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "match_file", interrupted)
    inp = write_input(tmp_path, "a.fits")
    code, _, err = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                       "--output-dir", tmp_path / "out")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert files_under(tmp_path / "out") == []  # the lock was released


def test_plots_without_matplotlib_fails_before_computing(tmp_path, capsys, monkeypatch,
                                                         no_compute):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    inp = write_input(tmp_path, "a.fits")
    for extra in ([], ["--workers", "1"]):
        code, _, err = run(capsys, "match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                           "--output-dir", tmp_path / "out", "--plots", tmp_path / "plots",
                           *extra)
        assert code == 2 and "needs matplotlib" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "plots").exists()


def test_version_verbosity_anywhere_help_and_python_m(tmp_path, capsys):
    import subprocess
    import sys

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"gpumatch {gm.__version__}"
    for argv in (["match", "--help"], ["--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "exit codes:" in text and "examples:" in text and "SPEC" not in text
    inp = write_input(tmp_path, "a.fits")
    for i, where in enumerate(("before", "after")):
        args = ["match", inp, "--psf", PSF_SPEC, "--reference", REF_SPEC, "--output-dir",
                tmp_path / f"o{i}", "--backend", "numpy"]
        argv = ["-q", *args] if where == "before" else [*args, "-q"]
        assert main([str(a) for a in argv]) == 0
        assert capsys.readouterr().out == ""  # quiet: no summary table
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "gpumatch", "--version"], cwd=root,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root))
    assert out.returncode == 0 and out.stdout.strip() == f"gpumatch {gm.__version__}"


def test_progress_bar_only_on_a_terminal(tmp_path, capsys):
    inputs = [write_input(tmp_path, f"{n}.fits", seed=i) for i, n in enumerate("ab")]
    code, _, err = run(capsys, "match", *inputs, "--psf", PSF_SPEC, "--reference", REF_SPEC,
                       "--output-dir", tmp_path / "out")
    assert code == 0 and "\r" not in err and "file/s" not in err


def test_readme_match_files_snippet_runs_under_a_main_guard():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    start = text.index("from gpumatch.distributed import match_files")
    snippet = text[start:text.index("```", start)]
    assert 'if __name__ == "__main__":' in snippet
    assert snippet.index("__main__") < snippet.index("match_files(")


def test_match_files_follows_header_cards_only_when_asked(tmp_path):
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from gpumatch.distributed import match_files

    _psf_image_file(tmp_path / "model_psf.fits", sigma=1.6)
    inp = write_input(tmp_path, "a.fits", meta={"PSF_FILE": "model_psf.fits"})
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                           dashboard_address=None)
    client = Client(cluster)
    try:
        off = match_files([inp], REF_SPEC, tmp_path / "off", client=client, backend="numpy",
                          progress=False)
        on = match_files([inp], REF_SPEC, tmp_path / "on", client=client, backend="numpy",
                         progress=False, psf_from_header=True)
    finally:
        client.close()
        cluster.close()
    assert off[0]["status"] == "failed" and "--psf-from-header" in off[0]["error"]
    assert on[0]["status"] == "ok", on[0]["error"]
    expected = gm.Exposure.read_fits(inp)
    expected.psf = gm.ImagePsf(_psf_image_file(tmp_path / "again_psf.fits", sigma=1.6))
    result = gm.ModelPsfMatchTask(backend="numpy").run(expected, gm.parse_psf(REF_SPEC))
    np.testing.assert_array_equal(gm.Exposure.read_fits(tmp_path / "on" / "a.fits").image,
                                  np.asarray(result.psfMatchedExposure.image))
