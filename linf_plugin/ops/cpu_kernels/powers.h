// Helpers of the finite-p kernels (lp_power.cpp, lp_interval.cpp): exact power chains, roots, the
// reference formula for single outputs, and the gradient factors.
#pragma once

#include <cmath>

#include "tiles.h"

namespace lp {

template <typename T> struct Lim {
    static constexpr T MIN = std::numeric_limits<T>::min();
    static constexpr T MAX = std::numeric_limits<T>::max();
    static constexpr int PREC = std::numeric_limits<T>::digits;
};

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

}  // namespace lp
