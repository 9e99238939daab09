"""The spatially varying matching kernel."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._docstrings import fill_docstrings
from .basis import polynomial_exponents
from .spatial import SpatialFunctions

__all__ = ["SpatialKernel", "box_variance_factor"]


def box_variance_factor(correlation: ArrayLike, k: int) -> float:
    """How much a ``k x k`` box sum's variance exceeds the sum of the variance plane.

    For noise of uniform per-pixel variance ``v`` and normalised correlation
    ``rho(dx, dy)`` (``correlation``, an odd square image with ``rho = 1`` at its
    centre), ``Var(sum over a k x k box) = k^2 v F`` with
    ``F = sum_d (k - |dx|) (k - |dy|) rho(d) / k^2`` (pairs of box pixels ``d``
    apart). ``F = 1`` for white noise.

    Parameters
    ----------
    correlation : ndarray (m, m)
        Normalised noise correlation, lag 0 at ``[m // 2, m // 2]`` (e.g.
        :meth:`SpatialKernel.noise_correlation`).
    k : int
        Box side in pixels.

    Returns
    -------
    float
        ``F``, the ratio of the box sum's variance to ``k^2 v``.
    """
    rho = np.asarray(correlation, dtype=np.float64)
    c = rho.shape[0] // 2
    lags = np.arange(rho.shape[0]) - c
    pairs = np.clip(k - np.abs(lags), 0, None).astype(np.float64)  # per axis
    return float(pairs @ rho @ pairs) / k ** 2


@fill_docstrings
class SpatialKernel:
    """``K(x, y) = sum_b (sum_j a_bj p_j(x, y)) B_b`` (docs/algorithm.md section 6).

    Parameters
    ----------
    basis : ndarray (nb, k, k)
        Basis images (float64).
    spatial_functions : SpatialFunctions
        The functions ``p_j`` and their region.
    coefficients : ndarray (nb, n_terms)
        Spatial coefficients; row 0 is ``[kernel_sum, 0, ...]``.
    """

    def __init__(self, basis: ArrayLike, spatial_functions: SpatialFunctions,
                 coefficients: ArrayLike) -> None:
        basis = np.asarray(basis, dtype=np.float64)
        coefficients = np.asarray(coefficients, dtype=np.float64)
        if basis.ndim != 3 or basis.shape[1] != basis.shape[2] or basis.shape[1] % 2 == 0:
            raise ValueError(f"basis must be (nb, k, k) with odd k, got {basis.shape}")
        if coefficients.shape != (basis.shape[0], spatial_functions.n_terms):
            raise ValueError(
                f"coefficients must have shape {(basis.shape[0], spatial_functions.n_terms)}, "
                f"got {coefficients.shape}"
            )
        self.basis_images = basis
        self.spatial_functions = spatial_functions
        self.spatial_coefficients = coefficients

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of the kernel in pixels."""
        k = self.basis_images.shape[1]
        return k, k

    @property
    def kernel_sum(self) -> float:
        """The kernel sum imposed on the solution (coefficient of basis 0)."""
        return float(self.spatial_coefficients[0, 0])

    @property
    def n_basis(self) -> int:
        """Number of basis images."""
        return self.basis_images.shape[0]

    @property
    def spatial_model_type(self) -> str:
        """The spatial functions' family (``"chebyshev1"`` or ``"polynomial"``)."""
        return self.spatial_functions.model_type

    @property
    def spatial_order(self) -> int:
        """Order of the spatial polynomials."""
        return self.spatial_functions.order

    def term_kernels(self) -> NDArray[np.float64]:
        """Return the kernels ``K_j`` with ``K(x, y) = sum_j p_j(x, y) K_j``.

        Returns
        -------
        ndarray (n_terms, k, k)
            One kernel image per spatial function.
        """
        return np.einsum("bj,bkl->jkl", self.spatial_coefficients, self.basis_images)

    def compute_images(self, xs: ArrayLike, ys: ArrayLike,
                       normalize: bool = False) -> NDArray[np.float64]:
        """Kernel images at parent positions.

        Parameters
        ----------
        xs, ys : array_like (n,)
            Parent positions in pixels.
        normalize : bool
            Scale each image to sum 1, as applied to the image.

        Returns
        -------
        ndarray (n, k, k)
            One kernel image per position.
        """
        P = self.spatial_functions.evaluate(np.ravel(xs), np.ravel(ys))
        images = np.einsum("nj,jkl->nkl", P, self.term_kernels())
        if normalize:
            images = images / images.sum(axis=(1, 2), keepdims=True)
        return images

    def compute_image(self, x: float, y: float, normalize: bool = False) -> NDArray[np.float64]:
        """The kernel image at parent position ``(x, y)`` (pixels).

        {position}
        normalize : bool
            Scale the image to sum 1, as applied to the image.

        Returns
        -------
        ndarray (k, k)
            The kernel image.
        """
        return self.compute_images([x], [y], normalize)[0]

    def noise_variance_gain(self, x: ArrayLike, y: ArrayLike) -> float | NDArray[np.float64]:
        """Sum of the squared normalised kernel at parent position(s) ``(x, y)``.

        The factor by which matching multiplies the variance of white noise
        (docs/algorithm.md section 13.1): the matched variance plane is
        ``sum(Khat**2 * variance)``. For a Gaussian exposure PSF of width ``t``
        matched to a Gaussian of width ``r`` (pixels) the ideal kernel gives
        ``1 / (4 pi (r^2 - t^2))``.

        {position_or_positions}

        Returns
        -------
        float, or ndarray for array ``x``, ``y``
            ``sum(Khat**2)`` at each position.
        """
        images = self.compute_images(np.ravel(x), np.ravel(y), normalize=True)
        gains = (images ** 2).sum(axis=(1, 2))
        return float(gains[0]) if np.ndim(x) == 0 else gains

    def sum_at(self, x: ArrayLike, y: ArrayLike) -> float | NDArray[np.float64]:
        """Unnormalised kernel sum at parent position(s).

        {position_or_positions}

        Returns
        -------
        float, or ndarray for array ``x``, ``y``
            ``sum(K)`` at each position.
        """
        P = self.spatial_functions.evaluate(np.ravel(x), np.ravel(y))
        sums = P @ self.term_kernels().sum(axis=(1, 2))
        return float(sums[0]) if np.ndim(x) == 0 else sums

    def noise_correlation(self, x: float, y: float) -> NDArray[np.float64]:
        """Correlation of the output noise at parent position ``(x, y)`` (pixels).

        Matching convolves the image with the normalised kernel ``K``, so white
        input noise comes out with covariance proportional to the
        autocorrelation ``A(d) = sum_u K(u) K(u + d)``; this returns
        ``A / A(0)``, the correlation coefficient between pixels ``d`` apart
        (docs/algorithm.md section 13.2). The variance plane holds
        ``A(0) = sum K^2`` times the input variance per pixel and none of the
        correlation: see :func:`box_variance_factor` for sums over apertures.

        {position}

        Returns
        -------
        ndarray (2k - 1, 2k - 1)
            Indexed ``[dy, dx]`` with lag 0 at the centre (value 1), symmetric
            under ``d -> -d``; exact where the input noise is white and its
            variance uniform over the kernel's footprint.
        """
        kern = self.compute_image(x, y, normalize=True)
        k = kern.shape[0]
        # Direct sums, (2k - 1)^2 k^2 products (~1 ms at k = 21): no FFT round-off
        # at long lags, and no scipy.signal import (slow) in every process.
        padded = np.pad(kern, k - 1)
        windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k))
        auto = np.einsum("ijkl,kl->ij", windows, kern)
        return auto / auto[k - 1, k - 1]

    def scaled_terms(self, box: Any) -> tuple[NDArray[np.float64], list, tuple]:
        """Term kernels for monomials ``X^a Y^c`` in coordinates scaled to ``box``.

        Parameters
        ----------
        box : Box
            Parent bounding box of the planes the kernel is applied to.

        Returns
        -------
        tuple
            ``(Q, exponents, (cx, cy, hx, hy))`` with
            ``K(x, y) = sum_k X^a_k Y^c_k Q[k]``, ``X = (x - cx) / hx``,
            ``Y = (y - cy) / hy`` (pixels): the form the application uses.
        """
        T, scale = self.spatial_functions.to_scaled_monomials(box)
        Q = np.einsum("jk,jab->kab", T, self.term_kernels())
        return Q, polynomial_exponents(self.spatial_order), scale

    #: Configuration the kernel was solved with (a dict), when known; set by
    #: :meth:`read_fits` and written by :meth:`write_fits`.
    config = None

    def write_fits(self, path: str | os.PathLike, overwrite: bool = False,
                   config: Any = None) -> str:
        """Write the kernel (basis, coefficients, spatial model, region, config) to FITS.

        See :mod:`gpumatch.io.kernel_fits` for the layout.

        Parameters
        ----------
        path : str or path-like
            Output file, written atomically.
        overwrite : bool
            Replace an existing ``path``; otherwise it raises :class:`FileExistsError`.
        config : dict or ModelPsfMatchConfig, optional
            Recorded with the kernel; defaults to :attr:`config`.

        Returns
        -------
        str
            The path written.
        """
        from .io.kernel_fits import write_kernel

        return write_kernel(self, path, overwrite=overwrite, config=config)

    @classmethod
    def read_fits(cls, path: str | os.PathLike) -> SpatialKernel:
        """Read a kernel written by :meth:`write_fits`; bit-identical to the original.

        Parameters
        ----------
        path : str or path-like
            A file written by :meth:`write_fits`.

        Returns
        -------
        SpatialKernel
            The kernel, with :attr:`config` as recorded.
        """
        from .io.kernel_fits import read_kernel

        return read_kernel(path, cls=cls)

    @classmethod
    def constant(cls, image: ArrayLike) -> SpatialKernel:
        """A spatially constant kernel from one image (sum kept as is).

        Parameters
        ----------
        image : array_like (k, k)
            The kernel image, odd square.

        Returns
        -------
        SpatialKernel
            Order-0 polynomial kernel equal to ``image`` everywhere.
        """
        from .pixels import Box

        img = np.asarray(image, dtype=np.float64)
        sf = SpatialFunctions("polynomial", 0, Box(0, 0, 1, 1))
        return cls(img[None], sf, np.ones((1, 1)))

    def __repr__(self):
        k = self.basis_images.shape[1]
        return (f"SpatialKernel({k}x{k}, {self.n_basis} bases, {self.spatial_model_type} "
                f"order {self.spatial_order}, kernel_sum={self.kernel_sum})")
