// Finite-p backward; one kernel gives either gradient:
//   out[a, i] = sum_c G[a, c] * sign(t) |t|^(p-1),   t = (A[a, i] - C[c, i]) * R[a, c]
// grad_x: A = x (B, D), C = w (N, D), G = grad_y and R = 1 / y as (B, N)
//         arrays (GT = false);
// grad_w: A = w, C = x, with the same G and R read transposed (GT = true);
//         the factor is odd in t, so swapping the operands is the minus sign
//         of dy/dw.
// R = 0 where y = 0 (no gradient), and |t| <= 1 always.
// APPROX (float, general p up to FAST_GRAD_MAX_P of kernel_specs.py): |t|^(p-1) =
// 2^((p-1) log2|t|) with lg2.approx and the hardware / polynomial exp2 split
// of common.cuh (relative error <= 1.65e-7 (p - 1) + 2.2e-7 per term, see
// there); otherwise the accurate exp2/log2 (lp_odd_pow).
//
// Grid (ceil(D / 16 RI), ceil(NA / 16 RA)), block (16, 16); thread (ty, tx)
// owns rows ty RA + i and features tx RI + j (16-byte shared loads).  The block's
// A-tile stays in registers; C, G and R stream through shared memory LP_BK
// rows of C at a time.  Zero padding past NC has G = 0 and adds 0.
#include "common.cuh"

// Blocks per SM for __launch_bounds__: 2 (at most 128 registers per thread), except where Blackwell's
// ptxas (sm_100, sm_120) needs more for the same code: double, and the accurate float powers, spilled
// 0.7-1.5 KiB per thread there at 128 registers; with one block per SM they keep everything in registers
// (tests/ops/test_nvrtc.py checks every architecture).
#define LP_BWD_MIN_BLOCKS(T, PV, APPROX) ((LP_ARCH >= 1000 && (sizeof(T) == 8 || ((PV) == 0 && !(APPROX)))) ? 1 : 2)

template <typename T, int PV, int RA, int RI, bool GT, bool APPROX>
__global__ void __launch_bounds__(LP_THREADS, LP_BWD_MIN_BLOCKS(T, PV, APPROX))
lp_backward(const T* __restrict__ A, const T* __restrict__ C, const T* __restrict__ G, const T* __restrict__ R,
            T* __restrict__ out, int NA, int NC, int D, T pm1) {
    constexpr int BA = LP_TY * RA;
    constexpr int BI = LP_TX * RI;
    constexpr int PAD = LP_VPAD(T);
    alignas(16) __shared__ T sc[LP_BK][BI + PAD];
    alignas(16) __shared__ T sg[LP_BK][BA + PAD];
    alignas(16) __shared__ T sr[LP_BK][BA + PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int a0 = blockIdx.y * BA;
    const int i0 = blockIdx.x * BI;
    constexpr bool FAST = APPROX && PV == 0 && lp_is_float<T>::value;
    const T lmin = T(LP_EXP2_FLOOR) / pm1;  // 2^((p-1) l) stays a normal float

    T av[RA][RI];
    T acc[RA][RI];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int a = a0 + ty * RA + i;
#pragma unroll
        for (int j = 0; j < RI; ++j) {
            const int f = i0 + tx * RI + j;
            av[i][j] = (a < NA && f < D) ? A[(lp_i64)a * D + f] : T(0);
            acc[i][j] = T(0);
        }
    }

    for (int c0 = 0; c0 < NC; c0 += LP_BK) {
        lp_load_direct<T, BI, PAD>(sc, C, NC, D, c0, i0);
        if constexpr (GT) {
            lp_load_direct<T, BA, PAD>(sg, G, NC, NA, c0, a0);
            lp_load_direct<T, BA, PAD>(sr, R, NC, NA, c0, a0);
        } else {
            lp_load_transposed<T, BA, PAD>(sg, G, NA, NC, a0, c0);
            lp_load_transposed<T, BA, PAD>(sr, R, NA, NC, a0, c0);
        }
        __syncthreads();
#pragma unroll(LP_SUM_UNROLL)
        for (int k = 0; k < LP_BK; ++k) {
            T cv[RI];
            T gv[RA];
            T rv[RA];
            lp_load_vec(cv, &sc[k][tx * RI]);
            lp_load_vec(gv, &sg[k][ty * RA]);
            lp_load_vec(rv, &sr[k][ty * RA]);
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RI; ++j) {
                    const T t = (av[i][j] - cv[j]) * rv[i];
                    if constexpr (FAST) {
                        const float l = lp_clamp_below(lp_lg2_approx(lp_abs(t)), lmin);
                        const float v = lp_pow2_fast<true>(j < LP_EX2_HW_COLS, pm1, l,
                                                     j < LP_EX2_HW_COLS ? 0.0f : LP_EXP2_MAGIC);
                        acc[i][j] = lp_fma(gv[i], copysignf(v, t), acc[i][j]);
                    } else {
                        acc[i][j] = lp_fma(gv[i], lp_odd_pow<PV, T>(t, pm1), acc[i][j]);
                    }
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int a = a0 + ty * RA + i;
#pragma unroll
        for (int j = 0; j < RI; ++j) {
            const int f = i0 + tx * RI + j;
            if (a < NA && f < D) out[(lp_i64)a * D + f] = acc[i][j];
        }
    }
}

// ---- Both gradients from one power per triple (training) --------------------
//   f[b, n, i] = G[b, n] sign(t) |t|^(p-1),   t = (x[b, i] - w[n, i]) R[b, n]
//   gx[b, i] = sum_n f,   gw[n, i] = -sum_b f
// The power, the two products by G and the two sums cost about what ONE of
// the single-gradient kernels above costs per triple (benchmarks/kernel_cost.py).
//
// Grid (ceil(D / BI), ceil(B / BB), S), block 256 threads seen as TB x TI
// (thread tid: batch rows tb RB + i, features ti RI + j).  The block streams
// w, G and R over its share of n (the S = gridDim.z shares are whole
// LP_BK-deep tiles) as lp_backward does; gx[b, i] sums over n in registers
// and is stored once when S = 1 (deterministic), added atomically into
// zeros when S > 1 (the caller's choice: more blocks when B D is small, see
// fused_n_splits in kernel_specs.py).  gw needs a sum over b, which is
// spread over the block's TB threads along b and over the ceil(B / BB)
// blocks along b:
//   1. each thread sums its RB rows in registers (one partial per k and j);
//   2. the partials of a tile go to shared memory sp[k][tb][f], and after the
//      tile's barrier every thread adds the TB partials of OUT consecutive
//      features of one k (16-byte loads, fixed order: deterministic in-block);
//   3. atomicAdd into gw, which the caller zeroes: the ceil(B / BB) blocks
//      along b add in whatever order the hardware runs them, so gw is NOT
//      bit-for-bit reproducible from run to run when B > 2 BB (float addition
//      is not associative); gx is when S = 1.  Under
//      torch.use_deterministic_algorithms(True) the backend runs the two
//      single-gradient kernels above instead (no atomics).
// With S = 1, gx is the single-gradient kernel's grad_x bit for bit (the same
// operations, fma included, over n in the same order) wherever both compute
// the power alike: every p but the fast general p, whose hardware /
// polynomial exp2 split follows another index here.
// Per tile a thread adds OUT x TB values and issues OUT atomics against
// LP_BK RB RI triples: ~0.2 instructions per triple.
// sp holds LP_BK TB BI values, 32 KiB at the catalogue's tiles (float: TB = 8,
// 64 features; double: TB = 4, RI = 1, 64 features), which with the operand
// tiles stays under the 48 KiB of static shared memory.  No warp shuffles:
// the sums go through shared memory, which the CPU emulation models.
// Zero padding as above: rows past B have G = R = 0, columns past N have
// G = 0; both add 0 (NaN only where the gradient is NaN anyway).
// RI consecutive values of a shared row in one load/store (8 bytes for two
// floats or one double: LDS.64 / STS.64).
template <typename T, int N>
struct alignas(N * sizeof(T)) LpSmallVec {
    T v[N];
};

// dst[k][c] = src[(row0 + k) * cols + col0 + c] (zero outside the matrix), as lp_load_direct, but with
// the trip count known at compile time: one base offset and one stride per thread (LpTileStage's
// pattern for the direct layout), no remainder loop.
template <typename T, int COLS, int PAD>
__device__ __forceinline__ void lp_load_direct_unrolled(T (*dst)[COLS + PAD], const T* __restrict__ src, int rows,
                                                        int cols, int row0, int col0) {
    static_assert((COLS * LP_BK) % LP_THREADS == 0 && LP_THREADS % COLS == 0, "a tile must split evenly");
    constexpr int PER = COLS * LP_BK / LP_THREADS;
    constexpr int KSTEP = LP_THREADS / COLS;
    const int tid = threadIdx.y * LP_TX + threadIdx.x;
    const int c = tid % COLS;
    const int k = tid / COLS;
    const bool col_ok = col0 + c < cols;
    const T* p = src + ((lp_i64)(row0 + k) * cols + col0 + c);
#pragma unroll
    for (int q = 0; q < PER; ++q) {
        dst[k + q * KSTEP][c] = (col_ok && row0 + k + q * KSTEP < rows) ? p[(lp_i64)q * KSTEP * cols] : T(0);
    }
}

template <typename T, int PV, int TB, int RB, int RI, bool APPROX>
__global__ void __launch_bounds__(LP_THREADS, 2)
lp_backward_fused(const T* __restrict__ X, const T* __restrict__ W, const T* __restrict__ G,
                  const T* __restrict__ R, T* __restrict__ gx, T* __restrict__ gw, int B, int N, int D, T pm1) {
    constexpr int TI = LP_THREADS / TB;
    constexpr int BB = TB * RB;
    constexpr int BI = TI * RI;
    constexpr int PAD = LP_VPAD(T);
    constexpr int OUT = LP_BK * BI / LP_THREADS;  // gw sums per thread and tile
    static_assert((OUT * (int)sizeof(T)) % 16 == 0, "the gw reduction reads 16-byte multiples");
    alignas(16) __shared__ T sc[LP_BK][BI + PAD];
    alignas(16) __shared__ T sg[LP_BK][BB + PAD];
    alignas(16) __shared__ T sr[LP_BK][BB + PAD];
    alignas(16) __shared__ T sp[LP_BK][TB][BI];
    typedef LpSmallVec<T, RI> Row;
    const int tid = threadIdx.y * LP_TX + threadIdx.x;
    const int tb = tid / TI;  // one tb per warp: G and R loads are broadcasts
    const int ti = tid % TI;
    const int b0 = blockIdx.y * BB;
    const int i0 = blockIdx.x * BI;
    const int rk = tid / (BI / OUT);          // the reduction's k ...
    const int rf = (tid % (BI / OUT)) * OUT;  // ... and first feature
    constexpr bool FAST = APPROX && PV == 0 && lp_is_float<T>::value;
    const T lmin = T(LP_EXP2_FLOOR) / pm1;

    T av[RB][RI];
    T acc[RB][RI];
#pragma unroll
    for (int i = 0; i < RB; ++i) {
        const int b = b0 + tb * RB + i;
#pragma unroll
        for (int j = 0; j < RI; ++j) {
            const int f = i0 + ti * RI + j;
            av[i][j] = (b < B && f < D) ? X[(lp_i64)b * D + f] : T(0);
            acc[i][j] = T(0);
        }
    }

    const int tiles = (N + LP_BK - 1) / LP_BK;
    const int splits = (int)gridDim.z;
    const int per = (tiles + splits - 1) / splits;
    const int c_begin = (int)blockIdx.z * per * LP_BK;
    const int c_end = c_begin + per * LP_BK < N ? c_begin + per * LP_BK : N;
    for (int c0 = c_begin; c0 < c_end; c0 += LP_BK) {
        {
            lp_load_direct_unrolled<T, BI, PAD>(sc, W, N, D, c0, i0);
            LpTileStage<T, BB> stage;
            stage.fetch(G, B, N, b0, c0);
            stage.template store<PAD>(sg);
            stage.fetch(R, B, N, b0, c0);
            stage.template store<PAD>(sr);
        }
        __syncthreads();
#pragma unroll(LP_SUM_UNROLL)
        for (int k = 0; k < LP_BK; ++k) {
            const Row cv = *reinterpret_cast<const Row*>(&sc[k][ti * RI]);
            T gv[RB];
            T rv[RB];
            lp_load_vec(gv, &sg[k][tb * RB]);
            lp_load_vec(rv, &sr[k][tb * RB]);
            Row pw;
#pragma unroll
            for (int j = 0; j < RI; ++j) pw.v[j] = T(0);
#pragma unroll
            for (int i = 0; i < RB; ++i) {
#pragma unroll
                for (int j = 0; j < RI; ++j) {
                    const T t = (av[i][j] - cv.v[j]) * rv[i];
                    T v;
                    if constexpr (FAST) {
                        // half of the terms through ex2.approx, half through the polynomial (common.cuh)
                        // (a constant per unrolled (i, j), as LP_EX2_HW_COLS is in lp_backward)
                        const bool hw = ((i * RI + j) & 1) == 0;
                        const float l = lp_clamp_below(lp_lg2_approx(lp_abs(t)), lmin);
                        v = copysignf(lp_pow2_fast<true>(hw, pm1, l, hw ? 0.0f : LP_EXP2_MAGIC), t);
                    } else {
                        v = lp_odd_pow<PV, T>(t, pm1);
                    }
                    acc[i][j] = lp_fma(gv[i], v, acc[i][j]);
                    pw.v[j] = lp_fma(gv[i], v, pw.v[j]);
                }
            }
            *reinterpret_cast<Row*>(&sp[k][tb][ti * RI]) = pw;
        }
        __syncthreads();
        // sp is next written after the next tile's first barrier: no third barrier
        // s = -(sum over tb): the minus of dy/dw rides on the additions (FADD negates operands for free)
        T s[OUT];
        lp_load_vec(s, &sp[rk][0][rf]);
#pragma unroll
        for (int m = 0; m < OUT; ++m) s[m] = -s[m];
#pragma unroll
        for (int q = 1; q < TB; ++q) {
            T v[OUT];
            lp_load_vec(v, &sp[rk][q][rf]);
#pragma unroll
            for (int m = 0; m < OUT; ++m) s[m] -= v[m];
        }
        const int n = c0 + rk;
        if (n < N) {
            T* dst = gw + ((lp_i64)n * D + i0 + rf);
#pragma unroll
            for (int m = 0; m < OUT; ++m) {
                if (i0 + rf + m < D) atomicAdd(dst + m, s[m]);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < RB; ++i) {
        const int b = b0 + tb * RB + i;
#pragma unroll
        for (int j = 0; j < RI; ++j) {
            const int f = i0 + ti * RI + j;
            if (b < B && f < D) {
                if (splits == 1) {
                    gx[(lp_i64)b * D + f] = acc[i][j];
                } else {
                    atomicAdd(&gx[(lp_i64)b * D + f], acc[i][j]);
                }
            }
        }
    }
}
