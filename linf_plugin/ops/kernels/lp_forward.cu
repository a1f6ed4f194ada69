// Finite-p forward in ONE pass over x and w:
//   y[b, n] = (sum_i |x[b, i] - w[n, i]|^p)^(1/p)
//
// Overflow and underflow (p up to 1000 and beyond, any scale of the data)
// are avoided by normalising with the running maximum m = max |x - w|: each
// D-tile first takes its maximum from shared memory (a subtraction and a
// NaN-keeping max per triple), and when it exceeds the running one the sum
// so far is rescaled once per output (online rescaling; no separate p = inf
// pass, no second read of x and w).  The largest term is then about 1, so
// neither the sum nor its root leaves float range.
//   PV = 1: a plain sum of |x - w|, nothing to normalise.
//   Every other p scales by a power of two, s = 2^-e with e the exponent of
//   m (exact: |x - w| s lies in [0, 2)), so a new maximum costs no division.
//   PV = 2, 8: terms (|x - w| s)^p < 2^p; a larger m multiplies the sum by
//     (s_new / s_old)^p, and y = root(sum) / s.
//   general p (PV = 0): terms 2^(p log2(|x - w| s) - c) with c the integer
//     ceil(p log2(m s)) (largest term in (1/2, 1]); a larger m multiplies the
//     sum by 2^(K_old - K_new), K = p log2(1/s) + c, and
//     y = 2^((log2 sum + c) / p) / s.  In float the power is lg2.approx plus
//     ex2.approx or a polynomial (common.cuh, with the error analysis: values
//     within 4.5e-7 relative for every p) unless APPROX is false; double
//     uses exp2/log2.  The backend turns APPROX off where a backward at
//     p > FAST_GRAD_MAX_P follows: the gradient factor (|x - w| / y)^(p-1)
//     multiplies y's relative error by p - 1.
// NaN in x[b] or w[n] makes y[b, n] NaN: the tile maximum is a NaN-keeping
// max, a NaN maximum becomes the running maximum for good, and an output
// whose running maximum is not > 0 is acc * m (not the sum's root).  The
// sum alone would not do: the polynomial exp2 turns a NaN term into a finite
// one (common.cuh, lp_exp2_poly).
//
// Grid (ceil(N / 16 RB), ceil(B / 16 RA)), block (16, 16); thread (ty, tx)
// owns rows ty RA + i and columns tx RB + j (vector loads, common.cuh); the
// global loads of tile t + 1 are issued before the arithmetic of tile t
// (LpTileStage).
// Zero padding past D adds |0 - 0|^p = 0 and cannot raise a maximum.
//
// For p = 2 and 8 in the common case the backend runs lp_forward_raw (below)
// first, a plain sum without normalisation, and this kernel only as its
// fixup: with redo non-null, a block whose entry redo[block] is 0 (every
// output of the raw kernel's identical block was in its safe range) returns
// at once, and the others recompute all their outputs here.
#include "common.cuh"

// Where mt > m (a new running maximum of one output): the new scale and
// offset, and the sum so far brought to them.  Branch-free (selects), so the
// kernel takes one branch per tile for all its outputs, not one per output.
// The factor 2^(K_old - K_new) <= 1 is exact (a power of two) while the
// scale s stays, and rounded (2 ulp, exp2) when m crosses a power of two,
// which happens a handful of times per output on real data (each time the
// old terms shrink by 2^-p or more, so the rounding matters only for small
// p).  For float general p, off holds c (hardware-exp2 columns) or M - c
// (polynomial columns) and lmin the clamp of log2 t that keeps
// p log2 t - c >= LP_EXP2_FLOOR; c needs no accuracy (it only bounds the
// largest term near 1), so lg2.approx gives it.
template <int PV, typename T>
__device__ __forceinline__ void lp_rescale(T& acc, T& m, T& s, T& off, T& lmin, T mt, T p, T rp, bool hw) {
    const bool grew = !(mt <= m);   // true for NaN: m takes it (see lp_forward)
    const T s_new = lp_scale_of(mt);
    const int d = lp_log2_scale(s_new) - lp_log2_scale(s);
    T factor;
    T c_new = T(0);
    if constexpr (PV == 0) {
        if constexpr (lp_is_float<T>::value) {
            c_new = ceilf(p * lp_lg2_approx(mt * s_new));
        } else {
            c_new = ceil(p * lp_log2(mt * s_new));
        }
        const T c_old = hw ? off : T(LP_EXP2_MAGIC) - off;
        const T dc = c_old - c_new;
        factor = d == 0 ? (dc < T(1 - lp_bias<T>::value) ? T(0) : lp_pow2i(T(0), (int)dc))
                        : lp_exp2(lp_fma(p, T(d), dc));
    } else {
        factor = d < 1 - lp_bias<T>::value ? T(0) : lp_pow<PV, T>(lp_pow2i(T(0), d), p);
    }
    factor = m > T(0) ? factor : T(0);  // before any nonzero |x - w|: only (clamped) zeros so far
    acc = grew ? acc * factor : acc;
    m = grew ? mt : m;
    s = grew ? s_new : s;
    if constexpr (PV == 0) {
        off = grew ? (hw ? c_new : T(LP_EXP2_MAGIC) - c_new) : off;
        lmin = grew ? (c_new + T(LP_EXP2_FLOOR)) * rp : lmin;
    }
}

template <typename T, int PV, int RA, int RB, bool APPROX>
__global__ void __launch_bounds__(LP_THREADS, 1)
lp_forward(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, const int* __restrict__ redo,
           int B, int N, int D, T p) {
    // the fixup of lp_forward_raw: the same grid, so the same block index (uniform: no thread reaches a barrier
    // its neighbours skip)
    if (redo != nullptr && redo[blockIdx.y * gridDim.x + blockIdx.x] == 0) return;
    constexpr int BA = LP_TY * RA;
    constexpr int BB = LP_TX * RB;
    constexpr bool FAST = APPROX && PV == 0 && lp_is_float<T>::value;
    constexpr bool NORM = PV != 1;
    constexpr bool GEN = PV == 0;
    constexpr int R1 = NORM ? RA : 1, C1 = NORM ? RB : 1, R0 = GEN ? RA : 1, C0 = GEN ? RB : 1;
    constexpr int PAD = LP_VPAD(T);
    alignas(16) __shared__ T sx[LP_BK][BA + PAD];
    alignas(16) __shared__ T sw[LP_BK][BB + PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int b0 = blockIdx.y * BA;
    const int n0 = blockIdx.x * BB;
    const T rp = T(1) / p;

    // acc: the scaled sum; m: running max; s: its scale (0 until a nonzero
    // |x - w| appears); off, lmin: see lp_rescale (off = c in double).
    T acc[RA][RB];
    T m[R1][C1];
    T s[R1][C1];
    T off[R0][C0];
    T lmin[R0][C0];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            acc[i][j] = T(0);
            if constexpr (NORM) {
                m[i][j] = T(0);
                s[i][j] = T(0);
            }
            if constexpr (GEN) {
                off[i][j] = (FAST && j >= LP_EX2_HW_COLS) ? T(LP_EXP2_MAGIC) : T(0);
                lmin[i][j] = T(LP_EXP2_FLOOR) * rp;
            }
        }
    }

    // the operands of step k: this thread's RA values of x and RB of w
    auto load_k = [&](int k, T(&xv)[RA], T(&wv)[RB]) {
        lp_load_vec(xv, &sx[k][ty * RA]);
        lp_load_vec(wv, &sw[k][tx * RB]);
    };
    LpTileStage<T, BA> stage_x;
    LpTileStage<T, BB> stage_w;
    stage_x.fetch(x, B, D, b0, 0);
    stage_w.fetch(w, N, D, n0, 0);
    for (int k0 = 0; k0 < D; k0 += LP_BK) {
        stage_x.template store<PAD>(sx);
        stage_w.template store<PAD>(sw);
        __syncthreads();
        if (k0 + LP_BK < D) {
            stage_x.fetch(x, B, D, b0, k0 + LP_BK);
            stage_w.fetch(w, N, D, n0, k0 + LP_BK);
        }
        if constexpr (NORM) {
            T mt[RA][RB];
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) mt[i][j] = m[i][j];
            }
#pragma unroll
            for (int k = 0; k < LP_BK; ++k) {
                T xv[RA], wv[RB];
                load_k(k, xv, wv);
#pragma unroll
                for (int e = 0; e < RA * RB; ++e) {  // e = (i, j)
                    T& t = mt[e / RB][e % RB];
                    t = lp_max_nonneg(t, lp_abs(xv[e / RB] - wv[e % RB]));
                }
            }
            // a NaN maximum counts as growth, and lp_rescale makes it the running maximum, which stays
            // NaN: the output is acc * m = NaN (below), whatever acc holds (the polynomial exp2 of the
            // general-p sum turns a NaN term into a finite value)
            bool grew = false;
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) grew |= !(mt[i][j] <= m[i][j]);
            }
            if (grew) {
#pragma unroll
                for (int i = 0; i < RA; ++i) {
#pragma unroll
                    for (int j = 0; j < RB; ++j) {
                        T none = T(0);
                        lp_rescale<PV, T>(acc[i][j], m[i][j], s[i][j], GEN ? off[i % R0][j % C0] : none,
                                          GEN ? lmin[i % R0][j % C0] : none, mt[i][j], p, rp,
                                          !FAST || j < LP_EX2_HW_COLS);
                    }
                }
            }
        }
        // otherwise the compiler keeps all 16 k of operands in registers from
        // the max pass to the sum pass (and spills)
        LP_COMPILER_FENCE();
#pragma unroll(NORM ? LP_SUM_UNROLL : LP_BK)
        for (int k = 0; k < LP_BK; ++k) {
            T xv[RA], wv[RB];
            load_k(k, xv, wv);
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) {
                    const T d = lp_abs(xv[i] - wv[j]);
                    if constexpr (!NORM) {
                        acc[i][j] += d;
                    } else if constexpr (FAST) {
                        const float l = lp_clamp_below(lp_lg2_approx(d * s[i][j]), lmin[i % R0][j % C0]);
                        acc[i][j] += lp_pow2_fast<false>(j < LP_EX2_HW_COLS, p, l, off[i % R0][j % C0]);
                    } else if constexpr (GEN) {
                        acc[i][j] += lp_exp2(lp_fma(p, lp_log2(d * s[i][j]), -off[i % R0][j % C0]));
                    } else {
                        acc[i][j] = lp_pow_acc<PV, T>(acc[i][j], d * s[i][j], p);
                    }
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int b = b0 + ty * RA + i;
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            const int n = n0 + tx * RB + j;
            if (b < B && n < N) {
                T v = acc[i][j];
                if constexpr (NORM) {
                    if (m[i % R1][j % C1] > T(0)) {
                        const T unscale = lp_pow2i(T(0), -lp_log2_scale(s[i % R1][j % C1]));
                        if constexpr (GEN) {
                            const T c = (FAST && j >= LP_EX2_HW_COLS) ? T(LP_EXP2_MAGIC) - off[i % R0][j % C0]
                                                                       : off[i % R0][j % C0];
                            v = lp_exp2((lp_log2(acc[i][j]) + c) * rp) * unscale;
                        } else {
                            v = lp_root<PV, T>(acc[i][j], p) * unscale;
                        }
                    } else {
                        v = acc[i][j] * m[i % R1][j % C1];  // 0, or NaN from a NaN term
                    }
                }
                y[(lp_i64)b * N + n] = v;
            }
        }
    }
}

// ---- The one-pass raw sum for p = 2 and 8 (PV), with a fixup ------------------
//
// y[b, n] = S^(1/p), S = sum_i (x[b, i] - w[n, i])^p accumulated as is: per
// triple a subtraction and the exact chain (p = 8: FADD, FMUL, FMUL, FFMA;
// even powers need no |.|).  No maximum pass, no scaling.  S is what
// lp_forward computes scaled by the power of two s^p (exactly, since (d s)^2
// = d^2 s^2 and sqrt(S s^p) = sqrt(S) s^(p/2) are exact scalings of a
// correctly rounded result), so both kernels agree to the rounding of their
// own summation wherever nothing underflows or overflows.  Where something
// may have, the raw result is not trusted:
//
// The safe range, 4 D T_MIN <= S <= T_MAX (T_MIN = 2^emin the smallest
// normal, 2^-126 in float, 2^-1022 in double; u = 2^-prec the unit
// roundoff, prec = 24 or 53; NVRTC keeps subnormals, no -ftz, and the CPU
// emulation does too):
//   Overflow: the terms are >= 0, so an intermediate that overflowed leaves
//     S = inf (never NaN); S <= T_MAX means nothing overflowed.
//   Underflow: a subtraction with a subnormal result is exact.  A subnormal
//     d^2 or d^4 (p = 8) means d^4 < 2^emin (1 + 2u), so the term, computed
//     or exact, is below 2^(2 emin + 1): negligible (2^(emin + prec) ~
//     2^-102 of the bound below).  What remains is the rounding of a
//     product or sum that lands in the subnormal range, at most half a
//     subnormal ulp, 2^(emin - prec), each; at most two per term (d^p
//     rounded, then acc + d^p; one when the two fuse into an FFMA).
//     So gradual underflow moves S by at most D 2^(emin - prec + 1) in all,
//     and S >= 4 D T_MIN = D 2^(emin + 2) bounds that by 2^(-prec - 1) S =
//     u S / 2 (the extra factor 2 covers the rounding of T(D) and of S
//     itself): y moves by at most u / (2 p) relative, and every other
//     rounding is lp_forward's own.  (float: S >= D 2^-124, i.e. |x - w|
//     typically above ~2e-5 at p = 8.)
//   NaN: a NaN term makes S NaN, which lp_forward would return as well (its
//     acc is poisoned by the same term); NaN compares false, so it stays.
// An output outside the range (inf; S = 0 from identical rows or
// everything below ~2^-18.6 at p = 8; tiny data) marks its block in
// redo[block], and lp_forward (the fixup launch, same grid and tile)
// recomputes that block with its running-maximum scaling.  Every block
// writes its entry, so redo needs no clearing (torch.empty).
template <typename T> struct lp_finite_max;
template <> struct lp_finite_max<float> {
    static __device__ __forceinline__ float get() { return __int_as_float(0x7F7FFFFF); }
};
template <> struct lp_finite_max<double> {
    static __device__ __forceinline__ double get() { return __longlong_as_double(0x7FEFFFFFFFFFFFFFll); }
};

template <typename T, int PV, int RA, int RB>
__global__ void __launch_bounds__(LP_THREADS, 1)
lp_forward_raw(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int* __restrict__ redo,
               int B, int N, int D) {
    static_assert(PV == 2 || PV == 8, "the raw sum is for the exact even chains");
    constexpr int BA = LP_TY * RA;
    constexpr int BB = LP_TX * RB;
    constexpr int PAD = LP_VPAD(T);
    alignas(16) __shared__ T sx[LP_BK][BA + PAD];
    alignas(16) __shared__ T sw[LP_BK][BB + PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int b0 = blockIdx.y * BA;
    const int n0 = blockIdx.x * BB;

    T acc[RA][RB];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
#pragma unroll
        for (int j = 0; j < RB; ++j) acc[i][j] = T(0);
    }
    LpTileStage<T, BA> stage_x;
    LpTileStage<T, BB> stage_w;
    stage_x.fetch(x, B, D, b0, 0);
    stage_w.fetch(w, N, D, n0, 0);
    for (int k0 = 0; k0 < D; k0 += LP_BK) {   // D >= 1 (the backend rejects D = 0)
        stage_x.template store<PAD>(sx);
        stage_w.template store<PAD>(sw);
        __syncthreads();
        if (k0 + LP_BK < D) {
            stage_x.fetch(x, B, D, b0, k0 + LP_BK);
            stage_w.fetch(w, N, D, n0, k0 + LP_BK);
        }
#pragma unroll
        for (int k = 0; k < LP_BK; ++k) {
            T xv[RA], wv[RB];
            lp_load_vec(xv, &sx[k][ty * RA]);
            lp_load_vec(wv, &sw[k][tx * RB]);
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) acc[i][j] = lp_pow_acc<PV, T>(acc[i][j], xv[i] - wv[j], T(PV));
            }
        }
        __syncthreads();
    }

    const T lo = T(D) * lp_pow2i(T(0), 3 - lp_bias<T>::value);   // 4 D T_MIN
    const T hi = lp_finite_max<T>::get();
    bool unsafe = false;
#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int b = b0 + ty * RA + i;
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            const int n = n0 + tx * RB + j;
            if (b < B && n < N) {
                const T s = acc[i][j];
                unsafe |= s < lo || s > hi;   // false for NaN: kept
                y[(lp_i64)b * N + n] = lp_root<PV, T>(s, T(PV));
            }
        }
    }
    // the block's verdict: one barrier that also ORs the threads' flags (no shared flag that many threads
    // would store to at once)
    const int any_unsafe = __syncthreads_or(unsafe);
    if (tx == 0 && ty == 0) redo[blockIdx.y * gridDim.x + blockIdx.x] = any_unsafe;
}
