"""Exceptions raised by gpumatch.

Every error says what is wrong and how to fix it; all of them are raised before
any output is produced, except :class:`PoorMatchError`, which carries the
finished result.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = [
    "GpumatchError",
    "ConfigError",
    "MissingPsfError",
    "InsufficientAreaError",
    "KernelTooLargeError",
    "PsfEvaluationError",
    "SolutionError",
    "SelfCheckError",
    "PoorMatchError",
    "GpumatchWarning",
    "PoorMatchWarning",
    "ConditioningWarning",
    "InputWarning",
    "BackendWarning",
    "warn",
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


class PoorMatchError(GpumatchError, RuntimeError):
    """A match whose verdict is not ``"good"``, with ``on_poor_match="raise"``.

    The match was computed; the verdict (``metadata["matchQuality"]``, see
    :mod:`gpumatch.verdict`) says it does not reach the reference.

    Parameters
    ----------
    message : str
        The verdict's reason and what to do.
    result : ModelPsfMatchResult, optional
        Kept as :attr:`result`.

    Attributes
    ----------
    result : ModelPsfMatchResult
        The whole result, so that the caller can still inspect or use it.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class SelfCheckError(GpumatchError, RuntimeError):
    """A GPU backend disagrees with NumPy or with a known answer (gpumatch/selftest.py).

    Parameters
    ----------
    message : str
        What disagreed, and what to do.
    report : gpumatch.selftest.SelfCheckReport, optional
        Kept as the ``report`` attribute.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


# -- warnings ------------------------------------------------------------------
# Anything that changes a user's data or result is a warning of one of these
# classes (so notebooks, pytest and ``warnings.filterwarnings`` see it) as well
# as a line in the ``gpumatch`` log; :func:`warn` does both.


class GpumatchWarning(UserWarning):
    """Base class of every gpumatch warning."""


class PoorMatchWarning(GpumatchWarning):
    """A match was computed but does not reach the reference (see the verdict)."""


class ConditioningWarning(GpumatchWarning):
    """The spatial system is conditioned badly enough to threaten the solution."""


class InputWarning(GpumatchWarning):
    """Input data was defaulted, ignored, resized or reinterpreted."""


class BackendWarning(GpumatchWarning):
    """A backend did not behave as expected and another one was used."""


def warn(message: str, category: type[Warning] = GpumatchWarning,
         logger: logging.Logger | None = None, stacklevel: int = 2) -> None:
    """Log ``message`` as a warning and emit it with :func:`warnings.warn`.

    Parameters
    ----------
    message : str
        One line: what changed and what to do about it.
    category : type
        A :class:`GpumatchWarning` subclass.
    logger : logging.Logger, optional
        Default: the ``gpumatch`` logger.
    stacklevel : int
        As for :func:`warnings.warn`, counted from the caller of this function.
    """
    import warnings

    (logger or logging.getLogger("gpumatch")).warning("%s", message)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
