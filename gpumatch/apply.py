"""Exact per-pixel application of a spatial kernel to an exposure (docs/algorithm.md section 7).

At output pixel ``(x, y)`` the kernel is ``K = sum_k X^a Y^c Q_k`` (scaled
monomials, see :meth:`SpatialKernel.scaled_terms`), so

    image_out = sum_k X^a Y^c (image (*) Q_k) / sum(K)
    var_out   = sum_m X^A Y^C (variance (*) V_m) / sum(K)^2,
    V_m = sum over pairs (k, k') with exponents adding to m of Q_k Q_k'.

Each term is a plain correlation with a fixed kernel, done with overlap-save
FFTs on tiles, so the result equals evaluating and normalising the kernel at
every pixel, not an interpolation. The ``Y`` part of each monomial is applied
to the input rows and only the ``X`` part to the outputs (binomial expansion
in the kernel's row offset), tiles are transformed in float32 where their
dynamic range keeps the error below 1e-6 of their values and in float64
elsewhere, and bands of tiles run on several threads with the same result as
one. Inputs the FFTs cannot carry exactly are
handled apart: NaN spreads to every output whose footprint covers it; outputs
that see an infinity, or a finite value far out of the plane's range (a -1e30
bad-pixel sentinel), are computed by direct sums, so such a value changes no
output whose footprint does not cover it (docs/algorithm.md section 7).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from .basis import polynomial_exponents
from .threads import host_threads, map_in_threads
from .tiles import choose_tile

log = logging.getLogger("gpumatch")

__all__ = ["apply_kernel", "start_apply_kernel", "PendingExposure", "convolve_planes",
           "footprint_or", "direct_convolve_pixels", "edge_planes", "variance_terms",
           "out_of_range", "RANGE_FACTOR"]

#: Tiles transformed together: a group's arrays stay in a core's cache.
_GROUP = 4

#: Finite values larger in magnitude than this factor times the plane's typical
#: magnitude are left out of the FFTs (and their outputs summed directly). The
#: FFTs round at about 1e-16 of the largest value of a tile, which reaches
#: every output of the tile (measured: 1.25e-17 of the outlier on the outputs of
#: a 21x21 kernel), so this keeps that error below ~1e-7 of typical outputs;
#: real sources (even saturated stars, ~1e5 times the noise) stay far below.
#: Float32 tiles need no tighter factor: a tile goes to float32 only when all
#: its values lie within a factor of about 25 / (kernel amplification) of its
#: smallest magnitude (:data:`F32_TARGET`), so bright values send their tiles
#: to float64, where this factor holds.
RANGE_FACTOR = 1e9
_SAMPLE = 65536    # pixels sampled for the typical magnitude


def _sliding_or(a, length, axis):
    """``out[t] = a[t] | ... | a[t + length - 1]`` along ``axis`` (valid part)."""
    n = a.shape[axis]
    if length > n:
        shape = list(a.shape)
        shape[axis] = 0
        return np.zeros(shape, dtype=a.dtype)

    def take(arr, start, stop):
        idx = [slice(None)] * arr.ndim
        idx[axis] = slice(start, stop)
        return arr[tuple(idx)]

    span = 1
    cur = a
    while 2 * span <= length:
        m = cur.shape[axis]
        cur = take(cur, 0, m - span) | take(cur, span, m)
        span *= 2
    m = cur.shape[axis]
    out_len = n - length + 1
    # Two overlapping power-of-two windows cover the whole window (OR is idempotent).
    return take(cur, 0, out_len) | take(cur, length - span, length - span + out_len)


def footprint_or(plane, support):
    """OR of ``plane`` over a kernel footprint, for every interior output pixel.

    Parameters
    ----------
    plane : integer or bool array (ny, nx)
    support : bool array (k, k)
        Footprint pixels (``support[j, i]`` reads input offset
        ``(j - h, i - h)``, the orientation of docs/algorithm.md section 5).

    Returns
    -------
    array (ny - k + 1, nx - k + 1)
        For output pixel ``(y, x)`` (interior, shifted by ``h``).
    """
    k = support.shape[0]
    ny, nx = plane.shape
    out = np.zeros((max(ny - k + 1, 0), max(nx - k + 1, 0)), dtype=plane.dtype)
    _footprint_or_into(plane, support, out)
    return out


#: Output rows of the mask OR done at a time: the temporaries stay a few
#: megabytes instead of several full planes.
_OR_ROWS = 128


def _footprint_or_into(plane, support, out):
    """:func:`footprint_or` written into ``out`` (ny - k + 1, nx - k + 1), band by band."""
    for r0 in range(0, out.shape[0], _OR_ROWS):
        _footprint_or_rows(r0, (plane, support, out))


def _footprint_or_rows(r0, args):
    """Rows ``r0 .. r0 + _OR_ROWS - 1`` of :func:`_footprint_or_into`; returns 0."""
    plane, support, out = args
    k = support.shape[0]
    r1 = min(out.shape[0], r0 + _OR_ROWS)
    out[r0:r1] = _footprint_or_band(plane[r0:r1 + k - 1], support)
    return 0


def _footprint_or_band(plane, support):
    k = support.shape[0]
    ny, nx = plane.shape
    oy, ox = ny - k + 1, nx - k + 1
    out = np.zeros((max(oy, 0), max(ox, 0)), dtype=plane.dtype)
    if oy <= 0 or ox <= 0 or not support.any():
        return out
    if support.all():
        return _sliding_or(_sliding_or(plane, k, 1), k, 0)
    cache = {}
    for j in range(k):
        row = support[j]
        i = 0
        while i < k:
            if not row[i]:
                i += 1
                continue
            i0 = i
            while i < k and row[i]:
                i += 1
            key = (i0, i)
            if key not in cache:
                cache[key] = _sliding_or(plane[:, i0:], i - i0, 1)[:, :ox]
            out |= cache[key][j:j + oy]
    return out


def _dilate(bad, k):
    """Outputs (interior, like :func:`footprint_or`) whose k x k box holds a True."""
    return footprint_or(bad.view(np.uint8) if bad.dtype == bool else bad,
                        np.ones((k, k), dtype=bool)).astype(bool)


#: Bound on the error of a float32 overlap-save correlation, relative to
#: ``max |tile|`` and per unit of the kernel's L1 norm (measured on 256-pixel
#: tiles with 21x21 kernels: 3.8e-8 for a unit-sum Gaussian on noise, 1.6e-8
#: for noisy kernels of L1 norm 17, 1.8e-9 for a single spike).
_F32_ERROR = 4e-8
#: Tiles are transformed in float32 only where that error bound stays below
#: this fraction of the smallest magnitude of the tile's values (so of the
#: outputs), float64 elsewhere (tiles of mixed sign, zeros, bright sources).
F32_TARGET = 1e-6


def _row_split(kernels, terms, k, hy):
    """Kernels ``G[a, p]`` with ``sum_k X^a Y^c Q_k = sum_(a,p) X^a Yin^p G[a, p]``.

    ``Y`` is the scaled row of the output, ``Yin`` that of the input pixel a
    tap reads: ``Y = Yin + (h - j) / hy`` for kernel row ``j``, so by the
    binomial theorem ``Y^c = sum_p C(c, p) Yin^p ((h - j) / hy)^(c - p)``. The
    ``Yin^p`` then weight the input (one transform per ``p``) and only the
    ``X^a`` weight outputs (one inverse transform per ``a``).

    Returns
    -------
    keys : list of (a, p)
    G : float64 array (len(keys), k, k)
    """
    from math import comb

    h = k // 2
    d = (h - np.arange(k)) / hy
    acc = {}
    for q, (a, c) in zip(kernels, terms):
        for p in range(c + 1):
            g = acc.setdefault((a, p), np.zeros((k, k)))
            g += comb(c, p) * (d ** (c - p))[:, None] * q
    keys = sorted(acc)
    return keys, np.array([acc[key] for key in keys])


def _sums_matrix(kernels, terms, order):
    """``S[c, a] = sum(kernel of X^a Y^c)``: the kernel sums as ``Y^T S X``."""
    S = np.zeros((order + 1, order + 1))
    for q, (a, c) in zip(kernels, terms):
        S[c, a] += q.sum()
    return S


class _Correlator:
    """``(sum_m X^a Y^c (plane (*) kernels[m]) + offset * sum(K^power)) / sum(K)^power``
    on the interior, written band by band into ``out``.

    The plane enters the FFTs minus ``offset`` (a typical value), whose
    contribution is added back exactly from the kernel sums; tiles whose
    dynamic range allows it are transformed in float32, the others in float64.
    """

    def __init__(self, plane, kernels, terms, order, norm_S, power, offset, X, Y, yin, k, hy):
        import scipy.fft

        self.fft = scipy.fft
        self.plane, self.k, self.h = plane, k, k // 2
        ny, nx = plane.shape
        self.oy, self.ox = ny - 2 * self.h, nx - 2 * self.h
        t = self.t = choose_tile(self.oy, self.ox, k)
        b = self.b = t - 2 * self.h
        self.nty, self.ntx = -(-self.oy // b), -(-self.ox // b)
        keys, G = _row_split(kernels, terms, k, hy)
        self.keys = keys
        self.P = 1 + max(p for _, p in keys)
        self.alist = sorted({a for a, _ in keys})
        # Correlation = convolution with the flipped kernel; the valid part of
        # the circular result starts at 2h.
        self._flipped = G[:, ::-1, ::-1]
        self._spec, self._spec_lock = {}, threading.Lock()
        self.l1 = float(np.abs(G).sum())
        ptop = max(a + c for a, c in terms)
        self.Ypow = Y[:, None] ** np.arange(ptop + 1)
        self.Xpow = X[:, None] ** np.arange(ptop + 1)
        self.S_num = _sums_matrix(kernels, terms, ptop)
        # The offset is a value of the plane's type, so a tile minus it is exact
        # before any rounding to float32.
        self.S_norm, self.power = norm_S, power
        self.offset = float(np.asarray(offset, dtype=plane.dtype))
        self.offset_S = self.offset * self.S_num
        no = norm_S.shape[0]
        self.Ypow_n, self.Xpow_n = self.Ypow[:, :no], self.Xpow[:, :no]
        xt = np.zeros(self.ntx * b)
        xt[:self.ox] = X
        self.xt1 = xt.reshape(1, self.ntx, b)
        ypad = np.zeros((self.nty - 1) * b + t)
        ypad[:ny] = yin
        self.yin = ypad
        self.fft_workers = 1
        self._local = threading.local()

    def _spectra(self, dtype):
        """The kernels' spectra in the precision of ``dtype`` tiles, made on first
        use (a plane whose tiles are all float32 never holds the float64 ones)."""
        spec = self._spec.get(dtype)
        if spec is None:
            with self._spec_lock:
                spec = self._spec.get(dtype)
                if spec is None:
                    t = self.t
                    spec = self.fft.rfft2(self._flipped, s=(t, t))
                    if dtype == np.float32:
                        spec = spec.astype(np.complex64)
                    spec = self._spec[dtype] = spec
        return spec

    def _buffers(self):
        """Per-thread work arrays, reused from band to band (fresh full-size
        temporaries cost page faults, which serialise the threads)."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            b = self.b
            bufs = self._local.bufs = {"tmp": np.empty((b, _GROUP, b))}
        return bufs

    def _typed_buffers(self, bufs, dtype):
        """Tile, weighted row-transform, product and partial-product arrays of one
        precision for a group of ``_GROUP`` tiles, made on first use."""
        if dtype not in bufs:
            t, g = self.t, _GROUP
            cdtype = np.complex64 if dtype == np.float32 else np.complex128
            bufs[dtype] = (np.empty((g, t, t), dtype),
                           *(np.empty((g, t, t // 2 + 1), cdtype) for _ in range(3)))
        return bufs[dtype]

    def _tile_ranges(self, block):
        """Per tile of a band, the largest and smallest input value, counting
        the zero padding beyond the plane as the offset (what it stands for)."""
        t, b, ntx = self.t, self.b, self.ntx
        nx = block.shape[1]
        colmax, colmin = block.max(axis=0), block.min(axis=0)
        hi, lo = np.empty(ntx), np.empty(ntx)
        padded_rows = block.shape[0] < t
        for i in range(ntx):
            c0, c1 = i * b, min(nx, i * b + t)
            hi[i], lo[i] = colmax[c0:c1].max(), colmin[c0:c1].min()
            if padded_rows or i * b + t > nx:
                hi[i], lo[i] = max(hi[i], self.offset), min(lo[i], self.offset)
        return hi, lo

    def band(self, r, out):
        """Outputs of the band of tiles ``r`` (rows ``r b`` .. ``r b + b - 1``)
        into ``out``; returns how many of its tiles were done in float32."""
        t, b = self.t, self.b
        ny = self.plane.shape[0]
        bufs = self._buffers()
        r0 = r * b
        nrow = min(self.oy, r0 + b) - r0
        rows = slice(r0, r0 + nrow)
        norm = self.Ypow_n[rows] @ self.S_norm @ self.Xpow_n.T
        if self.power == 2:
            norm *= norm
        block = self.plane[r0:min(ny, r0 + t)]
        vhi, vlo = self._tile_ranges(block)
        spread = np.maximum(vhi - self.offset, self.offset - vlo)
        floor = np.where(vlo > 0, vlo, np.where(vhi < 0, -vhi, 0.0))
        # The float32 error bound, relative to the smallest |value| of the tile.
        lo, hi = norm.min(), norm.max()  # min |norm| without a temporary
        least = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
        amp = self.l1 / least if least > 0 else np.inf
        use32 = _F32_ERROR * amp * spread <= F32_TARGET * floor
        for dtype, sel in ((np.float32, use32), (np.float64, ~use32)):
            idx = np.flatnonzero(sel)
            # A few tiles at a time: their transforms, products, sums and
            # normalisation stay in the core's cache (a whole band's do not).
            for i in range(0, idx.size, _GROUP):
                self._tiles(block, idx[i:i + _GROUP], rows, dtype, norm, out, bufs)
        return int(use32.sum())

    def _tiles(self, block, idx, rows, dtype, norm, out, bufs):
        """The outputs of tiles ``idx`` of one band in precision ``dtype``, written
        to ``out[rows]``; ``norm`` is the band's ``sum(K)^power``.

        ``block`` holds the band's input rows; each tile is its ``t x t``
        window minus the offset (a value of the plane's type), zero beyond
        the plane."""
        fft, t, b, h = self.fft, self.t, self.b, self.h
        n = idx.size
        part, weighted, prod, cprod = (x[:n] for x in self._typed_buffers(bufs, dtype))
        r0, nrow = rows.start, rows.stop - rows.start
        ny_in, nx = block.shape
        # x - offset of two float32 values is exact in float64, so its float32
        # rounding is the float32 subtraction's: float32 tiles of a float32
        # plane need no float64 pass (float64 tiles get the exact difference).
        sub_dtype = np.float32 if block.dtype == np.float32 == dtype else np.float64
        for j, i in enumerate(idx):
            c0 = i * b
            cols = min(nx, c0 + t) - c0
            np.subtract(block[:, c0:c0 + cols], self.offset, out=part[j, :ny_in, :cols],
                        dtype=sub_dtype, casting="same_kind")
            part[j, ny_in:] = 0
            part[j, :ny_in, cols:] = 0
        # The weights Yin^p are constant along each row, so they commute with the
        # transform along the rows: that is done once, then the weighted
        # copies are transformed along the columns.
        rows_ft = fft.rfft(part, axis=-1, workers=self.fft_workers)
        F = [fft.fft(rows_ft, axis=-2, workers=self.fft_workers)]
        yin = self.yin[r0:r0 + t, None].astype(dtype)
        ypow = yin
        for p in range(1, self.P):
            np.multiply(rows_ft, ypow, out=weighted)
            F.append(fft.fft(weighted, axis=-2, workers=self.fft_workers))
            if p + 1 < self.P:
                ypow = ypow * yin
        spec = self._spectra(dtype)
        sub = bufs["tmp"][:nrow, :n]  # [row, tile, column]
        xt = self.xt1[:, idx]
        # Horner in X: highest power first, sub = sub * X + term; the first
        # term waits in its own array until the first product writes sub.
        prev, pending = self.alist[-1], None
        for a in self.alist[::-1]:
            first = True
            for m, (aa, p) in enumerate(self.keys):
                if aa != a:
                    continue
                if first:
                    np.multiply(F[p], spec[m], out=prod)
                    first = False
                else:
                    np.multiply(F[p], spec[m], out=cprod)
                    prod += cprod
            conv = fft.irfft2(prod, s=(t, t), workers=self.fft_workers)
            crop = conv[:, 2 * h:2 * h + nrow, 2 * h:].transpose(1, 0, 2)
            if a == prev:
                pending = crop
            else:
                weight = xt if prev - a == 1 else xt ** (prev - a)
                if pending is not None:
                    np.multiply(pending, weight, out=sub)
                    pending = None
                else:
                    sub *= weight
                sub += crop
            prev = a
        if pending is not None:
            np.copyto(sub, pending)
        if prev:
            sub *= xt ** prev
        for j, i in enumerate(idx):
            c0 = i * b
            c1 = min(self.ox, c0 + b)
            res = sub[:, j, :c1 - c0]
            if self.power == 1:
                # The image's offset comes back whole: c0 sum(K) / sum(K) = c0.
                res /= norm[:, c0:c1]
                np.add(res, self.offset, out=out[rows, c0:c1], casting="same_kind")
            else:
                if self.offset:
                    res += self.Ypow[rows] @ self.offset_S @ self.Xpow[c0:c1].T
                np.divide(res, norm[:, c0:c1], out=out[rows, c0:c1], casting="same_kind")


def _typical_magnitude(data):
    """Lower quartile of ``|data|`` over the finite, non-zero values of a strided
    sample of about 65,536 pixels (the whole plane when the sample holds none);
    0 for a plane without such values.

    A quartile rather than the median: huge values on up to 3/4 of the plane (a
    mostly masked exposure filled with sentinels) still cannot raise it. Too low
    a value only sends more outputs to the direct sums (slower, still exact);
    too high a value would let outliers into the FFTs."""
    step = max(1, int(np.sqrt(data.size / _SAMPLE)))
    for sample in (data[::step, ::step], data):
        a = np.abs(sample[np.isfinite(sample)])
        a = a[a > 0]
        if a.size:
            return float(np.quantile(a, 0.25))
    return 0.0


def _typical_value(data):
    """Median of the finite values of a strided sample of about 65,536 pixels
    (0 without any): the offset taken out of the FFT input, so that the
    transforms carry only the deviations from it."""
    step = max(1, int(np.sqrt(data.size / _SAMPLE)))
    sample = data[::step, ::step]
    sample = sample[np.isfinite(sample)]
    return float(np.median(sample)) if sample.size else 0.0


def out_of_range(data, factor=RANGE_FACTOR):
    """Pixels of a plane that the FFTs cannot carry exactly.

    Parameters
    ----------
    data : float64 array (ny, nx)
    factor : float
        Finite values with ``|value| > factor * typical`` count (typical: the
        lower quartile of the magnitudes of the plane's finite non-zero values).

    Returns
    -------
    bool array (ny, nx) or None
        True at NaN, infinite and out-of-range pixels; None when there are none
        (the common case, found with two reductions and no full-size temporary).
    """
    lo, hi = data.min(), data.max()      # NaN propagates: one pass tells both
    limit = factor * _typical_magnitude(data)
    if np.isfinite(lo) and np.isfinite(hi) and max(-lo, hi) <= limit:
        return None
    with np.errstate(invalid="ignore"):
        return ~(np.abs(data) <= limit)      # NaN compares False


def edge_planes(shape, dtypes, no_data_bit, xp=np, border=None):
    """Image, variance and mask planes holding the edge values.

    NaN, +inf and only the NO_DATA bit (docs/algorithm.md section 7); the application fills
    the interior.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` in pixels.
    dtypes : tuple of dtype
        Image, variance and mask types.
    no_data_bit : int
        Bitmask of the mask's edge value.
    xp : module
        Array namespace of the planes.
    border : int, optional
        Width in pixels of the edge frame, when the caller writes every other
        pixel, the frame's side columns included: only the top and bottom
        ``border`` rows are filled (the rest is left uninitialised, so that
        the caller's threads touch those pages first). Default: the whole
        planes hold the edge values.
    """
    values = (np.nan, np.inf, np.array(int(no_data_bit)).astype(dtypes[2])[()])
    if border is None or 2 * border >= min(shape):
        return tuple(xp.full(shape, v, dtype=d) for v, d in zip(values, dtypes))
    planes = tuple(xp.empty(shape, dtype=d) for d in dtypes)
    h = border
    for plane, v in zip(planes, values if h else ()):
        plane[:h] = v
        plane[plane.shape[0] - h:] = v
    return planes


def variance_terms(Q, exponents, order):
    """Kernels of ``K^2 = sum_m X^A Y^C V_m`` from ``K = sum_k X^a Y^c Q_k``.

    Returns the exponents ``(A, C)`` (all of total degree ``<= 2 order``) and
    ``V`` ``(len, k, k)``: pair products ``Q_k Q_k'`` grouped by the product
    monomial.
    """
    exps2 = polynomial_exponents(2 * order)
    index2 = {e: m for m, e in enumerate(exps2)}
    V = np.zeros((len(exps2),) + Q.shape[1:])
    for i, (a1, c1) in enumerate(exponents):
        for j, (a2, c2) in enumerate(exponents):
            V[index2[(a1 + a2, c1 + c2)]] += Q[i] * Q[j]
    return exps2, V


def direct_convolve_pixels(plane, kernel, box, ys, xs, square=False):
    """Brute-force output at array pixels ``(ys, xs)`` (all interior).

    The normalised kernel is evaluated at each pixel's parent position; with
    ``square`` its square is used (variance propagation).
    """
    k = kernel.dimensions[0]
    h = k // 2
    out = np.empty(len(ys))
    off = np.arange(-h, h + 1)
    for start in range(0, len(ys), 4096):
        yy = ys[start:start + 4096]
        xx = xs[start:start + 4096]
        K = kernel.compute_images(xx + box.x0, yy + box.y0, normalize=True)
        if square:
            K = K * K
        patch = plane[(yy[:, None, None] + off[None, :, None]), (xx[:, None, None] + off[None, None, :])]
        with np.errstate(invalid="ignore"):
            out[start:start + 4096] = (patch * K).sum(axis=(1, 2))
    return out


def _clip_negative_variance(result, variance, k):
    """Set to 0 the negative outputs whose footprint holds no negative variance.

    A sum of ``Khat^2 * variance`` over non-negative variances is non-negative;
    FFT rounding (about 1e-16 of a tile's largest variance) can still give tiny
    negative values where the exact result is 0 or near it, and 0 is closer to
    the exact value. NaN stays NaN.
    """
    lowest = result.min()                  # NaN when there is one: look closer then
    if lowest >= 0:
        return
    with np.errstate(invalid="ignore"):
        ok = ~_dilate(variance < 0, k) if np.nanmin(variance) < 0 else True
        np.copyto(result, 0.0, where=(result < 0) & ok)


def convolve_planes(image, variance, mask, kernel, box, no_data_bit):
    """NumPy implementation of docs/algorithm.md section 7 on plain arrays.

    Parameters
    ----------
    image, variance : float arrays (ny, nx)
    mask : integer array (ny, nx)
    kernel : SpatialKernel
    box : Box
        Parent bbox of the planes.
    no_data_bit : int
        Bitmask given to edge pixels.

    Returns
    -------
    image_out, variance_out, mask_out : new arrays of the input dtypes.

    Notes
    -----
    Bands of FFT tiles run on ``GPUMATCH_THREADS`` threads (default: every
    core); each band is computed whole by one thread in a fixed order, so the
    result does not depend on the number of threads. BLAS is held to one
    thread for the same reason (the normalisation is a small matrix product).
    """
    from .backend import single_threaded_blas

    with single_threaded_blas():
        return _convolve_planes(image, variance, mask, kernel, box, no_data_bit)


def _convolve_planes(image, variance, mask, kernel, box, no_data_bit):
    """:func:`convolve_planes` inside the one-thread BLAS limit."""
    ny, nx = image.shape
    k = kernel.dimensions[0]
    h = k // 2
    # Only the top and bottom edge rows are filled here; the edge columns and
    # every interior pixel are written by the jobs below.
    image_out, var_out, mask_out = edge_planes(
        (ny, nx), (image.dtype, variance.dtype, mask.dtype), no_data_bit, border=h)
    oy, ox = ny - 2 * h, nx - 2 * h
    if oy <= 0 or ox <= 0:
        log.warning("exposure %dx%d is no larger than the %dx%d kernel: every pixel is edge",
                    nx, ny, k, k)
        return image_out, var_out, mask_out
    inner = (slice(h, ny - h), slice(h, nx - h))

    Q, exps, (cx, cy, hx, hy) = kernel.scaled_terms(box)
    X = (np.arange(h, nx - h) + box.x0 - cx) / hx
    Y = (np.arange(h, ny - h) + box.y0 - cy) / hy
    yin = (np.arange(ny) + box.y0 - cy) / hy        # scaled rows of the input pixels
    order = kernel.spatial_order
    norm_S = _sums_matrix(Q, exps, order)

    exps2, V = variance_terms(Q, exps, order)

    def prepare(spec):
        plane, kernels, terms, square, out = spec
        data = np.asarray(plane)
        if data.dtype.kind != "f":
            data = data.astype(np.float64)
        special = out_of_range(data)
        fft_data = data if special is None else np.where(special, 0, data)
        corr = _Correlator(fft_data, kernels, terms, order, norm_S, 2 if square else 1,
                           _typical_value(fft_data), X, Y, yin, k, hy)
        return corr, out[inner], data, special, square

    # The two planes' scans and kernel spectra at once.
    planes = map_in_threads(prepare, [(image, Q, exps, False, image_out),
                                      (variance, V, exps2, True, var_out)])

    # Variance bands, image bands, mask rows and edge columns (the longest
    # jobs first, so that the threads finish together): one pool, so that no
    # thread waits between planes and the outputs' first-touch page faults
    # are shared out.
    support = np.any(Q != 0, axis=0)
    jobs = [(corr.band, r, result) for corr, result, *_ in planes[::-1] for r in range(corr.nty)]
    jobs += [(_footprint_or_rows, r0, (mask, support, mask_out[inner]))
             for r0 in range(0, oy, _OR_ROWS)]
    # (Each plane's edge value is the one edge_planes put in its top rows.)
    jobs += [(_edge_columns, r0, (out, h, out[0, 0])) for out in (image_out, var_out, mask_out)
             for r0 in range(h, ny - h, _OR_ROWS) if h]
    counts = _run_jobs(jobs, [corr for corr, *_ in planes])

    for (corr, result, data, special, square), n32 in zip(planes, counts):
        log.debug("%s: %d of %d tiles in float32", "variance" if square else "image",
                  n32, corr.nty * corr.ntx)
        if special is not None:
            nan_out = _dilate(np.isnan(data), k)
            direct_out = _dilate(special, k) & ~nan_out
            result[nan_out] = np.nan
            iy, ix = np.nonzero(direct_out)
            log.debug("%s: %d non-finite or out-of-range inputs, %d outputs summed directly",
                      "variance" if square else "image", int(special.sum()), iy.size)
            if iy.size:
                result[iy, ix] = direct_convolve_pixels(data, kernel, box, iy + h, ix + h, square)
        if square:
            _clip_negative_variance(result, data, k)
    return image_out, var_out, mask_out


def _edge_columns(r0, args):
    """The ``h`` edge columns on each side of rows ``r0 .. r0 + _OR_ROWS - 1``
    (bounded by the bottom edge rows) set to ``value``; returns 0."""
    plane, h, value = args
    r1 = min(plane.shape[0] - h, r0 + _OR_ROWS)
    plane[r0:r1, :h] = value
    plane[r0:r1, plane.shape[1] - h:] = value
    return 0


def _run_jobs(jobs, correlators):
    """Run ``fn(index, arg)`` for every job (:func:`gpumatch.threads.map_in_threads`);
    returns each correlator's count of float32 tiles. Each job writes its own
    rows whole."""
    threads = host_threads()
    workers = min(threads, len(jobs))
    # Fewer jobs than threads (small planes): the spare threads go to each
    # transform (pocketfft splits lines, so the bits stay the same).
    for corr in correlators:
        corr.fft_workers = max(1, threads // max(1, workers))
    done = map_in_threads(lambda job: job[0](job[1], job[2]), jobs, workers)
    counts = []
    for corr in correlators:
        counts.append(sum(n for (fn, _, _), n in zip(jobs, done)
                          if getattr(fn, "__self__", None) is corr))
    return counts


def apply_kernel(exposure, kernel, psf=None, backend="numpy"):
    """Convolve an exposure with a spatial kernel, exactly per pixel.

    Parameters
    ----------
    exposure : Exposure
        Not modified.
    kernel : SpatialKernel
        The kernel, evaluated and normalised at every output pixel (parent
        coordinates), for example ``result.psfMatchingKernel``.
    psf : Psf, optional
        PSF of the output exposure (the input's when omitted).
    backend : str or Backend
        A registered backend name (see :func:`gpumatch.backend.backend_names`)
        or a :class:`gpumatch.backends.Backend`.

    Returns
    -------
    Exposure
        Same bbox, metadata and mask planes; edge pixels (within ``k // 2`` of a
        border) have image NaN, variance +inf and only the NO_DATA bit. Like a
        match's output it carries ``provenance`` (with ``config`` None and
        ``configMode`` ``{"mode": "kernel"}``; ``reference`` is ``psf``) and
        ``noise_correlation`` (docs/algorithm.md section 14.1).
    """
    from .backends import Backend, get_backend, resolve_backend_name
    from .provenance import record_match, start_input_checksum

    if not isinstance(backend, Backend):
        backend = get_backend(resolve_backend_name(backend))
    checksum = start_input_checksum(exposure)
    out = start_apply_kernel(exposure, kernel, psf, backend).result()
    record_match(out, exposure, exposure.psf if psf is None else psf, kernel, None, backend.name,
                 checksum)
    return out


class PendingExposure:
    """An application that may still be running on the device."""

    def __init__(self, planes, exposure, psf):
        self._planes, self._exposure, self._psf = planes, exposure, psf

    def wait(self):
        """Wait until the planes are complete."""
        if hasattr(self._planes, "wait"):
            self._planes.wait()

    def result(self):
        """The matched :class:`~gpumatch.Exposure`, once its planes are complete."""
        planes = self._planes.result() if hasattr(self._planes, "result") else self._planes
        return self._exposure.copy_metadata_to(*planes, psf=self._psf)


def start_apply_kernel(exposure, kernel, psf=None, backend="numpy", transfers=None):
    """:func:`apply_kernel`, returned once the work is queued.

    On the CPU the work is done before this returns. On the device it returns
    when every copy and launch is queued, so the host can go on (for example
    to queue the next exposure's copies on the same ``transfers``, a
    :class:`gpumatch.cuda.apply.HostTransfers`).

    Returns
    -------
    PendingExposure
        Its ``result()`` waits for the device and returns the Exposure.
    """
    from .backends import Backend, get_backend, resolve_backend_name

    if not isinstance(backend, Backend):
        backend = get_backend(resolve_backend_name(backend))
    return backend.start_apply(exposure, kernel, psf, transfers)
