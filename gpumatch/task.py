"""The task facade: ``ModelPsfMatchTask`` with LSST's names.

The data path is exposure -> cell set -> per-candidate normal equations ->
spatial solve -> spatial kernel -> application; the stages are the functions
of :mod:`gpumatch.stages` (shared with :func:`gpumatch.match_many`) and the
backend object (:mod:`gpumatch.backends`) supplies the array-specific pieces.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from . import stages
from .backend import resolve_backend, single_threaded_blas
from .backends import get_backend
from .config import ModelPsfMatchConfig
from .quality import candidate_residuals
from .selftest import check_backend_once
from .spatial_solve import check_spatial_solve
from .stages import ModelPsfMatchResult
from .verdict import apply_policy, check_on_poor_match

log = logging.getLogger("gpumatch")

__all__ = ["ModelPsfMatchTask", "ModelPsfMatchResult", "CellSetResult"]


class CellSetResult(NamedTuple):
    """What :meth:`ModelPsfMatchTask.buildCellSet` returns.

    Parameters
    ----------
    kernelCellSet : KernelCellSet
        Cells, candidates and their stamps.
    referencePsfModel : Psf
        The reference, resized to the stamp size when needed.
    """

    kernelCellSet: object
    referencePsfModel: object


class ModelPsfMatchTask:
    """Match an exposure's PSF to a reference PSF model (docs/algorithm.md section 1).

    Parameters
    ----------
    config : ModelPsfMatchConfig, optional
        The configuration (default: LSST's, ``ModelPsfMatchConfig()``; see
        :meth:`ModelPsfMatchConfig.for_psfs` for settings chosen from the PSFs).
    backend : str
        A registered backend (:func:`gpumatch.backend.backend_names`:
        ``"numpy"``, ``"cupy"``...); ``"auto"`` uses the GPU when CuPy and a
        device are usable.
    spatial_solve : {"host", "device"}, optional
        Where the GPU backend solves the spatial system (float64 either way):
        ``"host"`` copies it back and uses LAPACK, ``"device"`` uses cuSOLVER
        and copies back only the solution. Default: the backend's
        (``"host"`` until measured on GPUs otherwise). The NumPy backend
        always solves on the host.
    """

    ConfigClass = ModelPsfMatchConfig
    _DefaultName = "modelPsfMatch"

    def __init__(self, config=None, backend="auto", *, spatial_solve=None):
        self.config = ModelPsfMatchConfig() if config is None else config
        if not isinstance(self.config, ModelPsfMatchConfig):
            raise TypeError(f"config must be a ModelPsfMatchConfig, got {type(self.config).__name__}")
        self.config.validate()
        if spatial_solve is not None:
            check_spatial_solve(spatial_solve)
        self.backend = resolve_backend(backend)
        # A GPU backend is trusted in a process only after it has matched a
        # known case like NumPy does (gpumatch/selftest.py).
        if not check_backend_once(type(self), self.backend, explicit=backend != "auto"):
            self.backend = "numpy"
        #: The :class:`gpumatch.backends.Backend` that runs the stages (``backend`` is its name).
        self.array_backend = get_backend(self.backend, spatial_solve=spatial_solve)
        self.metadata = {}

    @property
    def spatial_solve(self):
        """Where the spatial system is solved: ``"host"`` or ``"device"``."""
        return self.array_backend.spatial_solve

    @spatial_solve.setter
    def spatial_solve(self, where):
        self.array_backend.spatial_solve = where

    def buildCellSet(self, exposure, referencePsfModel):
        """Cells, candidates and stamps for ``exposure`` (docs/algorithm.md section 3).

        Parameters
        ----------
        exposure : Exposure
            Its bbox sets the cells and its PSF the template stamps; not modified.
        referencePsfModel : Psf
            The PSF to match to, rendered as the target stamps.

        Returns
        -------
        CellSetResult
            ``(kernelCellSet, referencePsfModel)``, the latter resized to the
            stamp size when needed.
        """
        state = stages.prepare(self, stages.MatchState(exposure, referencePsfModel),
                               basis_for=None)
        return CellSetResult(state.cell_set, state.reference)

    def run(self, exposure, referencePsfModel, kernelSum=1.0, *, on_poor_match="warn"):
        """PSF-match ``exposure`` to ``referencePsfModel``.

        Parameters
        ----------
        exposure : Exposure
            Must carry a PSF; not modified.
        referencePsfModel : Psf
            The PSF to match to.
        kernelSum : float
            Sum imposed on the kernel (the output is normalised regardless).
        on_poor_match : {"warn", "raise", "ignore"}
            What a verdict (``metadata["matchQuality"]``, see
            :mod:`gpumatch.verdict`) of ``"poor"`` or ``"failed"`` does:
            a :class:`~gpumatch.errors.PoorMatchWarning` and a log line;
            :class:`~gpumatch.errors.PoorMatchError` carrying the result as
            its ``result``; or nothing.

        Returns
        -------
        ModelPsfMatchResult
            The matched exposure, the spatial kernel, the cell set, the
            reference used and the metadata (with the verdict).
        """
        check_on_poor_match(on_poor_match)
        with single_threaded_blas():
            result = self._run(exposure, referencePsfModel, kernelSum)
        return apply_policy(result, on_poor_match)

    def _run(self, exposure, referencePsfModel, kernelSum):
        state = stages.solve_exposure(self, exposure, referencePsfModel, kernelSum)
        return stages.complete(self, stages.start_apply(self, state))

    def diagnostic(self, kernelCellSet, spatialKernel):
        """Matched-PSF residuals of every candidate, logged and returned.

        For each candidate the template stamp is correlated with the normalised
        spatial kernel at its position and compared with the target on the good
        region; the FWHM of the matched and reference stamps are measured with
        adaptive moments.

        Parameters
        ----------
        kernelCellSet : KernelCellSet
            The cell set of a run (``result.kernelCellSet``).
        spatialKernel : SpatialKernel
            The kernel to check (``result.psfMatchingKernel``).

        Returns
        -------
        dict
            Arrays ``relative_l2``, ``max_abs``, ``fwhm_matched`` and
            ``fwhm_reference`` (one entry per candidate) and their summaries.
        """
        res = candidate_residuals(kernelCellSet, spatialKernel)
        log.info("matched-PSF residual over %d candidates: relative L2 median %.3g, max %.3g",
                 len(res["relative_l2"]), res["relative_l2_median"], res["relative_l2_max"])
        return res
