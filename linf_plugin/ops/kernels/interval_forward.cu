// Exact interval of ||x - w[n]||_p over the box lower[b] <= x <= upper[b].
//
// Per coordinate, with a = w - l and c = u - w (see lp_interval_terms):
// far = max(a, c) and near = max(-a, -c, 0); hi = ||far||_p, lo = ||near||_p
// (the function is separable, so these are attained at box corners/points).
//
// interval_inf_forward: p = inf.  Same tiling as linf_forward, with two
// shared tiles on the box side.  The clamp of near at 0 comes from starting
// the running maximum at 0.  SAVE stores the first D-tile of each maximum in
// tile_of (2, B, N): [0] for lo, [1] for hi; interval_resolve refines it.
// The next tile's global loads are issued before this tile's arithmetic.
//
// interval_lp_forward: finite p, the pass after interval_inf_forward (lo and
// hi hold the maxima on entry, the norms on exit), normalised as lp_forward.
// PV = 1 needs no first pass.  Grid (ceil(N / 16 RB), ceil(B / 16 RA)),
// block (16, 16) for both.  Zero padding gives far = near = 0.
#include "common.cuh"

template <typename T, int RA, int RB, bool SAVE>
__global__ void __launch_bounds__(LP_THREADS, SAVE ? 1 : 2)
interval_inf_forward(const T* __restrict__ lower, const T* __restrict__ upper, const T* __restrict__ w,
                     T* __restrict__ lo, T* __restrict__ hi, int* __restrict__ tile_of, int B, int N, int D) {
    constexpr int BA = LP_TY * RA;
    constexpr int BB = LP_TX * RB;
    __shared__ T sl[LP_BK][BA + LP_PAD];
    __shared__ T su[LP_BK][BA + LP_PAD];
    __shared__ T sw[LP_BK][BB + LP_PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int b0 = blockIdx.y * BA;
    const int n0 = blockIdx.x * BB;

    T mlo[RA][RB];
    T mhi[RA][RB];
    T tlo[SAVE ? RA : 1][SAVE ? RB : 1];
    T thi[SAVE ? RA : 1][SAVE ? RB : 1];
    int ilo[SAVE ? RA : 1][SAVE ? RB : 1];
    int ihi[SAVE ? RA : 1][SAVE ? RB : 1];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            mlo[i][j] = T(0);
            mhi[i][j] = T(0);
            if constexpr (SAVE) {
                ilo[i][j] = 0;
                ihi[i][j] = 0;
            }
        }
    }

    LpTileStage<T, BA> stage_l;
    LpTileStage<T, BA> stage_u;
    LpTileStage<T, BB> stage_w;
    stage_l.fetch(lower, B, D, b0, 0);
    stage_u.fetch(upper, B, D, b0, 0);
    stage_w.fetch(w, N, D, n0, 0);
    for (int k0 = 0, t = 0; k0 < D; k0 += LP_BK, ++t) {
        stage_l.store(sl);
        stage_u.store(su);
        stage_w.store(sw);
        __syncthreads();
        if (k0 + LP_BK < D) {  // next tile's loads in flight during this tile's arithmetic
            stage_l.fetch(lower, B, D, b0, k0 + LP_BK);
            stage_u.fetch(upper, B, D, b0, k0 + LP_BK);
            stage_w.fetch(w, N, D, n0, k0 + LP_BK);
        }
        if constexpr (SAVE) {
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) {
                    tlo[i][j] = T(0);
                    thi[i][j] = T(0);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < LP_BK; ++k) {
            T lv[RA];
            T uv[RA];
            T wv[RB];
#pragma unroll
            for (int i = 0; i < RA; ++i) {
                lv[i] = sl[k][ty + LP_TY * i];
                uv[i] = su[k][ty + LP_TY * i];
            }
#pragma unroll
            for (int j = 0; j < RB; ++j) wv[j] = sw[k][tx + LP_TX * j];
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) {
                    const T a = wv[j] - lv[i];
                    const T c = uv[i] - wv[j];
                    const T far = lp_max(a, c);
                    const T near = lp_max(-a, -c);
                    if constexpr (SAVE) {
                        thi[i][j] = lp_max(thi[i][j], far);
                        tlo[i][j] = lp_max(tlo[i][j], near);
                    } else {
                        mhi[i][j] = lp_max(mhi[i][j], far);
                        mlo[i][j] = lp_max(mlo[i][j], near);
                    }
                }
            }
        }
        if constexpr (SAVE) {
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) {
                    if (thi[i][j] > mhi[i][j]) {
                        mhi[i][j] = thi[i][j];
                        ihi[i][j] = t;
                    }
                    if (tlo[i][j] > mlo[i][j]) {
                        mlo[i][j] = tlo[i][j];
                        ilo[i][j] = t;
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
                lo[o] = mlo[i][j];
                hi[o] = mhi[i][j];
                if constexpr (SAVE) {
                    tile_of[o] = ilo[i][j];
                    tile_of[plane + o] = ihi[i][j];
                }
            }
        }
    }
}

template <typename T, int PV, int RA, int RB>
__global__ void __launch_bounds__(LP_THREADS)
interval_lp_forward(const T* __restrict__ lower, const T* __restrict__ upper, const T* __restrict__ w, T* lo, T* hi,
                    int B, int N, int D, T p) {
    constexpr int BA = LP_TY * RA;
    constexpr int BB = LP_TX * RB;
    __shared__ T sl[LP_BK][BA + LP_PAD];
    __shared__ T su[LP_BK][BA + LP_PAD];
    __shared__ T sw[LP_BK][BB + LP_PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int b0 = blockIdx.y * BA;
    const int n0 = blockIdx.x * BB;

    T alo[RA][RB];
    T ahi[RA][RB];
    T slo[RA][RB];
    T shi[RA][RB];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int b = b0 + ty + LP_TY * i;
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            const int n = n0 + tx + LP_TX * j;
            alo[i][j] = T(0);
            ahi[i][j] = T(0);
            slo[i][j] = T(1);
            shi[i][j] = T(1);
            if constexpr (PV != 1) {
                const bool in = b < B && n < N;
                const T mlo = in ? lo[(lp_i64)b * N + n] : T(0);
                const T mhi = in ? hi[(lp_i64)b * N + n] : T(0);
                slo[i][j] = mlo > T(0) ? T(1) / mlo : T(0);
                shi[i][j] = mhi > T(0) ? T(1) / mhi : T(0);
            }
        }
    }

    for (int k0 = 0; k0 < D; k0 += LP_BK) {
        lp_load_transposed<T, BA>(sl, lower, B, D, b0, k0);
        lp_load_transposed<T, BA>(su, upper, B, D, b0, k0);
        lp_load_transposed<T, BB>(sw, w, N, D, n0, k0);
        __syncthreads();
#pragma unroll((PV) == 0 ? 1 : 4)
        for (int k = 0; k < LP_BK; ++k) {
            T lv[RA];
            T uv[RA];
            T wv[RB];
#pragma unroll
            for (int i = 0; i < RA; ++i) {
                lv[i] = sl[k][ty + LP_TY * i];
                uv[i] = su[k][ty + LP_TY * i];
            }
#pragma unroll
            for (int j = 0; j < RB; ++j) wv[j] = sw[k][tx + LP_TX * j];
#pragma unroll
            for (int i = 0; i < RA; ++i) {
#pragma unroll
                for (int j = 0; j < RB; ++j) {
                    T a, c, far, near;
                    lp_interval_terms<T>(lv[i], uv[i], wv[j], a, c, far, near);
                    alo[i][j] = lp_pow_acc<PV, T>(alo[i][j], near * slo[i][j], p);
                    ahi[i][j] = lp_pow_acc<PV, T>(ahi[i][j], far * shi[i][j], p);
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
                const lp_i64 o = (lp_i64)b * N + n;
                if constexpr (PV == 1) {
                    lo[o] = alo[i][j];
                    hi[o] = ahi[i][j];
                } else {
                    lo[o] = lo[o] * lp_root<PV, T>(alo[i][j], p);
                    hi[o] = hi[o] * lp_root<PV, T>(ahi[i][j], p);
                }
            }
        }
    }
}
