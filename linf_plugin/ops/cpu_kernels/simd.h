// Portable SIMD for the CPU l_p-distance kernels: GCC/Clang vector extensions.
//
// The library is compiled on the machine that runs it (-march=native), so the
// vector width is the widest the CPU has: 64 bytes with AVX-512, 32 with AVX,
// 16 otherwise (SSE2 / NEON); a vector type wider than the hardware would be
// split by the compiler, so the width is also what the tile sizes assume
// (LP_NREG registers).  Every operation here rounds as its scalar IEEE
// counterpart does (no fast-math); where the kernels want fused multiply-adds
// they are compiled with -ffp-contract=fast (lp_power.cpp only).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__)
#define LP_VBYTES 64
#define LP_NREG 32
#elif defined(__AVX__)
#define LP_VBYTES 32
#define LP_NREG 16
#else
#define LP_VBYTES 16
#define LP_NREG 16
#endif

namespace lp {

typedef float vf __attribute__((vector_size(LP_VBYTES)));
typedef double vd __attribute__((vector_size(LP_VBYTES)));
typedef int32_t vi32 __attribute__((vector_size(LP_VBYTES)));
typedef int64_t vi64 __attribute__((vector_size(LP_VBYTES)));

// Per element type: the vector, the integer vector of the same lane width
// (IEEE bits), and the constants the bit tricks need.
template <typename T> struct S;
template <> struct S<float> {
    typedef vf V;
    typedef vi32 I;
    typedef int32_t Int;
    static constexpr int W = LP_VBYTES / 4;
    static constexpr Int ABS = 0x7fffffff;
    static constexpr Int SIGN = (Int)0x80000000u;
    static constexpr Int MIN_NORMAL = 0x00800000;   // bits of the smallest normal number
    static constexpr Int INF_BITS = 0x7f800000;
    static constexpr Int SQRT_HALF = 0x3f3504f3;    // bits of sqrt(1/2)
    static constexpr int MANT = 23;
    static constexpr Int BIAS = 127;
};
template <> struct S<double> {
    typedef vd V;
    typedef vi64 I;
    typedef int64_t Int;
    static constexpr int W = LP_VBYTES / 8;
    static constexpr Int ABS = 0x7fffffffffffffffll;
    static constexpr Int SIGN = (Int)0x8000000000000000ull;
    static constexpr Int MIN_NORMAL = 0x0010000000000000ll;
    static constexpr Int INF_BITS = 0x7ff0000000000000ll;
    static constexpr Int SQRT_HALF = 0x3fe6a09e667f3bcdll;
    static constexpr int MANT = 52;
    static constexpr Int BIAS = 1023;
};

template <typename V, typename E> static inline V loadu(const E* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}
template <typename V, typename E> static inline void storeu(E* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

// A vector of copies of s (through the integer bits: V{} + s would turn -0.0 into +0.0).
template <typename V, typename E> static inline V splat(E s) {
    if constexpr (std::is_integral<E>::value) {
        return V{} + s;
    } else {
        typedef typename S<E>::Int Int;
        Int b;
        std::memcpy(&b, &s, sizeof b);
        return (V)(typename S<E>::I{} + b);
    }
}

// Bit casts between a vector and the integer vector of the same size.
template <typename T> static inline typename S<T>::I bits(typename S<T>::V v) { return (typename S<T>::I)v; }
template <typename T> static inline typename S<T>::V from_bits(typename S<T>::I i) { return (typename S<T>::V)i; }

template <typename T> static inline typename S<T>::V vabs(typename S<T>::V v) {
    return from_bits<T>(bits<T>(v) & S<T>::ABS);
}

// max that keeps NaN from x: (x < c) is false for NaN, so x is returned.
template <typename T> static inline typename S<T>::V vmax_keep(typename S<T>::V x, T c) {
    typename S<T>::V cv = splat<typename S<T>::V>(c);
    return x < cv ? cv : x;
}
template <typename T> static inline typename S<T>::V vmin_keep(typename S<T>::V x, T c) {
    typename S<T>::V cv = splat<typename S<T>::V>(c);
    return x > cv ? cv : x;
}

// ---- log2 and exp2 ------------------------------------------------------------
//
// The portable versions (any vector width; AVX-512 builds use the table
// versions further down).
// log2(t) for t >= 0 (the kernels pass |d| / y and the like):
//   t = 2^k m with m in [sqrt(1/2), sqrt(2)) from the IEEE bits (k from the
//   exponent field after subtracting the bits of sqrt(1/2)), f = m - 1, and
//   ln(1 + f) from Cephes' logf polynomial (float, relative error 7.6e-8)
//   or fdlibm's log kernel (double, s = f / (2 + f), error < 2^-58.45);
//   log2 t = k + ln(1 + f) log2(e).  The result is relatively accurate near
//   t = 1 (k = 0), which is where large p needs it.
//   Special values, by select: t below the smallest normal (0 and the
//   subnormals) gives -inf, so t^q = 2^(q log2 t) is exactly 0 there (for
//   t = 0 it must be: an output of 0 passes no gradient; a subnormal t has
//   t^q below 2^-126, and the largest term or factor is about 1); with
//   SPECIALS, inf gives inf and NaN gives NaN.
template <typename T> struct Poly;
template <> struct Poly<float> {
    static inline vf ln1p(vf f) {
        const vf z = f * f;
        vf y = splat<vf>(7.0376836292E-2f);
        y = y * f + -1.1514610310E-1f;
        y = y * f + 1.1676998740E-1f;
        y = y * f + -1.2420140846E-1f;
        y = y * f + 1.4249322787E-1f;
        y = y * f + -1.6668057665E-1f;
        y = y * f + 2.0000714765E-1f;
        y = y * f + -2.4999993993E-1f;
        y = y * f + 3.3333331174E-1f;
        y = y * (f * z);
        y = y + -0.5f * z;
        return f + y;
    }
    // 2^f for f in [-1/2, 1/2]: Cephes' exp2f, 1 + f P(f).
    static inline vf exp2_reduced(vf f) {
        vf y = splat<vf>(1.535336188319500E-4f);
        y = y * f + 1.339887440266574E-3f;
        y = y * f + 9.618437357674640E-3f;
        y = y * f + 5.550332471162809E-2f;
        y = y * f + 2.402264791363012E-1f;
        y = y * f + 6.931472028550421E-1f;
        return y * f + 1.0f;
    }
    static constexpr float ROUND_MAGIC = 12582912.0f;   // 1.5 * 2^23
};
template <> struct Poly<double> {
    static inline vd ln1p(vd f) {
        const vd s = f / (2.0 + f);
        const vd z = s * s;
        const vd w = z * z;
        const vd t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
        const vd t2 = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01 +
                                                         w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
        const vd r = t2 + t1;
        const vd hfsq = 0.5 * f * f;
        return f - (hfsq - s * (hfsq + r));
    }
    // 2^f = e^(f ln 2) for f in [-1/2, 1/2]: Taylor to degree 13 (truncation < 4e-18).
    static inline vd exp2_reduced(vd f) {
        static const double c[14] = {1.0, 6.931471805599453094e-01, 2.402265069591007123e-01,
                                     5.550410866482157995e-02, 9.618129107628477162e-03, 1.333355814642844342e-03,
                                     1.540353039338160995e-04, 1.525273380405984028e-05, 1.321548679014430949e-06,
                                     1.017808600923969973e-07, 7.054911620801123330e-09, 4.445538271870811498e-10,
                                     2.567843599348820514e-11, 1.369148885390412888e-12};
        vd y = splat<vd>(c[13]);
        for (int k = 12; k >= 0; --k) y = y * f + c[k];
        return y;
    }
    static constexpr double ROUND_MAGIC = 6755399441055744.0;   // 1.5 * 2^52
};

// SPECIALS = false: the caller promises t is finite (no inf, no NaN).
template <typename T, bool SPECIALS> static inline typename S<T>::V vlog2(typename S<T>::V t) {
    typedef typename S<T>::V V;
    typedef typename S<T>::I I;
    typedef typename S<T>::Int Int;
    const I b = bits<T>(t);
    const I k = (b - S<T>::SQRT_HALF) >> S<T>::MANT;     // arithmetic shift: the exponent of m's range
    const V m = from_bits<T>(b - (k << S<T>::MANT));
    V l = Poly<T>::ln1p(m - (T)1) * (T)1.4426950408889634074 + __builtin_convertvector(k, V);
    l = b < (Int)S<T>::MIN_NORMAL ? splat<V>(-std::numeric_limits<T>::infinity()) : l;
    if constexpr (SPECIALS) l = b >= (Int)S<T>::INF_BITS ? t : l;   // inf -> inf, NaN -> NaN (t >= 0)
    return l;
}

// 2^x: k = round(x) by the 1.5 * 2^mant trick, f = x - k exact, 2^k from
// the exponent bits.  x is clamped below to -BIAS, where 2^k's bits are 0:
// results below half the smallest normal number are 0 (-inf included), and
// only x in [-BIAS + 1/2, -BIAS + 3/2) can give a subnormal (subnormal
// arithmetic costs ~100 cycles per operation on x86; an l_p term or
// gradient factor below 2^-126 of the largest one changes nothing); with
// SPECIALS, x is clamped above to BIAS + 1, where the bits are those of inf
// (+inf stays inf; NaN stays NaN).
template <typename T, bool SPECIALS> static inline typename S<T>::V vexp2(typename S<T>::V x) {
    typedef typename S<T>::V V;
    typedef typename S<T>::I I;
    x = vmax_keep<T>(x, -(T)S<T>::BIAS);
    if constexpr (SPECIALS) x = vmin_keep<T>(x, (T)(S<T>::BIAS + 1));
    const V shifted = x + Poly<T>::ROUND_MAGIC;
    const V kf = shifted - Poly<T>::ROUND_MAGIC;
    const V p = Poly<T>::exp2_reduced(x - kf);
    const I k = bits<T>(shifted) - bits<T>(splat<V>(Poly<T>::ROUND_MAGIC));
    return p * from_bits<T>((k + S<T>::BIAS) << S<T>::MANT);
}

// log2 |t| for any t (the sign is ignored): vlog2 on |t|, or on AVX-512 a
// table method: t = 2^e m with e = getexp(t), m = getmant(t) in [1, 2)
// (exact, subnormals included, sign dropped); the top 4 bits of m's
// mantissa pick c_i ~ 1 / (1 + (i + 1/2) / 16) and l_i = -log2 c_i, except
// c_15 = 1/2 exactly (l_15 = 1), so that t in [1/2, 1), where large p looks,
// is relatively accurate (r = m / 2 - 1 = t - 1 exactly); r = m c_i - 1 (one
// rounding, |r| <= 1/32), log2 |t| = e + l_i + r q(r) with q(r) =
// log2(1 + r) / r by Taylor (float to r^5, truncation < 3e-10; double to
// r^10, < 4e-18).  getexp gives -inf at 0, inf at inf, NaN at NaN, and the
// sum follows.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define LP_AVX512_MATH 1
#include <immintrin.h>

static const float LOG2_TABLE_C_F32[16] = {
    0.9696969985961914f, 0.9142857193946838f, 0.8648648858070374f, 0.8205128312110901f, 0.7804877758026123f, 0.7441860437393188f,
    0.7111111283302307f, 0.6808510422706604f, 0.6530612111091614f, 0.6274510025978088f, 0.6037735939025879f,
    0.581818163394928f, 0.5614035129547119f, 0.5423728823661804f, 0.5245901346206665f, 0.5f};
static const float LOG2_TABLE_L_F32[16] = {
    0.044394075870513916f, 0.12928301095962524f, 0.20945332944393158f, 0.28540220856666565f, 0.35755205154418945f,
    0.42626476287841797f, 0.4918530583381653f, 0.5545889139175415f, 0.6147098541259766f, 0.6724252700805664f,
    0.727920413017273f, 0.7813597321510315f, 0.832889974117279f, 0.8826430439949036f, 0.9307374358177185f, 1.0f};
static const double LOG2_TABLE_C_F64[16] = {
    0.9696969696969697, 0.9142857142857143, 0.8648648648648649, 0.8205128205128205, 0.7804878048780488, 0.7441860465116279,
    0.7111111111111111, 0.6808510638297872, 0.6530612244897959, 0.6274509803921569, 0.6037735849056604,
    0.5818181818181818, 0.5614035087719298, 0.5423728813559322, 0.5245901639344263, 0.5};
static const double LOG2_TABLE_L_F64[16] = {
    0.044394119358453395, 0.1292830169449665, 0.2094533656289497, 0.28540221886224837, 0.3575520046180836, 0.42626475470209796,
    0.49185309632967467, 0.5545888516776374, 0.6147098441152083, 0.6724253419714956, 0.7279204545631992,
    0.7813597135246597, 0.8328900141647417, 0.8826430493618412, 0.9307373375628862, 1.0};
// log2(e) (-1)^k / (k + 1)
static const double LOG1P_Q[13] = {1.4426950408889634,   -0.7213475204444817, 0.4808983469629878,
                                   -0.36067376022224085, 0.28853900817779266, -0.2404491734814939,
                                   0.2060992915555662,   -0.18033688011112042, 0.1602994489876626,
                                   -0.14426950408889633, 0.1311540946262694,  -0.12022458674074694,
                                   0.11097654160684334};

template <typename T> static inline typename S<T>::V vlog2abs(typename S<T>::V t);
template <> inline vf vlog2abs<float>(vf t) {
    const __m512 x = (__m512)t;
    const __m512 e = _mm512_getexp_ps(x);
    const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
    const __m512i idx = _mm512_srli_epi32(_mm512_castps_si512(m), 19);
    const __m512 c = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(LOG2_TABLE_C_F32));
    const __m512 l = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(LOG2_TABLE_L_F32));
    const vf r = (vf)_mm512_fmsub_ps(m, c, _mm512_set1_ps(1.0f));
    vf q = splat<vf>((float)LOG1P_Q[4]);
    for (int k = 3; k >= 0; --k) q = q * r + (float)LOG1P_Q[k];
    return r * q + (vf)_mm512_add_ps(e, l);
}
template <> inline vd vlog2abs<double>(vd t) {
    const __m512d x = (__m512d)t;
    const __m512d e = _mm512_getexp_pd(x);
    const __m512d m = _mm512_getmant_pd(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
    const __m512i idx = _mm512_srli_epi64(_mm512_castpd_si512(m), 48);
    const __m512d c = _mm512_permutex2var_pd(_mm512_loadu_pd(LOG2_TABLE_C_F64), idx,
                                             _mm512_loadu_pd(LOG2_TABLE_C_F64 + 8));
    const __m512d l = _mm512_permutex2var_pd(_mm512_loadu_pd(LOG2_TABLE_L_F64), idx,
                                             _mm512_loadu_pd(LOG2_TABLE_L_F64 + 8));
    const vd r = (vd)_mm512_fmsub_pd(m, c, _mm512_set1_pd(1.0));
    vd q = splat<vd>(LOG1P_Q[9]);
    for (int k = 8; k >= 0; --k) q = q * r + LOG1P_Q[k];
    return r * q + (vd)_mm512_add_pd(e, l);
}

// 2^x on AVX-512: k = round(x), f = x - k, 2^f by the polynomials above,
// scalef(2^f, k).  Results are 0 below 2^(emin + 1) (x < -125 in float, -1021
// in double; -inf included, the masked-off lanes never look at f): no
// subnormal ever reaches the sums (see vexp2).  With SPECIALS, x is capped
// at 200 / 2000 (+inf gives inf, not inf - inf); NaN propagates.
template <typename T, bool SPECIALS> static inline typename S<T>::V vexp2_avx512(typename S<T>::V xv);
template <> inline vf vexp2_avx512<float, false>(vf xv) {
    const __m512 x = (__m512)xv;
    const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vf p = Poly<float>::exp2_reduced((vf)_mm512_sub_ps(x, k));
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ);
    return (vf)_mm512_maskz_scalef_ps(keep, (__m512)p, k);
}
template <> inline vf vexp2_avx512<float, true>(vf xv) {
    return vexp2_avx512<float, false>((vf)_mm512_min_ps(_mm512_set1_ps(200.0f), (__m512)xv));
}
// double: x = n + j/16 + f with |f| <= 1/32 (x + 1.5 * 2^48 rounds to a
// multiple of 1/16 and leaves 16 (n + j/16) in the low bits), 2^x =
// 2^n 2^(j/16) 2^f with 2^(j/16) from a table (vpermt2pd reads j, the low 4
// bits) and 2^f by Taylor to degree 7 (|f ln 2| <= 0.0217: truncation
// < 2e-18): 8 multiply-adds instead of 14.
static const double EXP2_TABLE_F64[16] = {
    1.0, 1.0442737824274138, 1.0905077326652577, 1.1387886347566916, 1.189207115002721, 1.241857812073484,
    1.2968395546510096, 1.3542555469368927, 1.4142135623730951, 1.4768261459394993, 1.5422108254079407,
    1.6104903319492543, 1.681792830507429, 1.7562521603732995, 1.8340080864093424, 1.9152065613971474};
template <> inline vd vexp2_avx512<double, false>(vd xv) {
    const __m512d x = (__m512d)xv;
    const __m512d magic = _mm512_set1_pd(422212465065984.0);   // 1.5 * 2^48: its ulp is 1/16
    const __m512d shifted = _mm512_add_pd(x, magic);
    const vd f = (vd)_mm512_sub_pd(x, _mm512_sub_pd(shifted, magic));
    vd p = splat<vd>(1.5252733804059838e-05);
    p = p * f + 0.00015403530393381606;
    p = p * f + 0.0013333558146428441;
    p = p * f + 0.009618129107628477;
    p = p * f + 0.055504108664821576;
    p = p * f + 0.2402265069591007;
    p = p * f + 0.6931471805599453;
    p = p * f + 1.0;
    const __m512i sixteenths = _mm512_sub_epi64(_mm512_castpd_si512(shifted), _mm512_castpd_si512(magic));
    const __m512d t = _mm512_permutex2var_pd(_mm512_loadu_pd(EXP2_TABLE_F64), _mm512_castpd_si512(shifted),
                                             _mm512_loadu_pd(EXP2_TABLE_F64 + 8));
    const __m512d n = _mm512_cvtepi64_pd(_mm512_srai_epi64(sixteenths, 4));
    const __mmask8 keep = _mm512_cmp_pd_mask(x, _mm512_set1_pd(-1021.0), _CMP_NLT_UQ);
    return (vd)_mm512_maskz_scalef_pd(keep, _mm512_mul_pd((__m512d)p, t), n);
}
template <> inline vd vexp2_avx512<double, true>(vd xv) {
    return vexp2_avx512<double, false>((vd)_mm512_min_pd(_mm512_set1_pd(2000.0), (__m512d)xv));
}
#endif

// The kernels' entry points: log2 |t| and 2^x, the fastest variant the build has.
template <typename T, bool SPECIALS> static inline typename S<T>::V log2_abs(typename S<T>::V t) {
#if defined(LP_AVX512_MATH)
    return vlog2abs<T>(t);
#else
    return vlog2<T, SPECIALS>(vabs<T>(t));
#endif
}
template <typename T, bool SPECIALS> static inline typename S<T>::V exp2_of(typename S<T>::V x) {
#if defined(LP_AVX512_MATH)
    return vexp2_avx512<T, SPECIALS>(x);
#else
    return vexp2<T, SPECIALS>(x);
#endif
}

}  // namespace lp
