// linf_plugin CUDA kernels: definitions shared by every kernel file.
//
// Plain CUDA C++17 with no warp intrinsics and no library headers, so that
// NVRTC compiles it as is and the test suite can also run the very same
// source on the CPU through a small emulation shim (tests/ops/emulation).
//
// Tiled kernels use blocks of LP_TY x LP_TX = 16 x 16 threads.  Thread
// (ty, tx) owns the rows r0 + ty + 16 i (i < RA) and the columns
// c0 + tx + 16 j (j < RB) of the block's output tile: strided ownership keeps
// the shared-memory reads of a warp on distinct banks (or a broadcast) and
// the output stores coalesced.  Operands stream through shared memory in
// tiles LP_BK deep.
#ifndef LINF_PLUGIN_COMMON_CUH
#define LINF_PLUGIN_COMMON_CUH

#define LP_TX 16
#define LP_TY 16
#define LP_THREADS 256
#define LP_BK 16
// Row padding of shared tiles: with 16 k-values and 2 rows per warp in the
// transposing loader, a row stride of (rows + 2) words puts the 32 stores of
// a warp on 32 distinct banks.
#define LP_PAD 2

// Unrolling of the k-loop in the kernels that raise to powers: a general p
// costs exp2 + log2 per term, and unrolling 16 k-steps of 16 outputs each
// would inline 256 copies (minutes of NVRTC time in double, and a kernel
// too large for the instruction cache) for no gain: 16 independent outputs
// per step already give the scheduler its parallelism.  Those loops say
// '#pragma unroll((PV) == 0 ? 1 : 4)'.

typedef long long lp_i64;

__device__ __forceinline__ float lp_abs(float v) { return fabsf(v); }
__device__ __forceinline__ double lp_abs(double v) { return fabs(v); }
__device__ __forceinline__ float lp_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double lp_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float lp_exp2(float v) { return exp2f(v); }
__device__ __forceinline__ double lp_exp2(double v) { return exp2(v); }
__device__ __forceinline__ float lp_log2(float v) { return log2f(v); }
__device__ __forceinline__ double lp_log2(double v) { return log2(v); }
__device__ __forceinline__ float lp_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double lp_sqrt(double v) { return sqrt(v); }

// t^p for t in [0, 1]: multiplication chains for p = 1, 2, 8 (PV), exp2/log2
// for general p (PV = 0; log2(0) = -inf gives exactly 0).
template <int PV, typename T>
__device__ __forceinline__ T lp_pow(T t, T p) {
    if constexpr (PV == 1) {
        return t;
    } else if constexpr (PV == 2) {
        return t * t;
    } else if constexpr (PV == 8) {
        const T t2 = t * t;
        const T t4 = t2 * t2;
        return t4 * t4;
    } else {
        return lp_exp2(p * lp_log2(t));
    }
}

// s^(1/p) for s >= 0.
template <int PV, typename T>
__device__ __forceinline__ T lp_root(T s, T p) {
    if constexpr (PV == 1) {
        return s;
    } else if constexpr (PV == 2) {
        return lp_sqrt(s);
    } else if constexpr (PV == 8) {
        return lp_sqrt(lp_sqrt(lp_sqrt(s)));
    } else {
        return lp_exp2(lp_log2(s) / p);
    }
}

// sign(t) |t|^(p-1), the l_p gradient factor; |t| <= 1 here.  Odd in t.
template <int PV, typename T>
__device__ __forceinline__ T lp_odd_pow(T t, T pm1) {
    if constexpr (PV == 1) {
        return t > T(0) ? T(1) : (t < T(0) ? T(-1) : T(0));
    } else if constexpr (PV == 2) {
        return t;
    } else if constexpr (PV == 8) {
        const T t2 = t * t;
        return t * t2 * (t2 * t2);
    } else {
        const T m = lp_exp2(pm1 * lp_log2(lp_abs(t)));
        return t < T(0) ? -m : m;
    }
}

// (v r)^(p-1) for v >= 0, r = 1 / (the output); for p = 1, [r > 0]: an
// output that is exactly 0 passes no gradient.
template <int PV, typename T>
__device__ __forceinline__ T lp_grad_factor(T v, T r, T pm1) {
    if constexpr (PV == 1) {
        return r > T(0) ? T(1) : T(0);
    } else {
        return lp_odd_pow<PV, T>(v * r, pm1);
    }
}

// One coordinate of the interval of |x - w| over x in [l, u]; the same
// operations as every other backend, so p = inf results agree bit for bit.
template <typename T>
__device__ __forceinline__ void lp_interval_terms(T l, T u, T w, T& a, T& c, T& far, T& near) {
    a = w - l;
    c = u - w;
    far = lp_max(a, c);
    near = lp_max(lp_max(-a, -c), T(0));
}

// dst[k][r] = src[(row0 + r) * cols + col0 + k] (zero outside the matrix):
// a ROWS x LP_BK tile of a row-major (rows, cols) matrix, stored transposed.
// Consecutive threads read consecutive columns of one row (coalesced).
template <typename T, int ROWS>
__device__ __forceinline__ void lp_load_transposed(T (*dst)[ROWS + LP_PAD], const T* __restrict__ src,
                                                   int rows, int cols, int row0, int col0) {
    for (int e = threadIdx.y * LP_TX + threadIdx.x; e < ROWS * LP_BK; e += LP_THREADS) {
        const int k = e % LP_BK;
        const int r = e / LP_BK;
        const int row = row0 + r;
        const int col = col0 + k;
        dst[k][r] = (row < rows && col < cols) ? src[(lp_i64)row * cols + col] : T(0);
    }
}

// dst[k][c] = src[(row0 + k) * cols + col0 + c] (zero outside the matrix):
// an LP_BK x COLS tile of a row-major (rows, cols) matrix, as is.
template <typename T, int COLS>
__device__ __forceinline__ void lp_load_direct(T (*dst)[COLS + LP_PAD], const T* __restrict__ src,
                                               int rows, int cols, int row0, int col0) {
    for (int e = threadIdx.y * LP_TX + threadIdx.x; e < COLS * LP_BK; e += LP_THREADS) {
        const int c = e % COLS;
        const int k = e / COLS;
        const int row = row0 + k;
        const int col = col0 + c;
        dst[k][c] = (row < rows && col < cols) ? src[(lp_i64)row * cols + col] : T(0);
    }
}

// Register staging of a transposed tile (the layout of lp_load_transposed):
// fetch() issues the global loads of the NEXT tile into registers before the
// current tile is computed, store() moves them to shared memory after the
// barrier, so the load latency hides behind the arithmetic (software
// pipelining at the cost of ROWS * LP_BK / LP_THREADS registers).
template <typename T, int ROWS>
struct LpTileStage {
    static_assert((ROWS * LP_BK) % LP_THREADS == 0, "a tile must split evenly over the block");
    static constexpr int PER = ROWS * LP_BK / LP_THREADS;
    T v[PER];

    // Thread tid always takes column tid % LP_BK (LP_THREADS is a multiple of
    // LP_BK) and rows tid / LP_BK + q * LP_THREADS / LP_BK: one base offset and
    // one stride, which keeps the staging cheap in registers.
    __device__ __forceinline__ void fetch(const T* __restrict__ src, int rows, int cols, int row0, int col0) {
        constexpr int RSTEP = LP_THREADS / LP_BK;
        const int tid = threadIdx.y * LP_TX + threadIdx.x;
        const int r = row0 + tid / LP_BK;
        const int c = col0 + tid % LP_BK;
        const lp_i64 base = (lp_i64)r * cols + c;
        const lp_i64 step = (lp_i64)RSTEP * cols;
#pragma unroll
        for (int q = 0; q < PER; ++q) {
            v[q] = (c < cols && r + q * RSTEP < rows) ? src[base + q * step] : T(0);
        }
    }

    __device__ __forceinline__ void store(T (*dst)[ROWS + LP_PAD]) const {
        constexpr int RSTEP = LP_THREADS / LP_BK;
        const int tid = threadIdx.y * LP_TX + threadIdx.x;
#pragma unroll
        for (int q = 0; q < PER; ++q) dst[tid % LP_BK][tid / LP_BK + q * RSTEP] = v[q];
    }
};

#endif  // LINF_PLUGIN_COMMON_CUH
