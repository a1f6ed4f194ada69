// Finite-p backward; one kernel gives either gradient:
//   out[a, i] = sum_c G[a, c] * sign(t) |t|^(p-1),   t = (A[a, i] - C[c, i]) * R[a, c]
// grad_x: A = x (B, D), C = w (N, D), G = grad_y and R = 1 / y as (B, N)
//         arrays (GT = false);
// grad_w: A = w, C = x, with the same G and R read transposed (GT = true);
//         the factor is odd in t, so swapping the operands is the minus sign
//         of dy/dw.
// R = 0 where y = 0 (no gradient), and |t| <= 1 always.
//
// Grid (ceil(D / 16 RI), ceil(NA / 16 RA)), block (16, 16).  The block's
// A-tile stays in registers; C, G and R stream through shared memory LP_BK
// rows of C at a time.  Zero padding past NC has G = 0 and adds 0.
#include "common.cuh"

template <typename T, int PV, int RA, int RI, bool GT>
__global__ void __launch_bounds__(LP_THREADS)
lp_backward(const T* __restrict__ A, const T* __restrict__ C, const T* __restrict__ G, const T* __restrict__ R,
            T* __restrict__ out, int NA, int NC, int D, T pm1) {
    constexpr int BA = LP_TY * RA;
    constexpr int BI = LP_TX * RI;
    __shared__ T sc[LP_BK][BI + LP_PAD];
    __shared__ T sg[LP_BK][BA + LP_PAD];
    __shared__ T sr[LP_BK][BA + LP_PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int a0 = blockIdx.y * BA;
    const int i0 = blockIdx.x * BI;

    T av[RA][RI];
    T acc[RA][RI];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int a = a0 + ty + LP_TY * i;
#pragma unroll
        for (int j = 0; j < RI; ++j) {
            const int f = i0 + tx + LP_TX * j;
            av[i][j] = (a < NA && f < D) ? A[(lp_i64)a * D + f] : T(0);
            acc[i][j] = T(0);
        }
    }

    for (int c0 = 0; c0 < NC; c0 += LP_BK) {
        lp_load_direct<T, BI>(sc, C, NC, D, c0, i0);
        if constexpr (GT) {
            lp_load_direct<T, BA>(sg, G, NC, NA, c0, a0);
            lp_load_direct<T, BA>(sr, R, NC, NA, c0, a0);
        } else {
            lp_load_transposed<T, BA>(sg, G, NA, NC, a0, c0);
            lp_load_transposed<T, BA>(sr, R, NA, NC, a0, c0);
        }
        __syncthreads();
#pragma unroll((PV) == 0 ? 1 : 4)
        for (int k = 0; k < LP_BK; ++k) {
            T cv[RI];
            T gv[RA];
            T rv[RA];
#pragma unroll
            for (int j = 0; j < RI; ++j) cv[j] = sc[k][tx + LP_TX * j];
#pragma unroll
            for (int i = 0; i < RA; ++i) {
                gv[i] = sg[k][ty + LP_TY * i];
                rv[i] = sr[k][ty + LP_TY * i];
            }
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RI; ++j) {
                    acc[i][j] += gv[i] * lp_odd_pow<PV, T>((av[i][j] - cv[j]) * rv[i], pm1);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int a = a0 + ty + LP_TY * i;
#pragma unroll
        for (int j = 0; j < RI; ++j) {
            const int f = i0 + tx + LP_TX * j;
            if (a < NA && f < D) out[(lp_i64)a * D + f] = acc[i][j];
        }
    }
}
