"""Atomic file output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets

__all__ = ["atomic_write", "check_output_path"]


def _suffixes(name):
    """Extensions that select an on-disk format (``.fits``, ``.fits.gz``)."""
    base = os.path.basename(name)
    parts = base.split(".")
    if len(parts) <= 1:
        return ""
    tail = parts[-1].lower()
    if tail in ("gz", "bz2", "xz", "zip") and len(parts) > 2:
        return "." + ".".join(parts[-2:])
    return "." + parts[-1]


def _create_temporary(path):
    """Create an empty ``.{base}.{token}.tmp{suffix}`` beside ``path``; return its name.

    Created with mode 0o666 so the kernel applies the process umask, as for any
    new file: reading the umask (``os.umask``) would change it process-wide for
    a moment, which races with other threads. The suffix keeps the target's
    extension for writers that infer the format from it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    base, suffix = os.path.basename(path), ".tmp" + _suffixes(path)
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file for {path} in {directory}")


def check_output_path(path, overwrite, what="file"):
    """Validate an output path before any work is done.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    FileNotFoundError
        The directory that should hold ``path`` does not exist.
    IsADirectoryError
        ``path`` is a directory.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {what} {path}: it is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"cannot write {what} {path}: directory {directory} does not exist; create it first")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True (or --overwrite) to replace it, "
            "or choose another name")
    return path


def atomic_write(path, writer, overwrite=False, what="file"):
    """Create ``path`` atomically.

    ``writer(tmp_path)`` writes the complete file to a temporary path in the
    same directory (same file system); only when it returns is the file moved
    into place, with ``os.replace`` when ``overwrite`` is True and with a hard
    link (which refuses to replace anything) otherwise. On any failure the
    temporary file is removed and an existing ``path`` is left untouched.
    """
    path = check_output_path(path, overwrite, what)
    tmp = _create_temporary(path)
    try:
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(
                    f"{path} appeared while it was being written; pass overwrite=True to "
                    "replace it") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                     errno.EMLINK):
                    raise
                # File systems without hard links: check, then rename.
                if os.path.lexists(path):
                    raise FileExistsError(
                        f"{path} already exists; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path
