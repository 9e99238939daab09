"""Hostile files, shared machines and the command line.

Outputs are only ever regular files; header-named PSF files are opt-in and
confined; local clusters listen on the loopback with TLS; sizes are bounded
before anything is allocated; one run per output directory.
"""

import os
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
    assert ".tmp" not in err  # the hidden temporary is not what the message names
    assert os.listdir(outdir) == []


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
