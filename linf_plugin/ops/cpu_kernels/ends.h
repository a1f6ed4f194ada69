// The interval's per-coordinate ends, shared by the p = inf (lp_exact.cpp) and finite-p
// (lp_interval.cpp) kernels: for a box [lower, upper] and a weight w, a = w - lower and
// c = upper - w (one rounding each, as the torch backend), far = max(a, c) and
// near = max(-min(a, c), 0), the largest and smallest |x - w| over x in the box (+0 where w is
// inside it).  static: each source keeps its own copy, compiled with its own -ffp-contract.
#pragma once

namespace lp {

template <typename T, typename V> static inline void ends_of(const V& a, const V& c, V& near, V& far) {
    far = a > c ? a : c;
    const V neg = -(a < c ? a : c);
    near = neg > T(0) ? neg : V{};
}

// The ends of vector w against one box row's scalar bounds.
template <typename V, typename T> static inline void ends(const V& wv, T ls, T us, V& near, V& far) {
    ends_of<T>(wv - ls, us - wv, near, far);
}

}  // namespace lp
