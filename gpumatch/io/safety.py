"""Reading files that a data file names: confined, regular, size-capped.

A FITS header is data, not configuration: a card that names a file must not
make gpumatch open an arbitrary path (``/etc/passwd``, ``/dev/zero``, a FIFO
that blocks for ever). :func:`confined_file` accepts only a relative path that
stays inside a given directory and names a regular file of bounded size, and
refuses everything else with one wording, so the refusal does not reveal
which files exist.
"""

from __future__ import annotations

import os
import stat

__all__ = ["confined_file", "MAX_NAMED_FILE_BYTES", "UnsafePathError"]

#: Largest file a header card may make gpumatch read (PSFEx models are ~100 KiB).
MAX_NAMED_FILE_BYTES = 64 * 1024 * 1024


class UnsafePathError(PermissionError):
    """A file named inside a data file is not one gpumatch will read."""


def confined_file(directory, name, max_bytes=MAX_NAMED_FILE_BYTES):
    """The path of ``name`` inside ``directory`` if it is safe to read, else None.

    Safe means: ``name`` is a non-empty relative path without ``..``
    components; the file it names, after symbolic links are resolved, lies
    inside ``directory`` (resolved too), is a regular file and holds at most
    ``max_bytes`` bytes.

    Returns
    -------
    str or None
        The path to open; None for every refusal alike (the caller words it
        once, whatever the reason).
    """
    name = str(name).strip()
    if not name or "\x00" in name or os.path.isabs(name) or name.startswith("~"):
        return None
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return None
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, name))
    try:
        if os.path.commonpath([root, target]) != root:
            return None
        st = os.stat(target)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        return None
    return target
