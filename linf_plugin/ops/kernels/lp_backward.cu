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

template <typename T, int PV, int RA, int RI, bool GT, bool APPROX>
__global__ void __launch_bounds__(LP_THREADS, 2)
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
                        const float l = lp_max_nan(lp_lg2_approx(lp_abs(t)), lmin);
                        const float v = lp_pow2_fast(j < LP_EX2_HW_COLS, pm1, l,
                                                     j < LP_EX2_HW_COLS ? 0.0f : LP_EXP2_MAGIC);
                        acc[i][j] += gv[i] * copysignf(v, t);
                    } else {
                        acc[i][j] += gv[i] * lp_odd_pow<PV, T>(t, pm1);
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
