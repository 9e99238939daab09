// A CPU runtime for gpumatch's CUDA kernels, for tests on machines without a GPU.
//
// tests/cuda_emulator.py compiles a file of kernels/ with g++ after this
// header, so the *same source* that NVRTC compiles for the device runs on the
// host: every block of the grid, in turn, with each of its threads a
// coroutine (ucontext). A thread runs until it reaches __syncthreads() or
// returns; when every live thread of the block waits at the barrier, all are
// released. The order in which the threads of a block run between two
// barriers is a parameter (forward, reverse, or a seeded shuffle per phase),
// so a race on shared memory -- a result that depends on that order -- shows
// as different outputs for different orders.
//
// Checks, each reported as an error code and message (never a crash):
//   * a barrier reached by only part of a block (CUDA: undefined behaviour);
//   * dynamic shared memory: filled with 0xFF bytes (float NaN, integer -1)
//     before each block, so reads of values never written poison the result,
//     and bytes beyond the launch's shared_mem size must still hold the
//     poison when the block ends (no writes past the size asked for).
// Global-memory bounds are checked by the Python side (guard bands around
// every buffer).
//
// Only what gpumatch's kernels use is provided: threadIdx/blockIdx/blockDim/
// gridDim, __syncthreads, dynamic shared memory, vector types, __ldg, the
// bit-cast intrinsics and the CUDA math functions that are also C++ ones.
// Arithmetic is the host's IEEE arithmetic with contraction off: fmaf/fma are
// exact fused operations as on the device, other products and sums are
// rounded separately (nvcc may fuse some of them; results agree to rounding).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <math.h>
#include <ucontext.h>

// ---- language ---------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned int x, y, z;
};

// One host thread runs a launch at a time (the Python side holds a lock).
static uint3 threadIdx;
static uint3 blockIdx;
static dim3 blockDim;
static dim3 gridDim;

// ---- vector types -------------------------------------------------------------
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return {x, y, z, w};
}

// ---- intrinsics -----------------------------------------------------------------
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
using std::isfinite;
using std::isinf;
using std::isnan;
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }

// ---- the scheduler --------------------------------------------------------------
namespace emu {

enum State { RUNNABLE, AT_BARRIER, DONE };

struct Thread {
    ucontext_t ctx;
    std::vector<char> stack;
    State state;
    uint3 idx;
};

struct Block {
    ucontext_t sched;
    std::vector<Thread> threads;
    int current = -1;
    std::function<void()> body;
};

static Block* g_block = nullptr;
static char g_error[512];

// Enough for any kernel's dynamic shared memory (the H100/H200 opt-in limit is
// 227 KiB) plus room past it that must keep the poison.
static constexpr size_t kSharedBytes = 256 * 1024;
}  // namespace emu
// The kernels' `extern __shared__` arrays are aliases of this buffer (the
// Python side declares them after this header).
extern "C" {
alignas(256) unsigned char emu_shared_buffer[emu::kSharedBytes];
}
namespace emu {
static unsigned char* const g_shared = emu_shared_buffer;

static void trampoline() {
    Block* b = g_block;
    b->body();
    b->threads[b->current].state = DONE;
    // returning resumes uc_link, the scheduler
}

}  // namespace emu

inline void __syncthreads() {
    emu::Block* b = emu::g_block;
    emu::Thread& t = b->threads[b->current];
    t.state = emu::AT_BARRIER;
    swapcontext(&t.ctx, &b->sched);
    // resumed by the scheduler with our index restored
}

namespace emu {

// order: 0 forward, 1 reverse, 2+ shuffled with seed = order.
inline int run_grid(dim3 grid, dim3 block, size_t shmem, int order, const std::function<void()>& body) {
    g_error[0] = 0;
    const int nthreads = int(block.x * block.y * block.z);
    if (nthreads < 1 || nthreads > 1024) {
        std::snprintf(g_error, sizeof g_error, "block of %d threads (CUDA allows 1..1024)", nthreads);
        return 1;
    }
    if (shmem > 227 * 1024) {
        std::snprintf(g_error, sizeof g_error, "%zu B of dynamic shared memory (device limit 227 KiB)",
                      shmem);
        return 1;
    }
    gridDim = grid;
    blockDim = block;
    Block b;
    b.body = body;
    b.threads.resize(nthreads);
    for (auto& t : b.threads) t.stack.resize(256 * 1024);
    g_block = &b;
    std::mt19937 rng(order);
    std::vector<int> perm(nthreads);
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        std::memset(g_shared, 0xFF, kSharedBytes);
        for (int i = 0; i < nthreads; ++i) {
            Thread& t = b.threads[i];
            t.idx = {unsigned(i) % block.x, (unsigned(i) / block.x) % block.y,
                     unsigned(i) / (block.x * block.y)};
            t.state = RUNNABLE;
            getcontext(&t.ctx);
            t.ctx.uc_stack.ss_sp = t.stack.data();
            t.ctx.uc_stack.ss_size = t.stack.size();
            t.ctx.uc_link = &b.sched;
            makecontext(&t.ctx, trampoline, 0);
        }
        for (int phase = 0;; ++phase) {
            for (int i = 0; i < nthreads; ++i) perm[i] = i;
            if (order == 1) std::reverse(perm.begin(), perm.end());
            if (order >= 2) std::shuffle(perm.begin(), perm.end(), rng);
            for (int i : perm) {
                Thread& t = b.threads[i];
                if (t.state != RUNNABLE) continue;
                b.current = i;
                threadIdx = t.idx;
                swapcontext(&b.sched, &t.ctx);
            }
            int waiting = 0, done = 0;
            for (auto& t : b.threads) {
                waiting += t.state == AT_BARRIER;
                done += t.state == DONE;
            }
            if (done == nthreads) break;
            if (done) {
                std::snprintf(g_error, sizeof g_error,
                              "block (%u, %u, %u), barrier %d: %d threads wait at __syncthreads() "
                              "while %d have returned", bx, by, bz, phase, waiting, done);
                g_block = nullptr;
                return 2;
            }
            for (auto& t : b.threads) t.state = RUNNABLE;
        }
        for (size_t i = shmem; i < kSharedBytes; ++i) {
            if (g_shared[i] != 0xFF) {
                std::snprintf(g_error, sizeof g_error,
                              "block (%u, %u, %u) wrote shared memory byte %zu, beyond the %zu B "
                              "of the launch", bx, by, bz, i, shmem);
                g_block = nullptr;
                return 3;
            }
        }
    }
    g_block = nullptr;
    return 0;
}

template <typename... Args, size_t... I>
inline void call_kernel(void (*fn)(Args...), void** argv, std::index_sequence<I...>) {
    fn(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(argv[I])...);
}

template <typename... Args>
inline int launch(void (*fn)(Args...), unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                  unsigned by, unsigned bz, size_t shmem, void** argv, int order) {
    return run_grid(dim3(gx, gy, gz), dim3(bx, by, bz), shmem, order,
                    [=] { call_kernel(fn, argv, std::index_sequence_for<Args...>{}); });
}

// Each parameter's size in bytes and kind (0 pointer, 1 integer, 2 floating
// point), for the Python side to check a launch's arguments against.
template <typename... Args>
inline int signature(void (*)(Args...), int* sizes, int* kinds) {
    const int s[] = {int(sizeof(std::remove_cv_t<Args>))..., 0};
    const int k[] = {(std::is_pointer<std::remove_cv_t<Args>>::value ? 0
                      : std::is_floating_point<std::remove_cv_t<Args>>::value ? 2 : 1)..., 0};
    for (size_t i = 0; i < sizeof...(Args); ++i) {
        sizes[i] = s[i];
        kinds[i] = k[i];
    }
    return int(sizeof...(Args));
}

}  // namespace emu

// One exported launcher per kernel (the Python side looks for emu_launch_NAME).
#define EMU_EXPORT(NAME)                                                                      \
    extern "C" int emu_launch_##NAME(unsigned gx, unsigned gy, unsigned gz, unsigned bx,     \
                                     unsigned by, unsigned bz, size_t shmem, void** argv,    \
                                     int order) {                                            \
        return emu::launch(NAME, gx, gy, gz, bx, by, bz, shmem, argv, order);                \
    }                                                                                         \
    extern "C" int emu_signature_##NAME(int* sizes, int* kinds) {                            \
        return emu::signature(NAME, sizes, kinds);                                            \
    }

extern "C" const char* emu_error() { return emu::g_error; }
