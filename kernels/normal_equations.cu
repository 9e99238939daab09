// Per-candidate normal equations (docs/algorithm.md section 6), fused: basis convolutions of
// each template stamp on the good region and the products M = C^T C / var,
// b = C^T s / var, in float64, one thread block per candidate.
//
// Loaded by gpumatch/cuda/normal_equations.py through cupy.RawModule (NVRTC);
// the shape is fixed at compile time by -D options, with the production
// configuration (31-pixel stamps, 21-pixel kernel, 27 bases) as defaults so that
// `nvcc -arch=sm_90 -c normal_equations.cu` compiles the file as it stands.
//
// Why a fused kernel and not batched GEMMs: as GEMMs the design matrices are
// an im2col product, patches (n * g^2, k^2) x basis (k^2, nb). For the
// production case (1,156 candidates, g = 11, k = 21) the patch matrix alone is
// 1156 * 121 * 441 doubles = 493 MB written and read back (about 0.3 ms of
// HBM traffic plus the memory), and C (n, 121, 27) makes another round trip
// before the small C^T C products. Here each block keeps its 31x31 stamp
// (8 KB) and its C (26 KB) in shared memory, so the only traffic is the stamps
// in and M, b out (about 7 MB), and the 3.3 GFLOP of float64 convolution runs
// from registers.
//
// Thread mapping (phase 2): a work item is one (basis b, good row py) pair; it
// keeps the g outputs of that row in registers and, for each kernel row j,
// loads the stamp row py + j (the full stamp width, 16-byte vector loads) and
// the k basis values B[b, j, :] (read-only cache; items of one warp share at
// most three bases), then does k * g FMAs. Items are ordered with py fastest
// so that the threads of a warp read different stamp rows, which the row
// pitch spreads over different banks.
// Phase 3: one dot product of length g^2 per entry of the upper triangle of M
// (mirrored) and per entry of b. Accumulation is float64 throughout.

#ifndef NE_KSIZE
#define NE_KSIZE 21
#endif
#ifndef NE_STAMP
#define NE_STAMP 31
#endif
#ifndef NE_NBASIS
#define NE_NBASIS 27
#endif
#ifndef NE_MAX_THREADS
#define NE_MAX_THREADS 256
#endif

#if (NE_KSIZE % 2) != 1
#error "NE_KSIZE must be odd"
#endif
#if NE_STAMP < NE_KSIZE
#error "the stamp must be at least as large as the kernel"
#endif

#define NE_HALF (NE_KSIZE / 2)
#define NE_G (NE_STAMP - NE_KSIZE + 1)          // good pixels per row
#define NE_GG (NE_G * NE_G)
#define NE_WIN ((NE_STAMP + 1) / 2 * 2)          // doubles loaded per stamp row (even)
// Row pitch of the staged stamp, in doubles: a multiple of 2 (16-byte rows) with
// an odd number of 16-byte chunks, so consecutive rows start in different banks.
#define NE_TPITCH (((NE_WIN / 2) % 2 == 1) ? NE_WIN : (NE_WIN + 2))
#define NE_CPITCH ((NE_NBASIS % 2 == 1) ? NE_NBASIS : (NE_NBASIS + 1))
#define NE_SS_LEN ((NE_GG + 1) / 2 * 2)

// Shared memory (doubles, in order; gpumatch/cuda/normal_equations.py mirrors it):
//   sT  NE_STAMP * NE_TPITCH   template stamp (padding columns zeroed)
//   sS  NE_SS_LEN              target stamp on the good region, row-major
//   sC  NE_GG * NE_CPITCH      design matrix C[p][b]

extern "C" __global__ void __launch_bounds__(NE_MAX_THREADS)
gm_candidate_normal_equations(
    const double* __restrict__ templates,   // (n, NE_STAMP, NE_STAMP), C-contiguous
    const double* __restrict__ targets,     // (n, NE_STAMP, NE_STAMP), C-contiguous
    const double* __restrict__ basis,       // (NE_NBASIS, NE_KSIZE, NE_KSIZE), C-contiguous
    const double weight,                    // 1 / variance
    const int n_cand,
    double* __restrict__ M_out,             // (n, NE_NBASIS, NE_NBASIS)
    double* __restrict__ b_out)             // (n, NE_NBASIS)
{
    extern __shared__ double2 gm_ne_smem2[];
    double* sT = reinterpret_cast<double*>(gm_ne_smem2);
    double* sS = sT + NE_STAMP * NE_TPITCH;
    double* sC = sS + NE_SS_LEN;

    const int cand = blockIdx.x;
    if (cand >= n_cand) return;             // uniform over the block
    const long long base = (long long)cand * (NE_STAMP * NE_STAMP);
    const double* T = templates + base;
    const double* S = targets + base;

    // ---- 1. stage the template and the target's good region ----------------
    for (int t = threadIdx.x; t < NE_STAMP * NE_TPITCH; t += blockDim.x) {
        const int r = t / NE_TPITCH;
        const int c = t - r * NE_TPITCH;
        sT[t] = (c < NE_STAMP) ? T[r * NE_STAMP + c] : 0.0;
    }
    for (int t = threadIdx.x; t < NE_GG; t += blockDim.x) {
        const int py = t / NE_G;
        const int px = t - py * NE_G;
        sS[t] = S[(py + NE_HALF) * NE_STAMP + (px + NE_HALF)];
    }
    __syncthreads();

    // ---- 2. C[p][b] = sum_{j,i} T[py + j, px + i] B[b, j, i] -----------------
    for (int item = threadIdx.x; item < NE_G * NE_NBASIS; item += blockDim.x) {
        const int b = item / NE_G;
        const int py = item - b * NE_G;
        const double* Bb = basis + b * (NE_KSIZE * NE_KSIZE);
        double acc[NE_G];
#pragma unroll
        for (int px = 0; px < NE_G; ++px) acc[px] = 0.0;
#pragma unroll 1
        for (int j = 0; j < NE_KSIZE; ++j) {
            double w[NE_WIN];
            const double2* row = reinterpret_cast<const double2*>(sT + (py + j) * NE_TPITCH);
#pragma unroll
            for (int m = 0; m < NE_WIN / 2; ++m) {
                const double2 t = row[m];
                w[2 * m] = t.x;
                w[2 * m + 1] = t.y;
            }
            const double* Bj = Bb + j * NE_KSIZE;
#pragma unroll
            for (int i = 0; i < NE_KSIZE; ++i) {
                const double bv = __ldg(Bj + i);
#pragma unroll
                for (int px = 0; px < NE_G; ++px) acc[px] = fma(w[px + i], bv, acc[px]);
            }
        }
#pragma unroll
        for (int px = 0; px < NE_G; ++px) sC[(py * NE_G + px) * NE_CPITCH + b] = acc[px];
    }
    __syncthreads();

    // ---- 3. M = C^T C * w (upper triangle, mirrored), b = C^T s * w ------------
    double* M = M_out + (long long)cand * (NE_NBASIS * NE_NBASIS);
    double* bv_out = b_out + (long long)cand * NE_NBASIS;
    for (int e = threadIdx.x; e < NE_NBASIS * NE_NBASIS + NE_NBASIS; e += blockDim.x) {
        if (e < NE_NBASIS * NE_NBASIS) {
            const int m1 = e / NE_NBASIS;
            const int m2 = e - m1 * NE_NBASIS;
            if (m1 > m2) continue;
            double s = 0.0;
            for (int p = 0; p < NE_GG; ++p) s = fma(sC[p * NE_CPITCH + m1], sC[p * NE_CPITCH + m2], s);
            s *= weight;
            M[m1 * NE_NBASIS + m2] = s;
            M[m2 * NE_NBASIS + m1] = s;
        } else {
            const int m = e - NE_NBASIS * NE_NBASIS;
            double s = 0.0;
            for (int p = 0; p < NE_GG; ++p) s = fma(sC[p * NE_CPITCH + m], sS[p], s);
            bv_out[m] = s * weight;
        }
    }
}
