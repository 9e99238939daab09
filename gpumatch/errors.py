"""Exceptions raised by gpumatch.

Every error says what is wrong and how to fix it; all of them are raised before
any output is produced.
"""

__all__ = [
    "GpumatchError",
    "ConfigError",
    "MissingPsfError",
    "InsufficientAreaError",
    "KernelTooLargeError",
    "PsfEvaluationError",
    "SolutionError",
]


class GpumatchError(Exception):
    """Base class of every gpumatch error."""


class ConfigError(GpumatchError, ValueError):
    """A configuration field has an invalid value."""


class MissingPsfError(GpumatchError, RuntimeError):
    """The exposure has no PSF model attached."""


class InsufficientAreaError(GpumatchError, ValueError):
    """The exposure is too small for even one spatial cell."""


class KernelTooLargeError(GpumatchError, ValueError):
    """The matching kernel does not fit inside the (padded) PSF stamps."""


class PsfEvaluationError(GpumatchError, RuntimeError):
    """A PSF model could not be evaluated (exception, NaN, even or empty stamp)."""


class SolutionError(GpumatchError, RuntimeError):
    """The kernel solution is not finite."""
