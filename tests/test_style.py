"""Style checks run by the test command: ruff over the repository and numpydoc
over the public API.

* ``python -m ruff check`` with the configuration in ``pyproject.toml``
  (``[tool.ruff]``: pycodestyle E/W, pyflakes F, bugbear B, pyupgrade UP at
  110 columns).
* :func:`numpydoc.validate.validate` on every object of ``gpumatch.__all__``
  and the public methods and properties its classes define, for the checks in
  :data:`CHECKS`: every public object has a docstring whose summary is one
  capitalised line ending in a period, in the imperative or a noun phrase;
  every parameter is documented, with a type and a description, in signature
  order; and whatever returns a value has a described Returns section.

Both skip, saying why, where ruff or numpydoc is not installed (``pip install
-e .[test]`` installs them).
"""

from __future__ import annotations

import importlib.util
import inspect
import pathlib
import subprocess
import sys

import pytest

import gpumatch

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: The numpydoc checks the public API passes (numpydoc's codes):
#: GL08 a docstring; SS01-SS06 a one-line summary, capitalised, ending in a
#: period, not starting with the object's name or a third-person verb, on the
#: line after the quotes; PR01 every parameter documented, PR02 none unknown,
#: PR03 in signature order, PR04 each with a type, PR06 spelled ``int``/``str``/
#: ``bool``, PR07 each with a description; RT01 a Returns section where the
#: code returns a value, RT03 described.
CHECKS = frozenset({"GL08", "SS01", "SS02", "SS03", "SS04", "SS05", "SS06",
                    "PR01", "PR02", "PR03", "PR04", "PR06", "PR07", "RT01", "RT03"})

#: Public objects not checked (none: the whole public API passes).
NOT_YET = frozenset()


def _needs(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install {module}, or pip install -e .[test])")


def public_api():
    """Import paths of the public objects numpydoc checks: ``gpumatch.__all__``
    (functions and classes; data such as DEFAULT_MASK_PLANES has no docstring of
    its own) and the public methods and properties each class defines."""
    names = []
    for name in gpumatch.__all__:
        obj = getattr(gpumatch, name)
        if name in NOT_YET or not (inspect.isclass(obj) or callable(obj)):
            continue
        names.append(f"gpumatch.{name}")
        if inspect.isclass(obj):
            names += [f"gpumatch.{name}.{attr}" for attr, value in vars(obj).items()
                      if not attr.startswith("_") and (
                          callable(value) or isinstance(value, (property, classmethod,
                                                                staticmethod)))]
    return names


def test_ruff_passes():
    _needs("ruff")
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                          "--output-format", "concise", str(ROOT)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, (
        "ruff found problems (fix them, or run `python -m ruff check --fix`):\n"
        + res.stdout[-6000:] + res.stderr[-2000:])


def test_public_api_covers_the_package():
    names = public_api()
    assert "gpumatch.GaussianPsf.compute_kernel_images" in names
    assert "gpumatch.Exposure.read_fits" in names and "gpumatch.SpatialKernel.compute_image" in names
    assert len(names) > 80


def test_numpydoc_public_api():
    _needs("numpydoc")
    from numpydoc.validate import validate

    problems = []
    for name in public_api():
        for code, message in validate(name)["errors"]:
            if code in CHECKS:
                problems.append(f"{name}: {code} {message}")
    assert not problems, "\n".join(problems)


def _returns_a_value(x, y):
    """computes things"""
    return x + y


def _documented(x):
    """Double a number.

    Parameters
    ----------
    x : float
        The number, pixels.

    Returns
    -------
    float
        ``2 x``.
    """
    return 2 * x


def test_numpydoc_check_catches_a_bad_docstring():
    """The check is not vacuous: a docstring missing what CHECKS ask for fails it."""
    _needs("numpydoc")
    from numpydoc.validate import validate

    def codes(name):
        return {c for c, _ in validate(f"{__name__}.{name}")["errors"]} & CHECKS

    assert {"SS02", "SS03", "PR01", "RT01"} <= codes("_returns_a_value")
    assert codes("_documented") == set()
