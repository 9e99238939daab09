"""Spatial functions p_j(x, y) of the kernel coefficients (docs/algorithm.md section 6)."""

from __future__ import annotations

import numpy as np
from numpy.polynomial import chebyshev as C
from numpy.polynomial import polynomial as P

from .basis import polynomial_exponents

__all__ = ["SpatialFunctions"]


class SpatialFunctions:
    """Polynomial or Chebyshev spatial functions over a region.

    Parameters
    ----------
    model_type : {"chebyshev1", "polynomial"}
    order : int
        Total degree; ``(order + 1)(order + 2) / 2`` terms in order
        1, x, y, x^2, xy, y^2, ...
    region : Box
        The cell-set region ``R`` (parent pixels); Chebyshev arguments map it,
        taken as a real box ``[x0 - 0.5, x1 + 0.5]``, onto ``[-1, 1]``.
    """

    def __init__(self, model_type, order, region):
        if model_type not in ("chebyshev1", "polynomial"):
            raise ValueError(f"unknown spatial model type {model_type!r}")
        self.model_type = model_type
        self.order = int(order)
        self.region = region
        self.exponents = polynomial_exponents(self.order)
        self.xmin, self.xmax = region.x0 - 0.5, region.x1 + 0.5
        self.ymin, self.ymax = region.y0 - 0.5, region.y1 + 0.5

    @property
    def n_terms(self):
        return len(self.exponents)

    def _axis_values(self, t, lo, hi, xp):
        """Values of the 1-d factors f_0 .. f_order at coordinates ``t``."""
        t = xp.asarray(t, dtype=xp.float64)
        if self.model_type == "chebyshev1":
            t = (t - 0.5 * (lo + hi)) * (2.0 / (hi - lo))
        vals = [xp.ones_like(t)]
        if self.order >= 1:
            vals.append(t)
        for _ in range(2, self.order + 1):
            if self.model_type == "chebyshev1":
                vals.append(2 * t * vals[-1] - vals[-2])
            else:
                vals.append(vals[-1] * t)
        return vals

    def evaluate(self, xs, ys, xp=np):
        """``p_j(x, y)`` at parent positions: array ``(n, n_terms)``."""
        fx = self._axis_values(xp.ravel(xp.asarray(xs, dtype=xp.float64)), self.xmin, self.xmax, xp)
        fy = self._axis_values(xp.ravel(xp.asarray(ys, dtype=xp.float64)), self.ymin, self.ymax, xp)
        return xp.stack([fx[a] * fy[c] for a, c in self.exponents], axis=-1)

    def _axis_power_coefficients(self, lo, hi, center, half):
        """Matrix F with f_a(t) = sum_i F[a, i] ((t - center) / half)^i."""
        o = self.order
        F = np.zeros((o + 1, o + 1))
        for a in range(o + 1):
            if self.model_type == "chebyshev1":
                # t' = alpha s + beta with s = (t - center) / half.
                alpha = half * 2.0 / (hi - lo)
                beta = (center - 0.5 * (lo + hi)) * 2.0 / (hi - lo)
                power = C.cheb2poly(np.eye(o + 1)[a])
                inner = np.array([beta, alpha])
            else:
                # t = center + half s; binomial expansion keeps this exact.
                power = np.zeros(a + 1)
                power[a] = 1.0
                inner = np.array([center, half])
            out = np.zeros(1)
            for coef in power[::-1]:  # Horner composition p(inner(s))
                out = P.polyadd(P.polymul(out, inner), [coef])
            F[a, :len(out)] = out[:o + 1]
        return F

    def to_scaled_monomials(self, box):
        """Change of basis to monomials in coordinates scaled to ``box``.

        With ``X = (x - cx) / hx`` and ``Y = (y - cy) / hy`` (``c`` the centre and
        ``h`` the half size of ``box``, so ``|X|, |Y| <= 1`` on it), returns
        ``T`` of shape ``(n_terms, n_terms)`` such that
        ``p_j(x, y) = sum_k T[j, k] X^a_k Y^c_k`` with ``(a_k, c_k)`` =
        ``self.exponents[k]``. Exact polynomial algebra, so applying a kernel
        in these well-scaled coordinates loses no precision.
        """
        cx, cy = box.center
        hx = max(0.5 * (box.x1 - box.x0), 0.5)
        hy = max(0.5 * (box.y1 - box.y0), 0.5)
        Fx = self._axis_power_coefficients(self.xmin, self.xmax, cx, hx)
        Fy = self._axis_power_coefficients(self.ymin, self.ymax, cy, hy)
        index = {e: k for k, e in enumerate(self.exponents)}
        T = np.zeros((self.n_terms, self.n_terms))
        for j, (a, c) in enumerate(self.exponents):
            for i in range(a + 1):
                for m in range(c + 1):
                    T[j, index[(i, m)]] += Fx[a, i] * Fy[c, m]
        return T, (cx, cy, hx, hy)

    def solve_functions(self):
        """The functions in which the spatial system is assembled and solved.

        The Chebyshev functions of the same order over the same region: for
        ``"chebyshev1"`` this object itself; for ``"polynomial"`` the same
        polynomials written in the region's scaled coordinates, which span
        exactly the same kernels. Raw parent coordinates (hundreds to thousands
        of pixels, often far from 0) make the powers x^a y^c nearly collinear
        over the region, and the system assembled in them loses digits that no
        solver recovers; so both models solve one and the same well-scaled
        system and give the same kernel (docs/algorithm.md section 6), and
        :meth:`from_solve_functions` turns its coefficients into this model's.
        """
        if self.model_type == "chebyshev1":
            return self
        return SpatialFunctions("chebyshev1", self.order, self.region)

    def from_solve_functions(self):
        """``R (n_terms, n_terms)`` with ``a = c R``: the coefficients ``a`` of these
        functions that give the kernel whose coefficients in
        :meth:`solve_functions` are ``c`` (one row per basis). None when they are
        the same functions.

        Exact polynomial algebra: the Chebyshev functions expanded in monomials
        of the raw parent coordinates.
        """
        if self.model_type == "chebyshev1":
            return None
        from .pixels import Box

        # A box whose scaled coordinates are the raw ones: centre 0, half size 1.
        return self.solve_functions().to_scaled_monomials(Box(-1, -1, 3, 3))[0]

    def __repr__(self):
        return (f"SpatialFunctions({self.model_type!r}, order={self.order}, "
                f"region=[{self.xmin}, {self.xmax}] x [{self.ymin}, {self.ymax}])")

