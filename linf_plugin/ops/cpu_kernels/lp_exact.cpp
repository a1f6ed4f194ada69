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
#include "ends.h"
#include "tiles.h"

namespace lp {

// One step of a running max of keys (IEEE bits) m and, with ARG, its lowest argmax ix: both move only
// for a strictly larger key k (at coordinate dv).  k and dv by value: by reference, GCC 12 rebuilds
// dv with a masked broadcast from a general register at every update (p = inf forward ~10% slower).
template <bool ARG, typename I> static inline void max_step(I& m, I& ix, I k, I dv) {
    if constexpr (ARG) {
        const I gt = k > m;
        m = gt ? k : m;
        ix = gt ? dv : ix;
    } else {
        m = k > m ? k : m;
    }
}

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
        over_coords<NVV>(wt + n0, Np, D, [&](i64 d, const V* wv) {
            const I dv = splat<I>((Int)d);
            for (int i = 0; i < RB; ++i) {
                const T xs = rows.p[i][d];
                for (int j = 0; j < NVV; ++j) {
                    max_step<ARG>(acc[i][j], ix[i][j], bits<T>(xs - wv[j]) & S<T>::ABS, dv);
                }
            }
        });
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
    forward_tiles<RB, NV, S<T>::W>(B, N, nthreads, [&](i64 b0) {
        return LinfTile<T, RB, NV, ARG>{x, wt, B, N, Np, D, y, idx, b0};
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

// The sparse backwards' thread split: row(b) for every row, rows split over threads (each writes its
// own rows of the row-side gradients); then neurons(n_lo, n_hi) for one contiguous neuron range per
// thread (each writes its own rows of gw, summing the batch rows in order).
template <typename Fn> static void over_rows(i64 B, int nthreads, const Fn& row) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && B > 1)
    for (i64 b = 0; b < B; ++b) row(b);
}
template <typename Fn> static void over_neuron_ranges(i64 N, int nthreads, const Fn& neurons) {
    const int parts = (int)std::min<i64>(nthreads, N);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (parts > 1)
    for (int part = 0; part < parts; ++part) neurons(N * part / parts, N * (part + 1) / parts);
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
        over_rows(B, nthreads, [&](i64 b) {
            const T* xr = x + b * D;
            T* gr = gx + b * D;
            for (i64 n = 0; n < N; ++n) {
                const i64 k = idx[b * N + n];
                gr[k] += g[b * N + n] * sign_of<T>(xr[k] - w[n * D + k]);
            }
        });
    }
    if (gw != nullptr) {
        over_neuron_ranges(N, nthreads, [&](i64 n_lo, i64 n_hi) {
            for (i64 b = 0; b < B; ++b) {
                const T* xr = x + b * D;
                for (i64 n = n_lo; n < n_hi; ++n) {
                    const i64 k = idx[b * N + n];
                    gw[n * D + k] -= g[b * N + n] * sign_of<T>(xr[k] - w[n * D + k]);
                }
            }
        });
    }
}

// ---- the interval, p = inf ------------------------------------------------------
//
// Per coordinate the ends near and far (ends.h: a = w - lower, c = upper -
// w), and the lowest argmax of each over i; the caller passes finite inputs
// only.  Then a and c are never NaN and both ends are >= 0 (a + c = upper -
// lower >= 0 exactly, so one of a, c is): their bits order like their
// values, except that an end of -0 orders below everything.  That changes nothing: the
// running max starts at +0 with index 0 and moves only for a strictly
// larger key, so an end that is zero everywhere gives +0 at index 0, as the
// reference's max does.
template <typename T, int RB, int NV, bool ARG> struct IvalInfTile {
    const T* lower;
    const T* upper;
    const T* wt;
    i64 B, N, Np, D;
    T* lo;
    T* hi;
    int32_t* idx;   // (2, B, N): near's argmax, then far's
    i64 b0;

    template <int NVV> void run(i64 n0) const {
        typedef typename S<T>::V V;
        typedef typename S<T>::I I;
        typedef typename S<T>::Int Int;
        constexpr int W = S<T>::W;
        const Rows<T, RB> rl(lower, D, B, b0), ru(upper, D, B, b0);
        I mn[RB][NVV], mf[RB][NVV], in_[RB][NVV], if_[RB][NVV];
        for (int i = 0; i < RB; ++i)
            for (int j = 0; j < NVV; ++j) mn[i][j] = mf[i][j] = in_[i][j] = if_[i][j] = I{};
        over_coords<NVV>(wt + n0, Np, D, [&](i64 d, const V* wv) {
            const I dv = splat<I>((Int)d);
            for (int i = 0; i < RB; ++i) {
                const T ls = rl.p[i][d], us = ru.p[i][d];
                for (int j = 0; j < NVV; ++j) {
                    V near, far;
                    ends(wv[j], ls, us, near, far);
                    max_step<ARG>(mf[i][j], if_[i][j], bits<T>(far), dv);
                    max_step<ARG>(mn[i][j], in_[i][j], bits<T>(near), dv);
                }
            }
        });
        for (int i = 0; i < rl.valid; ++i) {
            const i64 row = (b0 + i) * N;
            for (int j = 0; j < NVV; ++j) {
                const i64 n = n0 + j * W;
                store_cols(lo + row, n, N, from_bits<T>(mn[i][j]));
                store_cols(hi + row, n, N, from_bits<T>(mf[i][j]));
                if constexpr (ARG) {
                    for (int l = 0; l < W && n + l < N; ++l) {
                        idx[row + n + l] = (int32_t)in_[i][j][l];
                        idx[B * N + row + n + l] = (int32_t)if_[i][j][l];
                    }
                }
            }
        }
    }
};

#if LP_NREG >= 32
constexpr int IVAL_RB = 3, IVAL_NV = 4, IVAL_ARG_RB = 2, IVAL_ARG_NV = 3;
#else
constexpr int IVAL_RB = 2, IVAL_NV = 2, IVAL_ARG_RB = 1, IVAL_ARG_NV = 2;
#endif

template <typename T, int RB, int NV, bool ARG>
static void ival_inf_forward(const T* lower, const T* upper, const T* wt, i64 B, i64 N, i64 Np, i64 D, T* lo, T* hi,
                             int32_t* idx, int nthreads) {
    forward_tiles<RB, NV, S<T>::W>(B, N, nthreads, [&](i64 b0) {
        return IvalInfTile<T, RB, NV, ARG>{lower, upper, wt, B, N, Np, D, lo, hi, idx, b0};
    });
}

// The sparse p = inf interval backward (the reference's subgradient conventions): the far end's
// argmax k sends g_hi to upper[b, k] (and -g_hi to w[n, k]) when upper - w >= w - lower there (ties
// to upper), else -g_hi to lower[b, k] (and g_hi to w[n, k]); the near end's argmax sends g_lo to
// lower[b, k] (-g_lo to w) when lower > w there, else -g_lo to upper (g_lo to w).  An end that is
// 0 sends nothing.  Outputs arrive zeroed; rows and neuron ranges split over threads, each summing
// in index order, so the result does not depend on the thread count.
template <typename T>
static void ival_inf_backward(const T* glo, const T* ghi, const T* lower, const T* upper, const T* w, const T* lo,
                              const T* hi, const int32_t* idx, i64 B, i64 N, i64 D, T* gl, T* gu, T* gw,
                              int nthreads) {
    const int32_t* k_lo = idx;
    const int32_t* k_hi = idx + B * N;
    auto far_up = [&](i64 b, i64 n, i64 k) { return upper[b * D + k] - w[n * D + k] >= w[n * D + k] - lower[b * D + k]; };
    auto near_below = [&](i64 b, i64 n, i64 k) { return -(w[n * D + k] - lower[b * D + k]) > T(0); };
    if (gl != nullptr || gu != nullptr) {
        over_rows(B, nthreads, [&](i64 b) {
            for (i64 n = 0; n < N; ++n) {
                const i64 o = b * N + n;
                const T vh = (ghi != nullptr && hi[o] > T(0)) ? ghi[o] : T(0);
                const i64 kh = k_hi[o];
                if (far_up(b, n, kh)) {
                    if (gu) gu[b * D + kh] += vh;
                } else if (gl) {
                    gl[b * D + kh] += -vh;
                }
                const T vl = (glo != nullptr && lo[o] > T(0)) ? glo[o] : T(0);
                const i64 kl = k_lo[o];
                if (near_below(b, n, kl)) {
                    if (gl) gl[b * D + kl] += vl;
                } else if (gu) {
                    gu[b * D + kl] += -vl;
                }
            }
        });
    }
    if (gw != nullptr) {
        over_neuron_ranges(N, nthreads, [&](i64 n_lo, i64 n_hi) {
            for (i64 b = 0; b < B; ++b) {
                for (i64 n = n_lo; n < n_hi; ++n) {
                    const i64 o = b * N + n;
                    const T vh = (ghi != nullptr && hi[o] > T(0)) ? ghi[o] : T(0);
                    const i64 kh = k_hi[o];
                    gw[n * D + kh] += far_up(b, n, kh) ? -vh : vh;
                    const T vl = (glo != nullptr && lo[o] > T(0)) ? glo[o] : T(0);
                    const i64 kl = k_lo[o];
                    gw[n * D + kl] += near_below(b, n, kl) ? -vl : vl;
                }
            }
        });
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

#define LP_IVAL_INF(SUF, T)                                                                                           \
    void lp_ival_inf_forward_##SUF(const T* lower, const T* upper, const T* wt, int64_t B, int64_t N, int64_t Np,     \
                                   int64_t D, T* lo, T* hi, int32_t* idx, int nthreads) {                             \
        if (idx != nullptr)                                                                                           \
            lp::ival_inf_forward<T, lp::IVAL_ARG_RB, lp::IVAL_ARG_NV, true>(lower, upper, wt, B, N, Np, D, lo, hi,    \
                                                                           idx, nthreads);                           \
        else                                                                                                          \
            lp::ival_inf_forward<T, lp::IVAL_RB, lp::IVAL_NV, false>(lower, upper, wt, B, N, Np, D, lo, hi, idx,      \
                                                                    nthreads);                                       \
    }                                                                                                                 \
    void lp_ival_inf_backward_##SUF(const T* glo, const T* ghi, const T* lower, const T* upper, const T* w,            \
                                    const T* lo, const T* hi, const int32_t* idx, int64_t B, int64_t N, int64_t D,    \
                                    T* gl, T* gu, T* gw, int nthreads) {                                             \
        lp::ival_inf_backward<T>(glo, ghi, lower, upper, w, lo, hi, idx, B, N, D, gl, gu, gw, nthreads);              \
    }
LP_IVAL_INF(f32, float)
LP_IVAL_INF(f64, double)

}  // extern "C"
