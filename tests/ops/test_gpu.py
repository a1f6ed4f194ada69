"""CuPy kernels on a real GPU against the PyTorch path (skipped without CUDA).

Tolerances: p = inf forward values and argmax are bit-identical (the max of
the same IEEE differences, ties to the lowest index); finite p and every
gradient agree to rtol 1e-4 (float32; 1e-10 float64): the kernels sum in a
different order, contract multiply-adds into FMAs, use CUDA's exp2/log2 for
general p, and accumulate p = inf gradients with atomicAdd in arbitrary order.
"""
from __future__ import annotations

import math

import pytest
import torch

from linf_plugin.ops import lp_dist, lp_dist_interval
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
def test_cupy_matches_torch_path(shape, p, dtype):
    x, w, g = _inputs(*shape, dtype, seed=sum(shape))
    y_c, gx_c, gw_c = _run(x, w, g, p, "cupy")
    y_t, gx_t, gw_t = _run(x, w, g, p, "torch")
    if math.isinf(p):
        assert torch.equal(y_c, y_t), "p = inf forward must be bit-identical"
    else:
        torch.testing.assert_close(y_c, y_t, **_tol(dtype))
    torch.testing.assert_close(gx_c, gx_t, **_tol(dtype))
    torch.testing.assert_close(gw_c, gw_t, **_tol(dtype))


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
def test_interval_matches_torch_path(p, dtype):
    g = torch.Generator().manual_seed(3)
    B, N, D = 70, 133, 65
    c = torch.randn(B, D, generator=g, dtype=dtype)
    r = torch.rand(B, D, generator=g, dtype=dtype)
    w = torch.randn(N, D, generator=g, dtype=dtype)
    outs = {}
    for backend in ("cupy", "torch"):
        lower = (c - r).cuda().requires_grad_()
        upper = (c + r).cuda().requires_grad_()
        ww = w.cuda().requires_grad_()
        lo, hi = lp_dist_interval(lower, upper, ww, p, backend=backend)
        (lo * 0.3 + hi).sum().backward()
        outs[backend] = (lo.detach(), hi.detach(), lower.grad, upper.grad, ww.grad)
    for i, (a, b) in enumerate(zip(outs["cupy"], outs["torch"])):
        if math.isinf(p) and i < 2:          # lo and hi at p = inf: bit-identical
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **_tol(dtype))


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
def test_linf_box_argmax_on_cuda_matches_cpu(dtype):
    # The p = inf CROWN relaxation's coordinates: the PyTorch path on every device.
    from linf_plugin.ops import linf_box_argmax

    for ties in (False, True):
        x, w, _ = _inputs(37, 5120, 67, dtype, seed=11, ties=ties)
        x, w = x.detach(), w.detach()
        lower, upper = x - 0.5, x + 0.5
        got = linf_box_argmax(lower, upper, w)
        want = linf_box_argmax(lower.cpu(), upper.cpu(), w.cpu())
        for a, b in zip(got, want):
            assert a.is_cuda and torch.equal(a.cpu(), b)
