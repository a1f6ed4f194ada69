// Helpers of the finite-p kernels (lp_power.cpp, lp_interval.cpp): the dispatch on p, exact power
// chains, roots, the reference formula for single outputs, the gradient factors, and the forward's
// raw-or-normalised tile structure.
#pragma once

#include <cmath>
#include <type_traits>

#include "tiles.h"

namespace lp {

template <typename T> struct Lim {
    static constexpr T MIN = std::numeric_limits<T>::min();
    static constexpr T MAX = std::numeric_limits<T>::max();
    static constexpr int PREC = std::numeric_limits<T>::digits;
    // the maxima m that a max-normalised output scales by: m and 1 / m are normal numbers
    static constexpr T SCALE_LO = MIN * 4, SCALE_HI = MAX / 4;
};

// The lower end of a raw sum's safe range over D terms (lp_power.cpp; the upper end is Lim<T>::MAX).
template <typename T> static inline T raw_floor(i64 D) {
    return T(D) * Lim<T>::MIN * std::ldexp(T(1), Lim<T>::PREC + 2);
}

// fn(std::integral_constant<int, PV>{}) for the p variant pv (native_backend.p_variant): 1, 2 and 8
// have exact multiplication chains, anything else is 0 (2^(p log2 t)).
template <typename Fn> static inline void with_variant(int pv, const Fn& fn) {
    switch (pv) {
        case 1: fn(std::integral_constant<int, 1>{}); break;
        case 2: fn(std::integral_constant<int, 2>{}); break;
        case 8: fn(std::integral_constant<int, 8>{}); break;
        default: fn(std::integral_constant<int, 0>{}); break;
    }
}

template <int PV, typename V> static inline V pow_chain(V t) {
    if constexpr (PV == 1) {
        return t;
    } else if constexpr (PV == 2) {
        return t * t;
    } else {
        static_assert(PV == 8, "exact chains for p = 1, 2 and 8");
        const V t2 = t * t;
        const V t4 = t2 * t2;
        return t4 * t4;
    }
}

template <typename T> static inline T root_of(int pv, T s, T p) {
    if (pv == 2) return std::sqrt(s);
    if (pv == 8) return std::sqrt(std::sqrt(std::sqrt(s)));
    return std::pow(s, T(1) / p);
}

// The reference backend's formula for one output (divisions, no vectors).
template <typename T> static T reference_output(const T* xr, const T* w, i64 Np, i64 n, i64 D, T p, int pv) {
    T m = T(0);
    for (i64 d = 0; d < D; ++d) {
        const T a = std::fabs(xr[d] - w[d * Np + n]);
        if (a != a) return a;
        m = a > m ? a : m;
    }
    const T safe = m > T(0) ? m : T(1);
    T s = T(0);
    for (i64 d = 0; d < D; ++d) s += std::pow(std::fabs(xr[d] - w[d * Np + n]) / safe, p);
    return m * root_of<T>(pv, s, p);
}

// t^(p - 1) for p = 2 and 8 (odd powers: the sign of t kept); |t|^(p - 1) for other p (PV = 0).
template <typename T, int PV> static inline typename S<T>::V pow_pm1(typename S<T>::V t, T pm1) {
    typedef typename S<T>::V V;
    if constexpr (PV == 2) {
        return t;
    } else if constexpr (PV == 8) {
        const V t2 = t * t;
        const V t3 = t2 * t;
        return t3 * t3 * t;
    } else {
        static_assert(PV == 0, "p = 1 has no power chain (its factors are signs)");
        return exp2_of<T, true>(log2_abs<T, true>(t) * pm1);
    }
}

// sign(t) |t|^(p - 1); for p = 1, torch.sign(t) (0 for zeros and NaN, as torch has it).
template <typename T, int PV> static inline typename S<T>::V grad_factor(typename S<T>::V t, T pm1) {
    typedef typename S<T>::V V;
    if constexpr (PV == 1) {
        const V one = splat<V>(T(1));
        return t > T(0) ? one : (t < T(0) ? -one : V{});
    } else if constexpr (PV == 0) {
        return from_bits<T>(bits<T>(pow_pm1<T, PV>(t, pm1)) | (bits<T>(t) & S<T>::SIGN));
    } else {
        return pow_pm1<T, PV>(t, pm1);
    }
}

// (v r)^(p - 1) for v >= 0 (the interval's ends); for p = 1, [r > 0] (an end of 0 passes no gradient).
template <typename T, int PV> static inline typename S<T>::V end_factor(typename S<T>::V v, T r, T pm1) {
    if constexpr (PV == 1) {
        return splat<typename S<T>::V>(r > T(0) ? T(1) : T(0));
    } else {
        return pow_pm1<T, PV>(v * r, pm1);
    }
}

// The finite-p forward over tiles, for F (lp_power.cpp's Forward, lp_interval.cpp's IvalForward) with
// F::VARIANT, F::W, f.B, f.N, f.normalised<RB, NVV>(b0, n0) and, for p = 1, 2, 8, f.raw<RB, NVV>(b0, n0)
// (false, with nothing stored, when an output left the raw sums' safe range).  Other p: max-normalised
// tiles of NORM_RB x NORM_NV; p = 1, 2, 8: raw tiles of RAW_RB x RAW_NV, one that refuses recomputed
// max-normalised over the same rectangle.  (Class templates have one instantiation per type across the
// library; these are only ever instantiated with a source's own F, so no two sources, compiled with
// different -ffp-contract, share one.)
template <typename F, int NORM_RB, int NORM_NV> struct NormalisedTile {
    const F& f;
    i64 b0;
    template <int NVV> void run(i64 n0) { f.template normalised<NORM_RB, NVV>(b0, n0); }
};
template <typename F, int RAW_RB, int NORM_RB, int NORM_NV> struct RawTile {
    const F& f;
    i64 b0;
    template <int NVV> void run(i64 n0) {
        if (f.template raw<RAW_RB, NVV>(b0, n0)) return;
        constexpr int W = F::W;
        const i64 b_end = std::min<i64>(f.B, b0 + RAW_RB), n_end = std::min<i64>(f.N, n0 + (i64)NVV * W);
        for (i64 b = b0; b < b_end; b += NORM_RB)
            for (i64 n = n0; n < n_end; n += (i64)NORM_NV * W) {
                NormalisedTile<F, NORM_RB, NORM_NV> tile{f, b};
                with_width<NORM_NV, W>((int)std::min<i64>(NORM_NV, (n_end - n + W - 1) / W), n, tile);
            }
    }
};

template <int RAW_RB, int RAW_NV, int NORM_RB, int NORM_NV, typename F>
static void finite_forward(const F& f, int nthreads) {
    if constexpr (F::VARIANT == 0) {
        forward_tiles<NORM_RB, NORM_NV, F::W>(f.B, f.N, nthreads, [&](i64 b0) {
            return NormalisedTile<F, NORM_RB, NORM_NV>{f, b0};
        });
    } else {
        forward_tiles<RAW_RB, RAW_NV, F::W>(f.B, f.N, nthreads, [&](i64 b0) {
            return RawTile<F, RAW_RB, NORM_RB, NORM_NV>{f, b0};
        });
    }
}

}  // namespace lp
