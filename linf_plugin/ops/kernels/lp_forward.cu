// Finite-p forward, the pass after linf_forward:
//   y[b, n] = m * (sum_i (|x[b, i] - w[n, i]| / m)^p)^(1/p),  m = y[b, n] on entry
// (the p = inf distance).  No term exceeds 1 and the largest is 1, so neither
// the sum nor its root overflows or underflows for any p (1000 included).
// m = 0 means x[b] == w[n] and gives y = 0.  PV = 1 needs no normalisation
// and no first pass: y = sum_i |x - w| (y's entry value is ignored).
//
// Same tiling as linf_forward: grid (ceil(N / 16 RB), ceil(B / 16 RA)),
// block (16, 16).  Each output is read and written by one thread only, so y
// may be both the input m and the output.  Zero padding past D adds 0.
#include "common.cuh"

template <typename T, int PV, int RA, int RB>
__global__ void __launch_bounds__(LP_THREADS)
lp_forward(const T* __restrict__ x, const T* __restrict__ w, T* y, int B, int N, int D, T p) {
    constexpr int BA = LP_TY * RA;
    constexpr int BB = LP_TX * RB;
    __shared__ T sx[LP_BK][BA + LP_PAD];
    __shared__ T sw[LP_BK][BB + LP_PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int b0 = blockIdx.y * BA;
    const int n0 = blockIdx.x * BB;

    T acc[RA][RB];
    T scale[RA][RB];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int b = b0 + ty + LP_TY * i;
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            const int n = n0 + tx + LP_TX * j;
            acc[i][j] = T(0);
            scale[i][j] = T(1);
            if constexpr (PV != 1) {
                const T m = (b < B && n < N) ? y[(lp_i64)b * N + n] : T(0);
                scale[i][j] = m > T(0) ? T(1) / m : T(0);
            }
        }
    }

    for (int k0 = 0; k0 < D; k0 += LP_BK) {
        lp_load_transposed<T, BA>(sx, x, B, D, b0, k0);
        lp_load_transposed<T, BB>(sw, w, N, D, n0, k0);
        __syncthreads();
#pragma unroll((PV) == 0 ? 1 : 4)
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
                    if constexpr (PV == 1) {
                        acc[i][j] += lp_abs(xv[i] - wv[j]);
                    } else {
                        acc[i][j] += lp_pow<PV, T>(lp_abs(xv[i] - wv[j]) * scale[i][j], p);
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
                const lp_i64 o = (lp_i64)b * N + n;
                if constexpr (PV == 1) {
                    y[o] = acc[i][j];
                } else {
                    y[o] = y[o] * lp_root<PV, T>(acc[i][j], p);
                }
            }
        }
    }
}
