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


def test_wheel_ships_subpackages_and_cuda_sources(tmp_path):
    """Build the wheel and look inside: kernels/*.cu become gpumatch/kernels/."""
    import subprocess
    import zipfile

    pytest.importorskip("setuptools")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), ROOT], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip()[-300:]}")
    (wheel,) = tmp_path.glob("gpumatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    cu = sorted(n for n in os.listdir(os.path.join(ROOT, "kernels")) if n.endswith(".cu"))
    assert cu, "no CUDA sources in kernels/"
    for n in cu:
        assert f"gpumatch/kernels/{n}" in names
    for module in ("gpumatch/io/fits.py", "gpumatch/cuda/module.py", "gpumatch/psf/psfex.py"):
        assert module in names
