"""The public op: input checks, dispatch, gradients (gradcheck) and the exact interval."""
from __future__ import annotations

import logging
import math
import subprocess
import sys

import pytest
import torch

import importlib
from linf_plugin.ops import BACKEND_ENV, LpDistFunction, get_backend, lp_dist, lp_dist_interval, resolve_backend
from linf_plugin.ops.reference import ReferenceBackend
from linf_plugin.ops.torch_backend import TorchBackend

INF = math.inf
lp_mod = importlib.import_module("linf_plugin.ops.lp_dist")  # the package attribute is the function


def _xw(B=4, N=5, D=6, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype).requires_grad_(grad)
    w = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_(grad)
    return x, w


def _box(B=4, N=5, D=6, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, D, generator=g, dtype=dtype)
    r = 0.1 + torch.rand(B, D, generator=g, dtype=dtype)
    w = torch.randn(N, D, generator=g, dtype=dtype)
    return (t.detach().clone().requires_grad_(grad) for t in (c - r, c + r, w))


# -- bad input ----------------------------------------------------------------
@pytest.mark.parametrize("x, w, exc, msg", [
    (torch.randn(3, 4), torch.randn(5, 3), ValueError, "D=4 features but w has D=3"),
    (torch.randn(3, 4, 1), torch.randn(5, 4), ValueError, r"x must have shape \(B, D\)"),
    (torch.randn(4), torch.randn(5, 4), ValueError, r"x must have shape \(B, D\)"),
    (torch.randn(3, 4), torch.randn(4), ValueError, r"w must have shape \(N, D\)"),
    (torch.randn(3, 0), torch.randn(5, 0), ValueError, "at least one feature"),
    (torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64), TypeError, "share a dtype"),
    (torch.ones(3, 4, dtype=torch.int64), torch.randn(5, 4), TypeError, "x must be float32 or float64, got torch.int64"),
    (torch.randn(3, 4), torch.ones(5, 4, dtype=torch.int32), TypeError, "w must be float32 or float64"),
    (torch.randn(3, 4).half(), torch.randn(5, 4).half(), TypeError, "float16"),
    (torch.ones(3, 4, dtype=torch.bool), torch.randn(5, 4), TypeError, "torch.bool"),
    ([[1.0, 2.0]], torch.randn(5, 2), TypeError, "x must be a torch.Tensor"),
    (torch.randn(3, 4), torch.randn(5, 4, device="meta"), ValueError, "same device"),
    (torch.tensor([[0.0, float("nan")]]), torch.randn(5, 2), ValueError, "x contains NaN"),
    (torch.randn(3, 2), torch.tensor([[float("nan"), 0.0]]), ValueError, "w contains NaN"),
])
def test_bad_pairs_raise_clear_errors(x, w, exc, msg):
    with pytest.raises(exc, match=msg):
        lp_dist(x, w)


@pytest.mark.parametrize("p, exc, msg", [
    (0.5, ValueError, "p must be >= 1"), (-INF, ValueError, "p must be >= 1"), (float("nan"), ValueError, "NaN"),
    (True, TypeError, "real number"), ("inf", TypeError, "real number"), (None, TypeError, "real number"),
    (torch.tensor([1.0, 2.0]), TypeError, "scalar"),
])
def test_bad_p_raises(p, exc, msg):
    x, w = _xw()
    with pytest.raises(exc, match=msg):
        lp_dist(x, w, p)
    with pytest.raises(exc, match=msg):
        lp_dist_interval(x, x + 1, w, p)


def test_p_accepts_numbers_and_scalar_tensors():
    x, w = _xw()
    ref = lp_dist(x, w, 3.0)
    for p in (3, torch.tensor(3.0), torch.tensor([3])):
        torch.testing.assert_close(lp_dist(x, w, p), ref)


@pytest.mark.parametrize("make, exc, msg", [
    (lambda l, u, w: (u, l, w), ValueError, r"empty box: lower > upper at \["),
    (lambda l, u, w: (l, u[:, :-1], w), ValueError, "same shape"),
    (lambda l, u, w: (l, u.float(), w), TypeError, "share a dtype"),
    (lambda l, u, w: (l, u.to("meta"), w), ValueError, "same device"),
    (lambda l, u, w: (l.index_fill(1, torch.tensor([0]), float("nan")), u, w), ValueError, "lower contains NaN"),
    (lambda l, u, w: (l, u.index_fill(1, torch.tensor([0]), float("nan")), w), ValueError, "upper contains NaN"),
    (lambda l, u, w: (l, u, w.index_fill(1, torch.tensor([0]), float("nan"))), ValueError, "w contains NaN"),
    (lambda l, u, w: (l.long(), u, w), TypeError, "lower must be float32 or float64"),
])
def test_bad_boxes_raise_clear_errors(make, exc, msg):
    with pytest.raises(exc, match=msg):
        lp_dist_interval(*make(*_box()))


# -- dispatch -----------------------------------------------------------------
def _cpu_default() -> str:
    """What ``auto`` picks for CPU tensors: the native kernels where they build (a C++ compiler), else torch."""
    try:
        get_backend("native")
    except RuntimeError:
        return "torch"
    return "native"


def test_backend_names_and_environment(monkeypatch):
    x, w = _xw()
    assert resolve_backend(None, x) == _cpu_default()
    assert isinstance(get_backend("torch"), TorchBackend)
    assert isinstance(get_backend("reference"), ReferenceBackend)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert resolve_backend(None, x) == "reference"
    assert resolve_backend("torch", x) == "torch"            # the argument wins
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="unknown lp_dist backend 'fast'"):
        lp_dist(x, w)
    with pytest.raises(ValueError, match="unknown lp_dist backend 'numba'"):
        lp_dist(x, w, backend="numba")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        lp_dist(x, w, backend="cupy")


def test_environment_selects_the_backend_that_runs(monkeypatch):
    calls = []

    class Spy(ReferenceBackend):
        def forward(self, x, w, p, need_aux=True):
            calls.append(p)
            return super().forward(x, w, p, need_aux)

    monkeypatch.setitem(lp_mod._instances, "reference", Spy())
    monkeypatch.setenv(BACKEND_ENV, "reference")
    x, w = _xw()
    lp_dist(x, w, 2.0)
    assert calls == [2.0]


def test_cupy_backend_unavailable_is_a_clear_error_and_is_remembered(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(lp_mod, "_unavailable", {})
    monkeypatch.setattr(lp_mod, "_instances", {"reference": ReferenceBackend()})
    with pytest.raises(RuntimeError, match="CuPy backend is not available"):
        get_backend("cupy")
    assert "cupy" in lp_mod._unavailable
    with pytest.raises(RuntimeError, match="CuPy backend is not available"):
        get_backend("cupy")


def test_auto_announces_its_choice_once(monkeypatch, caplog):
    monkeypatch.setattr(lp_mod, "_announced", set())
    x, w = _xw()
    with caplog.at_level(logging.DEBUG, logger="linf_plugin.ops.lp_dist"):
        lp_dist(x, w)
        lp_dist(x, w, 2.0)
    msgs = [r.getMessage() for r in caplog.records if "backend 'auto'" in r.getMessage()]
    assert msgs == [f"lp_dist: backend 'auto' uses '{_cpu_default()}' for cpu tensors"]


def test_importing_the_package_does_not_import_cupy():
    code = ("import sys, torch, linf_plugin; from linf_plugin.ops import lp_dist; "
            "lp_dist(torch.randn(2, 3), torch.randn(4, 3)); print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- values -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("torch", "native", "reference"))
@pytest.mark.parametrize("p", (1.0, 2.0, 3.0, 8.0, INF))
def test_values_match_torch_cdist(backend, p):
    x, w = _xw(7, 9, 11)
    torch.testing.assert_close(lp_dist(x, w, p, backend=backend), torch.cdist(x, w, p=p), rtol=1e-10, atol=1e-12)


def test_empty_batch_and_empty_weights():
    x, w = _xw(grad=True)
    for a, b, shape in ((x[:0], w, (0, 5)), (x, w[:0], (4, 0))):
        y = lp_dist(a, b, 2.0)
        assert y.shape == shape
        y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    lo, hi = lp_dist_interval(x[:0].detach(), x[:0].detach(), w.detach())
    assert lo.shape == hi.shape == (0, 5)


@pytest.mark.parametrize("backend", ("torch", "native", "reference"))
@pytest.mark.parametrize("scale", (1e-200, 1.0, 1e200))
def test_large_p_is_stable(backend, scale):
    x, w = _xw(3, 4, 50)
    x, w = x * scale, w * scale
    for p in (100.0, 1000.0, 1e6):
        y = lp_dist(x, w, p, backend=backend)
        y_inf = lp_dist(x, w, INF, backend=backend)
        # ||.||_inf <= ||.||_p <= D^(1/p) ||.||_inf, up to rounding (the largest term is 1 -+ 1 ulp).
        assert torch.isfinite(y).all()
        assert (y >= y_inf * (1 - 1e-12)).all() and (y <= y_inf * 50 ** (1 / p) * (1 + 1e-12)).all()


# -- gradients ----------------------------------------------------------------
@pytest.mark.parametrize("backend", ("torch", "native", "reference"))
@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 100.0, INF))
def test_gradcheck(backend, p):
    x, w = _xw(4, 5, 6, seed=1, grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lp_dist(a, b, p, backend=backend), (x, w))


@pytest.mark.parametrize("backend", ("torch", "native", "reference"))
@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 100.0, INF))
def test_interval_gradcheck(backend, p):
    lower, upper, w = _box(3, 4, 5, seed=2, grad=True)
    # Move some w outside the boxes so the near end has gradient too.
    with torch.no_grad():
        w[0] += 3.0
        w[1] -= 3.0
    assert torch.autograd.gradcheck(lambda l, u, v: lp_dist_interval(l, u, v, p, backend=backend), (lower, upper, w))


def test_linf_gradient_is_the_signed_argmax_subgradient_with_ties_to_the_lowest_index():
    x = torch.tensor([[0.0, 2.0, -2.0, 1.0]], requires_grad=True)
    w = torch.zeros(2, 4, requires_grad=True)
    with torch.no_grad():
        w[1, 1] = 1.0                                   # row 1: |d| = (0, 1, 2, 1) -> argmax 2, d < 0
    for backend in ("torch", "native", "reference"):
        x.grad = w.grad = None
        lp_dist(x, w, backend=backend).sum().backward()
        assert x.grad.tolist() == [[0.0, 1.0, -1.0, 0.0]]          # row 0 ties 1 and 2 -> index 1
        assert w.grad.tolist() == [[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]


def test_no_grad_forward_matches_grad_forward():
    x, w = _xw(6, 7, 8, dtype=torch.float32, grad=True)
    with torch.no_grad():
        y0 = lp_dist(x, w)
    torch.testing.assert_close(lp_dist(x, w), y0, rtol=0, atol=0)


# -- the interval ---------------------------------------------------------------
@pytest.mark.parametrize("backend", ("torch", "native", "reference"))
@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 8.5, INF))
def test_interval_contains_samples_and_is_attained(backend, p):
    B, N, D = 5, 6, 7
    lower, upper, w = _box(B, N, D, dtype=torch.float64, seed=4)
    w[:2] *= 4                       # neurons far outside the boxes, one inside box 0
    w[-1] = (lower[0] + upper[0]) / 2
    lo, hi = lp_dist_interval(lower, upper, w, p, backend=backend)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        x = lower + (upper - lower) * torch.rand(B, D, generator=g, dtype=torch.float64)
        y = lp_dist(x, w, p, backend=backend)
        assert (lo <= y + 1e-12).all() and (y <= hi + 1e-12).all()
    # Attained: hi at the far corner, lo at the projection of w onto the box (per (b, n) pair).
    a, c = w[None] - lower[:, None], upper[:, None] - w[None]
    far_corner = torch.where(c >= a, upper[:, None], lower[:, None])          # (B, N, D)
    nearest = torch.minimum(torch.maximum(w[None], lower[:, None]), upper[:, None])
    for b in range(B):
        y_far = lp_dist(far_corner[b], w, p, backend=backend).diagonal()
        y_near = lp_dist(nearest[b], w, p, backend=backend).diagonal()
        torch.testing.assert_close(y_far, hi[b], rtol=1e-12, atol=0)
        torch.testing.assert_close(y_near, lo[b], rtol=1e-12, atol=1e-300)
    assert (lo[:2] > 0).any() and (lo == 0).any()


def test_interval_of_a_point_box_is_the_distance():
    x, w = _xw(4, 5, 6)
    for p in (1.0, 8.0, INF):
        lo, hi = lp_dist_interval(x, x, w, p)
        torch.testing.assert_close(lo, lp_dist(x, w, p), rtol=1e-12, atol=0)
        torch.testing.assert_close(hi, lp_dist(x, w, p), rtol=1e-12, atol=0)


def test_interval_gradient_flows_to_one_used_end_only():
    lower, upper, w = _box(grad=True)
    lo, hi = lp_dist_interval(lower, upper, w)
    hi.sum().backward()
    assert lower.grad is not None and (lower.grad <= 0).all() and (upper.grad >= 0).all()


def test_symbolic_emits_custom_lp_dist_with_float_p():
    """Trace and convert to ONNX ops the way auto_LiRPA does: one custom::LpDist node,
    p as a float attribute (inf representable), output typed (B, N)."""
    import torch.onnx.utils as onnx_utils

    class Layer(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(5, 3))
            self.p = p

        def forward(self, x):
            return LpDistFunction.apply(x, self.w, self.p, "torch")

    for p in (INF, 8.0):
        trace, _ = torch.jit._get_trace_graph(Layer(p), (torch.rand(4, 3),))
        graph = onnx_utils._optimize_graph(trace, torch.onnx.OperatorExportTypes.ONNX, params_dict={})
        nodes = [n for n in graph.nodes() if n.kind() == "custom::LpDist"]
        assert len(nodes) == 1
        assert nodes[0].f("p") == p
        assert nodes[0].output().type().sizes() == [4, 5]

@pytest.mark.parametrize("p", [math.inf, 8.0, 1.0])
@pytest.mark.parametrize("backend", ["torch", "native", "reference"])
def test_no_grad_inference_matches_the_autograd_path(backend, p):
    """Under no_grad lp_dist skips the autograd Function (and the argmax it would save);
    the values must be bit-identical to the differentiable call."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 50, generator=g)
    w = torch.randn(21, 50, generator=g).requires_grad_(True)
    y = lp_dist(x, w, p, backend=backend)
    assert y.requires_grad
    with torch.no_grad():
        y0 = lp_dist(x, w, p, backend=backend)
    assert not y0.requires_grad
    assert torch.equal(y0, y.detach())
