"""Docstring sections that many public methods share, written once.

Positions (parent pixel coordinates) are documented the same way by the PSF
models and the spatial kernel. A docstring names one of the :data:`SECTIONS`
by a line holding only ``{name}``; :func:`fill_docstrings` replaces that line
with the section, indented as the line was, when the class or function is
defined, so :func:`help`, Sphinx and numpydoc read the complete text
(:class:`~gpumatch.psf.Psf` fills its subclasses' docstrings itself). This
module imports nothing from gpumatch, so any module above
:mod:`gpumatch.pixels` (which imports no other module) may use it.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

__all__ = ["SECTIONS", "fill_docstring", "fill_docstrings"]

#: Shared docstring sections by name. Each opens its docstring's Parameters
#: section (the header included), so the method's own parameters follow it.
SECTIONS = {
    "position": """\
Parameters
----------
x, y : float
    Parent position in pixels.""",
    "position_or_average": """\
Parameters
----------
x, y : float, optional
    Parent position in pixels (default: :attr:`average_position`).""",
    "positions": """\
Parameters
----------
xs, ys : array_like (n,)
    Parent positions in pixels.""",
    "position_or_positions": """\
Parameters
----------
x, y : float or array_like
    Parent position(s) in pixels.""",
}

_FIELD = re.compile(r"^([ \t]*)\{(\w+)\}[ \t]*$", re.MULTILINE)


def fill_docstring(doc: str | None) -> str | None:
    """Replace every line ``{name}`` of ``doc`` by ``SECTIONS[name]``, indented alike.

    Parameters
    ----------
    doc : str or None
        A docstring as written in the source (None passes through).

    Returns
    -------
    str or None
        The docstring with its shared sections filled in.

    Raises
    ------
    KeyError
        A ``{name}`` line names no section (a typo would otherwise reach the
        user's help text).
    """
    if doc is None:
        return None

    def section(match):
        indent, name = match.groups()
        if name not in SECTIONS:
            raise KeyError(f"docstring field {{{name}}} names no section of "
                           f"gpumatch._docstrings.SECTIONS ({', '.join(SECTIONS)})")
        return "\n".join(indent + line if line else line
                         for line in SECTIONS[name].splitlines())

    return _FIELD.sub(section, doc)


def fill_docstrings(obj: Any) -> Any:
    """Fill the shared sections of a function's or a class's docstrings (a decorator).

    Parameters
    ----------
    obj : function or class
        For a class, its own docstring and those of the methods, class and
        static methods it defines are filled.

    Returns
    -------
    function or class
        ``obj`` itself, its docstrings filled in place.
    """
    targets = [obj]
    if inspect.isclass(obj):
        for value in vars(obj).values():
            if isinstance(value, (classmethod, staticmethod)):
                value = value.__func__
            if inspect.isfunction(value):
                targets.append(value)
    for target in targets:
        if target.__doc__ is not None:
            target.__doc__ = fill_docstring(target.__doc__)
    return obj
