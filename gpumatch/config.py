"""Configuration of the model-to-model PSF matching task.

Field names follow LSST's ``ModelPsfMatchConfig`` so that existing
configurations carry over unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["ModelPsfMatchConfig"]


def _as_tuple(value, kind, name):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a sequence of {kind.__name__}, got {value!r}")
    try:
        return tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a sequence of {kind.__name__}, got {value!r}") from None


@dataclass
class ModelPsfMatchConfig:
    """Configuration of :class:`~gpumatch.ModelPsfMatchTask` (docs/algorithm.md section 2).

    Values are checked on construction and again by :meth:`validate`, which the
    task calls before every run; a bad value raises :class:`ConfigError` naming
    the field.

    Parameters
    ----------
    kernelBasisSet : str
        Kernel basis: Alard-Lupton (default "alard-lupton").
    kernelSize : int
        Kernel size in pixels (odd, >= 3) (default 21).
    scaleByFwhm : bool
        Choose basis widths and kernel size from the PSF FWHMs (default False).
    kernelSizeFwhmScaling : float
        Kernel size = this x the widest basis sigma, with ``scaleByFwhm`` (default 6.0).
    kernelSizeMin, kernelSizeMax : int
        Bounds of the scaled kernel size (default 21 / 35).
    alardNGauss : int
        Number of Gaussians (default 3).
    alardSigGauss : tuple
        Gaussian widths in pixels (default (0.7, 1.5, 3.0)).
    alardDegGauss : tuple
        Polynomial degree per Gaussian (default (4, 2, 2)).
    alardGaussBeta : float
        Width ratio of successive Gaussians, with ``scaleByFwhm`` (default 2.0).
    alardMinSig, alardMinSigDeconv : float
        Smallest width when convolving / deconvolving (default 0.7 / 0.4).
    spatialModelType : str
        ``"chebyshev1"`` or ``"polynomial"`` (default "chebyshev1").
    spatialKernelOrder : int
        Order of the spatial variation (default 2).
    fitForBackground : bool
        Fit a background too; model matching has none (default False).
    spatialBgOrder : int
        Order of that background (default 1; unused).
    sizeCellX, sizeCellY : int
        Cell size in pixels; one candidate per cell (default 128 / 128).
    constantVarianceWeighting : bool
        Constant weights in the fit (default True).
    conditionNumberType : str
        ``"EIGENVALUE"`` or ``"SVD"`` (default "EIGENVALUE").
    maxSpatialConditionNumber : float
        Log (INFO) above this raw condition number; the warning is on the
        equilibrated system (default 1e10).
    maxMatchedPsfResidual : float
        Worst matched-PSF relative L2 residual of a good match (default 0.01).
    maxFwhmError : float
        Worst relative FWHM error of the matched PSF in a good match (default 0.01).
    doAutoPadPsf : bool
        Pad PSF stamps to ``autoPadPsfTo`` x kernelSize (default True).
    autoPadPsfTo : float
        PSF stamp size over kernel size, in [1.0, 2.0] (default 1.4).
    padPsfBy : int
        Fixed (even) padding when ``doAutoPadPsf`` is False (default 0).
    """

    kernelBasisSet: str = "alard-lupton"
    kernelSize: int = 21
    scaleByFwhm: bool = False
    kernelSizeFwhmScaling: float = 6.0
    kernelSizeMin: int = 21
    kernelSizeMax: int = 35
    alardNGauss: int = 3
    alardSigGauss: tuple = (0.7, 1.5, 3.0)
    alardDegGauss: tuple = (4, 2, 2)
    alardGaussBeta: float = 2.0
    alardMinSig: float = 0.7
    alardMinSigDeconv: float = 0.4
    spatialModelType: str = "chebyshev1"
    spatialKernelOrder: int = 2
    fitForBackground: bool = False
    spatialBgOrder: int = 1
    sizeCellX: int = 128
    sizeCellY: int = 128
    constantVarianceWeighting: bool = True
    conditionNumberType: str = "EIGENVALUE"
    maxSpatialConditionNumber: float = 1e10
    maxMatchedPsfResidual: float = 0.01
    maxFwhmError: float = 0.01
    doAutoPadPsf: bool = True
    autoPadPsfTo: float = 1.4
    padPsfBy: int = 0

    def __post_init__(self):
        self.validate()

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all configuration fields, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> ModelPsfMatchConfig:
        """Build a config from a mapping, rejecting unknown names helpfully.

        Parameters
        ----------
        values : mapping
            Field name to value (lists for tuple fields are accepted).

        Returns
        -------
        ModelPsfMatchConfig
            The validated configuration.
        """
        names = cls.field_names()
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"unknown configuration field {key!r}.{hint} "
                    f"Valid fields: {', '.join(names)}"
                )
        return cls(**values)

    @classmethod
    def for_psfs(cls, exposure_psf: Any, reference: Any, *, bbox: Any = None,
                 **overrides: Any) -> ModelPsfMatchConfig:
        """Recommended settings for matching ``exposure_psf`` to ``reference``.

        Kernel size, stamp padding, basis widths and degrees are chosen from
        the two PSFs (measured over the detector, wings included) so that the
        match reaches a worst matched-PSF residual of 1% and FWHM within 1%
        with as little added noise as the match needs; see
        :mod:`gpumatch.recommend`. ``ModelPsfMatchConfig()`` keeps LSST's
        defaults instead.

        Parameters
        ----------
        exposure_psf, reference : Psf
            The exposure's PSF and the PSF to match it to.
        bbox : Box, optional
            The detector area (parent pixels); default: the PSF model's own
            domain where it has one.
        **overrides
            Configuration fields applied on top of the recommendation.

        Returns
        -------
        ModelPsfMatchConfig
            With ``recommendation`` (:class:`gpumatch.recommend.Recommendation`):
            the residual, FWHM ratio and noise gain it expects. When no kernel up
            to ``kernelSizeMax`` reaches the target, a ``PoorMatchWarning`` says so.
        """
        from .recommend import recommend_config

        return recommend_config(cls, exposure_psf, reference, bbox, overrides)

    def to_dict(self) -> dict:
        """Plain dict of the field values (tuples as lists).

        Returns
        -------
        dict
            Field name to value, in declaration order.
        """
        out = {}
        for name in self.field_names():
            v = getattr(self, name)
            out[name] = list(v) if isinstance(v, tuple) else v
        return out

    def copy(self, **changes: Any) -> ModelPsfMatchConfig:
        """A validated copy with some fields changed.

        Parameters
        ----------
        **changes
            Field names and their new values.

        Returns
        -------
        ModelPsfMatchConfig
            The copy; this configuration is unchanged.
        """
        return dataclasses.replace(self, **changes)

    def validate(self) -> ModelPsfMatchConfig:
        """Check every field; raise :class:`ConfigError` naming the first bad one.

        Returns
        -------
        ModelPsfMatchConfig
            This configuration, normalised (tuples, ints, floats).
        """

        def need(cond, name, what):
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: {what}")

        def as_int(name):
            v = getattr(self, name)
            ok = isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer())
            if isinstance(v, bool) or not ok:
                raise ConfigError(f"{name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
            return int(v)

        def as_float(name):
            v = getattr(self, name)
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a number, got {v!r}") from None
            if isinstance(v, bool) or not math.isfinite(fv):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, fv)
            return fv

        def as_bool(name):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ConfigError(f"{name} must be True or False, got {v!r}")
            return v

        basis = str(self.kernelBasisSet).lower()
        if basis == "delta-function":
            raise ConfigError(
                "kernelBasisSet='delta-function' is not implemented in gpumatch; "
                "use kernelBasisSet='alard-lupton'"
            )
        need(basis == "alard-lupton", "kernelBasisSet", "must be 'alard-lupton'")
        self.kernelBasisSet = basis

        k = as_int("kernelSize")
        need(k >= 3 and k % 2 == 1, "kernelSize", "must be an odd integer >= 3 (e.g. 21)")
        as_bool("scaleByFwhm")
        need(as_float("kernelSizeFwhmScaling") >= 1.0, "kernelSizeFwhmScaling", "must be >= 1")
        kmin = as_int("kernelSizeMin")
        kmax = as_int("kernelSizeMax")
        need(kmin >= 3, "kernelSizeMin", "must be >= 3")
        need(kmax >= kmin, "kernelSizeMax", f"must be >= kernelSizeMin ({kmin})")

        n = as_int("alardNGauss")
        need(n >= 1, "alardNGauss", "must be >= 1")
        self.alardSigGauss = _as_tuple(self.alardSigGauss, float, "alardSigGauss")
        self.alardDegGauss = _as_tuple(self.alardDegGauss, int, "alardDegGauss")
        need(
            len(self.alardSigGauss) == n,
            "alardSigGauss",
            f"has {len(self.alardSigGauss)} entries but alardNGauss={n}; give one width per Gaussian",
        )
        need(
            len(self.alardDegGauss) == n,
            "alardDegGauss",
            f"has {len(self.alardDegGauss)} entries but alardNGauss={n}; give one degree per Gaussian",
        )
        need(all(s > 0 and math.isfinite(s) for s in self.alardSigGauss), "alardSigGauss",
             "widths must be positive (pixels)")
        need(all(d >= 0 for d in self.alardDegGauss), "alardDegGauss", "degrees must be >= 0")
        need(as_float("alardGaussBeta") >= 0, "alardGaussBeta", "must be >= 0")
        need(as_float("alardMinSig") >= 0.25, "alardMinSig", "must be >= 0.25 pixels")
        need(as_float("alardMinSigDeconv") >= 0.25, "alardMinSigDeconv", "must be >= 0.25 pixels")

        smt = str(self.spatialModelType).lower()
        need(smt in ("chebyshev1", "polynomial"), "spatialModelType",
             "must be 'chebyshev1' or 'polynomial'")
        self.spatialModelType = smt
        need(as_int("spatialKernelOrder") >= 0, "spatialKernelOrder", "must be >= 0")
        need(not as_bool("fitForBackground"), "fitForBackground",
             "background fitting is not part of model-to-model matching (PSF models "
             "have no sky); set fitForBackground=False")
        need(as_int("spatialBgOrder") >= 0, "spatialBgOrder", "must be >= 0")
        need(as_int("sizeCellX") >= 32, "sizeCellX", "must be >= 32 pixels")
        need(as_int("sizeCellY") >= 32, "sizeCellY", "must be >= 32 pixels")
        as_bool("constantVarianceWeighting")
        cnt = str(self.conditionNumberType).upper()
        need(cnt in ("EIGENVALUE", "SVD"), "conditionNumberType", "must be 'EIGENVALUE' or 'SVD'")
        self.conditionNumberType = cnt
        need(as_float("maxSpatialConditionNumber") > 0, "maxSpatialConditionNumber", "must be > 0")
        # The verdict's thresholds (gpumatch.verdict): relative, so 0.01 is 1%.
        need(as_float("maxMatchedPsfResidual") > 0, "maxMatchedPsfResidual",
             "must be > 0 (a relative L2 residual, e.g. 0.01)")
        need(as_float("maxFwhmError") > 0, "maxFwhmError",
             "must be > 0 (a relative FWHM error, e.g. 0.01)")
        as_bool("doAutoPadPsf")
        need(1.0 <= as_float("autoPadPsfTo") <= 2.0, "autoPadPsfTo", "must lie in [1.0, 2.0]")
        need(as_int("padPsfBy") >= 0, "padPsfBy", "must be >= 0")
        # An odd padPsfBy is reported when the cell set is built (docs/algorithm.md section 3),
        # because it only matters when doAutoPadPsf is False.
        self._check_limits()
        return self

    def _check_limits(self):
        """Bound every field that drives memory (:data:`gpumatch.limits.LIMITS`)."""
        from .limits import LIMITS

        for name, limit in LIMITS.items():
            value = getattr(self, name, None)
            if value is None:
                continue
            values = value if isinstance(value, tuple) else (value,)
            if max(values) > limit:
                raise ConfigError(
                    f"{name}={value!r} is invalid: must be at most {limit} (larger values need "
                    "more memory than any PSF-matching run should; lower it)")
