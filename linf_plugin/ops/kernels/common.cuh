// linf_plugin CUDA kernels: definitions shared by every kernel file.
//
// Plain CUDA C++17 with no warp intrinsics and no library headers, so that
// NVRTC compiles it as is and the test suite can also run the very same
// source on the CPU through a small emulation shim (tests/ops/emulation).
// Supported: compute capability 7.5 (sm_75) and up; LP_ARCH below picks the
// few code paths that differ.
//
// Floating point: NVRTC compiles these files with --fmad=false (kernel_specs.py),
// so no multiply and add are fused unless the source says so: every fused
// multiply-add is an explicit lp_fma (FFMA / DFMA), in the same places the
// compiler would contract them (the disassembly is identical with
// --fmad=true, tests/ops/test_kernel_cost.py), so this costs nothing.  The
// arithmetic the GPU performs is then exactly the arithmetic written here:
// +, -, *, /, sqrt and fma round the same way on the GPU and in the CPU
// emulation, and two kernels that write the same operations in the same
// order give the same bits.  Only the math library (exp2f, log2f, exp2,
// log2: CUDA's and the C library's last ulp differ) and the approximate
// instructions (lg2.approx, ex2.approx) differ between the two.
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

// Unrolling of the k-loop in the kernels that raise to powers: 16 k-steps of
// 16 outputs each fully unrolled would inline 256 copies of the power (a
// kernel too large for the instruction cache, minutes of NVRTC time in
// double) and, next to the per-tile rescaling of lp_forward, more live
// registers than a thread has; 4 steps of 16 independent outputs give the
// scheduler its parallelism at a loop overhead of ~3 instructions per 64
// triples.  benchmarks/kernel_cost.py reads this value to weight the loop.
#define LP_SUM_UNROLL 4

typedef long long lp_i64;

// The architecture the code is compiled for: NVRTC defines __CUDA_ARCH__
// (750 for sm_75, 800 for sm_80, ...); the CPU emulation defines
// LP_EMULATED_ARCH to take either path.
#if defined(__CUDA_ARCH__)
#define LP_ARCH __CUDA_ARCH__
#elif defined(LP_EMULATED_ARCH)
#define LP_ARCH LP_EMULATED_ARCH
#else
#error "compile with NVRTC (which defines __CUDA_ARCH__) or define LP_EMULATED_ARCH"
#endif

// ---- Vector loads from shared memory ----------------------------------------
// The forward kernels give each thread CONTIGUOUS rows (ty RA + i) and
// columns (tx RB + j) of the tile, so a k-step reads its RA + RB operands
// with 16-byte loads (LDS.128: RA / 4 + RB / 4 instructions instead of
// RA + RB).  A warp then reads 2 distinct x-chunks (broadcast) and 16
// consecutive w-chunks (conflict-free).  Rows of such tiles are padded by
// LP_VPAD(T) elements (16 bytes), which keeps every row 16-byte aligned;
// the cost is a 2-way bank conflict in the once-per-tile stores.
#define LP_VPAD(T) (16 / (int)sizeof(T))
template <typename T, int N>
struct alignas(16) LpVec {
    T v[N];
};
template <int N, typename T>
__device__ __forceinline__ void lp_load_vec(T (&out)[N], const T* src) {
    static_assert((N * sizeof(T)) % 16 == 0, "vector loads need 16-byte multiples");
    const LpVec<T, N> v = *reinterpret_cast<const LpVec<T, N>*>(src);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = v.v[i];
}
// A compiler-only memory fence: loads after it are not merged with loads
// before it (nor kept in registers across it).  Same syntax in g++.
#define LP_COMPILER_FENCE() asm volatile("" ::: "memory")

__device__ __forceinline__ float lp_abs(float v) { return fabsf(v); }
// a b + c rounded once (FFMA / DFMA).  Explicit overloads: an unqualified
// fma(float, float, float) could resolve to the double function.
__device__ __forceinline__ float lp_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double lp_fma(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ double lp_abs(double v) { return fabs(v); }
__device__ __forceinline__ float lp_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double lp_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float lp_exp2(float v) { return exp2f(v); }
__device__ __forceinline__ double lp_exp2(double v) { return exp2(v); }
__device__ __forceinline__ float lp_log2(float v) { return log2f(v); }
__device__ __forceinline__ double lp_log2(double v) { return log2(v); }
__device__ __forceinline__ float lp_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double lp_sqrt(double v) { return sqrt(v); }

// acc + t^p for t >= 0: multiplication chains for p = 1, 2, 8 (PV) whose last
// product fuses with the addition, exp2/log2 for general p (PV = 0;
// log2(0) = -inf gives exactly 0).  Even powers need no |t|.
template <int PV, typename T>
__device__ __forceinline__ T lp_pow_acc(T acc, T t, T p) {
    if constexpr (PV == 1) {
        return acc + t;
    } else if constexpr (PV == 2) {
        return lp_fma(t, t, acc);
    } else if constexpr (PV == 8) {
        const T t2 = t * t;
        const T t4 = t2 * t2;
        return lp_fma(t4, t4, acc);
    } else {
        return acc + lp_exp2(p * lp_log2(t));
    }
}

// t^p alone (the rescaling factors of lp_forward).
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

// ---- Fast float32 powers for general p (PV = 0) --------------------------
//
// t^p = 2^(p log2 t) costs two MUFU (special-function unit) instructions
// with the hardware approximations, and sm_80/sm_90 run MUFU at 16 lanes per
// SM and cycle against 128 for FP32: at two MUFU per (b, n, i) triple the
// unit, not the issue rate, bounds the kernel (8 issue cycles per MUFU per
// warp).  So log2 uses the hardware (lg2.approx), and 2^z is split between
// the hardware (ex2.approx) and a polynomial on the FP32 pipes
// (lp_exp2_poly, ~9 instructions), per output column of the register tile
// (LP_EX2_HW_COLS of RB): both pipes then stay busy.
//
// Error analysis, float32 (u = 2^-24; the bounds are the CUDA Programming
// Guide's for __log2f / exp2f, which lower to these two instructions):
//   lg2.approx(t):  absolute error <= 2^-22 for t in [0.5, 2], else 2 ulp of
//                   the result.  The caller scales t into (0, 2) by a power
//                   of two (exact), so every term within a factor 2^-p of
//                   the largest has |error| <= 2^-22 (t in [0.5, 2) gives
//                   |log2 t| < 1, and 2 ulp of a value in [1, 2) is 2^-22).
//                   Smaller terms have |log2 t| <= 2 + k at t ~ 2^-k and an
//                   error of at most 2 ulp(k), but weigh 2^-pk.
//   ex2.approx(z):  relative error <= 2 ulp = 2^-22 (z in [-126, 1]).
//   lp_exp2_poly:   2^f on |f| <= 1/2 by a degree-5 polynomial fitted for
//                   relative error 7.5e-8; evaluated in float32 with FMA:
//                   <= 2.2e-7 (4 ulp); the 2^j scaling is exact.
// A term t^p is then off by a factor 2^(p e_lg2) (1 + e_exp) with
// |e_lg2| <= 2^-22, |e_exp| <= 2.2e-7: relative error
//   p ln2 2^-22 + 2.2e-7 = 1.65e-7 p + 2.2e-7     (plus p u from rounding t).
// Values: y = (sum of terms)^(1/p) divides the sum's relative error by p:
//   |dy / y| <= 1.65e-7 + 2.2e-7 / p + u  < 4.5e-7  for every p >= 1
// (the 1e-6 floor holds at every p).  Gradients use |t|^(p-1) with
// t = (x - w) / y, so both y's relative error e_y and the power's own error
// are multiplied by p - 1:
//   (p - 1) (|e_y| + 1.65e-7 + u) + 2.2e-7,   |e_y| <= 1.65e-7 + 2.2e-7 / p + u,
// about 4.9e-5 at p = 128 (FAST_GRAD_MAX_P in kernel_specs.py, where the
// backend picks the kernels): half of the 1e-4 floor.  Above it the forward
// that precedes a backward and the backward itself use the accurate
// exp2f/log2f (float32's own rounding, (p - 1) u ~ 6e-5 at p = 1000,
// remains).
// The CPU emulation (tests/ops/emulation/cuda_shim.h) perturbs both
// approximations by these maximum errors, so the accuracy tests bound the
// worst case, not the typical one.
#define LP_EX2_HW_COLS 2
// The clamp of log2 t: z = p log2 t + c stays >= -125, so 2^z is a normal
// float; terms below 2^-125 of the largest change no sum (<= D 2^-125).
#define LP_EXP2_FLOOR -125.0f

#ifndef LP_EMULATED_INTRINSICS
// The emulation header defines these three with the same contracts.
__device__ __forceinline__ float lp_lg2_approx(float v) {
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
    return r;
}
__device__ __forceinline__ float lp_ex2_approx(float v) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
    return r;
}
#if LP_ARCH >= 800
// One FMNMX.NAN instruction; the PTX modifier .NaN needs sm_80.
__device__ __forceinline__ float lp_max_nan_f32_insn(float a, float b) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
#endif
#endif

// NaN-keeping maxima (as torch.amax: fmaxf would drop a NaN), with the
// semantics of PTX max.NaN.f32: the canonical NaN (bits 0x7fffffff) when
// either operand is NaN, +0.0 above -0.0, otherwise the larger operand.  On
// sm_80 and later that is one instruction (FMNMX.NAN); sm_75 lacks the .NaN
// modifier, so there each use gets the cheapest code with the same result
// on the operands it can see.  tests/ops/test_kernel_emulation.py compares
// each sm_75 version with the instruction's emulation on special values, and
// tests/ops/test_gpu.py with the instruction itself.
template <typename T> struct lp_canonical_nan;
template <> struct lp_canonical_nan<float> {
    static __device__ __forceinline__ float get() { return __int_as_float(0x7fffffff); }
};
template <> struct lp_canonical_nan<double> {
    static __device__ __forceinline__ double get() { return __longlong_as_double(0x7fffffffffffffffll); }
};
__device__ __forceinline__ bool lp_sign_bit(float v) { return __float_as_int(v) < 0; }
__device__ __forceinline__ bool lp_sign_bit(double v) { return __double_as_longlong(v) < 0; }

// Any operands: comparisons and selects (a few instructions; double has no
// NaN-keeping max instruction at all).
template <typename T>
__device__ __forceinline__ T lp_max_nan_portable(T a, T b) {
    if (a != a || b != b) return lp_canonical_nan<T>::get();
    // equal operands differ at most in the sign of a zero: take the one without it
    return (a > b || (a == b && !lp_sign_bit(a))) ? a : b;
}
__device__ __forceinline__ float lp_max_nan(float a, float b) {
#if LP_ARCH >= 800
    return lp_max_nan_f32_insn(a, b);
#else
    return lp_max_nan_portable(a, b);
#endif
}
__device__ __forceinline__ double lp_max_nan(double a, double b) { return lp_max_nan_portable(a, b); }

// Operands that are >= +0.0 or the canonical NaN (|x - w| and the running
// maxima of the forward kernels: float arithmetic on the GPU returns the
// canonical NaN, and fabs clears its sign).  Such bit patterns order as
// unsigned integers exactly as max.NaN orders the values (+0.0 < subnormals
// < normals < +inf < NaN), so sm_75 takes one integer max (IMNMX.U32): the
// same cost as FMNMX.NAN.  Doubles take the portable version (no hot loop
// of a double kernel is bound by it).
__device__ __forceinline__ float lp_max_nonneg_int(float a, float b) {
    const unsigned ua = (unsigned)__float_as_int(a), ub = (unsigned)__float_as_int(b);
    return __int_as_float((int)(ua > ub ? ua : ub));
}
__device__ __forceinline__ float lp_max_nonneg(float a, float b) {
#if LP_ARCH >= 800
    return lp_max_nan_f32_insn(a, b);
#else
    return lp_max_nonneg_int(a, b);
#endif
}
__device__ __forceinline__ double lp_max_nonneg(double a, double b) { return lp_max_nan_portable(a, b); }

// max(l, lo) keeping a NaN l, for a bound lo that is a number other than
// +-0.0 (the clamps of log2 in the general-p kernels): on sm_75 a compare
// and a select, which return l itself where it is NaN.
__device__ __forceinline__ float lp_clamp_below_select(float l, float lo) { return l < lo ? lo : l; }
__device__ __forceinline__ float lp_clamp_below(float l, float lo) {
#if LP_ARCH >= 800
    return lp_max_nan_f32_insn(l, lo);
#else
    return lp_clamp_below_select(l, lo);
#endif
}

// 2^(p l + c) for the z = p l + c range [LP_EXP2_FLOOR, ~0], with cm = M - c
// (M = 1.5 2^23, c an integer): r = M + round(z) in one FFMA (ulp(r) = 1),
// f = z - round(z) exactly rounded in a second FFMA, 2^f by polynomial, and
// 2^round(z) from the low 9 bits of r's bit pattern, which are round(z) mod
// 2^9 (the bits of M end in 22 zeros).
//   KEEP_NAN false: (bits(r) << 23) + bits(2^f) is the product (one LEA);
//     but a NaN l gives a FINITE result there (r and 2^f are the canonical
//     NaN 0x7fffffff, and the integer sum of their patterns is FLT_MAX), so
//     the caller must carry NaN another way (lp_forward: its running max).
//   KEEP_NAN true: 2^round(z) = float with bits (bits(r) << 23) + (127 << 23),
//     times 2^f (an IMAD and an exact FMUL: one instruction more); a NaN l
//     gives NaN.
template <bool KEEP_NAN>
__device__ __forceinline__ float lp_exp2_poly(float p, float l, float cm) {
    const float r = fmaf(p, l, cm);
    const float f = fmaf(p, l, cm - r);
    float q = 1.3276484e-3f;
    q = fmaf(q, f, 9.6755419e-3f);
    q = fmaf(q, f, 5.5507131e-2f);
    q = fmaf(q, f, 2.4022120e-1f);
    q = fmaf(q, f, 6.9314694e-1f);
    q = fmaf(q, f, 1.0000001f);
    if constexpr (KEEP_NAN) {
        return q * __int_as_float((int)(((unsigned)__float_as_int(r) << 23) + (127u << 23)));
    } else {
        return __int_as_float((int)((unsigned)__float_as_int(q) + ((unsigned)__float_as_int(r) << 23)));
    }
}

// 2^(p l - c) by the hardware (hw) or the polynomial; off = c for the
// hardware and M - c for the polynomial, so neither spends an instruction
// on it per triple.  hw is a constant in the unrolled loops that call this
// (it depends on the register-tile column only).  KEEP_NAN: see lp_exp2_poly
// (the hardware path keeps NaN either way).
#define LP_EXP2_MAGIC 12582912.0f
template <bool KEEP_NAN>
__device__ __forceinline__ float lp_pow2_fast(bool hw, float p, float l, float off) {
    if (hw) {
        return lp_ex2_approx(fmaf(p, l, -off));
    } else {
        return lp_exp2_poly<KEEP_NAN>(p, l, off);
    }
}

template <typename T> struct lp_is_float { static constexpr bool value = false; };
template <> struct lp_is_float<float> { static constexpr bool value = true; };

// Powers of two by their bit patterns (exact; no division, no call).
template <typename T> struct lp_bias;
template <> struct lp_bias<float> { static constexpr int value = 127; };
template <> struct lp_bias<double> { static constexpr int value = 1023; };
__device__ __forceinline__ int lp_biased_exponent(float v) { return (__float_as_int(v) >> 23) & 0xFF; }
__device__ __forceinline__ int lp_biased_exponent(double v) {
    return (int)((__double_as_longlong(v) >> 52) & 0x7FF);
}
// 2^k for k in the normal range [1 - bias, bias].
__device__ __forceinline__ float lp_pow2i(float, int k) { return __int_as_float((k + 127) << 23); }
__device__ __forceinline__ double lp_pow2i(double, int k) { return __longlong_as_double((lp_i64)(k + 1023) << 52); }
// The scale s = 2^-e of a maximum v (e its exponent, kept so that s is
// normal): v s in [1, 2) for normal v, and any |d| <= v gives |d| s < 2.
template <typename T>
__device__ __forceinline__ T lp_scale_of(T v) {
    constexpr int bias = lp_bias<T>::value;
    int e = lp_biased_exponent(v);
    e = e < 1 ? 1 : (e > 2 * bias - 1 ? 2 * bias - 1 : e);
    return lp_pow2i(T(0), bias - e);
}
// log2 of a scale from lp_scale_of, exactly.
template <typename T>
__device__ __forceinline__ int lp_log2_scale(T s) { return lp_biased_exponent(s) - lp_bias<T>::value; }

// One coordinate of the interval of |x - w| over x in [l, u]; the same
// operations as every other backend (subtractions and maxima: nothing a
// compiler could fuse), so p = inf results agree bit for bit.
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
template <typename T, int ROWS, int PAD = LP_PAD>
__device__ __forceinline__ void lp_load_transposed(T (*dst)[ROWS + PAD], const T* __restrict__ src,
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
template <typename T, int COLS, int PAD = LP_PAD>
__device__ __forceinline__ void lp_load_direct(T (*dst)[COLS + PAD], const T* __restrict__ src,
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

    template <int PAD = LP_PAD>
    __device__ __forceinline__ void store(T (*dst)[ROWS + PAD]) const {
        constexpr int RSTEP = LP_THREADS / LP_BK;
        const int tid = threadIdx.y * LP_TX + threadIdx.x;
#pragma unroll
        for (int q = 0; q < PER; ++q) dst[tid % LP_BK][tid / LP_BK + q * RSTEP] = v[q];
    }
};

#endif  // LINF_PLUGIN_COMMON_CUH
