// Adaptive second moments of many PSF stamps (gpumatch.moments.adaptive_moments_batch,
// its NumPy twin): one thread block per stamp iterates the elliptical Gaussian
// weight to its fixed point without leaving the multiprocessor.
//
// Loaded by gpumatch/cuda/moments.py through cupy.RawModule (NVRTC). As array
// code the iteration is ~100 element-wise and reduction kernels per step for
// ~15 steps, all of them launch-bound for a few thousand 31x31 stamps; here it
// is one launch, the stamp in shared memory, float64 throughout.
//
// Per stamp (NumPy names):
//   pos = max(img, 0); ok = all finite and sum(pos) > 0 (else NaN out)
//   xc, yc = centroid of pos; wxx = wyy = max(1, min(nx, ny) / 8)^2, wxy = 0
//   repeat up to max_iter times:
//     w = exp(-q / 2) img, q the quadratic form of (wxx, wyy, wxy) at (x - xc, y - yc)
//     s, and the w-weighted first and second moments about (xc, yc)
//     new weight = inverse(inverse(Q) - inverse(W)) where that is positive
//     definite, else 2 Q; new centre = weighted centroid
//     change = max(max |dW| / max(wxx, wyy), |dxc| + |dyc|)   (NaN propagates)
//     non-finite change: nothing is updated (the result will be NaN);
//     else update; converged when change < rtol
//   out = (xc, yc, wxx, wyy, wxy), NaN unless ok and converged.
// Sums are block reductions in a fixed order, so results are deterministic and
// agree with NumPy's to rounding (a stamp that converges right at rtol may take
// one step more or less: differences of order rtol).

#ifndef AM_THREADS
#define AM_THREADS 128
#endif

#if (AM_THREADS & (AM_THREADS - 1)) != 0
#error "AM_THREADS must be a power of two"
#endif

#define AM_NSUM 6

// NaN-propagating maximum (C's fmax ignores NaN; NumPy's maximum does not).
__device__ __forceinline__ double am_max(double a, double b) {
    if (a != a || b != b) return a + b;
    return a > b ? a : b;
}

// Sum the AM_NSUM partial sums of every thread into red[k * AM_THREADS]
// (tree order, the same for every launch); all threads see the totals.
__device__ __forceinline__ void am_reduce(double* red, const double v[AM_NSUM]) {
    const int t = threadIdx.x;
#pragma unroll
    for (int k = 0; k < AM_NSUM; ++k) red[k * AM_THREADS + t] = v[k];
    __syncthreads();
    for (int stride = AM_THREADS / 2; stride > 0; stride >>= 1) {
        if (t < stride) {
#pragma unroll
            for (int k = 0; k < AM_NSUM; ++k)
                red[k * AM_THREADS + t] += red[k * AM_THREADS + t + stride];
        }
        __syncthreads();
    }
}

// Shared memory (doubles, in order; gpumatch/cuda/moments.py mirrors it):
//   img   ny * nx               the stamp (NaN-free copy, 0 where not ok)
//   red   AM_NSUM * AM_THREADS  reduction scratch
//   par   8                     xc, yc, wxx, wyy, wxy, state (0 run, 1 done, 2 failed)

extern "C" __global__ void __launch_bounds__(AM_THREADS)
gm_adaptive_moments(
    const double* __restrict__ stamps,   // (n, ny, nx), C-contiguous
    const int n, const int ny, const int nx,
    const int max_iter, const double rtol,
    double* __restrict__ out)             // (n, 5)
{
    extern __shared__ double gm_am_smem[];
    const int npix = ny * nx;
    double* img = gm_am_smem;
    double* red = img + npix;
    double* par = red + AM_NSUM * AM_THREADS;
    const int stamp = blockIdx.x;
    if (stamp >= n) return;                   // uniform over the block
    const int t = threadIdx.x;
    const double* src = stamps + (long long)stamp * npix;

    // ---- 1. stage the stamp; flux, centroid, finiteness ---------------------
    double v[AM_NSUM] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};   // pos, pos x, pos y, bad
    for (int p = t; p < npix; p += AM_THREADS) {
        const double a = src[p];
        img[p] = a;
        if (!isfinite(a)) {
            v[3] += 1.0;
        } else if (a > 0.0) {
            const int y = p / nx;
            const int x = p - y * nx;
            v[0] += a;
            v[1] += a * (double)x;
            v[2] += a * (double)y;
        }
    }
    am_reduce(red, v);
    const bool ok = red[3 * AM_THREADS] == 0.0 && red[0] > 0.0;
    if (t == 0) {
        const double tot = red[0];
        par[0] = red[AM_THREADS] / tot;
        par[1] = red[2 * AM_THREADS] / tot;
        const double w0 = am_max(1.0, (double)min(nx, ny) / 8.0);
        par[2] = w0 * w0;
        par[3] = w0 * w0;
        par[4] = 0.0;
        par[5] = ok ? 0.0 : 2.0;
    }
    __syncthreads();

    // ---- 2. iterate ----------------------------------------------------------------
    for (int it = 0; it < max_iter; ++it) {
        if (par[5] != 0.0) break;             // uniform: read after a barrier
        const double xc = par[0], yc = par[1], wxx = par[2], wyy = par[3], wxy = par[4];
        const double det = wxx * wyy - wxy * wxy;
#pragma unroll
        for (int k = 0; k < AM_NSUM; ++k) v[k] = 0.0;
        for (int p = t; p < npix; p += AM_THREADS) {
            const int y = p / nx;
            const int x = p - y * nx;
            const double dx = (double)x - xc;
            const double dy = (double)y - yc;
            const double q = (wyy * dx * dx - 2.0 * wxy * dx * dy + wxx * dy * dy) / det;
            const double w = exp(-0.5 * q) * img[p];
            v[0] += w;
            v[1] += w * dx;
            v[2] += w * dy;
            v[3] += w * dx * dx;
            v[4] += w * dy * dy;
            v[5] += w * dx * dy;
        }
        __syncthreads();                      // everyone has read par before it changes
        am_reduce(red, v);
        if (t == 0) {
            double s = red[0];
            if (!(s > 0.0)) s = __longlong_as_double(0x7ff8000000000000LL);
            const double nxc = xc + red[AM_THREADS] / s;
            const double nyc = yc + red[2 * AM_THREADS] / s;
            const double qxx = red[3 * AM_THREADS] / s;
            const double qyy = red[4 * AM_THREADS] / s;
            const double qxy = red[5 * AM_THREADS] / s;
            const double qdet = qxx * qyy - qxy * qxy;
            const double ia = qyy / qdet - wyy / det;
            const double ib = qxx / qdet - wxx / det;
            const double ic = -qxy / qdet + wxy / det;
            const double idet = ia * ib - ic * ic;
            const bool good = (qdet > 0.0) && (ia > 0.0) && (idet > 0.0);
            const double nxx = good ? ib / idet : 2.0 * qxx;
            const double nyy = good ? ia / idet : 2.0 * qyy;
            const double nxy = good ? -ic / idet : 2.0 * qxy;
            double change = am_max(fabs(nxx - wxx), am_max(fabs(nyy - wyy), fabs(nxy - wxy)));
            change = am_max(change / am_max(wxx, wyy), fabs(nxc - xc) + fabs(nyc - yc));
            if (!isfinite(change)) {
                par[5] = 2.0;                 // NumPy keeps the old values and never converges
            } else {
                par[0] = nxc;
                par[1] = nyc;
                par[2] = nxx;
                par[3] = nyy;
                par[4] = nxy;
                if (change < rtol) par[5] = 1.0;
            }
        }
        __syncthreads();
    }

    if (t == 0) {
        const bool done = par[5] == 1.0;
        double* o = out + (long long)stamp * 5;
        for (int k = 0; k < 5; ++k) o[k] = done ? par[k] : __longlong_as_double(0x7ff8000000000000LL);
    }
}
