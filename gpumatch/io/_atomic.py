"""Atomic file output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import stat

__all__ = ["atomic_write", "check_output_path", "check_directory_writable", "temporary_owner"]

#: ``{host}-{pid}`` of this process in the names of its temporary files, so that a
#: sweep of stale temporaries can tell which writer (and so which run) made each.
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
_OWNER = re.compile(r"\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[0-9a-f]+\.tmp")


def _owner_tag():
    return f"{_HOST}-{os.getpid()}"  # the pid at call time: forked workers differ


def temporary_owner(name):
    """``(host, pid)`` of the process that created temporary file ``name``, or None
    for a name without them (written by an older gpumatch)."""
    m = _OWNER.search(os.path.basename(name))
    return None if m is None else (m.group("host"), int(m.group("pid")))


def owner_alive(name):
    """Whether the writer of temporary file ``name`` is a live process on this host
    (other than this one): its file may be in flight and must not be swept."""
    owner = temporary_owner(name)
    if owner is None or owner[0] != _HOST or owner[1] == os.getpid():
        return False
    try:
        os.kill(owner[1], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
    """Create an empty ``.{base}.{host}-{pid}.{token}.tmp{suffix}`` beside ``path``;
    return its name.

    Created with mode 0o666 so the kernel applies the process umask, as for any
    new file: reading the umask (``os.umask``) would change it process-wide for
    a moment, which races with other threads. The suffix keeps the target's
    extension for writers that infer the format from it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    base, suffix = os.path.basename(path), ".tmp" + _suffixes(path)
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{_owner_tag()}.{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file for {path} in {directory}")


def check_directory_writable(directory, what="file"):
    """Refuse a ``directory`` this process cannot create files in, before any work.

    ``os.access`` asks the kernel, so a read-only mount and a directory
    without write or search permission are both seen.

    Raises
    ------
    PermissionError
        ``directory`` is not writable.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write {what} in {directory}: the directory is not writable (read-only or "
            "no permission); choose another output directory (--output-dir DIR or -o FILE)")
    return directory


def check_output_path(path, overwrite, what="file"):
    """Validate an output path before any work is done.

    Only regular files are ever written or replaced: an existing path that is
    anything else (a device node, a FIFO, a socket, a directory) is refused
    even with ``overwrite``, so ``-o /dev/null --overwrite`` cannot replace a
    device with a file.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False, or it exists and is not a
        regular file.
    FileNotFoundError
        The directory that should hold ``path`` does not exist.
    IsADirectoryError
        ``path`` is a directory.
    PermissionError
        The directory that should hold ``path`` is not writable.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {what} {path}: it is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"cannot write {what} {path}: directory {directory} does not exist; create it first")
    try:
        mode = os.stat(path).st_mode  # follows a symbolic link to what it names
    except FileNotFoundError:
        mode = None  # nothing there, or a dangling link (replaced, not followed)
    if mode is not None and not stat.S_ISREG(mode):
        raise FileExistsError(
            f"cannot write {what} {path}: it exists and is not a regular file (a device, FIFO "
            "or socket), so it is never replaced, even with --overwrite; choose another name")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True (or --overwrite) to replace it, "
            "or choose another name")
    check_directory_writable(directory, what)
    return path


def _fsync_directory(directory):
    """Make a rename in ``directory`` durable (POSIX: the entry lives in the directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # file systems that do not support it
        pass
    finally:
        os.close(fd)


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
    _fsync_directory(os.path.dirname(os.path.abspath(path)))
    return path
