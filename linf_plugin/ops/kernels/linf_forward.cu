// p = inf forward: y[b, n] = max_i |x[b, i] - w[n, i]|.
//
// x (B, D), w (N, D), y (B, N), all row-major.  Grid (ceil(N / 16 RB),
// ceil(B / 16 RA)), block (16, 16).  Each thread keeps RA x RB running maxima
// in registers; per (b, n, i) triple the hot loop issues one subtraction and
// one max of an absolute value (the |.| folds into the max on the GPU).
// The max keeps NaN (lp_max_nonneg: max.NaN, or an integer max on sm_75): a NaN in x[b] or w[n] makes
// y[b, n] NaN, as torch.amax does, at no cost per triple.
//
// SAVE also records, per output, the first D-tile (LP_BK coordinates) that
// holds its final maximum: the tile maximum is kept apart and merged once per
// tile with a strict '>', so earlier tiles win ties.  linf_resolve (in
// linf_backward.cu) turns the tile into the exact lowest argmax, which keeps
// the argmax bookkeeping out of the per-triple loop.  Zero padding past D
// cannot change a maximum, since every |d| >= 0.  The global loads of tile
// t + 1 are issued before the arithmetic of tile t (LpTileStage).
#include "common.cuh"

template <typename T, int RA, int RB, bool SAVE>
__global__ void __launch_bounds__(LP_THREADS, SAVE ? 1 : 2)
linf_forward(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int* __restrict__ tile_of,
             int B, int N, int D) {
    constexpr int BA = LP_TY * RA;
    constexpr int BB = LP_TX * RB;
    __shared__ T sx[LP_BK][BA + LP_PAD];
    __shared__ T sw[LP_BK][BB + LP_PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int b0 = blockIdx.y * BA;
    const int n0 = blockIdx.x * BB;

    T m[RA][RB];
    T mt[SAVE ? RA : 1][SAVE ? RB : 1];
    int tile[SAVE ? RA : 1][SAVE ? RB : 1];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            m[i][j] = T(0);
            if constexpr (SAVE) tile[i][j] = 0;
        }
    }

    LpTileStage<T, BA> stage_x;
    LpTileStage<T, BB> stage_w;
    stage_x.fetch(x, B, D, b0, 0);
    stage_w.fetch(w, N, D, n0, 0);
    for (int k0 = 0, t = 0; k0 < D; k0 += LP_BK, ++t) {
        stage_x.store(sx);
        stage_w.store(sw);
        __syncthreads();
        if (k0 + LP_BK < D) {  // next tile's loads in flight during this tile's arithmetic
            stage_x.fetch(x, B, D, b0, k0 + LP_BK);
            stage_w.fetch(w, N, D, n0, k0 + LP_BK);
        }
        if constexpr (SAVE) {
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) mt[i][j] = T(0);
            }
        }
#pragma unroll
        for (int k = 0; k < LP_BK; ++k) {
            T xv[RA];
            T wv[RB];
#pragma unroll
            for (int i = 0; i < RA; ++i) xv[i] = sx[k][ty + LP_TY * i];
#pragma unroll
            for (int j = 0; j < RB; ++j) wv[j] = sw[k][tx + LP_TX * j];
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) {
                    if constexpr (SAVE) {
                        mt[i][j] = lp_max_nonneg(mt[i][j], lp_abs(xv[i] - wv[j]));
                    } else {
                        m[i][j] = lp_max_nonneg(m[i][j], lp_abs(xv[i] - wv[j]));
                    }
                }
            }
        }
        if constexpr (SAVE) {
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) {
                    if (mt[i][j] > m[i][j] || mt[i][j] != mt[i][j]) {
                        m[i][j] = mt[i][j];
                        tile[i][j] = t;
                    }
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int b = b0 + ty + LP_TY * i;
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            const int n = n0 + tx + LP_TX * j;
            if (b < B && n < N) {
                y[(lp_i64)b * N + n] = m[i][j];
                if constexpr (SAVE) tile_of[(lp_i64)b * N + n] = tile[i][j];
            }
        }
    }
}
