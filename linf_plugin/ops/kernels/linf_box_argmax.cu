// linf_box_argmax: the coordinates that decide the l_inf distance's range
// over a box (CROWN's p = inf relaxation), for every (b, n) at once.
//
// Per coordinate i, with a = w - l and c = u - w (lp_interval_terms, the
// same operations as every other backend): far_i = max(a, c) and
// near_i = max(-a, -c, 0).  Writes, into out of shape (3, B, N), int32:
//   out[0] = the lowest argmax of near,
//   out[1] = the lowest argmax of far,
//   out[2] = the lowest argmax of far with out[1] left out (0 when D = 1).
// One sweep over i in ascending order with strict '>' comparisons gives
// exactly that: a later equal value never displaces an earlier one, and the
// runner-up is the best of everything the leader did not take.  Values
// compare as numbers (-0.0 == 0.0), as torch.argmax does.  far >= 0 and
// near >= 0, so -1 is a safe "nothing yet".
//
// Tiled like interval_inf_forward: grid (ceil(N / 16 RB), ceil(B / 16 RA)),
// block (16, 16); thread (ty, tx) owns rows b0 + ty + 16 i and columns
// n0 + tx + 16 j.  The zero padding of the last k-tile is skipped (a padded
// coordinate must not become the runner-up).
#include "common.cuh"

template <typename T, int RA, int RB>
__global__ void __launch_bounds__(LP_THREADS)
linf_box_argmax(const T* __restrict__ lower, const T* __restrict__ upper, const T* __restrict__ w,
                int* __restrict__ out, int B, int N, int D) {
    constexpr int BA = LP_TY * RA;
    constexpr int BB = LP_TX * RB;
    __shared__ T sl[LP_BK][BA + LP_PAD];
    __shared__ T su[LP_BK][BA + LP_PAD];
    __shared__ T sw[LP_BK][BB + LP_PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int b0 = blockIdx.y * BA;
    const int n0 = blockIdx.x * BB;

    T near_m[RA][RB];
    T far_m1[RA][RB];
    T far_m2[RA][RB];
    int near_k[RA][RB];
    int far_k1[RA][RB];
    int far_k2[RA][RB];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            near_m[i][j] = T(-1);
            far_m1[i][j] = T(-1);
            far_m2[i][j] = T(-1);
            near_k[i][j] = 0;
            far_k1[i][j] = 0;
            far_k2[i][j] = 0;
        }
    }

    for (int k0 = 0; k0 < D; k0 += LP_BK) {
        lp_load_transposed<T, BA>(sl, lower, B, D, b0, k0);
        lp_load_transposed<T, BA>(su, upper, B, D, b0, k0);
        lp_load_transposed<T, BB>(sw, w, N, D, n0, k0);
        __syncthreads();
        const int kn = D - k0 < LP_BK ? D - k0 : LP_BK;
        for (int k = 0; k < kn; ++k) {
            const int idx = k0 + k;
            T wv[RB];
#pragma unroll
            for (int j = 0; j < RB; ++j) wv[j] = sw[k][tx + LP_TX * j];
#pragma unroll
            for (int i = 0; i < RA; ++i) {
                const T l = sl[k][ty + LP_TY * i];
                const T u = su[k][ty + LP_TY * i];
#pragma unroll
                for (int j = 0; j < RB; ++j) {
                    T a, c, far, near;
                    lp_interval_terms(l, u, wv[j], a, c, far, near);
                    if (near > near_m[i][j]) {
                        near_m[i][j] = near;
                        near_k[i][j] = idx;
                    }
                    if (far > far_m1[i][j]) {
                        far_m2[i][j] = far_m1[i][j];
                        far_k2[i][j] = far_k1[i][j];
                        far_m1[i][j] = far;
                        far_k1[i][j] = idx;
                    } else if (far > far_m2[i][j]) {
                        far_m2[i][j] = far;
                        far_k2[i][j] = idx;
                    }
                }
            }
        }
        __syncthreads();
    }

    const lp_i64 plane = (lp_i64)B * N;
#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int b = b0 + ty + LP_TY * i;
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            const int n = n0 + tx + LP_TX * j;
            if (b < B && n < N) {
                const lp_i64 o = (lp_i64)b * N + n;
                out[o] = near_k[i][j];
                out[plane + o] = far_k1[i][j];
                // D = 1: the leader took the only coordinate; far_k2 is still 0.
                out[2 * plane + o] = far_k2[i][j];
            }
        }
    }
}
