// Loop structure shared by the CPU l_p-distance kernels.
//
// Forward passes vectorise over the outputs' n axis: w is passed transposed,
// wt (D, Np) with Np = N rounded up to the vector width W and zero columns
// past N, so one vector holds W neurons; a tile is RB rows of x (each a
// broadcast scalar per coordinate) against NV vectors of neurons, and the
// coordinate loop d = 0 .. D-1 is the reduction, in that order for every
// output (the result never depends on the tiling or the thread count).
// Rows past B in the last row tile point at row B - 1 (computed, never
// stored); the last neuron tile runs one vector at a time.
//
// Threads: tasks (neuron tile, row tile), neuron-major, statically split
// over torch's thread count through torch's own OpenMP runtime (the library
// links the one torch has loaded); each output is written by one task.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace lp {

typedef int64_t i64;

// Row pointers of one row tile (rows past B repeat the last row).
template <typename T, int RB> struct Rows {
    const T* p[RB];
    int valid;
    Rows(const T* x, i64 ldx, i64 B, i64 b0) {
        valid = (int)std::min<i64>(RB, B - b0);
        for (int i = 0; i < RB; ++i) p[i] = x + (b0 + std::min(i, valid - 1)) * ldx;
    }
};

// The coordinate loop of a forward tile: body(d, wv) for d = 0, 1, ..., D - 1, in that order (every
// output's reduction order), wv the tile's NVV weight vectors at d (row d of wt from the tile's column).
template <int NVV, typename T, typename Body>
static inline void over_coords(const T* wt, i64 Np, i64 D, const Body& body) {
    typedef typename S<T>::V V;
    const T* wp = wt;
    for (i64 d = 0; d < D; ++d, wp += Np) {
        V wv[NVV];
        for (int j = 0; j < NVV; ++j) wv[j] = loadu<V>(wp + j * S<T>::W);
        body(d, wv);
    }
}

// Runs the neuron tile at n0 that has nv vectors: f.run<NV>(n0) when it is
// whole, else f.run<1> per vector (few instantiations: fast builds).
template <int NV, int W, typename F> static inline void with_width(int nv, i64 n0, F& f) {
    if (nv == NV) {
        f.template run<NV>(n0);
        return;
    }
    for (int v = 0; v < nv; ++v) f.template run<1>(n0 + (i64)v * W);
}

// Store one tile row's vector j (W outputs starting at column n) into y, keeping only columns < N.
template <typename T, typename V> static inline void store_cols(T* yrow, i64 n, i64 N, const V& v) {
    constexpr int W = (int)(sizeof(V) / sizeof(T));
    if (n + W <= N) {
        storeu(yrow + n, v);
    } else {
        for (int l = 0; l < W && n + l < N; ++l) yrow[n + l] = v[l];
    }
}

// The forward task loop: for every (neuron tile, row tile), make(b0) builds the row tile at b0 (a
// functor with run<NVV>(n0)) and with_width runs it on the neuron tile.
template <int RB, int NV, int W, typename Make>
static void forward_tiles(i64 B, i64 N, int nthreads, const Make& make) {
    const i64 nt_cols = (i64)NV * W;
    const i64 n_tiles = (N + nt_cols - 1) / nt_cols;
    const i64 b_tiles = (B + RB - 1) / RB;
    const i64 tasks = n_tiles * b_tiles;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && tasks > 1)
    for (i64 t = 0; t < tasks; ++t) {
        const i64 jn = t / b_tiles, ib = t % b_tiles;
        const i64 n0 = jn * nt_cols;
        auto tile = make(ib * RB);
        with_width<NV, W>((int)std::min<i64>(NV, (N - n0 + W - 1) / W), n0, tile);
    }
}

// Backward passes split the coordinates (vectors of W, "chunks") statically
// over threads and walk the rows in blocks of row_block(): a block's
// per-pair inputs (g and 1 / y, row_bytes per row) stay in L2 while each of
// the thread's chunks passes over them.  Every block's loop has the same
// bounds and a static schedule, so a thread keeps the same chunks from
// block to block and needs no barrier between them (nowait).
static inline i64 row_block(i64 row_bytes, int rb) {
    const i64 budget = 256 * 1024;
    return std::max<i64>(rb, budget / std::max<i64>(row_bytes, 1) / rb * rb);
}

// The backward task loop over f (f.B rows, f.N neurons, f.Dp padded coordinates, f.gw (N, Dp) or
// null): f.rows<RB>(b0, c, gwc) (then f.rows<1> for a block's last rows) for every row block and every
// chunk c, gwc being gw's column block at c.  Without gw (grad_w not wanted) each thread accumulates
// into a scratch column block of its own.
template <int RB, typename F> static void backward_chunks(const F& f, i64 row_bytes, int nthreads) {
    typedef typename std::remove_pointer<decltype(f.gw)>::type T;
    constexpr int W = F::W;
    const i64 chunks = f.Dp / W, block = row_block(row_bytes, RB);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && chunks > 1)
    {
        std::vector<T> scratch(f.gw == nullptr ? (size_t)(f.N * f.Dp) : 0);
        for (i64 r0 = 0; r0 < f.B; r0 += block) {
            const i64 r1 = std::min(f.B, r0 + block);
#pragma omp for schedule(static) nowait
            for (i64 ch = 0; ch < chunks; ++ch) {
                const i64 c = ch * W;
                T* gwc = (f.gw != nullptr ? f.gw : scratch.data()) + c;
                i64 b0 = r0;
                for (; b0 + RB <= r1; b0 += RB) f.template rows<RB>(b0, c, gwc);
                for (; b0 < r1; ++b0) f.template rows<1>(b0, c, gwc);
            }
        }
    }
}

}  // namespace lp
