"""The installed package must contain every subpackage and the CUDA sources."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_subpackage_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "gpumatch")):
        if "__init__.py" in files and "__pycache__" not in dirpath:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


def test_cuda_sources_are_package_data():
    cfg = _pyproject()["tool"]["setuptools"]
    assert cfg["package-dir"]["gpumatch.kernels"] == "kernels"
    assert "*.cu" in cfg["package-data"]["gpumatch.kernels"]
    from importlib import resources

    names = [p.name for p in resources.files("gpumatch.kernels").iterdir()]
    assert any(n.endswith(".cu") for n in names), names
