// The interval of the l_p distance over a box, finite p (compiled with -ffp-contract=fast, like
// lp_power.cpp, whose derivations apply here term for term).
//
// Per coordinate a = w - lower, c = upper - w, far = max(a, c) and
// near = max(-min(a, c), 0); lo = ||near||_p and hi = ||far||_p.  The
// caller passes finite inputs only (the backend sends anything else to the
// torch backend), so no NaN arises in a, c.
//
// Forward (vectorised over n, tiles.h): p = 1 plain sums; p = 2, 8 the raw
// one-pass sums of near^p and far^p with lp_power.cpp's safe range, a tile
// with either end outside it recomputed max-normalised; other p
// max-normalised (max pass, then sums of (end / m)^p).  Ends whose maximum
// is not a normal number with a normal inverse (0 when w is inside the box,
// tiny, huge) are recomputed per output with the reference's formula.
//
// Backward (vectorised over coordinates, fused): per triple the two factors
// cf = g_hi (far r_hi)^(p-1) and cn = g_lo (near r_lo)^(p-1) (r = 1 / end, 0
// at an end of 0) are computed once and routed as the reference routes
// them: far follows upper where c >= a (ties to upper), else lower; near is
// lower - w where a < 0, w - upper where c < 0, constant otherwise.
// gl, gu sum the neurons in order and gw the rows in order, whatever the
// thread count.
#include "ends.h"
#include "powers.h"

namespace lp {

// The reference formula for one output's two ends (scalar, with divisions).
template <typename T>
static void reference_ends(const T* lr, const T* ur, const T* wt, i64 Np, i64 n, i64 D, T p, int pv, T& lo, T& hi) {
    T m_lo = T(0), m_hi = T(0);
    for (i64 d = 0; d < D; ++d) {
        const T a = wt[d * Np + n] - lr[d], c = ur[d] - wt[d * Np + n];
        const T far = a > c ? a : c, near = std::max(-(a < c ? a : c), T(0));
        m_lo = near > m_lo ? near : m_lo;
        m_hi = far > m_hi ? far : m_hi;
    }
    const T s_lo = m_lo > T(0) ? m_lo : T(1), s_hi = m_hi > T(0) ? m_hi : T(1);
    T sum_lo = T(0), sum_hi = T(0);
    for (i64 d = 0; d < D; ++d) {
        const T a = wt[d * Np + n] - lr[d], c = ur[d] - wt[d * Np + n];
        const T far = a > c ? a : c, near = std::max(-(a < c ? a : c), T(0));
        sum_lo += std::pow(near / s_lo, p);
        sum_hi += std::pow(far / s_hi, p);
    }
    lo = m_lo * root_of<T>(pv, sum_lo, p);
    hi = m_hi * root_of<T>(pv, sum_hi, p);
}

template <typename T, int PV> struct IvalForward {
    typedef typename S<T>::V V;
    typedef typename S<T>::I I;
    static constexpr int W = S<T>::W, VARIANT = PV;
    const T* lower;
    const T* upper;
    const T* wt;
    i64 B, N, Np, D;
    T* lo;
    T* hi;
    T p;

    static inline V power(V t, T p) {
        if constexpr (PV == 0) {
            return exp2_of<T, false>(log2_abs<T, false>(t) * p);
        } else {
            return pow_chain<PV>(t);
        }
    }

    template <int RB, int NVV> void normalised(i64 b0, i64 n0) const {
        const Rows<T, RB> rl(lower, D, B, b0), ru(upper, D, B, b0);
        I ml[RB][NVV], mh[RB][NVV];
        for (int i = 0; i < RB; ++i)
            for (int j = 0; j < NVV; ++j) ml[i][j] = mh[i][j] = I{};
        over_coords<NVV>(wt + n0, Np, D, [&](i64 d, const V* wv) {
            for (int i = 0; i < RB; ++i)
                for (int j = 0; j < NVV; ++j) {
                    V near, far;
                    ends(wv[j], rl.p[i][d], ru.p[i][d], near, far);
                    const I kn = bits<T>(near), kf = bits<T>(far);
                    ml[i][j] = kn > ml[i][j] ? kn : ml[i][j];
                    mh[i][j] = kf > mh[i][j] ? kf : mh[i][j];
                }
        });
        V il[RB][NVV], ih[RB][NVV], sl[RB][NVV], sh[RB][NVV];
        for (int i = 0; i < RB; ++i)
            for (int j = 0; j < NVV; ++j) {
                const V a = from_bits<T>(ml[i][j]), b = from_bits<T>(mh[i][j]);
                il[i][j] = a > T(0) ? T(1) / a : V{};
                ih[i][j] = b > T(0) ? T(1) / b : V{};
                sl[i][j] = sh[i][j] = V{};
            }
        over_coords<NVV>(wt + n0, Np, D, [&](i64 d, const V* wv) {
            for (int i = 0; i < RB; ++i)
                for (int j = 0; j < NVV; ++j) {
                    V near, far;
                    ends(wv[j], rl.p[i][d], ru.p[i][d], near, far);
                    sl[i][j] += power(near * il[i][j], p);
                    sh[i][j] += power(far * ih[i][j], p);
                }
        });
        constexpr T lo_ok = Lim<T>::SCALE_LO, hi_ok = Lim<T>::SCALE_HI;
        for (int i = 0; i < rl.valid; ++i) {
            const i64 row = (b0 + i) * N;
            for (int j = 0; j < NVV; ++j) {
                const V a = from_bits<T>(ml[i][j]), b = from_bits<T>(mh[i][j]);
                V out_lo, out_hi;
                for (int l = 0; l < W; ++l) {
                    const i64 n = n0 + j * W + l;
                    const bool ok_lo = a[l] >= lo_ok && a[l] <= hi_ok, ok_hi = b[l] >= lo_ok && b[l] <= hi_ok;
                    out_lo[l] = ok_lo ? a[l] * root_of<T>(PV, sl[i][j][l], p) : T(0);
                    out_hi[l] = ok_hi ? b[l] * root_of<T>(PV, sh[i][j][l], p) : T(0);
                    if ((!ok_lo || !ok_hi) && n < N) {
                        T r_lo, r_hi;
                        reference_ends<T>(rl.p[i], ru.p[i], wt, Np, n, D, p, PV, r_lo, r_hi);
                        out_lo[l] = ok_lo ? out_lo[l] : r_lo;
                        out_hi[l] = ok_hi ? out_hi[l] : r_hi;
                    }
                }
                store_cols(lo + row, n0 + j * W, N, out_lo);
                store_cols(hi + row, n0 + j * W, N, out_hi);
            }
        }
    }

    // p = 1, 2, 8: raw sums; false (nothing stored) when an end of an output is outside the safe range.
    template <int RB, int NVV> bool raw(i64 b0, i64 n0) const {
        const Rows<T, RB> rl(lower, D, B, b0), ru(upper, D, B, b0);
        V sl[RB][NVV], sh[RB][NVV];
        for (int i = 0; i < RB; ++i)
            for (int j = 0; j < NVV; ++j) sl[i][j] = sh[i][j] = V{};
        over_coords<NVV>(wt + n0, Np, D, [&](i64 d, const V* wv) {
            for (int i = 0; i < RB; ++i) {
                const T ls = rl.p[i][d], us = ru.p[i][d];
                for (int j = 0; j < NVV; ++j) {
                    V near, far;
                    ends(wv[j], ls, us, near, far);
                    sl[i][j] += pow_chain<PV>(near);
                    sh[i][j] += pow_chain<PV>(far);
                }
            }
        });
        if constexpr (PV != 1) {
            const T lo_s = raw_floor<T>(D), hi_s = Lim<T>::MAX;
            for (int i = 0; i < rl.valid; ++i)
                for (int j = 0; j < NVV; ++j)
                    for (int l = 0; l < W && n0 + j * W + l < N; ++l) {
                        const T a = sl[i][j][l], b = sh[i][j][l];
                        if (a < lo_s || a > hi_s || b < lo_s || b > hi_s) return false;
                    }
        }
        for (int i = 0; i < rl.valid; ++i) {
            const i64 row = (b0 + i) * N;
            for (int j = 0; j < NVV; ++j) {
                V a = sl[i][j], b = sh[i][j];
                if constexpr (PV != 1) {
                    for (int l = 0; l < W; ++l) {
                        a[l] = root_of<T>(PV, a[l], p);
                        b[l] = root_of<T>(PV, b[l], p);
                    }
                }
                store_cols(lo + row, n0 + j * W, N, a);
                store_cols(hi + row, n0 + j * W, N, b);
            }
        }
        return true;
    }
};

#if LP_NREG >= 32
constexpr int IRAW_RB = 3, IRAW_NV = 4, INORM_RB = 2, INORM_NV = 2;
#else
constexpr int IRAW_RB = 2, IRAW_NV = 2, INORM_RB = 1, INORM_NV = 2;
#endif

// ---- backward -------------------------------------------------------------------

#if LP_NREG >= 32
constexpr int IBWD_RB = 3, IBWD_RN = 4;
#else
constexpr int IBWD_RB = 1, IBWD_RN = 3;
#endif

template <typename T, int PV> struct IvalBackward {
    typedef typename S<T>::V V;
    static constexpr int W = S<T>::W;
    const T* lower;
    const T* upper;
    const T* w;
    const T* glo;
    const T* ghi;
    const T* rlo;
    const T* rhi;
    i64 B, N, Dp;
    T pm1;
    T* gl;
    T* gu;
    T* gw;

    template <int RB, int RN> inline void tile(i64 b0, i64 n0, i64 c, V (&gla)[RB], V (&gua)[RB], T* gwc) const {
        V lv[RB], uv[RB], wv[RN], gwv[RN];
        for (int i = 0; i < RB; ++i) {
            lv[i] = loadu<V>(lower + (b0 + i) * Dp + c);
            uv[i] = loadu<V>(upper + (b0 + i) * Dp + c);
        }
        for (int j = 0; j < RN; ++j) {
            wv[j] = loadu<V>(w + (n0 + j) * Dp + c);
            gwv[j] = loadu<V>(gwc + (n0 + j) * Dp);
        }
        for (int i = 0; i < RB; ++i) {
            const i64 o = (b0 + i) * N + n0;
            for (int j = 0; j < RN; ++j) {
                const V a = wv[j] - lv[i], cc = uv[i] - wv[j];
                V near, far;
                ends_of<T>(a, cc, near, far);
                const V cf = end_factor<T, PV>(far, rhi[o + j], pm1) * ghi[o + j];
                const V cn = end_factor<T, PV>(near, rlo[o + j], pm1) * glo[o + j];
                const auto up = cc >= a, below = a < T(0), above = cc < T(0);
                const V zero = V{};
                gla[i] += (up ? zero : -cf) + (below ? cn : zero);
                gua[i] += (up ? cf : zero) - (above ? cn : zero);
                gwv[j] += (up ? -cf : cf) - (below ? cn : zero) + (above ? cn : zero);
            }
        }
        for (int j = 0; j < RN; ++j) storeu(gwc + (n0 + j) * Dp, gwv[j]);
    }

    template <int RB> inline void rows(i64 b0, i64 c, T* gwc) const {
        V gla[RB], gua[RB];
        for (int i = 0; i < RB; ++i) gla[i] = gua[i] = V{};
        i64 n0 = 0;
        for (; n0 + IBWD_RN <= N; n0 += IBWD_RN) tile<RB, IBWD_RN>(b0, n0, c, gla, gua, gwc);
        for (; n0 < N; ++n0) tile<RB, 1>(b0, n0, c, gla, gua, gwc);
        for (int i = 0; i < RB; ++i) {
            if (gl != nullptr) storeu(gl + (b0 + i) * Dp + c, gla[i]);
            if (gu != nullptr) storeu(gu + (b0 + i) * Dp + c, gua[i]);
        }
    }

    void run(int nthreads) const { backward_chunks<IBWD_RB>(*this, 4 * N * (i64)sizeof(T), nthreads); }
};

template <typename T>
static void lp_ival_forward(const T* lower, const T* upper, const T* wt, i64 B, i64 N, i64 Np, i64 D, T p, int pv,
                            T* lo, T* hi, int nt) {
    with_variant(pv, [&](auto v) {
        finite_forward<IRAW_RB, IRAW_NV, INORM_RB, INORM_NV>(
            IvalForward<T, decltype(v)::value>{lower, upper, wt, B, N, Np, D, lo, hi, p}, nt);
    });
}

template <typename T>
static void lp_ival_backward(const T* lower, const T* upper, const T* w, const T* glo, const T* ghi, const T* rlo,
                             const T* rhi, i64 B, i64 N, i64 Dp, T p, int pv, T* gl, T* gu, T* gw, int nt) {
    const T pm1 = p - T(1);
    with_variant(pv, [&](auto v) {
        IvalBackward<T, decltype(v)::value>{lower, upper, w, glo, ghi, rlo, rhi, B, N, Dp, pm1, gl, gu, gw}.run(nt);
    });
}

}  // namespace lp

extern "C" {

#define LP_IVAL(SUF, T)                                                                                               \
    void lp_ival_forward_##SUF(const T* lower, const T* upper, const T* wt, int64_t B, int64_t N, int64_t Np,         \
                               int64_t D, double p, int pv, T* lo, T* hi, int nthreads) {                             \
        lp::lp_ival_forward<T>(lower, upper, wt, B, N, Np, D, (T)p, pv, lo, hi, nthreads);                            \
    }                                                                                                                 \
    void lp_ival_backward_##SUF(const T* lower, const T* upper, const T* w, const T* glo, const T* ghi, const T* rlo, \
                                const T* rhi, int64_t B, int64_t N, int64_t Dp, double p, int pv, T* gl, T* gu,       \
                                T* gw, int nthreads) {                                                                \
        lp::lp_ival_backward<T>(lower, upper, w, glo, ghi, rlo, rhi, B, N, Dp, (T)p, pv, gl, gu, gw, nthreads);       \
    }
LP_IVAL(f32, float)
LP_IVAL(f64, double)

}  // extern "C"
