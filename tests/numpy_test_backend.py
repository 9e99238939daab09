"""A backend added the way a new one is: this module and one registry line.

It is NumPy under another name (tests/test_backends.py registers it as
``"numpy-test"``), so its results must equal the NumPy backend's bit for bit.
"""

from gpumatch.backends.numpy_backend import NumpyBackend


class NumpyTestBackend(NumpyBackend):
    """NumPy, registered under another name."""

    name = "numpy-test"
