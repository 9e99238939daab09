"""Symmetric solves that survive rank deficiency, and condition numbers.

The rule (docs/algorithm.md section 6): a system is solved by Cholesky of its
diagonally equilibrated form whenever that factorisation succeeds and its
solution passes a backward-error check; only otherwise does an eigen-decomposition
pseudo-inverse solve it. No direction of a system that factorises is dropped,
however large its condition number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .backend import array_namespace, to_numpy
from .backends import backend_for_namespace
from .threads import map_in_threads, piece_size

log = logging.getLogger("gpumatch")

__all__ = ["SymmetricSolution", "solve_symmetric", "solve_symmetric_many", "solve_symmetric_batch",
           "condition_number", "DEVICE_FAILURES"]

#: What a device linear-algebra call may raise that a smaller call or the host can
#: still do: CuPy's ``CUSOLVERError``, ``CUBLASError`` and ``CUDARuntimeError``
#: are RuntimeErrors, its ``OutOfMemoryError`` a MemoryError, and
#: ``cupyx.errstate(linalg="raise")`` raises LinAlgError. Programming errors
#: (TypeError, AttributeError...) are not among them.
DEVICE_FAILURES = (RuntimeError, MemoryError, np.linalg.LinAlgError)

#: Per-candidate systems solved in one stacked device call (27 x 27 systems of the
#: production basis: ~6 MB each for the matrices); a visit has ~200,000.
DEVICE_CHUNK = 8192
#: Below this many systems a failing device chunk goes to the host.
_MIN_DEVICE_CHUNK = 256


@dataclass
class SymmetricSolution:
    """Solution of ``A x = b`` and how it was found.

    ``condition_number`` is that of ``A`` (or of the matrix the caller named,
    see :func:`solve_symmetric_many`), ``equilibrated_condition_number`` that
    of the diagonally equilibrated matrix actually factorised: the one that
    says how well the solution is determined. ``reason`` says, in words, why
    ``method`` ran.
    """

    x: np.ndarray
    method: str  # "cholesky" or "eigen-pseudo-inverse"
    condition_number: float
    rank: int
    equilibrated_condition_number: float = float("nan")
    reason: str = ""


def _rank_tolerance(eigvals, n):
    """``n eps max|lambda|`` of each eigenvalue set (last axis)."""
    return abs(eigvals).max(axis=-1) * n * np.finfo(np.float64).eps


def condition_number(A, kind="EIGENVALUE", eigvals=None, xp=None):
    """Ratio of largest to smallest |eigenvalue| ("EIGENVALUE") or singular value ("SVD").

    ``A`` may be one matrix ``(m, m)`` (a float is returned) or a stack
    ``(n, m, m)`` (an array of ``n`` floats, in ``xp``; one stacked LAPACK or
    cuSOLVER call). ``xp`` defaults to the namespace of ``A``.
    """
    xp = array_namespace(A) if xp is None else xp
    A = xp.asarray(A, dtype=xp.float64)
    if kind == "SVD":
        s = xp.linalg.svd(A, compute_uv=False)
    else:
        s = abs(xp.linalg.eigvalsh(A) if eigvals is None else eigvals)
    smax, smin = s.max(axis=-1), s.min(axis=-1)
    # inf for a zero matrix and wherever the smallest value is not positive.
    ok = (smax != 0) & (smin > 0)
    cond = xp.where(ok, smax / xp.where(ok, smin, 1.0), xp.inf)
    return float(cond) if A.ndim == 2 else cond


def solve_symmetric(A, b, condition_type="EIGENVALUE"):
    """Solve symmetric positive semi-definite ``A x = b`` in float64.

    Cholesky of the Jacobi-equilibrated matrix ``D A D`` (``D = diag(A)^-1/2``,
    so that unknowns of very different scales do not matter), refined once
    with its residual, is accepted when every pivot is above rounding level
    and the solution's backward error is below ``1e-8``; otherwise an
    eigen-decomposition pseudo-inverse of ``D A D`` inverts the eigenvalues
    above ``m eps max|lambda|`` (the minimum-norm least-squares solution). The
    reported condition number is that of ``A`` itself.
    """
    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return solve_symmetric_many(A[None], b[None], condition_type)[0]


def _equilibrate(A, b, xp):
    """``d = diag(A)^-1/2`` (1 where the diagonal is not positive), ``D A D`` and ``D b``."""
    diag = xp.diagonal(A, axis1=1, axis2=2)
    d = xp.where(diag > 0, diag, 1.0) ** -0.5
    return d, A * d[:, :, None] * d[:, None, :], b * d


def solve_symmetric_many(A, b, condition_type="EIGENVALUE", xp=None, batched=None,
                         condition_of=None):
    """:func:`solve_symmetric` for a stack of systems ``A (n, m, m)``, ``b (n, m)``.

    On the host (``xp`` NumPy, not ``batched``) each system is solved alone,
    so exactly (bitwise) as it would be alone. ``batched`` solves the whole
    stack with stacked factorisations, one copy to the host, and one more
    for the systems that need the pseudo-inverse: it is how a device (``xp``
    CuPy) solves, and with NumPy it tests that path against the host's. Both
    make the same decision by the same rule.

    Parameters
    ----------
    A : array (n, m, m)
    b : array (n, m)
    condition_type : {"EIGENVALUE", "SVD"}
    xp : module, optional
        Where to solve: ``numpy`` (the host) or ``cupy`` (the device). Default:
        the namespace of ``A``. Arrays are copied there as needed.
    batched : bool, optional
        Default: True for CuPy, False for NumPy (which alone has the
        system-by-system path).
    condition_of : array (n, m, m), optional
        The matrices whose condition numbers are reported, when ``A`` is an
        equivalent system in other unknowns (see
        :func:`gpumatch.spatial_solve.solve_spatial_systems`). Default: ``A``.

    Returns
    -------
    list of SymmetricSolution
        One per system, ``x`` a NumPy array.
    """
    xp = array_namespace(A) if xp is None else xp
    on_device = backend_for_namespace(xp).on_device
    if batched is None:
        batched = on_device
    if batched:
        return _solve_batched(A, b, condition_type, xp, condition_of)
    if on_device:
        raise ValueError("only NumPy solves system by system; use batched=True with "
                         f"{xp.__name__}")
    A = np.asarray(to_numpy(A), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    C = A if condition_of is None else np.asarray(to_numpy(condition_of), dtype=np.float64)
    return [_solve_batched(A[i:i + 1], b[i:i + 1], condition_type, np, C[i:i + 1])[0]
            for i in range(len(A))]


# A solve is accepted when its normwise backward error |A y - b| / (|A| |y| + |b|)
# (infinity norms) is below this: a factorisation that worked gives ~m eps
# (1e-14 for m ~ 160) whatever the conditioning, one that failed gives O(1).
_BACKWARD_ERROR_MAX = 1e-8


def _pivot_tolerance(m):
    """Smallest acceptable Cholesky pivot of an ``m x m`` unit-diagonal matrix.

    A pivot is what is left of a diagonal element once the unknowns before it
    are eliminated; rounding makes every element of a unit-diagonal matrix
    uncertain by ~eps, so a pivot below ``m eps`` is rounding noise: the
    factorisation broke down (LAPACK's pivoted Cholesky stops at the same
    level). A system with a tiny but real pivot, however large its condition
    number, passes.
    """
    return m * np.finfo(np.float64).eps


def _per_system(fn, xp, *arrays):
    """``fn`` on each system of the stacks ``arrays``; NaN where it raises."""
    out = []
    for parts in zip(*arrays):
        try:
            out.append(fn(*parts))
        except np.linalg.LinAlgError:
            out.append(xp.full_like(parts[-1], xp.nan))
    return xp.stack(out)


def _stacked(fn, xp, *arrays):
    """``fn(*arrays)`` on stacks, NaN for the systems where it fails.

    NumPy (and CuPy told to raise by ``cupyx.errstate(linalg="raise")``)
    refuses a whole stack when one system fails; then the systems are done
    one by one. CuPy by default does not check and leaves invalid values,
    which the pivots and the backward error catch.
    """
    try:
        return fn(*arrays)
    except np.linalg.LinAlgError:
        return _per_system(fn, xp, *arrays)


def _solve_lower(L, B, trans, xp):
    """``L^-1 B`` (``trans="N"``) or ``L^-T B`` (``"T"``) for stacks of lower-triangular
    ``L (n, m, m)`` and ``B (n, m)``."""
    backend = backend_for_namespace(xp)

    def solve(Li, Bi):
        return backend.solve_triangular(Li, Bi, trans=trans)

    try:
        return solve(L, B[..., None])[..., 0]
    except ValueError:  # SciPy refusing a singular L (a LinAlgError), or a SciPy (< 1.15)
        # or CuPy (< 14) without stacks: a call per system
        return _per_system(solve, xp, L, B)


def _backward_error(As, bs, y, xp):
    """Normwise backward error ``|As y - bs| / (|As| |y| + |bs|)`` (infinity norms) per
    system: NaN where ``y`` is not finite, which no test accepts."""
    r = xp.einsum("nij,nj->ni", As, y) - bs
    size = abs(As).sum(axis=-1).max(axis=-1) * abs(y).max(axis=-1) + abs(bs).max(axis=-1)
    return abs(r).max(axis=-1) / size


def _cholesky_solve(As, bs, xp, refine=True):
    """Cholesky solutions of the equilibrated stacks, refined once with their
    residual where ``refine``.

    Returns
    -------
    y : array (n, m)
    pivot : array (n,)
        The smallest pivot of each factorisation (NaN where it broke down).
    berr : array (n,)
        The backward error of each solution.
    """
    L = _stacked(xp.linalg.cholesky, xp, As)

    def solve(rhs):
        return _solve_lower(L, _solve_lower(L, rhs, "N", xp), "T", xp)

    y = solve(bs)
    if refine:
        # One step of refinement: it costs two triangular solves and brings the
        # solution several times closer to that of the stored system (measured on
        # the production basis), at no risk: it is kept only where it is finite.
        refined = y - solve(xp.einsum("nij,nj->ni", As, y) - bs)
        y = xp.where(xp.isfinite(refined).all(axis=-1)[:, None], refined, y)
    pivot = xp.diagonal(L, axis1=1, axis2=2).min(axis=-1) ** 2
    return y, pivot, _backward_error(As, bs, y, xp)


def _accepted(pivot, berr, m):
    """Host bools: which Cholesky solutions the rule accepts."""
    with np.errstate(invalid="ignore"):
        return (pivot > _pivot_tolerance(m)) & (berr <= _BACKWARD_ERROR_MAX)


def _reasons(pivot, berr, m, rank):
    """Why each system was solved as it was, in words."""
    tol = _pivot_tolerance(m)
    out = []
    for p, e, r in zip(pivot, berr, rank):
        if p > tol and e <= _BACKWARD_ERROR_MAX:
            out.append(f"Cholesky of the equilibrated system: smallest pivot {p:.3g} > "
                       f"{tol:.3g}, backward error {e:.2g} <= {_BACKWARD_ERROR_MAX:.0e}")
            continue
        if not np.isfinite(p):
            why = "it is not positive definite"
        elif p <= tol:
            why = f"pivot {p:.3g} <= {tol:.3g} (rounding level)"
        else:
            why = f"backward error {e:.2g} > {_BACKWARD_ERROR_MAX:.0e}"
        out.append(f"Cholesky of the equilibrated system broke down ({why}); the eigen "
                   f"pseudo-inverse kept {int(r)} of {m} eigenvalues")
    return out


def _solve_batched(A, b, condition_type, xp, condition_of=None):
    """The stacked solve: every system by Cholesky (one stacked call); one copy
    brings back the solutions and what decides each system's method; only the
    systems that Cholesky does not solve (rare: the spatial system is positive
    semi-definite by construction) are solved by the pseudo-inverse, with one
    more copy."""
    A = xp.asarray(A, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    if not len(A):
        return []
    m = A.shape[-1]
    C = A if condition_of is None else xp.asarray(condition_of, dtype=xp.float64)
    conds = condition_number(C, condition_type, xp=xp)
    d, As, bs = _equilibrate(A, b, xp)
    conds_eq = condition_number(As, condition_type, xp=xp)
    y, pivot, berr = _cholesky_solve(As, bs, xp)
    x, (conds, conds_eq, pivot, berr) = _to_host(y * d, (conds, conds_eq, pivot, berr), xp)
    ok = _accepted(pivot, berr, m)
    rank = np.full(len(x), m)
    redo = np.flatnonzero(~ok)
    if redo.size:
        at = xp.asarray(redo)
        y2, r2 = _pseudo_inverse_solve(As[at], bs[at], xp)
        x[redo], (r2,) = _to_host(y2 * d[at], (r2,), xp)
        rank[redo] = r2.astype(int)
    methods = np.where(ok, "cholesky", "eigen-pseudo-inverse")
    reasons = _reasons(pivot, berr, m, rank)
    return [SymmetricSolution(x[i], str(methods[i]), float(conds[i]), int(rank[i]),
                              float(conds_eq[i]), reasons[i]) for i in range(len(x))]


def _to_host(y, columns, xp):
    """``y (n, m)`` and per-system ``columns`` (each ``(n,)``) in one copy to the host.

    Returns
    -------
    tuple
        ``(y, [column, ...])``, NumPy float64.
    """
    host = to_numpy(xp.concatenate(
        [y, xp.stack([c.astype(xp.float64) for c in columns], axis=1)], axis=1))
    m = y.shape[-1]
    return host[:, :m], [host[:, m + i] for i in range(len(columns))]


def _pseudo_inverse_solve(M, b, xp):
    """Eigen-decomposition pseudo-inverse solutions ``(n, m)`` of stacked symmetric
    systems, inverting the eigenvalues above ``m eps max|lambda|``, and how many
    that is (the rank, ``(n,)``)."""
    lam, vec = xp.linalg.eigh(M)
    keep = abs(lam) > _rank_tolerance(lam, M.shape[-1])[:, None]
    inv = xp.where(keep, 1.0 / xp.where(keep, lam, 1.0), 0.0)
    proj = xp.einsum("nji,nj->ni", vec, b)
    return xp.einsum("nij,nj->ni", vec, inv * proj), keep.sum(axis=-1)


#: Fewest systems per piece of :func:`solve_symmetric_batch` on the host
#: (see :func:`gpumatch.threads.piece_size`).
_HOST_CHUNK = 64


def solve_symmetric_batch(M, b, xp=np, chunk=None):
    """Solutions ``(n, m)`` of many small systems ``M (n, m, m)``, ``b (n, m)``, by the
    rule of :func:`solve_symmetric` (no condition numbers).

    These are the single-candidate kernels, diagnostics only: on a device they
    are solved in chunks of at most ``chunk`` systems (default
    :data:`DEVICE_CHUNK`), so that no library call meets a whole visit's
    candidates at once, and a chunk whose device call fails
    (:data:`DEVICE_FAILURES`) is solved again in smaller chunks, then on the
    host: such a failure never fails the exposures.
    """
    M = xp.asarray(M, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    if not backend_for_namespace(xp).on_device:
        # Systems are independent: on the host, chunks run on the host threads.
        if len(M) <= _HOST_CHUNK:
            return _solve_small(M, b, np)
        step = piece_size(len(M), least=_HOST_CHUNK)
        return np.concatenate(map_in_threads(
            lambda i: _solve_small(M[i:i + step], b[i:i + step], np),
            range(0, len(M), step)))
    chunk = DEVICE_CHUNK if chunk is None else max(1, int(chunk))
    out = xp.empty_like(b)
    for start in range(0, len(M), chunk):
        stop = min(len(M), start + chunk)
        out[start:stop] = _solve_small_on_device(M[start:stop], b[start:stop], xp)
    return out


def _solve_small_on_device(M, b, xp):
    """:func:`_solve_small` on the device; on a device failure, in quarters, then on the host."""
    try:
        return _solve_small(M, b, xp)
    except DEVICE_FAILURES as exc:
        if len(M) <= _MIN_DEVICE_CHUNK:
            log.warning("device solve of %d single-candidate systems failed (%s: %s); solving "
                        "them on the host", len(M), type(exc).__name__, exc)
            return xp.asarray(_solve_small(to_numpy(M), to_numpy(b), np))
        step = -(-len(M) // 4)
        log.warning("device solve of %d single-candidate systems failed (%s: %s); retrying in "
                    "chunks of %d", len(M), type(exc).__name__, exc, step)
        return xp.concatenate([_solve_small_on_device(M[i:i + step], b[i:i + step], xp)
                               for i in range(0, len(M), step)])


def _solve_small(M, b, xp):
    """Cholesky of the equilibrated systems, the pseudo-inverse where it is not accepted."""
    if not len(M):
        return xp.empty_like(b)
    d, Ms, bs = _equilibrate(M, b, xp)
    y, pivot, berr = _cholesky_solve(Ms, bs, xp, refine=False)
    pivot, berr = to_numpy(xp.stack([pivot, berr]))      # one copy to the host
    ok = _accepted(pivot, berr, M.shape[-1])
    redo = np.flatnonzero(~ok)
    if redo.size:
        at = xp.asarray(redo)
        y[at] = _pseudo_inverse_solve(Ms[at], bs[at], xp)[0]
    return y * d
