// Gradients of the interval [lo, hi] with respect to lower, upper and w.
//
// Subgradient conventions (shared with every backend): far follows the upper
// end when c >= a (ties -> upper), else the lower end; near is l - w when
// l > w, w - u when w > u, else constant 0; an output that is exactly 0
// passes no gradient; for p = inf only the lowest argmax carries gradient.
//
// interval_resolve: idx (2, B, N) tiles -> exact argmax of near ([0]) and
//   far ([1]), as linf_resolve.  Grid ceil(B N / 16), block 256.
// interval_inf_backward: sparse scatter with atomicAdd; any of grad_l,
//   grad_u, grad_w may be null.  Grid-stride over B N, block 256.
// interval_lp_backward_box: grad_l, grad_u (B, D), reducing over n; grid
//   (ceil(D / 16 RI), ceil(B / 16 RA)), block (16, 16).
// interval_lp_backward_w: grad_w (N, D), reducing over b; grid
//   (ceil(D / 16 RI), ceil(N / 16 RA)), block (16, 16).
// Gl, Gh are the incoming gradients of lo and hi, Rl, Rh the reciprocals of
// lo and hi (0 where the output is 0), all (B, N).
#include "common.cuh"

template <typename T>
__global__ void __launch_bounds__(LP_THREADS)
interval_resolve(const T* __restrict__ lower, const T* __restrict__ upper, const T* __restrict__ w,
                 const T* __restrict__ lo, const T* __restrict__ hi, int* __restrict__ idx, int B, int N, int D) {
    constexpr int SLOTS = LP_THREADS / LP_BK;
    __shared__ int hit_lo[SLOTS][LP_BK];
    __shared__ int hit_hi[SLOTS][LP_BK];
    const int lane = threadIdx.x % LP_BK;
    const int slot = threadIdx.x / LP_BK;
    const lp_i64 plane = (lp_i64)B * N;
    const lp_i64 o = (lp_i64)blockIdx.x * SLOTS + slot;
    const bool valid = o < plane;
    int k_lo = 0;
    int k_hi = 0;
    if (valid) {
        const lp_i64 b = o / N;
        const lp_i64 n = o % N;
        k_lo = idx[o] * LP_BK;
        k_hi = idx[plane + o] * LP_BK;
        T a, c, far, near;
        int k = k_lo + lane;
        hit_lo[slot][lane] = 0;
        if (k < D) {
            lp_interval_terms<T>(lower[b * D + k], upper[b * D + k], w[n * D + k], a, c, far, near);
            hit_lo[slot][lane] = near == lo[o] ? 1 : 0;
        }
        k = k_hi + lane;
        hit_hi[slot][lane] = 0;
        if (k < D) {
            lp_interval_terms<T>(lower[b * D + k], upper[b * D + k], w[n * D + k], a, c, far, near);
            hit_hi[slot][lane] = far == hi[o] ? 1 : 0;
        }
    }
    __syncthreads();
    if (valid && lane == 0) {
        int f = 0;
        while (f < LP_BK && !hit_lo[slot][f]) ++f;
        idx[o] = k_lo + (f < LP_BK ? f : 0);
        f = 0;
        while (f < LP_BK && !hit_hi[slot][f]) ++f;
        idx[plane + o] = k_hi + (f < LP_BK ? f : 0);
    }
}

template <typename T>
__global__ void __launch_bounds__(LP_THREADS)
interval_inf_backward(const T* __restrict__ lower, const T* __restrict__ upper, const T* __restrict__ w,
                      const T* __restrict__ lo, const T* __restrict__ hi, const T* __restrict__ g_lo,
                      const T* __restrict__ g_hi, const int* __restrict__ idx, T* grad_l, T* grad_u, T* grad_w,
                      int B, int N, int D) {
    const lp_i64 total = (lp_i64)B * N;
    const lp_i64 stride = (lp_i64)gridDim.x * blockDim.x;
    for (lp_i64 o = (lp_i64)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += stride) {
        const lp_i64 b = o / N;
        const lp_i64 n = o % N;
        T a, c, far, near;
        const T vh = hi[o] > T(0) ? g_hi[o] : T(0);
        if (vh != T(0)) {
            const int k = idx[total + o];
            lp_interval_terms<T>(lower[b * D + k], upper[b * D + k], w[n * D + k], a, c, far, near);
            if (c >= a) {
                if (grad_u) atomicAdd(grad_u + b * D + k, vh);
                if (grad_w) atomicAdd(grad_w + n * D + k, -vh);
            } else {
                if (grad_l) atomicAdd(grad_l + b * D + k, -vh);
                if (grad_w) atomicAdd(grad_w + n * D + k, vh);
            }
        }
        const T vl = lo[o] > T(0) ? g_lo[o] : T(0);
        if (vl != T(0)) {
            const int k = idx[o];
            lp_interval_terms<T>(lower[b * D + k], upper[b * D + k], w[n * D + k], a, c, far, near);
            if (-a > T(0)) {
                if (grad_l) atomicAdd(grad_l + b * D + k, vl);
                if (grad_w) atomicAdd(grad_w + n * D + k, -vl);
            } else {
                if (grad_u) atomicAdd(grad_u + b * D + k, -vl);
                if (grad_w) atomicAdd(grad_w + n * D + k, vl);
            }
        }
    }
}

template <typename T, int PV, int RA, int RI>
__global__ void __launch_bounds__(LP_THREADS, sizeof(T) == 8 ? 1 : 2)
interval_lp_backward_box(const T* __restrict__ lower, const T* __restrict__ upper, const T* __restrict__ w,
                         const T* __restrict__ Gl, const T* __restrict__ Rl, const T* __restrict__ Gh,
                         const T* __restrict__ Rh, T* __restrict__ grad_l, T* __restrict__ grad_u,
                         int B, int N, int D, T pm1) {
    constexpr int BA = LP_TY * RA;
    constexpr int BI = LP_TX * RI;
    __shared__ T sw[LP_BK][BI + LP_PAD];
    __shared__ T sgl[LP_BK][BA + LP_PAD];
    __shared__ T srl[LP_BK][BA + LP_PAD];
    __shared__ T sgh[LP_BK][BA + LP_PAD];
    __shared__ T srh[LP_BK][BA + LP_PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int b0 = blockIdx.y * BA;
    const int i0 = blockIdx.x * BI;

    T lv[RA][RI];
    T uv[RA][RI];
    T accl[RA][RI];
    T accu[RA][RI];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int b = b0 + ty + LP_TY * i;
#pragma unroll
        for (int j = 0; j < RI; ++j) {
            const int f = i0 + tx + LP_TX * j;
            const bool in = b < B && f < D;
            lv[i][j] = in ? lower[(lp_i64)b * D + f] : T(0);
            uv[i][j] = in ? upper[(lp_i64)b * D + f] : T(0);
            accl[i][j] = T(0);
            accu[i][j] = T(0);
        }
    }

    for (int c0 = 0; c0 < N; c0 += LP_BK) {
        lp_load_direct<T, BI>(sw, w, N, D, c0, i0);
        lp_load_transposed<T, BA>(sgl, Gl, B, N, b0, c0);
        lp_load_transposed<T, BA>(srl, Rl, B, N, b0, c0);
        lp_load_transposed<T, BA>(sgh, Gh, B, N, b0, c0);
        lp_load_transposed<T, BA>(srh, Rh, B, N, b0, c0);
        __syncthreads();
#pragma unroll((PV) == 0 ? 1 : 4)
        for (int k = 0; k < LP_BK; ++k) {
            T wv[RI];
#pragma unroll
            for (int j = 0; j < RI; ++j) wv[j] = sw[k][tx + LP_TX * j];
#pragma unroll
            for (int i = 0; i < RA; ++i) {
                const T gl = sgl[k][ty + LP_TY * i];
                const T rl = srl[k][ty + LP_TY * i];
                const T gh = sgh[k][ty + LP_TY * i];
                const T rh = srh[k][ty + LP_TY * i];
#pragma unroll
                for (int j = 0; j < RI; ++j) {
                    T a, c, far, near;
                    lp_interval_terms<T>(lv[i][j], uv[i][j], wv[j], a, c, far, near);
                    const T ff = lp_grad_factor<PV, T>(far, rh, pm1);
                    const T fn = lp_grad_factor<PV, T>(near, rl, pm1);
                    if (c >= a) {
                        accu[i][j] = lp_fma(gh, ff, accu[i][j]);
                    } else {
                        accl[i][j] = lp_fma(-gh, ff, accl[i][j]);
                    }
                    if (-a > T(0)) accl[i][j] = lp_fma(gl, fn, accl[i][j]);
                    if (-c > T(0)) accu[i][j] = lp_fma(-gl, fn, accu[i][j]);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int b = b0 + ty + LP_TY * i;
#pragma unroll
        for (int j = 0; j < RI; ++j) {
            const int f = i0 + tx + LP_TX * j;
            if (b < B && f < D) {
                grad_l[(lp_i64)b * D + f] = accl[i][j];
                grad_u[(lp_i64)b * D + f] = accu[i][j];
            }
        }
    }
}

template <typename T, int PV, int RA, int RI>
__global__ void __launch_bounds__(LP_THREADS, sizeof(T) == 8 ? 1 : 2)
interval_lp_backward_w(const T* __restrict__ lower, const T* __restrict__ upper, const T* __restrict__ w,
                       const T* __restrict__ Gl, const T* __restrict__ Rl, const T* __restrict__ Gh,
                       const T* __restrict__ Rh, T* __restrict__ grad_w, int B, int N, int D, T pm1) {
    constexpr int BA = LP_TY * RA;
    constexpr int BI = LP_TX * RI;
    __shared__ T sl[LP_BK][BI + LP_PAD];
    __shared__ T su[LP_BK][BI + LP_PAD];
    __shared__ T sgl[LP_BK][BA + LP_PAD];
    __shared__ T srl[LP_BK][BA + LP_PAD];
    __shared__ T sgh[LP_BK][BA + LP_PAD];
    __shared__ T srh[LP_BK][BA + LP_PAD];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int n0 = blockIdx.y * BA;
    const int i0 = blockIdx.x * BI;

    T wv[RA][RI];
    T acc[RA][RI];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int n = n0 + ty + LP_TY * i;
#pragma unroll
        for (int j = 0; j < RI; ++j) {
            const int f = i0 + tx + LP_TX * j;
            wv[i][j] = (n < N && f < D) ? w[(lp_i64)n * D + f] : T(0);
            acc[i][j] = T(0);
        }
    }

    for (int c0 = 0; c0 < B; c0 += LP_BK) {
        lp_load_direct<T, BI>(sl, lower, B, D, c0, i0);
        lp_load_direct<T, BI>(su, upper, B, D, c0, i0);
        lp_load_direct<T, BA>(sgl, Gl, B, N, c0, n0);
        lp_load_direct<T, BA>(srl, Rl, B, N, c0, n0);
        lp_load_direct<T, BA>(sgh, Gh, B, N, c0, n0);
        lp_load_direct<T, BA>(srh, Rh, B, N, c0, n0);
        __syncthreads();
#pragma unroll((PV) == 0 ? 1 : 4)
        for (int k = 0; k < LP_BK; ++k) {
            T lv[RI];
            T uv[RI];
#pragma unroll
            for (int j = 0; j < RI; ++j) {
                lv[j] = sl[k][tx + LP_TX * j];
                uv[j] = su[k][tx + LP_TX * j];
            }
#pragma unroll
            for (int i = 0; i < RA; ++i) {
                const T gl = sgl[k][ty + LP_TY * i];
                const T rl = srl[k][ty + LP_TY * i];
                const T gh = sgh[k][ty + LP_TY * i];
                const T rh = srh[k][ty + LP_TY * i];
#pragma unroll
                for (int j = 0; j < RI; ++j) {
                    T a, c, far, near;
                    lp_interval_terms<T>(lv[j], uv[j], wv[i][j], a, c, far, near);
                    const T ff = lp_grad_factor<PV, T>(far, rh, pm1);
                    const T fn = lp_grad_factor<PV, T>(near, rl, pm1);
                    acc[i][j] = lp_fma((c >= a) ? -gh : gh, ff, acc[i][j]);
                    if (-a > T(0)) acc[i][j] = lp_fma(-gl, fn, acc[i][j]);
                    if (-c > T(0)) acc[i][j] = lp_fma(gl, fn, acc[i][j]);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int n = n0 + ty + LP_TY * i;
#pragma unroll
        for (int j = 0; j < RI; ++j) {
            const int f = i0 + tx + LP_TX * j;
            if (n < N && f < D) grad_w[(lp_i64)n * D + f] = acc[i][j];
        }
    }
}
