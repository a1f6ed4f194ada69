"""CuPy kernels on a real GPU against a float64 reference and the PyTorch path (skipped without CUDA).

Accuracy (see ``lp_accuracy.py`` for the tolerance and where it comes from):
each backend's outputs and gradients are compared with the float64 torch
path on the same inputs, by relative norm error, within
``eps * (p + sqrt(max(B, N, D)))``; and the CuPy path must be no less
accurate than the torch path (``err_cupy <= 2 err_torch + 16 eps``).  Two
float32 paths are never compared element-wise at finite p: both round, more
so as p grows.

Exact: p = inf forward values and argmax are bit-identical to the torch path (the max of the
same IEEE differences, ties to the lowest index: subtractions and maxima, nothing a compiler could fuse
into a multiply-add), and so are the linf_box_argmax coordinates.  Between our own kernels, which NVRTC
compiles with --fmad=false (every fused multiply-add explicit in the source), the equalities the CPU
emulation asserts hold on the GPU too and are checked here: the raw sum and the normalising forward, the
fused and the single-gradient grad_x; and the sm_75 fallbacks give the NaN-keeping max instruction's bits.
The same accuracy checks run on the CPU through the emulated launcher (test_cupy_launcher.py).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from .lp_accuracy import check_accuracy, interval_outputs, lp_outputs
from .model_step import FAMILY_MODELS, assert_same_step, build, train_step

from linf_plugin.ops import lp_dist
from linf_plugin.ops.lp_dist import LpDistIntervalFunction

pytestmark = pytest.mark.gpu
INF = math.inf
PS = (1.0, 2.0, 8.0, 8.5, 100.0, 1000.0, INF)
SHAPES = [(1, 7, 5), (9, 1, 33), (17, 23, 1), (130, 70, 41), (37, 5120, 67), (64, 96, 3072)]


@pytest.fixture(scope="module", autouse=True)
def _cupy():
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _tol(dtype):
    """p = inf gradients: sums of a few +-g in atomicAdd order."""
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def _inputs(B, N, D, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-3, 4, (B, D), generator=g).to(dtype)
        w = torch.randint(-3, 4, (N, D), generator=g).to(dtype)
    else:
        x, w = torch.randn(B, D, generator=g, dtype=dtype), torch.randn(N, D, generator=g, dtype=dtype)
    return x.cuda().requires_grad_(), w.cuda().requires_grad_(), torch.randn(B, N, generator=g, dtype=dtype).cuda()


def _run(x, w, g, p, backend):
    x.grad = w.grad = None
    y = lp_dist(x, w, p, backend=backend)
    y.backward(g)
    return y.detach(), x.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_cupy_and_torch_paths_against_float64(shape, p, dtype):
    x, w, g = _inputs(*shape, dtype, seed=sum(shape))
    check_accuracy(lp_outputs, (x, w, g), p, max(shape), candidate="cupy")
    if math.isinf(p):
        y_c, _, _ = _run(x, w, g, p, "cupy")
        y_t, _, _ = _run(x, w, g, p, "torch")
        assert torch.equal(y_c, y_t), "p = inf forward must be bit-identical"


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_ties_pick_the_same_subgradient(dtype):
    x, w, g = _inputs(70, 130, 50, dtype, seed=1, ties=True)
    y_c, gx_c, gw_c = _run(x, w, g, INF, "cupy")
    y_t, gx_t, gw_t = _run(x, w, g, INF, "torch")
    assert torch.equal(y_c, y_t)
    torch.testing.assert_close(gx_c, gx_t, **_tol(dtype))
    torch.testing.assert_close(gw_c, gw_t, **_tol(dtype))


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_interval_against_float64(p, dtype):
    g = torch.Generator().manual_seed(3)
    B, N, D = 70, 133, 65
    c = torch.randn(B, D, generator=g, dtype=dtype).cuda()
    r = torch.rand(B, D, generator=g, dtype=dtype).cuda()
    w = torch.randn(N, D, generator=g, dtype=dtype).cuda()
    check_accuracy(interval_outputs, (c - r, c + r, w), p, max(B, N, D), candidate="cupy")
    if math.isinf(p):                       # lo and hi at p = inf: bit-identical
        got, want = interval_outputs(c - r, c + r, w, p, "cupy"), interval_outputs(c - r, c + r, w, p, "torch")
        assert torch.equal(got["lo"], want["lo"]) and torch.equal(got["hi"], want["hi"])


@pytest.mark.parametrize("scale", (1e-30, 3e-6, 1.0, 1e6, 1e30, "mixed"))
@pytest.mark.parametrize("p", (2.0, 8.0))
def test_raw_sum_and_its_fallback_at_any_scale(p, scale):
    """p = 2, 8: the raw sum where it is safe, the normalising kernel on the blocks where it under- or
    overflows ("mixed": rows at scales 1e-30 to 1e30 next to ordinary ones): every value within 1e-6 of
    float64 (the CPU twin, with the block flags checked, is in test_cupy_launcher.py)."""
    g = torch.Generator().manual_seed(8)
    B, N, D = 200, 300, 67
    if scale == "mixed":
        sx = torch.tensor([1e-30, 3e-6, 1.0, 1e6, 1e30], dtype=torch.float64)[torch.randint(0, 5, (B,), generator=g)]
        sw = torch.tensor([1e-30, 3e-6, 1.0, 1e6, 1e30], dtype=torch.float64)[torch.randint(0, 5, (N,), generator=g)]
        sx[100:], sw[150:] = 1.0, 1.0
    else:
        sx, sw = torch.full((B,), scale, dtype=torch.float64), torch.full((N,), scale, dtype=torch.float64)
    x = (torch.randn(B, D, generator=g, dtype=torch.float64) * sx[:, None]).float().cuda()
    w = (torch.randn(N, D, generator=g, dtype=torch.float64) * sw[:, None]).float().cuda()
    y = lp_dist(x, w, p, backend="cupy")
    y_ref = lp_dist(x.double(), w.double(), p, backend="torch")
    assert torch.isfinite(y).all() and (y > 0).all()
    assert ((y.double() - y_ref).abs() / y_ref).max().item() <= 1e-6


def test_no_host_synchronisation_in_forward_and_backward():
    x, w, g = _inputs(256, 512, 300, torch.float32, seed=2)
    for p in (INF, 8.0, 8.5):
        _run(x, w, g, p, "cupy")                       # compile and load the modules first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in (INF, 8.0, 8.5):
            y = lp_dist(x, w, p, backend="cupy")
            y.backward(g)
            lo, hi = LpDistIntervalFunction.apply(x.detach() - 0.1, x.detach() + 0.1, w, p, "cupy")
            hi.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_runs_on_the_current_stream():
    x, w, g = _inputs(128, 256, 200, torch.float32, seed=4)
    ref = lp_dist(x, w, backend="torch").detach()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = lp_dist(x, w, backend="cupy")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(y.detach(), ref)


def test_auto_picks_cupy_for_cuda_tensors():
    from linf_plugin.ops import resolve_backend

    assert resolve_backend(None, torch.zeros(1, device="cuda")) == "cupy"


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_linf_box_argmax_on_cuda_runs_the_kernel_and_matches_cpu(dtype, caplog):
    # The p = inf CROWN relaxation's coordinates: the CuPy kernel on CUDA (no torch.compile, no warning).
    from linf_plugin.ops import linf_box_argmax

    for ties in (False, True):
        x, w, _ = _inputs(37, 5120, 67, dtype, seed=11, ties=ties)
        x, w = x.detach(), w.detach()
        lower, upper = x - 0.5, x + 0.5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = linf_box_argmax(lower, upper, w)
        assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
        want = linf_box_argmax(lower.cpu(), upper.cpu(), w.cpu())
        for a, b in zip(got, want):
            assert a.is_cuda and a.dtype == torch.int64 and torch.equal(a.cpu(), b)


@pytest.mark.parametrize("p", (8.0, INF), ids=("p8", "pinf"))
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_every_registered_model_trains_on_cuda_at_full_width(name, p):
    """The registered architecture as is (5120-wide included), one step on each backend."""
    from linf_plugin.ops import use_backend
    from linf_plugin.ops.lp_dist import get_backend

    model = build(name, input_shape=(3, 32, 32), small=False, device="cuda")
    twin = copy.deepcopy(model)
    got = train_step(model, p, batch=8)                 # auto: the CuPy backend on CUDA
    with use_backend(get_backend("torch"), "cuda"):
        want = train_step(twin, p, batch=8)
    assert_same_step(got, want, rtol=1e-3, atol=1e-4)


# -- what the CPU emulation claims, on the hardware --------------------------------------------------------
# The NaN-keeping maxima, instruction against the sm_75 fallbacks, on the GPU itself (test_nvrtc.py compiles
# this source on the CPU).  Outputs: general (lp_max_nan_f32_insn, lp_max_nan_portable), non-negative operands
# (the instruction, lp_max_nonneg_int), clamps (the instruction, lp_clamp_below_select).
MAXIMA_SOURCE = """
extern "C" __global__ void maxima(const float* a, const float* b, int n, float* out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[6 * i + 0] = lp_max_nan_f32_insn(a[i], b[i]);
    out[6 * i + 1] = lp_max_nan_portable(a[i], b[i]);
    out[6 * i + 2] = lp_max_nan_f32_insn(a[i], b[i]);
    out[6 * i + 3] = lp_max_nonneg_int(a[i], b[i]);
    out[6 * i + 4] = lp_max_nan_f32_insn(a[i], b[i]);
    out[6 * i + 5] = lp_clamp_below_select(a[i], b[i]);
}
"""
SPECIAL_BITS = (0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x00800000, 0x3F800000, 0xBF800000, 0x40200000,
                0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001)


def test_the_sm75_maxima_give_the_instructions_bits_on_the_gpu():
    """max.NaN.f32 itself (canonical NaN 0x7fffffff for any NaN operand, +0.0 above -0.0) against the portable
    max on every pair of special values; against the integer max on non-negative operands and the canonical
    NaN; against the compare-and-select clamp for bounds other than NaN and +-0.0 (NaN for NaN)."""
    import cupy
    import numpy

    from linf_plugin.ops.kernel_specs import NVRTC_OPTIONS, full_source

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the instruction max.NaN.f32 needs compute capability 8.0")
    module = cupy.RawModule(code=full_source(()) + MAXIMA_SOURCE, options=NVRTC_OPTIONS)
    bits = numpy.array(SPECIAL_BITS, dtype=numpy.uint32)
    a = numpy.repeat(bits, len(bits)).view(numpy.float32)
    b = numpy.tile(bits, len(bits)).view(numpy.float32)
    out = cupy.empty(6 * a.size, dtype=cupy.float32)
    module.get_function("maxima")((1,), (a.size,), (cupy.asarray(a), cupy.asarray(b), numpy.int32(a.size), out))
    got = cupy.asnumpy(out).reshape(-1, 6).view(numpy.uint32)
    assert (got[:, 0] == got[:, 1]).all()
    assert (got[numpy.isnan(a) | numpy.isnan(b), 0] == 0x7FFFFFFF).all()
    nonneg = (((a >= 0) & ~numpy.signbit(a)) | (a.view(numpy.uint32) == 0x7FFFFFFF)) & \
             (((b >= 0) & ~numpy.signbit(b)) | (b.view(numpy.uint32) == 0x7FFFFFFF))
    assert (got[nonneg, 2] == got[nonneg, 3]).all()
    bounded = ~numpy.isnan(b) & (b != 0)
    as_float = got.view(numpy.float32)
    assert (numpy.isnan(as_float[bounded, 4]) == numpy.isnan(as_float[bounded, 5])).all()
    number = bounded & ~numpy.isnan(as_float[:, 4])
    assert (got[number, 4] == got[number, 5]).all()


@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 8.5, 100.0, INF))
def test_nan_inputs_give_nan_where_the_oracle_has_them(p):
    """A NaN in x[b] or w[n] makes y[b, n] NaN (the kernels' maxima keep it; at general p the running maximum
    carries it past the polynomial exp2, which would turn it into a finite value), and the gradients are NaN
    exactly where the float64 oracle's are (fused and single-gradient kernels alike)."""
    from .oracles import lp_grad_oracle

    g = torch.Generator().manual_seed(5)
    x, w, gy = torch.randn(70, 40, generator=g), torch.randn(20, 40, generator=g), torch.randn(70, 20, generator=g)
    x[66, 37] = float("nan")
    w[3, 2] = float("nan")
    bad = torch.zeros(70, 20, dtype=torch.bool)
    bad[66, :] = True
    bad[:, 3] = True
    xc, wc, gc = x.cuda(), w.cuda(), gy.cuda()
    y = lp_dist(xc, wc, p, backend="cupy").cpu()
    assert torch.isnan(y[bad]).all() and not torch.isnan(y[~bad]).any()
    if not math.isinf(p):
        want = lp_grad_oracle(gy, x, w, p)
        for need in (("x", "w"), ("x",), ("w",)):
            got = lp_outputs(xc, wc, gc, p, "cupy", need=need)
            for name, ref in zip(("grad_x", "grad_w"), want):
                if name in got:
                    assert torch.equal(got[name].cpu().isnan(), ref.isnan()), (need, name)


@pytest.mark.parametrize("p", (2.0, 8.0))
def test_the_raw_sum_is_the_normalising_forward_bit_for_bit(p):
    """Where no block needs its fixup, the raw sum is the result; the normalising kernel alone (a null flag
    buffer) gives the same bits: the same products, fused multiply-adds and roots, scaled by exact powers of 2."""
    from linf_plugin.ops.kernel_specs import grid_for, module_spec
    from linf_plugin.ops.lp_dist import get_backend

    backend = get_backend("cupy")
    x, w, _ = _inputs(200, 300, 67, torch.float32, seed=12)
    x, w = x.detach(), w.detach()
    y, _ = backend.forward(x, w, p, need_aux=False)
    spec = module_spec("lp", "float", int(p))
    kernel = spec.kernels["forward"]
    y_norm = torch.full_like(y, -1.0)
    backend.launcher(spec, kernel, grid_for(kernel, 200, 300), (x, w, y_norm, None, 200, 300, 67, p))
    torch.cuda.synchronize()
    assert torch.equal(y, y_norm)


@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 300.0))
def test_fused_and_single_gradient_grad_x_are_equal_bit_for_bit(p):
    """One share of n (N < 1024): the fused kernel's grad_x sums the single-gradient kernel's terms in the same
    order with the same operations (the fast general p splits its exp2 otherwise, so 8.5 is not here)."""
    from linf_plugin.ops.lp_dist import get_backend

    backend = get_backend("cupy")
    x, w, g = _inputs(130, 300, 67, torch.float32, seed=13)
    x, w = x.detach(), w.detach()
    y, aux = backend.forward(x, w, p)
    gx, _ = backend.backward(g, x, w, y, aux, p)
    gx1, _ = backend.backward(g, x, w, y, aux, p, need_w=False)
    assert torch.equal(gx, gx1)


@pytest.mark.parametrize("p", (8.0, INF))
def test_deterministic_algorithms_give_the_same_gradients_twice(p):
    """Under torch.use_deterministic_algorithms(True) no atomics run (p = inf: lp_scatter_rows; finite p: the
    single-gradient kernels), so two backward passes agree bit for bit, lp_dist_interval's included."""
    x, w, g = _inputs(300, 700, 67, torch.float32, seed=14)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            y, gx, gw = _run(x, w, g, p, "cupy")
            lower = (x.detach() - 0.1).requires_grad_()
            w2 = w.detach().clone().requires_grad_()
            lo, hi = LpDistIntervalFunction.apply(lower, lower.detach() + 0.2, w2, p, "cupy")
            (lo * g + hi * g).sum().backward()
            runs.append((gx, gw, lower.grad, w2.grad))
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
