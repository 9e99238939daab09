"""One run per output directory, and output names that cannot collide.

:func:`run_lock` holds ``DIR/.gpumatch.lock`` (the owner's pid, host and start
time) for the length of a run, so two runs never write into one directory at
once (one's sweep of stale temporary files could otherwise delete the other's
file in flight). A lock whose owner is gone (same host, no such process) is
stale: it is replaced, with a warning. :func:`check_output_names` refuses,
before any work, a set of inputs whose outputs would overwrite each other.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket

from ..errors import GpumatchError

__all__ = ["LOCK_NAME", "RunLockedError", "run_lock", "check_output_names"]

#: Lock file a run holds in its output directory.
LOCK_NAME = ".gpumatch.lock"


class RunLockedError(GpumatchError, FileExistsError):
    """Another gpumatch run is writing into the same output directory."""


def _read_owner(path):
    try:
        with open(path) as fh:
            owner = json.load(fh)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _owner_gone(owner):
    """Whether the lock's owner is known to have ended (same host, no such process)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False  # another machine's run, or a lock being written: cannot tell
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's live process
        return False
    return False


def _take_over_stale(path, owner):
    """Move a stale lock aside atomically; True if it was the one seen (so it is gone)."""
    aside = f"{path}.stale.{secrets.token_hex(4)}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # someone else removed it: try again
    if _read_owner(aside) == owner:
        os.unlink(aside)
        return True
    # Another run replaced the stale lock with its own meanwhile: put that back.
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)
    os.unlink(aside)
    return False


@contextlib.contextmanager
def run_lock(directory):
    """Hold ``directory``'s run lock for the ``with`` block.

    Raises
    ------
    RunLockedError
        Another live run holds it (its pid and host are named).
    """
    from ..errors import GpumatchWarning, warn
    from ._atomic import check_directory_writable

    directory = os.fspath(directory)
    # Said about the directory, not about the hidden lock file it cannot hold.
    check_directory_writable(directory, "outputs")
    path = os.path.join(directory, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "token": secrets.token_hex(8)}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            if _owner_gone(owner):
                if _take_over_stale(path, owner):
                    warn(f"{path}: removed the stale lock of a gpumatch run that is gone (pid "
                         f"{owner.get('pid')} on {owner.get('host')}, started "
                         f"{owner.get('started')})", GpumatchWarning)
                continue
            who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
                   if owner else "a run starting now")
            raise RunLockedError(
                f"{directory} is in use by another gpumatch run ({who}); wait for it to end, "
                f"choose another output directory, or remove {path} if that run is gone") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:  # pragma: no cover - five stale takeovers raced away
        raise RunLockedError(f"{directory}: could not take the run lock {path}; try again")
    try:
        yield path
    finally:
        if _read_owner(path) == me:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def check_output_names(inputs, outputs, kernels=(), summary=None):
    """Refuse, before any work, outputs that would overwrite each other.

    Parameters
    ----------
    inputs, outputs : sequences of path
        Each input and its matched exposure's path.
    kernels : sequence of path
        The ``--save-kernel`` files (one per input), if any.
    summary : path, optional
        The run's summary file.

    Raises
    ------
    ValueError
        Two files of the run would have one path (names both inputs).
    """
    written = {}

    def claim(path, what):
        key = os.path.normcase(os.path.abspath(path))
        if key in written:
            raise ValueError(
                f"{written[key]} and {what} would both be written to {path}; rename an input "
                "or write to another --output-dir")
        written[key] = what

    if summary is not None:
        claim(summary, "the run's summary")
    for i, (inp, out) in enumerate(zip(inputs, outputs)):
        claim(out, f"the output of {inp}")
        if i < len(kernels):
            claim(kernels[i], f"the kernel of {inp} (--save-kernel)")
