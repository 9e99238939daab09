"""The shared docstring sections of :mod:`gpumatch._docstrings`: filled in where
they are named, indented like the line that names them, and nowhere left unfilled
in the public API that numpydoc checks."""

from __future__ import annotations

import inspect
import re

import pytest

import gpumatch
from gpumatch._docstrings import SECTIONS, fill_docstring, fill_docstrings

from test_style import public_api


def test_a_named_section_is_filled_with_the_line_s_indent():
    doc = "Summary.\n\n        {position}\n        normalize : bool\n            Scale.\n"
    assert fill_docstring(doc) == (
        "Summary.\n\n        Parameters\n        ----------\n        x, y : float\n"
        "            Parent position in pixels.\n        normalize : bool\n            Scale.\n")
    # Braces that are not a whole line are text, not fields.
    assert fill_docstring("``{name: value}`` and {position} inline") == \
        "``{name: value}`` and {position} inline"
    assert fill_docstring(None) is None


def test_an_unknown_section_is_an_error_naming_it():
    with pytest.raises(KeyError, match="positon"):
        fill_docstring("Summary.\n\n    {positon}\n")


def test_the_decorator_fills_a_class_and_its_methods():
    @fill_docstrings
    class Model:
        """A model.

        {positions}
        """

        def at(self, x, y):
            """Value at ``(x, y)``.

            {position}
            """

        @classmethod
        def many(cls, xs, ys):
            """Values at many positions.

            {positions}
            """

    assert "xs, ys : array_like (n,)\n            Parent positions in pixels." in Model.__doc__
    assert inspect.getdoc(Model.at).splitlines()[2:6] == [
        "Parameters", "----------", "x, y : float", "    Parent position in pixels."]
    assert "{positions}" not in Model.many.__doc__


def test_psf_models_get_the_sections_and_inherit_documented_contracts():
    for name in ("position", "positions", "position_or_average"):
        assert SECTIONS[name].startswith("Parameters\n----------\n")
    doc = inspect.getdoc(gpumatch.GaussianPsf.compute_kernel_image)
    assert "x, y : float\n    Parent position in pixels." in doc
    assert gpumatch.GaussianPsf.resized.__doc__ == gpumatch.Psf.resized.__doc__
    assert "Parent positions in pixels." in gpumatch.PsfexPsf.coefficients.__doc__


def test_no_public_docstring_keeps_an_unfilled_section():
    field = re.compile(r"^\s*\{\w+\}\s*$", re.MULTILINE)
    left = []
    for path in public_api():
        obj = gpumatch
        for part in path.split(".")[1:]:
            obj = getattr(obj, part)
        if field.search(inspect.getdoc(obj) or ""):
            left.append(path)
    assert not left, f"docstrings with an unfilled {{section}} line: {left}"
