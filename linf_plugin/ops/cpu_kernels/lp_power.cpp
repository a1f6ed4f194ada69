// Finite-p kernels, compiled with -ffp-contract=fast (products and sums may
// fuse; nothing here is bit-exact with the torch backend, all of it is held
// to the float64 reference's tolerances).  PV: 1, 2 or 8 for those p (exact
// multiplication chains), 0 for any other p (2^(p log2 t), simd.h).
//
// Forward, y = ||x[b] - w[n]||_p, vectorised over n (tiles.h):
//
// * p = 1: sum |d|, no scaling needed.
// * p = 2, 8: first the raw one-pass sum S = sum_i d_i^p (a subtraction and
//   the chain: p = 8 is d2 = d d, d4 = d2 d2, S += d4 d4), y = S^(1/p).
//   S is the max-normalised sum times m^p, so both agree up to their own
//   rounding wherever nothing under- or overflowed.  The safe range:
//     S <= T_MAX: the terms are >= 0, so any overflow leaves S = inf.
//     S >= D T_MIN 2^(prec + 2) (T_MIN the smallest normal, prec = 24 or
//       53): a term that under- or flushes to zero at any step (gradual
//       underflow, or flush-to-zero if torch.set_flush_denormal is on) is
//       below T_MIN, and the roundings that land among the subnormals are
//       at most T_MIN in all per term, so at most 2 D T_MIN are lost, below
//       2^-(prec+1) S: half a unit roundoff, i.e. u / (2 p) in y.
//     NaN compares false and stays NaN, as the normalised form's does.
//   A tile with any output outside the range is recomputed max-normalised.
// * max-normalised (general p, and the fixup): pass 1 takes m = max |d|
//   (the p = inf kernel's integer max), pass 2 sums (|d| / m)^p as
//   (|d| inv)^p with inv = 1 / m, and y = m (sum)^(1/p): the largest term is
//   1, so nothing overflows or underflows for any p (1000 and beyond).
//   Outputs whose m is not a normal number with a normal inverse (0, tiny,
//   huge, inf, NaN) are recomputed per output exactly as the reference
//   backend does: y = m (sum (|d| / m)^p)^(1/p) with divisions (y = 0 for
//   m = 0, NaN when a NaN or inf - inf appears).
//
// Backward (x, w padded to a multiple of W columns, zeros past D), fused for
// both gradients, vectorised over the coordinates: per triple the factor
// f = g[b, n] sign(t) |t|^(p - 1), t = (x[b, i] - w[n, i]) r[b, n],
// r = 1 / y (0 where y = 0), is computed once and added to gx[b, i] and
// subtracted from gw[n, i].  Threads split the coordinates (vectors of W;
// rows in blocks, tiles.h); gx[b, i] sums n = 0, 1, ... and gw[n, i] sums
// b = 0, 1, ... in order, so the result does not depend on the tiling or
// the thread count.
#include "powers.h"

namespace lp {

template <typename T, int PV> struct Forward {
    typedef typename S<T>::V V;
    typedef typename S<T>::I I;
    static constexpr int W = S<T>::W, VARIANT = PV;
    const T* x;
    const T* wt;
    i64 B, N, Np, D;
    T* y;
    T p;

    // The max-normalised tiles over rows [b0, b0 + rows) x columns [n0, n0 + NVV W).
    template <int RB, int NVV> void normalised(i64 b0, i64 n0) const {
        const Rows<T, RB> rows(x, D, B, b0);
        I mx[RB][NVV];
        for (int i = 0; i < RB; ++i)
            for (int j = 0; j < NVV; ++j) mx[i][j] = I{};
        over_coords<NVV>(wt + n0, Np, D, [&](i64 d, const V* wv) {
            for (int i = 0; i < RB; ++i) {
                const T xs = rows.p[i][d];
                for (int j = 0; j < NVV; ++j) {
                    const I k = bits<T>(xs - wv[j]) & S<T>::ABS;
                    mx[i][j] = k > mx[i][j] ? k : mx[i][j];
                }
            }
        });
        V inv[RB][NVV], acc[RB][NVV];
        for (int i = 0; i < RB; ++i)
            for (int j = 0; j < NVV; ++j) {
                const V m = from_bits<T>(mx[i][j]);
                inv[i][j] = m > T(0) ? T(1) / m : V{};
                acc[i][j] = V{};
            }
        over_coords<NVV>(wt + n0, Np, D, [&](i64 d, const V* wv) {
            for (int i = 0; i < RB; ++i) {
                const T xs = rows.p[i][d];
                for (int j = 0; j < NVV; ++j) {
                    const V t = (xs - wv[j]) * inv[i][j];
                    if constexpr (PV == 0) {
                        // |t| <= 1: log2 needs no inf/NaN case, exp2 no upper clamp
                        acc[i][j] += exp2_of<T, false>(log2_abs<T, false>(t) * p);
                    } else if constexpr (PV == 1) {
                        acc[i][j] += vabs<T>(t);
                    } else {
                        acc[i][j] += pow_chain<PV>(t);
                    }
                }
            }
        });
        constexpr T lo = Lim<T>::SCALE_LO, hi = Lim<T>::SCALE_HI;
        for (int i = 0; i < rows.valid; ++i) {
            T* yrow = y + (b0 + i) * N;
            for (int j = 0; j < NVV; ++j) {
                const V m = from_bits<T>(mx[i][j]);
                V out;
                for (int l = 0; l < W; ++l) {
                    const i64 n = n0 + j * W + l;
                    out[l] = (m[l] >= lo && m[l] <= hi) ? m[l] * root_of<T>(PV, acc[i][j][l], p)
                             : n < N                    ? reference_output<T>(rows.p[i], wt, Np, n, D, p, PV)
                                                        : T(0);
                }
                store_cols(yrow, n0 + j * W, N, out);
            }
        }
    }

    // p = 2, 8: the raw sums of one tile; false (nothing stored) when an output is outside the safe range.
    template <int RB, int NVV> bool raw(i64 b0, i64 n0) const {
        const Rows<T, RB> rows(x, D, B, b0);
        V acc[RB][NVV];
        for (int i = 0; i < RB; ++i)
            for (int j = 0; j < NVV; ++j) acc[i][j] = V{};
        over_coords<NVV>(wt + n0, Np, D, [&](i64 d, const V* wv) {
            for (int i = 0; i < RB; ++i) {
                const T xs = rows.p[i][d];
                for (int j = 0; j < NVV; ++j) {
                    if constexpr (PV == 1) {
                        acc[i][j] += vabs<T>(xs - wv[j]);
                    } else {
                        acc[i][j] += pow_chain<PV>(xs - wv[j]);
                    }
                }
            }
        });
        if constexpr (PV != 1) {
            const T lo = raw_floor<T>(D), hi = Lim<T>::MAX;
            for (int i = 0; i < rows.valid; ++i)
                for (int j = 0; j < NVV; ++j)
                    for (int l = 0; l < W && n0 + j * W + l < N; ++l) {
                        const T s = acc[i][j][l];
                        if (s < lo || s > hi) return false;
                    }
        }
        for (int i = 0; i < rows.valid; ++i) {
            T* yrow = y + (b0 + i) * N;
            for (int j = 0; j < NVV; ++j) {
                V out = acc[i][j];
                if constexpr (PV != 1) {
                    for (int l = 0; l < W; ++l) out[l] = root_of<T>(PV, out[l], p);
                }
                store_cols(yrow, n0 + j * W, N, out);
            }
        }
        return true;
    }
};

#if LP_NREG >= 32
constexpr int RAW_RB = 4, RAW_NV = 5, NORM_RB = 2, NORM_NV = 4;
#else
constexpr int RAW_RB = 3, RAW_NV = 3, NORM_RB = 2, NORM_NV = 2;
#endif

template <typename T>
static void lp_forward(const T* x, const T* wt, i64 B, i64 N, i64 Np, i64 D, T p, int pv, T* y, int nt) {
    with_variant(pv, [&](auto v) {
        finite_forward<RAW_RB, RAW_NV, NORM_RB, NORM_NV>(Forward<T, decltype(v)::value>{x, wt, B, N, Np, D, y, p}, nt);
    });
}

// ---- backward -------------------------------------------------------------------

#if LP_NREG >= 32
constexpr int BWD_RB = 4, BWD_RN = 4;
#else
constexpr int BWD_RB = 2, BWD_RN = 3;
#endif

template <typename T, int PV> struct Backward {
    typedef typename S<T>::V V;
    static constexpr int W = S<T>::W;
    const T* x;
    const T* w;
    const T* g;
    const T* r;
    i64 B, N, Dp;
    T pm1;
    T* gx;
    T* gw;

    // rows [b0, b0 + RB) against neurons [n0, n0 + RN) at coordinates [c, c + W)
    template <int RB, int RN> inline void tile(i64 b0, i64 n0, i64 c, V (&gxa)[RB], T* gwc) const {
        V xv[RB], wv[RN], gwv[RN];
        for (int i = 0; i < RB; ++i) xv[i] = loadu<V>(x + (b0 + i) * Dp + c);
        for (int j = 0; j < RN; ++j) {
            wv[j] = loadu<V>(w + (n0 + j) * Dp + c);
            gwv[j] = loadu<V>(gwc + (n0 + j) * Dp);
        }
        for (int i = 0; i < RB; ++i) {
            const T* gr = g + (b0 + i) * N + n0;
            const T* rr = r + (b0 + i) * N + n0;
            for (int j = 0; j < RN; ++j) {
                const V f = grad_factor<T, PV>((xv[i] - wv[j]) * rr[j], pm1) * gr[j];
                gxa[i] += f;
                gwv[j] -= f;
            }
        }
        for (int j = 0; j < RN; ++j) storeu(gwc + (n0 + j) * Dp, gwv[j]);
    }

    template <int RB> inline void rows(i64 b0, i64 c, T* gwc) const {
        V gxa[RB];
        for (int i = 0; i < RB; ++i) gxa[i] = V{};
        i64 n0 = 0;
        for (; n0 + BWD_RN <= N; n0 += BWD_RN) tile<RB, BWD_RN>(b0, n0, c, gxa, gwc);
        for (; n0 < N; ++n0) tile<RB, 1>(b0, n0, c, gxa, gwc);
        if (gx != nullptr)
            for (int i = 0; i < RB; ++i) storeu(gx + (b0 + i) * Dp + c, gxa[i]);
    }

    void run(int nthreads) const { backward_chunks<BWD_RB>(*this, 2 * N * (i64)sizeof(T), nthreads); }
};

template <typename T>
static void lp_backward(const T* x, const T* w, const T* g, const T* r, i64 B, i64 N, i64 Dp, T p, int pv, T* gx, T* gw,
                        int nt) {
    const T pm1 = p - T(1);
    with_variant(pv, [&](auto v) { Backward<T, decltype(v)::value>{x, w, g, r, B, N, Dp, pm1, gx, gw}.run(nt); });
}

}  // namespace lp

extern "C" {

void lp_forward_f32(const float* x, const float* wt, int64_t B, int64_t N, int64_t Np, int64_t D, double p, int pv,
                    float* y, int nthreads) {
    lp::lp_forward<float>(x, wt, B, N, Np, D, (float)p, pv, y, nthreads);
}
void lp_forward_f64(const double* x, const double* wt, int64_t B, int64_t N, int64_t Np, int64_t D, double p, int pv,
                    double* y, int nthreads) {
    lp::lp_forward<double>(x, wt, B, N, Np, D, p, pv, y, nthreads);
}
void lp_backward_f32(const float* x, const float* w, const float* g, const float* r, int64_t B, int64_t N, int64_t Dp,
                     double p, int pv, float* gx, float* gw, int nthreads) {
    lp::lp_backward<float>(x, w, g, r, B, N, Dp, (float)p, pv, gx, gw, nthreads);
}
void lp_backward_f64(const double* x, const double* w, const double* g, const double* r, int64_t B, int64_t N,
                     int64_t Dp, double p, int pv, double* gx, double* gw, int nthreads) {
    lp::lp_backward<double>(x, w, g, r, B, N, Dp, p, pv, gx, gw, nthreads);
}

}  // extern "C"
