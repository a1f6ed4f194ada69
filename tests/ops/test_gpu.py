"""CuPy kernels on a real GPU against a float64 reference and the PyTorch path (skipped without CUDA).

Accuracy (see ``lp_accuracy.py`` for the tolerance and where it comes from):
each backend's outputs and gradients are compared with the float64 torch
path on the same inputs, by relative norm error, within
``eps * (p + sqrt(max(B, N, D)))``; and the CuPy path must be no less
accurate than the torch path (``err_cupy <= 2 err_torch + 16 eps``).  Two
float32 paths are never compared element-wise at finite p: both round, more
so as p grows.

Exact: p = inf forward values and argmax are bit-identical to the torch path (the max of the
same IEEE differences, ties to the lowest index), and so are the
linf_box_argmax coordinates.  The same accuracy checks run on the CPU
through the emulated launcher (test_cupy_launcher.py).
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
