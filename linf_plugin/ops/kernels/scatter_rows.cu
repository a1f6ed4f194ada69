// Deterministic sums of the sparse p = inf gradients (torch.use_deterministic_algorithms(True)).
//
//   out[r, k] = sum_c [idx0[r, c] == k] s0[r, c]  +  sum_c [idx1[r, c] == k] s1[r, c]
//
// for r < R, k < D; SOURCES = 1: idx1 and s1 are not read (null).  Each output (b, n)
// of a p = inf layer sends its gradient to one coordinate, its argmax (two,
// lower and upper end, for an interval): grad_x takes rows r = b and c = n,
// grad_w the transposed index and values (r = n, c = b).  linf_backward and
// interval_inf_backward add those values with atomics, in whatever order the
// hardware runs them, so the sums' last bits change from run to run; here
// every sum has one fixed order, whatever the schedule:
//   block (r, chunk) owns out[r, k0 .. k0 + KC) (k0 = chunk KC); thread t
//   walks c = t, t + 256, ... upwards and adds each entry whose index falls
//   in the chunk to ITS OWN partial sp[k - k0][t] (no other thread touches
//   it: program order); then the 256 partials of each column are summed by
//   a fixed tree (pairs at distance 128, 64, ..., 1), and thread k stores
//   column k.
// Every block reads its row of idx and s (R C entries in all) once, so each
// row is read ceil(D / KC) times, mostly from L2: about 10 instructions per
// (r, c) and chunk, i.e. ~10 / KC per (b, n, i) triple, and the grid has
// R ceil(D / KC) blocks.  KC = 32 (float) or 16 (double): sp holds KC x 257
// values, 33 KiB, under the 48 KiB of static shared memory.
// Grid (R, ceil(D / KC)), block 256.
#include "common.cuh"

template <typename T, int KC, int SOURCES>
__global__ void __launch_bounds__(LP_THREADS)
lp_scatter_rows(const int* __restrict__ idx0, const T* __restrict__ s0, const int* __restrict__ idx1,
                const T* __restrict__ s1, T* __restrict__ out, int R, int C, int D) {
    static_assert(KC <= LP_THREADS && (SOURCES == 1 || SOURCES == 2), "one thread stores each column");
    __shared__ T sp[KC][LP_THREADS + 1];   // + 1: thread t's column k sits on bank (k + t) mod 32
    const int t = threadIdx.x;
    const lp_i64 r = blockIdx.x;
    const int k0 = blockIdx.y * KC;
#pragma unroll
    for (int k = 0; k < KC; ++k) sp[k][t] = T(0);
    const int* i0 = idx0 + r * C;
    const T* v0 = s0 + r * C;
    const int* i1 = SOURCES == 2 ? idx1 + r * C : nullptr;
    const T* v1 = SOURCES == 2 ? s1 + r * C : nullptr;
    for (int c = t; c < C; c += LP_THREADS) {
        const unsigned k = (unsigned)(i0[c] - k0);   // < KC exactly when the index is in the chunk
        if (k < (unsigned)KC) sp[k][t] += v0[c];
        if constexpr (SOURCES == 2) {
            const unsigned k1 = (unsigned)(i1[c] - k0);
            if (k1 < (unsigned)KC) sp[k1][t] += v1[c];
        }
    }
    __syncthreads();
#pragma unroll
    for (int h = LP_THREADS / 2; h >= 1; h /= 2) {   // unrolled: h, and so e / h and e % h, known
#pragma unroll
        for (int e = t; e < KC * h; e += LP_THREADS) {
            const int k = e / h;
            const int j = e % h;
            sp[k][j] += sp[k][j + h];
        }
        __syncthreads();
    }
    if (t < KC && k0 + t < D) out[r * D + k0 + t] = sp[t][0];
}
