// p = inf kernels, compiled with -ffp-contract=off: every value is one IEEE
// subtraction, an absolute value and a max, exactly as the torch backend
// computes them, so the outputs agree bit for bit.
//
// The max runs on the IEEE bits of |x - w| as integers: non-negative floats
// order like their bit patterns, and a NaN (sign cleared) orders above inf,
// so the integer max propagates NaN and an integer compare gives the lowest
// argmax (strictly greater, coordinates in increasing order; NaN wins like
// the torch backend's packed float32 key).  Integer max and compare run on
// the vector integer units beside the floating-point ones.
#include "tiles.h"

namespace lp {

template <typename T, int RB, int NV, bool ARG> struct LinfTile {
    const T* x;
    const T* wt;
    i64 B, N, Np, D;
    T* y;
    int32_t* idx;
    i64 b0;

    template <int NVV> void run(i64 n0) const {
        typedef typename S<T>::V V;
        typedef typename S<T>::I I;
        typedef typename S<T>::Int Int;
        constexpr int W = S<T>::W;
        const Rows<T, RB> rows(x, D, B, b0);
        I acc[RB][NVV], ix[RB][NVV];
        for (int i = 0; i < RB; ++i)
            for (int j = 0; j < NVV; ++j) acc[i][j] = ix[i][j] = I{};
        const T* wp = wt + n0;
        for (i64 d = 0; d < D; ++d, wp += Np) {
            V wv[NVV];
            for (int j = 0; j < NVV; ++j) wv[j] = loadu<V>(wp + j * W);
            const I dv = splat<I>((Int)d);
            for (int i = 0; i < RB; ++i) {
                const T xs = rows.p[i][d];
                for (int j = 0; j < NVV; ++j) {
                    const I k = bits<T>(xs - wv[j]) & S<T>::ABS;
                    if constexpr (ARG) {
                        const I gt = k > acc[i][j];
                        acc[i][j] = gt ? k : acc[i][j];
                        ix[i][j] = gt ? dv : ix[i][j];
                    } else {
                        acc[i][j] = k > acc[i][j] ? k : acc[i][j];
                    }
                }
            }
        }
        for (int i = 0; i < rows.valid; ++i) {
            T* yrow = y + (b0 + i) * N;
            for (int j = 0; j < NVV; ++j) {
                store_cols(yrow, n0 + j * W, N, from_bits<T>(acc[i][j]));
                if constexpr (ARG) {
                    int32_t* irow = idx + (b0 + i) * N;
                    for (int l = 0; l < W && n0 + j * W + l < N; ++l) irow[n0 + j * W + l] = (int32_t)ix[i][j][l];
                }
            }
        }
    }
};

// Tiles: RB rows x NV vectors of accumulators (and as many index vectors
// with the argmax), within the register file.
#if LP_NREG >= 32
constexpr int LINF_RB = 4, LINF_NV = 5, LINF_ARG_RB = 3, LINF_ARG_NV = 4;
#else
constexpr int LINF_RB = 3, LINF_NV = 3, LINF_ARG_RB = 2, LINF_ARG_NV = 2;
#endif

template <typename T, int RB, int NV, bool ARG>
static void linf_forward(const T* x, const T* wt, i64 B, i64 N, i64 Np, i64 D, T* y, int32_t* idx, int nthreads) {
    forward_tasks<RB, NV, S<T>::W>(B, N, nthreads, [&](i64 b0, i64 n0, int nv) {
        LinfTile<T, RB, NV, ARG> tile{x, wt, B, N, Np, D, y, idx, b0};
        with_width<NV, S<T>::W>(nv, n0, tile);
    });
}

template <typename T>
static void linf_forward_any(const T* x, const T* wt, i64 B, i64 N, i64 Np, i64 D, T* y, int32_t* idx, int nt) {
    if (idx != nullptr) {
        linf_forward<T, LINF_ARG_RB, LINF_ARG_NV, true>(x, wt, B, N, Np, D, y, idx, nt);
    } else {
        linf_forward<T, LINF_RB, LINF_NV, false>(x, wt, B, N, Np, D, y, idx, nt);
    }
}

// torch.sign: 1, -1, or 0 for zeros and NaN.
template <typename T> static inline T sign_of(T d) { return d > T(0) ? T(1) : (d < T(0) ? T(-1) : T(0)); }

// The sparse p = inf backward: each output sends g * sign(x - w) at its
// argmax coordinate k to gx[b, k] and its negative to gw[n, k].  gx and gw
// arrive zeroed.  gx rows are split over threads, each row summing its
// neurons in order; gw rows likewise, each summing the batch rows in order:
// the result does not depend on the thread count.
template <typename T>
static void linf_backward(const T* x, const T* w, const T* g, const int32_t* idx, i64 B, i64 N, i64 D, T* gx, T* gw,
                          int nthreads) {
    if (gx != nullptr) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && B > 1)
        for (i64 b = 0; b < B; ++b) {
            const T* xr = x + b * D;
            T* gr = gx + b * D;
            for (i64 n = 0; n < N; ++n) {
                const i64 k = idx[b * N + n];
                gr[k] += g[b * N + n] * sign_of<T>(xr[k] - w[n * D + k]);
            }
        }
    }
    if (gw != nullptr) {
        const int parts = (int)std::min<i64>(nthreads, N);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (parts > 1)
        for (int part = 0; part < parts; ++part) {
            const i64 n_lo = N * part / parts, n_hi = N * (part + 1) / parts;
            for (i64 b = 0; b < B; ++b) {
                const T* xr = x + b * D;
                for (i64 n = n_lo; n < n_hi; ++n) {
                    const i64 k = idx[b * N + n];
                    gw[n * D + k] -= g[b * N + n] * sign_of<T>(xr[k] - w[n * D + k]);
                }
            }
        }
    }
}

}  // namespace lp

extern "C" {

int lp_vector_bytes() { return LP_VBYTES; }

void lp_linf_forward_f32(const float* x, const float* wt, int64_t B, int64_t N, int64_t Np, int64_t D, float* y,
                         int32_t* idx, int nthreads) {
    lp::linf_forward_any<float>(x, wt, B, N, Np, D, y, idx, nthreads);
}
void lp_linf_forward_f64(const double* x, const double* wt, int64_t B, int64_t N, int64_t Np, int64_t D, double* y,
                         int32_t* idx, int nthreads) {
    lp::linf_forward_any<double>(x, wt, B, N, Np, D, y, idx, nthreads);
}
void lp_linf_backward_f32(const float* x, const float* w, const float* g, const int32_t* idx, int64_t B, int64_t N,
                          int64_t D, float* gx, float* gw, int nthreads) {
    lp::linf_backward<float>(x, w, g, idx, B, N, D, gx, gw, nthreads);
}
void lp_linf_backward_f64(const double* x, const double* w, const double* g, const int32_t* idx, int64_t B, int64_t N,
                          int64_t D, double* gx, double* gw, int nthreads) {
    lp::linf_backward<double>(x, w, g, idx, B, N, D, gx, gw, nthreads);
}

}  // extern "C"
