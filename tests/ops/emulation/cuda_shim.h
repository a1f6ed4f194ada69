// A tiny CUDA execution model in C++20, enough to run linf_plugin's kernels
// (linf_plugin/ops/kernels/*.cu) on the CPU for testing.
//
// Two ways to run a block's threads (emu_configure selects, per process):
//   * threads (mode 3): each thread is a real std::thread with its own
//     threadIdx/blockIdx (thread_local), interleaving freely between
//     barriers; __syncthreads() is a std::barrier over the block's threads.
//     This is the mode the sanitizer builds run (ThreadSanitizer sees the
//     real interleavings; tests/ops/test_sanitizers.py);
//   * fibers (modes 0-2, the fast default): each thread is a ucontext fiber
//     on one OS thread; __syncthreads() switches back to a scheduler that
//     runs every thread up to the barrier, then starts the next phase.  The
//     order of threads within each phase is ascending (0), descending (1) or
//     freshly shuffled per phase from a seed (2), so a kernel whose result
//     depends on the order of threads between two barriers (a shared-memory
//     race) shows up as a difference between schedules.
// Blocks run one after another, in ascending (0), descending (1) or shuffled
// (2, 3; from the seed) order of their index, so atomics from different
// blocks arrive in a different order per schedule and seed, as they do on a
// GPU.  __shared__ variables become function-static storage (one copy,
// reused by the next block) which is POISONED before every block: filled
// with 0xFF bytes (a NaN in float and double, -1 in int) unless
// emu_configure_poison says otherwise, so a read of shared memory that the
// block has not written gives NaN or garbage instead of a zero or a value
// left by the previous block.  The library learns where each kernel's
// shared variables are from its symbol table (harness.py registers them
// with emu_add_shared after loading).  A launch fails when the threads of a
// block pass different numbers of barriers (undefined behaviour on a GPU);
// atomicAdd is std::atomic_ref::fetch_add; __syncthreads_or is a barrier
// that also ORs the threads' predicates.
// Arithmetic is the host's IEEE arithmetic (SSE2, round to nearest, no
// flush-to-zero, no contraction: harness.py compiles with
// -ffp-contract=off), as the kernels' own (NVRTC with --fmad=false: every
// fused multiply-add is an explicit fma, which the C library computes
// correctly rounded).  So +, -, *, /, sqrt and fma round exactly as on the
// GPU; the math functions (exp2f, log2f, ...) are the C library's, which
// may differ from CUDA's in the last ulp.
// Not modelled: warps and warp-synchronous code (the kernels use none), the
// GPU memory model beyond barriers, blocks running at the same time, bank
// conflicts, timing, register and shared-memory limits (the NVRTC test
// checks those).
// The hardware approximations the kernels reach through inline PTX
// (lg2.approx, ex2.approx; common.cuh wraps them as lp_lg2_approx and
// lp_ex2_approx) are emulated PESSIMISTICALLY: the exact result (in double)
// moved by the documented maximum error, always in the same direction
// (emu_configure_approx(+1 or -1); 0 gives the exact result), so errors
// cannot cancel across the terms of a sum and an accuracy test bounds the
// worst case.  max.NaN.f32 (lp_max_nan_f32_insn) follows the PTX ISA: the
// canonical NaN when either operand is NaN, +0.0 above -0.0.
// LP_EMULATED_ARCH (default 900) stands for __CUDA_ARCH__: 750 takes the
// sm_75 code paths of common.cuh.
#pragma once

#include <float.h>
#include <math.h>
#include <string.h>
#include <algorithm>

#include <ucontext.h>

#include <atomic>
#include <barrier>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifndef LP_EMULATED_ARCH
#define LP_EMULATED_ARCH 900
#endif

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace emu {
inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline thread_local unsigned long syncs = 0;
inline dim3 block_dim;
inline dim3 grid_dim;

inline int mode = 2;
inline unsigned long long seed = 0x9E3779B97F4A7C15ull;

inline unsigned long long next_random() {
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return seed;
}

// ---- shared memory: where each kernel's __shared__ variables live, and their poisoning
struct Region {
    std::string kernel;
    unsigned char* data;
    size_t size;
};
inline std::vector<Region> shared_regions;
inline int poison_byte = 0xFF;   // -1: leave shared memory as the previous block left it

// The regions of kernel `name` (every registered region when name is null).
inline std::vector<Region> regions_of(const char* name) {
    std::vector<Region> out;
    for (const Region& r : shared_regions)
        if (name == nullptr || r.kernel == name) out.push_back(r);
    return out;
}

inline void poison(const std::vector<Region>& regions) {
    if (poison_byte < 0) return;
    for (const Region& r : regions) memset(r.data, poison_byte, r.size);
}

// The blocks of a grid in the order the schedule runs them.
inline std::vector<dim3> block_order(dim3 grid) {
    std::vector<dim3> order;
    order.reserve((size_t)grid.x * grid.y * grid.z);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) order.push_back(dim3(bx, by, bz));
    if (mode == 1) std::reverse(order.begin(), order.end());
    if (mode >= 2)
        for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
    return order;
}

// ---- fibers
struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    dim3 tid;
    unsigned long syncs = 0;
    bool done = false;
};
inline ucontext_t scheduler;
inline Fiber* current = nullptr;
inline std::function<void()>* fiber_body = nullptr;
inline int fiber_or_acc = 0;      // __syncthreads_or: the predicates of the phase in progress ...
inline int fiber_or_result = 0;   // ... and the OR of the phase that ended last
constexpr size_t kStack = 1 << 16;

inline void fiber_entry() {
    (*fiber_body)();
    current->done = true;  // returning resumes the scheduler (uc_link)
}

template <class F>
int launch_fibers(dim3 grid, dim3 block, F& body, const std::vector<Region>& regions) {
    const unsigned nt = block.x * block.y * block.z;
    std::function<void()> fn = [&] { body(); };
    fiber_body = &fn;
    std::vector<Fiber> fibers(nt);
    for (auto& f : fibers) f.stack.reset(new char[kStack]);
    std::vector<unsigned> order(nt);
    int error = 0;
    for (const dim3& b : block_order(grid)) {
        block_idx = b;
        poison(regions);
        fiber_or_acc = fiber_or_result = 0;
        for (unsigned t = 0; t < nt; ++t) {
            Fiber& f = fibers[t];
            f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            f.syncs = 0;
            f.done = false;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.get();
            f.ctx.uc_stack.ss_size = kStack;
            f.ctx.uc_link = &scheduler;
            makecontext(&f.ctx, fiber_entry, 0);
        }
        for (;;) {  // one barrier phase per round
            std::iota(order.begin(), order.end(), 0u);
            if (mode == 1) std::reverse(order.begin(), order.end());
            if (mode == 2)
                for (unsigned i = nt; i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
            unsigned done = 0;
            for (unsigned t : order) {
                Fiber& f = fibers[t];
                if (f.done) {
                    ++done;
                    continue;
                }
                current = &f;
                thread_idx = f.tid;
                swapcontext(&scheduler, &f.ctx);
                done += f.done;
            }
            fiber_or_result = fiber_or_acc;   // every thread has reached the barrier (or the end)
            fiber_or_acc = 0;
            if (done == nt) break;
            if (done != 0) error = 1;  // some threads finished while others wait at a barrier
        }
        for (unsigned t = 1; t < nt; ++t)
            if (fibers[t].syncs != fibers[0].syncs) error = 1;
    }
    fiber_body = nullptr;
    current = nullptr;
    return error;
}

// ---- real threads
// A pool of OS threads per block size, started on first use and kept for the process (blocked in a barrier
// between launches; never joined): starting 256 threads per launch would dominate the sanitizer runs.
struct OrCompletion {   // runs once per barrier phase, after the last thread arrives and before any leaves
    std::atomic<int>* acc;
    int* result;
    void operator()() noexcept { *result = acc->exchange(0); }
};
using Barrier = std::barrier<OrCompletion>;
inline Barrier* barrier = nullptr;
inline std::atomic<int> thread_or_acc{0};
inline int thread_or_result = 0;

struct Pool {
    unsigned nt;
    Barrier blocks;                 // __syncthreads among the nt workers
    std::barrier<> gate;            // the launching thread and the workers: start and end of a launch
    std::function<void(unsigned)> job;
    explicit Pool(unsigned n) : nt(n), blocks(n, OrCompletion{&thread_or_acc, &thread_or_result}), gate(n + 1) {
        for (unsigned t = 0; t < n; ++t) {
            std::thread([this, t] {
                for (;;) {
                    gate.arrive_and_wait();   // a launch begins
                    job(t);
                    gate.arrive_and_wait();   // it is done
                }
            }).detach();
        }
    }
};

inline Pool& pool_of(unsigned nt) {
    static std::vector<Pool*> pools;   // leaked on purpose: the workers outlive static destruction
    for (Pool* p : pools)
        if (p->nt == nt) return *p;
    pools.push_back(new Pool(nt));
    return *pools.back();
}

template <class F>
int launch_threads(dim3 grid, dim3 block, F& body, const std::vector<Region>& regions) {
    const unsigned nt = block.x * block.y * block.z;
    const std::vector<dim3> order = block_order(grid);
    Pool& pool = pool_of(nt);
    thread_or_acc = 0;
    barrier = &pool.blocks;
    std::vector<unsigned long> counts(nt);
    std::atomic<int> error{0};
    poison(regions);   // before the gate: ordered before the first block
    pool.job = [&](unsigned t) {
        thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        for (const dim3& b : order) {
            block_idx = b;
            syncs = 0;
            body();
            counts[t] = syncs;
            pool.blocks.arrive_and_wait();  // the block is done; its shared memory may be reused
            if (t == 0) {
                for (unsigned s = 1; s < nt; ++s)
                    if (counts[s] != counts[0]) error = 1;
                poison(regions);
            }
            pool.blocks.arrive_and_wait();
        }
    };
    pool.gate.arrive_and_wait();
    pool.gate.arrive_and_wait();
    barrier = nullptr;
    return error.load();
}

// Runs body() as every thread of every block of the grid; `kernel` names the
// kernel whose shared variables are poisoned before each block (null: all
// registered ones).  Returns 0, or 1 when the threads of some block passed
// different numbers of barriers.
template <class F>
int launch(dim3 grid, dim3 block, F body, const char* kernel = nullptr) {
    block_dim = block;
    grid_dim = grid;
    const std::vector<Region> regions = regions_of(kernel);
    return mode == 3 ? launch_threads(grid, block, body, regions) : launch_fibers(grid, block, body, regions);
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

inline void __syncthreads() {
    if (emu::mode == 3) {
        ++emu::syncs;
        emu::barrier->arrive_and_wait();
    } else {
        ++emu::current->syncs;
        swapcontext(&emu::current->ctx, &emu::scheduler);
    }
}

// A barrier that returns nonzero when the predicate is nonzero for any thread of the block.
inline int __syncthreads_or(int predicate) {
    if (emu::mode == 3) {
        if (predicate) emu::thread_or_acc.fetch_or(1);
        ++emu::syncs;
        emu::barrier->arrive_and_wait();
        return emu::thread_or_result;
    }
    if (predicate) emu::fiber_or_acc = 1;
    ++emu::current->syncs;
    swapcontext(&emu::current->ctx, &emu::scheduler);
    return emu::fiber_or_result;
}

// mode: 0 fibers ascending, 1 fibers descending, 2 fibers shuffled (seeded), 3 std::threads (blocks shuffled).
extern "C" void emu_configure(int mode, unsigned long long seed) {
    emu::mode = mode;
    emu::seed = seed ? seed : 0x9E3779B97F4A7C15ull;
}

// byte: the value every byte of shared memory gets before each block (0-255), or -1 for none (shared
// memory then keeps what the previous block left, zeros at first).
extern "C" void emu_configure_poison(int byte) { emu::poison_byte = byte; }

// The __shared__ variable at data (size bytes) belongs to kernel (its name expression, e.g.
// "lp_forward<float, 8, 4, 4, false>").
extern "C" void emu_add_shared(const char* kernel, void* data, size_t size) {
    emu::shared_regions.push_back(emu::Region{kernel, static_cast<unsigned char*>(data), size});
}

extern "C" size_t emu_shared_count() { return emu::shared_regions.size(); }

template <class T>
inline T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}

// ---- bit casts and the approximate intrinsics (see the header comment)
#define LP_EMULATED_INTRINSICS 1

namespace emu {
inline int approx_sign = 1;
}  // namespace emu

// sign: +1 or -1 moves every approximation by +/- its maximum error, 0 makes it exact.
extern "C" void emu_configure_approx(int sign) { emu::approx_sign = sign; }

inline float __int_as_float(int v) {
    float f;
    memcpy(&f, &v, sizeof f);
    return f;
}

inline int __float_as_int(float v) {
    int i;
    memcpy(&i, &v, sizeof i);
    return i;
}

inline double __longlong_as_double(long long v) {
    double d;
    memcpy(&d, &v, sizeof d);
    return d;
}

inline long long __double_as_longlong(double v) {
    long long i;
    memcpy(&i, &v, sizeof i);
    return i;
}

inline float emu_ulp(float v) {
    v = fabsf(v);
    return nextafterf(v, INFINITY) - v;
}

// lg2.approx.ftz.f32: absolute error <= 2^-22 for inputs in [0.5, 2], else <= 2 ulp of the result
// (CUDA Programming Guide, __log2f); denormal inputs flush to zero.
inline float lp_lg2_approx(float v) {
    if (v != 0.0f && fabsf(v) < FLT_MIN) v = 0.0f;
    const double exact = log2((double)v);
    if (!isfinite(exact)) return (float)exact;
    const double bound = (v >= 0.5f && v <= 2.0f) ? ldexp(1.0, -22) : 2.0 * emu_ulp((float)exact);
    return (float)(exact + emu::approx_sign * bound);
}

// ex2.approx.ftz.f32: relative error <= 2 ulp (2^-22); denormal results flush to zero.
inline float lp_ex2_approx(float z) {
    const double exact = exp2((double)z);
    if (!isfinite(exact) || exact == 0.0) return (float)exact;
    const float r = (float)(exact * (1.0 + emu::approx_sign * ldexp(1.0, -22)));
    return fabsf(r) < FLT_MIN ? 0.0f : r;
}

// max.NaN.f32 as the PTX ISA specifies it: the canonical NaN (0x7fffffff) when either operand is NaN;
// otherwise the larger operand, with +0.0 above -0.0.  Written independently of common.cuh's
// comparison-and-select version (lp_max_nan_portable), which the tests compare with this one.
inline float lp_max_nan_f32_insn(float a, float b) {
    if (isnan(a) || isnan(b)) return __int_as_float(0x7fffffff);
    if (a == 0.0f && b == 0.0f) return signbit(a) && signbit(b) ? -0.0f : 0.0f;
    return std::max(a, b);
}
