"""The CUDA kernels, run on the CPU emulator, against the plain reference.

``emu_backend`` is the real :class:`CupyBackend` (its buffers, kernel order
and launch grids) with a launcher that executes the very ``.cu`` sources the
GPU gets, compiled by g++ under ``tests/ops/emulation/cuda_shim.h``.  See
that header and ``emulation/harness.py`` for what this does and does not
prove (no timing, no GPU memory model beyond barriers, no CUDA math ulps).

Shapes are chosen off the tile sizes (64/128 rows, 16-deep tiles) and
include 1s, so partial tiles, several blocks per grid dimension and the
zero padding are all exercised.
"""
from __future__ import annotations

import math

import pytest
import torch

from .lp_accuracy import rel_err, rel_tol
from .oracles import lp_grad_oracle

from linf_plugin.ops.kernel_specs import all_module_specs, full_source, fused_n_splits
from linf_plugin.ops.reference import ReferenceBackend

REF = ReferenceBackend()
PS = (1.0, 2.0, 8.0, 8.5, math.inf)
DTYPES = (torch.float32, torch.float64)


def _tol(dtype, p):
    """Finite p in float32 sums D terms in a different order (and through exp2/log2 for general p)."""
    if math.isinf(p):
        return dict(rtol=0, atol=0)
    return dict(rtol=3e-5, atol=3e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)


def _gtol(dtype):
    return dict(rtol=5e-5, atol=5e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def _problem(B, N, D, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:   # small integers: many equal |x - w| within a row, and equal box ends
        x = torch.randint(-3, 4, (B, D), generator=g).to(dtype)
        w = torch.randint(-3, 4, (N, D), generator=g).to(dtype)
        r = torch.randint(0, 3, (B, D), generator=g).to(dtype)
    else:
        x = torch.randn(B, D, generator=g, dtype=dtype)
        w = torch.randn(N, D, generator=g, dtype=dtype)
        r = torch.rand(B, D, generator=g, dtype=dtype)
    lower, upper = x - r, x + torch.rand(B, D, generator=g, dtype=dtype) * (0 if ties else 1) + r
    grad = torch.randn(B, N, generator=g, dtype=dtype)
    return x, w, lower, upper, grad


def _check_all(backend, B, N, D, dtype, p, seed=0, ties=False):
    x, w, lower, upper, g = _problem(B, N, D, dtype, seed, ties)
    tol, gtol = _tol(dtype, p), _gtol(dtype)

    y, aux = backend.forward(x, w, p)
    y_ref, aux_ref = REF.forward(x, w, p)
    torch.testing.assert_close(y, y_ref, **tol)
    if math.isinf(p):
        assert aux.dtype == torch.int32 and torch.equal(aux.long(), aux_ref), "argmax must be the lowest index"
    gx, gw = backend.backward(g, x, w, y, aux, p)
    gx_ref, gw_ref = REF.backward(g, x, w, y_ref, aux_ref, p)
    torch.testing.assert_close(gx, gx_ref, **gtol)
    torch.testing.assert_close(gw, gw_ref, **gtol)

    lo, hi, iaux = backend.interval_forward(lower, upper, w, p)
    lo_ref, hi_ref, iaux_ref = REF.interval_forward(lower, upper, w, p)
    torch.testing.assert_close(lo, lo_ref, **tol)
    torch.testing.assert_close(hi, hi_ref, **tol)
    if math.isinf(p):
        assert torch.equal(iaux.long(), iaux_ref)
    g_lo, g_hi = g, torch.randn_like(g)
    got = backend.interval_backward(g_lo, g_hi, lower, upper, w, lo, hi, iaux, p)
    want = REF.interval_backward(g_lo, g_hi, lower, upper, w, lo_ref, hi_ref, iaux_ref, p)
    for name, a, b in zip(("lower", "upper", "w"), got, want):
        torch.testing.assert_close(a, b, **gtol, msg=lambda m, n=name: f"interval grad {n}: {m}")


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_kernel_matches_reference(emu_backend, dtype, p):
    # 37 rows, 70 neurons, 41 features: partial tiles everywhere, 3 D-tiles, 5 c-tiles.
    _check_all(emu_backend, 37, 70, 41, dtype, p)


@pytest.mark.parametrize("shape", [(1, 5, 3), (4, 1, 7), (3, 4, 1), (1, 1, 1), (130, 70, 17), (9, 133, 65)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", (8.5, math.inf))
def test_odd_shapes(emu_backend, shape, p):
    # 130 rows and 133 neurons cross the 128-wide tiles; 65 features crosses the 64-wide ones.
    _check_all(emu_backend, *shape, torch.float32, p, seed=sum(shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_lowest_index(emu_backend, dtype):
    # Integer data: most rows tie between several coordinates, across D-tiles (D = 50 > 3 tiles).
    _check_all(emu_backend, 21, 35, 50, dtype, math.inf, seed=3, ties=True)
    x = torch.zeros(3, 40, dtype=dtype)
    w = torch.zeros(2, 40, dtype=dtype)
    x[:, 5] = x[:, 17] = x[:, 33] = 2.0          # three exact ties in three different D-tiles
    w[1, 17] = w[1, 33] = -1.0                   # row 1: the later ties grow, the first stays
    y, aux = emu_backend.forward(x, w, math.inf)
    assert torch.equal(y, torch.tensor([[2.0, 3.0]] * 3, dtype=dtype))
    assert aux.tolist() == [[5, 17]] * 3


def test_identical_rows_have_zero_output_and_zero_gradient(emu_backend):
    x = torch.randn(5, 33)
    w = torch.cat([x[:2], torch.randn(3, 33)])
    for p in (1.0, 2.0, 8.0, 8.5, math.inf):
        y, aux = emu_backend.forward(x, w, p)
        assert y[0, 0] == 0 and y[1, 1] == 0
        gx, gw = emu_backend.backward(torch.ones(5, 5), x, w, y, aux, p)
        y_ref, aux_ref = REF.forward(x, w, p)
        gx_ref, gw_ref = REF.backward(torch.ones(5, 5), x, w, y_ref, aux_ref, p)
        torch.testing.assert_close(gx, gx_ref, rtol=5e-5, atol=5e-5)
        torch.testing.assert_close(gw, gw_ref, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("scale", (1e-30, 1.0, 1e30))
def test_large_p_neither_overflows_nor_underflows(emu_backend, scale):
    x = torch.randn(6, 40, dtype=torch.float32) * scale
    w = torch.randn(7, 40, dtype=torch.float32) * scale
    for p in (100.0, 1000.0):
        y, _ = emu_backend.forward(x, w, p)
        y_ref = REF.forward(x.double(), w.double(), p)[0].float()
        assert torch.isfinite(y).all() and (y > 0).all()
        torch.testing.assert_close(y, y_ref, rtol=3e-5, atol=0)


def test_need_aux_false_skips_the_argmax(emu_backend, harness, emulator_lib):
    launcher = harness.EmulatedLauncher(emulator_lib)
    backend = type(emu_backend)(launcher=launcher)
    x, w = torch.randn(9, 20), torch.randn(11, 20)
    y, aux = backend.forward(x, w, math.inf, need_aux=False)
    assert aux is None
    assert [name for name, _ in launcher.calls] == ["linf_forward<float, 8, 8, false>"]
    torch.testing.assert_close(y, REF.forward(x, w, math.inf)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("need_aux", (True, False))
def test_nan_rows_give_nan_outputs(emu_backend, dtype, need_aux):
    """The kernels' own maxima keep NaN (no NaN scan in the backend): a NaN anywhere in x[b] or w[n]
    makes y[b, n] NaN, also where it sits in a later D-tile than the maximum or next to zeros."""
    x, w = torch.randn(4, 40, dtype=dtype), torch.randn(6, 40, dtype=dtype)
    x[1, 37] = float("nan")          # third D-tile, after the maximum has been found
    w[2, 0] = float("nan")           # first coordinate
    x[3] = w[4] = 0.0
    w[4, 20] = float("nan")          # the only nonzero |x - w| of output (3, 4) is NaN
    bad = torch.zeros(4, 6, dtype=torch.bool)
    bad[1, :] = True
    bad[:, 2] = True
    bad[:, 4] = True
    for p in (1.0, 2.0, 8.0, 8.5, 100.0, math.inf):
        y, _ = emu_backend.forward(x, w, p, need_aux=need_aux)
        assert torch.isnan(y[bad]).all() and not torch.isnan(y[~bad]).any(), p


# -- the fused finite-p backward: both gradients from one kernel -------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 8.5, 300.0))    # 300: the accurate-power (float precise) instance
@pytest.mark.parametrize("shape", [(37, 70, 41), (130, 17, 65), (1, 1, 1), (65, 33, 129), (64, 16, 64), (3, 40, 2),
                                   (5, 1100, 7), (70, 1030, 3)],        # n split over 2 blocks: gx by atomics too
                         ids=lambda s: "x".join(map(str, s)))
def test_fused_backward_matches_float64(harness, emulator_lib, shape, p, dtype):
    """lp_backward_fused against the float64 oracle: ragged tiles (float 64 x 64 per block, 32 x 64 at p = 1
    and p > 128; double 16 x 64; 16-deep n-tiles; 130 and 65 rows cross batch blocks, so gw is summed by atomics from several
    blocks; N > 1024 splits n over blocks along z, so gx is too), outputs y = 0 (w[n] = x[b] exactly), and
    the single-gradient kernels' results."""
    from linf_plugin.ops.cupy_backend import CupyBackend

    launcher = harness.EmulatedLauncher(emulator_lib, "shuffled", seed=sum(shape))
    backend = CupyBackend(launcher=launcher)
    B, N, D = shape
    g = torch.Generator().manual_seed(sum(shape))
    x, w, gy = (torch.randn(*s, generator=g, dtype=dtype) for s in ((B, D), (N, D), (B, N)))
    w[N // 2] = x[B // 2]                                        # y[B // 2, N // 2] = 0: no gradient from it
    y, aux = backend.forward(x, w, p)
    assert y[B // 2, N // 2] == 0
    start = len(launcher.calls)
    gx, gw = backend.backward(gy, x, w, y, aux, p)
    (name, grid), = launcher.calls[start:]
    kernel = next(k for spec in all_module_specs() for k in spec.kernels.values() if k.name == name)
    rows, cols = kernel.tile
    splits = fused_n_splits(kernel, B, N, D)
    ctype = "float" if dtype == torch.float32 else "double"
    assert name.startswith(f"lp_backward_fused<{ctype},") and grid == (-(-D // cols), -(-B // rows), splits)
    assert cols == 64 and rows == (16 if ctype == "double" else 32 if p in (1.0, 300.0) else 64)
    assert (splits > 1) == (N > 1000)
    ox, ow = lp_grad_oracle(gy, x, w, p)
    tol = rel_tol(dtype, p, max(shape))
    assert rel_err(gx, ox) <= tol and rel_err(gw, ow) <= tol, (rel_err(gx, ox), rel_err(gw, ow), tol)
    gx1, _ = backend.backward(gy, x, w, y, aux, p, need_w=False)
    _, gw1 = backend.backward(gy, x, w, y, aux, p, need_x=False)
    if p != 8.5 and splits == 1:
        # the same terms summed over n in the same order, with the same explicit fma (NVRTC --fmad=false: the GPU
        # rounds as written, so this holds there too; 8.5 splits ex2.approx / polynomial by another index)
        assert torch.equal(gx, gx1)
    torch.testing.assert_close(gx, gx1, **_gtol(dtype))
    torch.testing.assert_close(gw, gw1, **_gtol(dtype))


def test_fused_backward_splits_n_only_when_the_grid_is_small():
    from linf_plugin.ops.kernel_specs import module_spec

    kernel = module_spec("lp", "float", 8).kernels["backward_fused"]
    assert fused_n_splits(kernel, 512, 5120, 5120) == 2      # the paper's layer: 640 blocks -> 1280
    assert fused_n_splits(kernel, 512, 5120, 3072) == 3      # its first layer: 384 blocks -> 1152
    assert fused_n_splits(kernel, 4096, 5120, 5120) == 1     # 6400 blocks already
    assert fused_n_splits(kernel, 8, 600, 64) == 1           # at least 512 n per share
    assert fused_n_splits(kernel, 8, 10 ** 6, 64) == 1024


@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 8.5, 100.0, 300.0))
def test_fused_backward_nan_as_the_single_gradient_kernels(emu_backend, p):
    """A NaN in x[b, i] (w[n, i]) makes y[b, :] (y[:, n]) NaN, so 1 / y is taken as 0 there, and only the terms
    with the NaN coordinate itself stay NaN: gx[b, i], gw[:, i] (gx[:, i], gw[n, i]).  The fused kernel
    gives the same pattern as the single-gradient kernels and the oracle, also for NaN in padding-adjacent
    tiles (B = 70: two batch blocks)."""
    g = torch.Generator().manual_seed(5)
    x, w, gy = torch.randn(70, 40, generator=g), torch.randn(20, 40, generator=g), torch.randn(70, 20, generator=g)
    x[66, 37] = float("nan")
    w[3, 2] = float("nan")
    y, aux = emu_backend.forward(x, w, p)
    gx, gw = emu_backend.backward(gy, x, w, y, aux, p)
    assert emu_backend.launcher.calls[-1][0].startswith("lp_backward_fused")
    gx1, _ = emu_backend.backward(gy, x, w, y, aux, p, need_w=False)
    _, gw1 = emu_backend.backward(gy, x, w, y, aux, p, need_x=False)
    ox, ow = lp_grad_oracle(gy, x, w, p)
    for got, single, want in ((gx, gx1, ox), (gw, gw1, ow)):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(single.isnan(), want.isnan())
        ok = ~want.isnan()
        assert ok.any() and rel_err(got[ok], want[ok]) <= rel_tol(torch.float32, p, 70)


@pytest.fixture
def pessimistic(emulator_lib):
    """Set the emulated lg2/ex2.approx to move by +1 or -1 times their maximum error (restored after)."""
    def set_sign(sign):
        emulator_lib.emu_configure_approx(sign)
    yield set_sign
    emulator_lib.emu_configure_approx(1)


def _rel_max(a, b):
    return ((a.double() - b).abs() / b.abs().clamp_min(1e-300)).max().item()


def _rel_norm(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("sign", (1, -1))
@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 8.5, 100.0, 1000.0, math.inf))
def test_float32_accuracy_floor_with_pessimistic_intrinsics(emu_backend, pessimistic, p, sign):
    """Issue #14's floor, float32 kernels against float64: values <= 1e-6 relative (each output), gradients
    <= 1e-4 relative in norm, with every hardware approximation off by its documented maximum error in
    the same direction (so errors cannot cancel).  D = 300 crosses 19 tiles; the data's scale grows along
    D so the running maximum, and its power-of-two scale, change many times."""
    pessimistic(sign)
    g = torch.Generator().manual_seed(14)
    B, N, D = 19, 23, 300
    ramp = torch.logspace(-3, 3, D, dtype=torch.float64)
    x64 = torch.randn(B, D, generator=g, dtype=torch.float64) * ramp
    w64 = torch.randn(N, D, generator=g, dtype=torch.float64) * ramp
    gy64 = torch.randn(B, N, generator=g, dtype=torch.float64)
    x, w, gy = x64.float(), w64.float(), gy64.float()
    y, aux = emu_backend.forward(x, w, p)
    y_ref, aux_ref = REF.forward(x.double(), w.double(), p)      # the same float32 inputs, in float64
    assert _rel_max(y, y_ref) <= 1e-6
    gx_ref, gw_ref = REF.backward(gy.double(), x.double(), w.double(), y_ref, aux_ref, p)
    gx, gw = emu_backend.backward(gy, x, w, y, aux, p)              # both: the fused kernel at finite p
    assert _rel_norm(gx, gx_ref) <= 1e-4 and _rel_norm(gw, gw_ref) <= 1e-4
    if not math.isinf(p):                                            # one: the single-gradient kernels
        gx, _ = emu_backend.backward(gy, x, w, y, aux, p, need_w=False)
        _, gw = emu_backend.backward(gy, x, w, y, aux, p, need_x=False)
        assert _rel_norm(gx, gx_ref) <= 1e-4 and _rel_norm(gw, gw_ref) <= 1e-4


def test_the_pessimistic_emulation_moves_the_result(emu_backend, pessimistic):
    """The accuracy test above has teeth: the two error directions give different float32 results."""
    x, w = torch.randn(7, 50), torch.randn(9, 50)
    pessimistic(1)
    up = emu_backend.forward(x, w, 100.0)[0]
    pessimistic(-1)
    down = emu_backend.forward(x, w, 100.0)[0]
    pessimistic(0)
    exact = emu_backend.forward(x, w, 100.0)[0]
    assert (up > exact).any() and (down < exact).any()


@pytest.mark.parametrize("schedule", ("ascending", "descending", "threads"))
def test_results_do_not_depend_on_the_thread_schedule(harness, emulator_lib, schedule):
    """Shared-memory races would make results depend on the order of threads between barriers."""
    from linf_plugin.ops.cupy_backend import CupyBackend

    backend = CupyBackend(launcher=harness.EmulatedLauncher(emulator_lib, schedule))
    _check_all(backend, 19, 23, 21, torch.float32, math.inf, seed=11)
    _check_all(backend, 19, 23, 21, torch.float64, 8.5, seed=12)
    _check_all(backend, 70, 37, 69, torch.float32, 8.0, seed=13)   # the fused backward's gw reduction (2 x 2 blocks)
    assert any(name.startswith("lp_backward_fused") for name, _ in backend.launcher.calls)


# -- torch.use_deterministic_algorithms(True): no atomics, the same bits whatever order blocks and threads take --
def _gradients(backend, p, data):
    x, w, gy, lower, upper = data
    y, aux = backend.forward(x, w, p)
    gx, gw = backend.backward(gy, x, w, y, aux, p)
    lo, hi, iaux = backend.interval_forward(lower, upper, w, p)
    return (gx, gw, *backend.interval_backward(gy, 0.5 * gy, lower, upper, w, lo, hi, iaux, p))


@pytest.mark.parametrize("p", (math.inf, 8.0, 8.5))
def test_deterministic_mode_gives_the_same_bits_whatever_the_schedule(harness, emulator_lib, p):
    """Blocks run in a shuffled order and threads in a shuffled order per barrier phase, so atomics add in a
    different order per seed: the default kernels' gradients differ in their last bits between seeds (the
    p = inf scatters; at finite p the fused kernel's grad_w, summed over 4 batch blocks).  Under
    torch.use_deterministic_algorithms(True) no atomic kernel runs, and every gradient (interval ones included)
    has the same bits under every seed and the descending schedule, within tolerance of the reference."""
    from linf_plugin.ops.cupy_backend import CupyBackend

    g = torch.Generator().manual_seed(21)
    B, N, D = (21, 60, 7) if math.isinf(p) else (200, 40, 33)
    x, w, gy = torch.randn(B, D, generator=g), torch.randn(N, D, generator=g), torch.randn(B, N, generator=g)
    data = (x, w, gy, x - 0.3, x + 0.3)
    schedules = [("shuffled", 1), ("shuffled", 2), ("shuffled", 3), ("descending", 1)]
    atomic = ("linf_backward", "interval_inf_backward", "lp_backward_fused")
    before = torch.are_deterministic_algorithms_enabled()
    runs = {}
    try:
        for mode in (False, True):
            torch.use_deterministic_algorithms(mode)
            runs[mode] = []
            for schedule, seed in schedules:
                backend = CupyBackend(launcher=harness.EmulatedLauncher(emulator_lib, schedule, seed=seed))
                runs[mode].append(_gradients(backend, p, data))
                launched = {name.split("<")[0] for name, _ in backend.launcher.calls}
                assert bool(launched & set(atomic)) != mode, launched
    finally:
        torch.use_deterministic_algorithms(before)
    first, *others = runs[False]
    assert any(not torch.equal(a, b) for run in others for a, b in zip(first, run))
    first, *others = runs[True]
    assert all(torch.equal(a, b) for run in others for a, b in zip(first, run))
    ref = _gradients(REF, p, data)
    for got, want in zip(first, ref):
        torch.testing.assert_close(got, want, **_gtol(torch.float32))


# -- sm_75 and sm_80+: the NaN-keeping maxima, instruction (sm_80+) against the fallbacks (sm_75) ----------------
_MAXIMA = '#include "cuda_shim.h"\n' + full_source(()) + """
extern "C" void maxima(const float* a, const float* b, int n, float* general, float* nonneg, float* clamp) {
    for (int i = 0; i < n; ++i) {
        general[i] = lp_max_nan(a[i], b[i]);
        nonneg[i] = lp_max_nonneg(a[i], b[i]);
        clamp[i] = lp_clamp_below(a[i], b[i]);
    }
}
extern "C" void portable(const float* a, const float* b, int n, float* out) {
    for (int i = 0; i < n; ++i) out[i] = lp_max_nan_portable(a[i], b[i]);
}
"""
_BITS = {"+0": 0x00000000, "-0": 0x80000000, "min_sub": 0x00000001, "-min_sub": 0x80000001, "min_norm": 0x00800000,
         "1": 0x3F800000, "-1": 0xBF800000, "2.5": 0x40200000, "-2.5": 0xC0200000, "max": 0x7F7FFFFF,
         "-max": 0xFF7FFFFF, "inf": 0x7F800000, "-inf": 0xFF800000, "nan": 0x7FFFFFFF, "nan_x86": 0x7FC00000,
         "-nan_x86": 0xFFC00000, "snan": 0x7F800001}


def _floats(names):
    import numpy

    return torch.from_numpy(numpy.array([_BITS[n] for n in names], dtype=numpy.uint32).view(numpy.float32))


def _run_maxima(lib, a, b):
    import ctypes

    outs = [torch.empty_like(a) for _ in range(3)]
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())   # noqa: E731
    lib.maxima(ptr(a), ptr(b), a.numel(), *map(ptr, outs))
    return outs


def _bits(t):
    return t.view(torch.int32)


def test_the_sm75_maxima_give_the_instructions_bits(harness, tmp_path):
    """common.cuh compiled as for sm_75 (LP_EMULATED_ARCH=750: comparisons and selects, an integer max) against
    sm_80+ (the emulated max.NaN.f32: canonical NaN 0x7fffffff when either operand is NaN, +0.0 above -0.0), on
    every pair of special values: NaN of several payloads and signs, +-0.0, subnormals, +-inf, +-FLT_MAX.
      lp_max_nan: the same bits on every pair;
      lp_max_nonneg: the same bits on the operands it is for (>= +0.0 or the canonical NaN);
      lp_clamp_below(l, lo): the same bits for every l and every lo other than NaN and +-0.0, NaN for NaN."""
    import ctypes

    names = list(_BITS)
    pairs = [(x, y) for x in names for y in names]
    a, b = _floats([x for x, _ in pairs]), _floats([y for _, y in pairs])
    sm75 = _run_maxima(harness.build_library(tmp_path, _MAXIMA, arch=750), a, b)
    sm90 = _run_maxima(harness.build_library(tmp_path, _MAXIMA, arch=900), a, b)
    general75, nonneg75, clamp75 = sm75
    general90, nonneg90, clamp90 = sm90
    assert torch.equal(_bits(general75), _bits(general90))
    nonneg = torch.tensor([x in ("+0", "min_sub", "min_norm", "1", "2.5", "max", "inf", "nan") and
                           y in ("+0", "min_sub", "min_norm", "1", "2.5", "max", "inf", "nan") for x, y in pairs])
    assert nonneg.sum() == 64 and torch.equal(_bits(nonneg75[nonneg]), _bits(nonneg90[nonneg]))
    bounded = torch.tensor(["nan" not in y and y not in ("+0", "-0") for _, y in pairs])
    number = ~clamp90.isnan() & bounded
    assert torch.equal(clamp75.isnan()[bounded], clamp90.isnan()[bounded])
    assert torch.equal(_bits(clamp75[number]), _bits(clamp90[number]))
    # the semantics themselves, spelled out on a few pairs
    want = {("nan_x86", "1"): _BITS["nan"], ("-nan_x86", "-inf"): _BITS["nan"], ("snan", "snan"): _BITS["nan"],
            ("-0", "+0"): _BITS["+0"], ("+0", "-0"): _BITS["+0"], ("-0", "-0"): _BITS["-0"],
            ("-min_sub", "-0"): _BITS["-0"], ("-1", "-2.5"): _BITS["-1"], ("inf", "max"): _BITS["inf"]}
    for (x, y), bits in want.items():
        assert _bits(general90)[pairs.index((x, y))].item() == (bits if bits < 2 ** 31 else bits - 2 ** 32), (x, y)
    # the shim's instruction and common.cuh's portable version are written independently: they agree too
    lib = harness.build_library(tmp_path, _MAXIMA, arch=900)
    out = torch.empty_like(a)
    lib.portable(ctypes.c_void_p(a.data_ptr()), ctypes.c_void_p(b.data_ptr()), a.numel(), ctypes.c_void_p(out.data_ptr()))
    assert torch.equal(_bits(out), _bits(general90))


def test_sm75_kernels_give_the_sm80_results(harness, tmp_path_factory, emulator_lib):
    """The p = inf and finite-p float kernels built as for sm_75 give what the sm_80+ build gives, bit for bit
    (NaN for NaN), on data with NaN rows, zero rows (identical x and w: +-0.0 differences) and ties."""
    from linf_plugin.ops.cupy_backend import CupyBackend
    from linf_plugin.ops.kernel_specs import module_spec

    kernels = [k.name for key in (("linf", "float", None), ("lp", "float", 8), ("lp", "float", 0))
               for k in module_spec(*key).kernels.values()]
    lib75 = harness.build_library(tmp_path_factory.mktemp("sm75"), harness.harness_source(kernels), arch=750)
    g = torch.Generator().manual_seed(75)
    x, w = torch.randint(-3, 4, (37, 41), generator=g).float(), torch.randn(70, 41, generator=g)
    w[:5] = x[:5]                                    # y = 0 there
    w[6] = -x[6] * 0.0                               # -0.0 against +0.0 and against integers
    x[7, 3] = float("nan")
    w[9, 40] = float("nan")
    gy = torch.randn(37, 70, generator=g)
    results = []
    for lib in (lib75, emulator_lib):
        backend = CupyBackend(launcher=harness.EmulatedLauncher(lib, "shuffled", seed=4))
        out = []
        for p in (math.inf, 8.0, 8.5):
            y, aux = backend.forward(x, w, p)
            out += [y, *backend.backward(gy, x, w, y, aux, p)]
        results.append(out)
    for a, b in zip(*results):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(_bits(a[~a.isnan()]), _bits(b[~b.isnan()]))
    assert results[0][0].isnan().any() and (results[0][0] == 0).any()


def test_barrier_divergence_is_detected(harness, tmp_path):
    src = '#include "cuda_shim.h"\n' + """
template <typename T> __global__ void divergent(T* out) {
    if (threadIdx.x < 3) __syncthreads();
    out[threadIdx.x] = T(1);
}
extern "C" int run(int mode, float* out) {
    emu_configure(mode, 1);
    return emu::launch(dim3(2), dim3(8), [&] { divergent<float>(out); });
}
"""
    lib = harness.build_library(tmp_path, src)
    out = torch.zeros(8)
    import ctypes
    for mode in (0, 2):
        assert lib.run(mode, ctypes.c_void_p(out.data_ptr())) == 1


def test_a_shared_memory_race_changes_with_the_schedule(harness, tmp_path):
    """The schedule test above has teeth: a kernel that reads its neighbour's shared slot
    without a barrier gives different results under different schedules."""
    src = '#include "cuda_shim.h"\n' + """
template <typename T> __global__ void racy(T* out) {
    __shared__ T s[64];
    s[threadIdx.x] = T(threadIdx.x + 1);
    out[threadIdx.x] = s[(threadIdx.x + 1) % 64];   // missing __syncthreads() before this read
}
extern "C" int run(int mode, float* out) {
    emu_configure(mode, 5);
    return emu::launch(dim3(1), dim3(64), [&] { racy<float>(out); });
}
"""
    lib = harness.build_library(tmp_path, src)
    import ctypes
    results = []
    for mode in (0, 1):
        out = torch.zeros(64)
        assert lib.run(mode, ctypes.c_void_p(out.data_ptr())) == 0
        results.append(out)
    assert not torch.equal(results[0], results[1])


def test_every_catalogue_kernel_was_launched(harness, emulator_lib):
    """The emulation covers the whole catalogue: run each variant once and compare the call log."""
    from linf_plugin.ops.cupy_backend import CupyBackend

    launcher = harness.EmulatedLauncher(emulator_lib)
    backend = CupyBackend(launcher=launcher)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for dtype in DTYPES:
            for p in (1.0, 2.0, 8.0, 8.5, 300.0, math.inf):   # 300: the float accurate-power gradient kernels
                x, w, lower, upper, g = _problem(3, 4, 5, dtype)
                y, aux = backend.forward(x, w, p, need_aux=True)
                backend.forward(x, w, p, need_aux=False)
                backend.backward(g, x, w, y, aux, p)
                backend.backward(g, x, w, y, aux, p, need_w=False)   # one gradient: the single-gradient kernels
                backend.backward(g, x, w, y, aux, p, need_x=False)
                lo, hi, iaux = backend.interval_forward(lower, upper, w, p, need_aux=True)
                backend.interval_forward(lower, upper, w, p, need_aux=False)
                backend.interval_backward(g, g, lower, upper, w, lo, hi, iaux, p)
                if math.isinf(p):                                    # the fixed-order sums
                    torch.use_deterministic_algorithms(True)
                    backend.backward(g, x, w, y, aux, p)
                    backend.interval_backward(g, g, lower, upper, w, lo, hi, iaux, p)
                    torch.use_deterministic_algorithms(before)
            backend.linf_box_argmax(lower, upper, w)
    finally:
        torch.use_deterministic_algorithms(before)
    launched = {name for name, _ in launcher.calls}
    catalogue = {k.name for spec in all_module_specs() for k in spec.kernels.values()}
    assert launched == catalogue


def test_concurrent_builds_of_one_library_agree(harness, tmp_path):
    """pytest-xdist workers build the emulator into one shared cache directory at
    the same moment: both must load a complete library, built once, and leave no
    half-written files behind."""
    import subprocess
    import sys

    (tmp_path / "src.cpp").write_text('#include "cuda_shim.h"\nextern "C" int answer() { return 42; }\n')
    child = (
        "import importlib.util, os, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('h', {str(harness.__file__)!r})\n"
        "h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)\n"
        "ready = sys.argv[1]; open(os.path.join(ready, str(os.getpid())), 'w').close()\n"
        "while len(os.listdir(ready)) < 2: time.sleep(0.001)\n"   # both imported: build together
        "print(h.build_library(sys.argv[3], open(sys.argv[2]).read()).answer())\n")
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "ready"), str(tmp_path / "src.cpp"),
                               str(tmp_path / "cache")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "42", err[-2000:]
    built = sorted(f.name for f in (tmp_path / "cache").iterdir() if not f.name.endswith(".lock"))
    assert len(built) == 2 and built[0].endswith(".shared") and built[1] == built[0][:-len(".shared")] + ".so", built


# -- p = 2, 8: the raw sum (lp_forward_raw) and its fixup (lp_forward over the blocks it marked) ----------
def raw_flags(backend):
    """The block flags the last raw-sum launch wrote, shaped (grid y, grid x) like the output tiles."""
    launch = backend.launcher.last_launch("lp_forward_raw")
    return torch.from_numpy(launch.args[3].copy()).view(launch.grid[1], launch.grid[0])


def _normalising_only(backend, x, w, p):
    """lp_forward alone on every block (a null flag buffer): what the backend returned before the raw sum."""
    from linf_plugin.ops.kernel_specs import grid_for, module_spec
    from linf_plugin.ops.torch_kernels import p_variant

    spec = module_spec("lp", "float" if x.dtype == torch.float32 else "double", p_variant(p))
    kernel = spec.kernels["forward"]
    B, N, D = x.shape[0], w.shape[0], x.shape[1]
    y = torch.full((B, N), -1.0, dtype=x.dtype)
    backend.launcher(spec, kernel, grid_for(kernel, B, N), (x, w, y, None, B, N, D, p))
    return y


def _scaled(B, N, D, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, generator=g, dtype=torch.float64) * scale).to(dtype), \
        (torch.randn(N, D, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", (2.0, 8.0))
def test_raw_sum_takes_the_fast_path_on_ordinary_data(emu_backend, dtype, p):
    """Ordinary data (130 x 70 outputs: 3 x 2 blocks, D = 41) marks no block, so the fixup returns at once
    everywhere, and the raw sum alone is the result: bit for bit what the normalising kernel gives (its
    power-of-two scaling is exact when nothing under- or overflows, and both kernels write the same products,
    fused multiply-adds and square roots; NVRTC compiles them with --fmad=false, so on the GPU too they round
    the same, test_gpu.py checks it there)."""
    backend = emu_backend
    x, w = _scaled(130, 70, 41, 1.0, seed=2, dtype=dtype)
    y, _ = backend.forward(x, w, p)
    assert [c.name.split("<")[0] for c in backend.launcher.device.calls] == ["lp_forward_raw", "lp_forward"]
    assert raw_flags(backend).shape == (3, 2) and not raw_flags(backend).any()
    assert torch.equal(y, _normalising_only(backend, x, w, p))
    torch.testing.assert_close(y, REF.forward(x, w, p)[0], **_tol(dtype, p))


# scales where the raw sum of D = 41 terms leaves its safe range [4 D T_MIN, T_MAX] for every output:
# tiny (every term 0), subnormal terms (a few significant bits left: a raw result off by ~1%), huge
# (float32: d^8 is subnormal for |d| < ~2e-5 and overflows above ~6e4; d^2 at ~1e-19 and ~1e19)
_EXTREME = {(torch.float32, 2.0): (1e-25, 3e-21, 1e25), (torch.float32, 8.0): (1e-8, 3e-6, 1e6),
            (torch.float64, 2.0): (1e-170, 3e-161, 1e160), (torch.float64, 8.0): (1e-45, 3e-40, 1e40)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", (2.0, 8.0))
def test_raw_sum_falls_back_on_extreme_scales(emu_backend, dtype, p):
    """Data far below or above the raw sum's range marks every block; the fixup's results are the
    normalising kernel's, bit for bit, and within 1e-6 (float32) of float64."""
    backend = emu_backend
    for k, scale in enumerate(_EXTREME[(dtype, p)]):
        x, w = _scaled(130, 70, 41, scale, seed=k, dtype=dtype)
        y, _ = backend.forward(x, w, p)
        assert raw_flags(backend).all(), scale
        assert torch.equal(y, _normalising_only(backend, x, w, p)), scale
        y_ref = REF.forward(x.double(), w.double(), p)[0]
        assert (y > 0).all() and torch.isfinite(y).all()
        assert _rel_max(y, y_ref) <= (1e-6 if dtype == torch.float32 else 1e-14), scale


@pytest.mark.parametrize("p", (2.0, 8.0))
def test_raw_sum_falls_back_only_where_needed(emu_backend, p):
    """Mixed data, 150 x 70 outputs in 3 x 2 blocks of 64 x 64: a huge row and an inf entry in the first
    row of blocks, one tiny output (x[70] and w[5] both tiny) and one zero output (x[100] = w[2]) in the
    second, a NaN entry in the third.  Only the blocks holding an output outside the raw sum's range are
    marked (NaN needs no fixup: the raw sum keeps it); every output is the normalising kernel's, bit for
    bit (NaN for NaN, inf for inf: the torch path gives NaN there), and the finite ones are within 1e-6
    of float64."""
    backend = emu_backend
    tiny, _, huge = _EXTREME[(torch.float32, p)]
    x, w = _scaled(150, 70, 41, 1.0, seed=9)
    x[17] *= huge
    x[30, 5] = float("inf")
    x[70] *= tiny
    w[5] *= tiny
    x[100] = w[2]
    x[140, 0] = float("nan")
    y, _ = backend.forward(x, w, p)
    assert raw_flags(backend).tolist() == [[1, 1], [1, 0], [0, 0]]
    torch.testing.assert_close(y, _normalising_only(backend, x, w, p), rtol=0, atol=0, equal_nan=True)
    assert (y[30] == math.inf).all() and torch.isnan(y[140]).all() and y[100, 2] == 0
    finite = torch.ones_like(y, dtype=torch.bool)
    finite[30] = finite[140] = False
    assert torch.isfinite(y[finite]).all() and 0 < y[70, 5] < 1e-3 * y[70, 6]
    y_ref = REF.forward(x.double(), w.double(), p)[0]
    assert _rel_max(y[finite], y_ref[finite]) <= 1e-6
