// p = inf argmax and backward.
//
// linf_resolve: idx (B, N) holds, on entry, the D-tile of each maximum (from
// linf_forward<..., SAVE = true>) and, on exit, the exact argmax: the lowest
// i in that tile with |x[b, i] - w[n, i]| == y[b, n].  The comparison is
// exact because it repeats the forward's own operations.  A block of 256
// threads serves 16 outputs; lane l of an output tests coordinate
// tile * LP_BK + l (coalesced reads), and the lowest hit wins.  Grid
// ceil(B N / 16), block 256.
//
// linf_backward: the subgradient at the argmax is sparse, so each output
// adds g * sign(x - w) at its argmax into grad_x and subtracts it from
// grad_w (atomicAdd: the sum is exact up to the order of accumulation).
// Either output pointer may be null.  Grid-stride over B N, block 256.
#include "common.cuh"

template <typename T>
__global__ void __launch_bounds__(LP_THREADS)
linf_resolve(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ y, int* __restrict__ idx,
             int B, int N, int D) {
    constexpr int SLOTS = LP_THREADS / LP_BK;
    __shared__ int hit[SLOTS][LP_BK];
    const int lane = threadIdx.x % LP_BK;
    const int slot = threadIdx.x / LP_BK;
    const lp_i64 o = (lp_i64)blockIdx.x * SLOTS + slot;
    const bool valid = o < (lp_i64)B * N;
    int k0 = 0;
    if (valid) {
        const lp_i64 b = o / N;
        const lp_i64 n = o % N;
        k0 = idx[o] * LP_BK;
        const int k = k0 + lane;
        hit[slot][lane] = (k < D && lp_abs(x[b * D + k] - w[n * D + k]) == y[o]) ? 1 : 0;
    }
    __syncthreads();
    if (valid && lane == 0) {
        int f = 0;
        while (f < LP_BK && !hit[slot][f]) ++f;
        idx[o] = k0 + (f < LP_BK ? f : 0);
    }
}

template <typename T>
__global__ void __launch_bounds__(LP_THREADS)
linf_backward(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ g, const int* __restrict__ idx,
              T* grad_x, T* grad_w, int B, int N, int D) {
    const lp_i64 total = (lp_i64)B * N;
    const lp_i64 stride = (lp_i64)gridDim.x * blockDim.x;
    for (lp_i64 o = (lp_i64)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += stride) {
        const lp_i64 b = o / N;
        const lp_i64 n = o % N;
        const int k = idx[o];
        const T d = x[b * D + k] - w[n * D + k];
        const T v = d > T(0) ? g[o] : (d < T(0) ? -g[o] : T(0));
        if (v != T(0)) {
            if (grad_x) atomicAdd(grad_x + b * D + k, v);
            if (grad_w) atomicAdd(grad_w + n * D + k, -v);
        }
    }
}
