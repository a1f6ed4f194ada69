"""Bound-propagation certificates are float-rigorous: nothing certifies just past a point's exact radius.

The nets are built so float32 rounding matters: large first-layer weights and
offsets (and batch-norm statistics) make logits of order 1e3-1e4 whose
margins cancel, so the float32 bound is off by far more than a relative
``64 u (1 + |lb|)`` slack.  Each point's radius is found by bisection of the
method's own float64 bound (64 halvings, to the last bit); at
``radius * (1 + 1e-7)`` that bound is negative, so no certificate may hold.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from linf_plugin.certification import CertResult, certify
from linf_plugin.certification.bound_prop import BoundPropCertifier
from linf_plugin.certification.float_safety import rounding_slack, widen_box
from linf_plugin.data import linf_box

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")


def _mlp(seed, scale=100.0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        m[1].weight.mul_(scale)
        m[1].bias.add_(3 * scale)
        m[5].bias[:3] += 50  # the labels below come from argmax: mostly classes 0-2
    return m.eval()


def _cnn(seed, bn, scale=30.0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3)] + ([nn.BatchNorm2d(4)] if bn else []) + \
        [nn.ReLU(), nn.Flatten(), nn.Linear(144, 16), nn.ReLU(), nn.Linear(16, 10)]
    m = nn.Sequential(*layers)
    with torch.no_grad():
        m[0].weight.mul_(scale)
        m[0].bias.add_(scale)
        if bn:  # statistics of the data: a large mean subtracted, as trained nets have
            m[1].momentum = None
            m.train()(torch.rand(256, 1, 8, 8))
            m[1].bias.normal_()
    return m.eval()


def _lp_net(seed, name, **kwargs):
    """An l_inf-dist net (or hybrid) whose first layer sees inputs normalised to about [1000, 1100] and
    weights near them: distances of order 10-100 computed from operands of order 1e3, so float32
    rounding of the bounds matters as in the ReLU nets above."""
    from linf_plugin.models import create_model
    from linf_plugin.nn import lp_dist_layers

    torch.manual_seed(seed)
    m = create_model(name, input_shape=(1, 8, 8), num_classes=10, mean=(-10.0,), std=0.01, **kwargs)
    with torch.no_grad():
        first = next(iter(lp_dist_layers(m)))
        first.weight.mul_(30).add_(1050)
    return m.eval()


NETS = {"mlp": lambda: _mlp(0), "cnn": lambda: _cnn(1, bn=False), "cnn_bn": lambda: _cnn(2, bn=True),
        "linf": lambda: _lp_net(3, "linf_dist_mlp", depth=3, width=32),
        "hybrid": lambda: _lp_net(4, "linf_dist_hybrid", depth=2, width=32, head_hidden=16)}


RADIUS_CAP = 0.5


def _radius64(model, x, y, method, hi=RADIUS_CAP, steps=64):
    """Per point, the largest eps at which the method's own float64 bound is positive (bisection).

    A point still certified at ``hi`` gets ``hi``: it has no radius below the cap, so tests skip it
    (see :func:`_bounded`).
    """
    m64 = copy.deepcopy(model).double()
    cert = BoundPropCertifier(m64, x[:1].double(), 10, alpha_iterations=3)
    x64 = x.double()
    lo_e = torch.zeros(x.shape[0], dtype=torch.float64)
    hi_e = torch.full_like(lo_e, hi)
    for _ in range(steps):
        mid = (lo_e + hi_e) / 2
        lower, upper = linf_box(x64, mid, (0, 1), outward=True)
        ok = cert.lower_margins(x64, y, lower, upper, method).amin(1) > 0
        lo_e, hi_e = torch.where(ok, mid, lo_e), torch.where(ok, hi_e, mid)
    return lo_e


def _bounded(radius):
    """Indices of points whose exact radius lies strictly inside (0, RADIUS_CAP)."""
    return torch.nonzero((radius > 0) & (radius < RADIUS_CAP)).flatten().tolist()


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("method", METHODS)
def test_nothing_certifies_just_past_the_exact_radius(net, method):
    model = NETS[net]()
    torch.manual_seed(5)
    x = torch.rand(6 if method == "alpha-crown" else 10, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    radius = _radius64(model, x, y, method)
    assert ((radius > 0) & (radius < 0.25)).sum() >= 4
    past, below = [], []
    for i in _bounded(radius):
        pt = (x[i:i + 1], y[i:i + 1])
        res = certify(model, pt, float(radius[i]) * (1 + 1e-7), method, alpha_iterations=3)
        assert res.float_rigorous, res.extra
        past.append(bool(res.certified[0]))
        below.append(bool(certify(model, pt, float(radius[i]) * (1 - 1e-3), method,
                                  alpha_iterations=3).certified[0]))
    assert not any(past), f"{sum(past)} points certified past their exact radius"
    assert sum(below) >= len(below) // 2  # the test is not vacuous: just below the radius, points certify


def test_float64_models_are_rigorous_too():
    model = _mlp(3).double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    y = model(x).argmax(1)
    radius = _radius64(model, x, y, "crown")
    for i in _bounded(radius):
        res = certify(model, (x[i:i + 1], y[i:i + 1]), float(radius[i]) * (1 + 1e-9), "crown")
        assert res.float_rigorous and not res.certified[0]


def test_widen_box_survives_centre_radius_recomputation():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        lo = (torch.rand(10000, dtype=dtype) - 0.5) * 10 ** torch.randint(-3, 4, (10000,)).to(dtype)
        hi = lo + torch.rand(10000, dtype=dtype) * 10 ** torch.randint(-9, 2, (10000,)).to(dtype)
        wl, wu = widen_box(lo, hi)
        c, r = (wu + wl) / 2, (wu - wl) / 2  # what auto_LiRPA recomputes, in the same dtype
        assert ((c - r) <= lo).all() and ((c + r) >= hi).all()
        # without the widening the recomputed box does lose points (why widen_box exists)
        c0, r0 = (hi + lo) / 2, (hi - lo) / 2
        assert ((c0 - r0) > lo).any() or ((c0 + r0) < hi).any()


def test_slack_grows_with_the_magnitudes_and_unsupported_ops_are_reported():
    from linf_plugin.lirpa import bounded_module

    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    lower, upper = linf_box(x, 0.01, outward=True)
    slacks = []
    for scale in (1.0, 1000.0):
        model = _mlp(0, scale=scale).double()
        bounded = bounded_module(model, x[:1])
        bounded(x)
        slack, info = rounding_slack(bounded, lower, upper)
        assert info.rigorous and slack.shape == (2,) and (slack > 0).all()
        slacks.append(slack)
    assert (slacks[1] > 100 * slacks[0]).all()
    odd = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softplus(), nn.Linear(10, 10)).double().eval()
    res = certify(odd, (x.float(), odd(x).argmax(1)), 0.001, "ibp")
    assert not res.float_rigorous and "not float-rigorous" in res.extra["float_rigorous_reason"]


def test_tf32_and_autocast_are_off_while_bounding_and_restored_after(monkeypatch):
    from auto_LiRPA import BoundedModule

    seen = []
    original_compute = BoundedModule.compute_bounds

    def compute_spy(self, *a, **k):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.get_float32_matmul_precision(), torch.is_autocast_enabled("cpu")))
        return original_compute(self, *a, **k)

    monkeypatch.setattr(BoundedModule, "compute_bounds", compute_spy)
    model = _mlp(0)
    x = torch.rand(4, 1, 8, 8)
    y = model(x).argmax(1)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = certify(model, (x, y), 1e-4, "crown")
            assert torch.is_autocast_enabled("cpu")
        assert seen and all(s == (False, False, "highest", False) for s in seen)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])
    assert res.float_rigorous
    assert np.array_equal(res.certified, certify(model, (x, y), 1e-4, "crown").certified)


def test_under_bf16_autocast_nothing_certifies_past_the_radius():
    model = _mlp(4)
    torch.manual_seed(6)
    x = torch.rand(8, 1, 8, 8)
    y = model(x).argmax(1)
    radius = _radius64(model, x, y, "crown")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for i in _bounded(radius):
            res = certify(model, (x[i:i + 1], y[i:i + 1]), float(radius[i]) * (1 + 1e-7), "crown")
            assert res.float_rigorous and not res.certified[0]


def test_float_rigorous_goes_through_json_and_old_results_load():
    res = certify(_mlp(0), (torch.rand(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)), 0.0, "ibp")
    d = json.loads(json.dumps(res.to_dict()))
    assert d["float_rigorous"] is True and CertResult.from_dict(d).float_rigorous
    del d["float_rigorous"]  # a result saved before the field existed
    old = CertResult.from_dict(d)
    assert old.float_rigorous is False and "not float-rigorous" in old.summary()
    assert not certify(_mlp(0), (torch.rand(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)), 0.0, "ibp",
                       rigorous=False).float_rigorous


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), scale=st.sampled_from([1.0, 30.0, 300.0]),
       method=st.sampled_from(["ibp", "crown-ibp", "crown"]))
def test_fuzz_no_certificate_past_the_radius(seed, scale, method):
    model = _mlp(seed, scale=scale)
    torch.manual_seed(seed)
    x = torch.rand(3, 1, 8, 8)
    y = model(x).argmax(1)
    radius = _radius64(model, x, y, method, steps=56)
    for i in _bounded(radius):
        res = certify(model, (x[i:i + 1], y[i:i + 1]), float(radius[i]) * (1 + 1e-6), method)
        assert not res.certified[0]



def test_the_magnitude_pass_covers_alpha_crowns_threshold_planes():
    """The float64 re-check bounds rounding by the |W| pass.  An optimised upper plane of an l_inf-dist
    neuron (w = 0, box [0,1]^3 x [0,0.1], r = 0, theta = 1: 2/3 + (x0 + x1 + x2)/3) has absolute terms
    5/3 where max_i (|z_i| + |w_i|) is 1, so the pass must count more than that: the plane's terms on
    the box stay under what it counts, for any parameters."""
    import math
    from types import SimpleNamespace

    from linf_plugin.certification.float_safety import _magnitude
    from linf_plugin.lirpa.alpha_planes import default_params, plane_support, planes_from_params
    from linf_plugin.ops import linf_box_argmax

    f64 = torch.float64
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.tensor([[0.0, 0, 0, 0]], dtype=f64), torch.tensor([[1.0, 1, 1, 0.1]], dtype=f64),
              torch.zeros(1, 4, dtype=f64))]
    for _ in range(100):
        c = torch.randn(2, 6, generator=gen, dtype=f64)
        r = torch.rand(2, 6, generator=gen, dtype=f64) * 2
        cases.append((c - r, c + r, torch.randn(3, 6, generator=gen, dtype=f64)))
    node = SimpleNamespace(p=math.inf)
    worst = 0.0
    for lower, upper, w in cases:
        support = plane_support(lower, upper, w, linf_box_argmax(lower, upper, w)[0])
        mag = _magnitude(node, [torch.maximum(lower.abs(), upper.abs()), w.abs()], "BoundLpDist")
        slots = support.index.shape[-1]
        reach = torch.maximum(support.lo.abs(), support.hi.abs())
        for r, theta in ((0.0, 1.0), (1.0, 1.0), (0.5, 0.5), (0.0, 0.3), (0.2, 0.9)):
            params = default_params(support)
            params[..., 2 * slots + 1], params[..., 2 * slots + 2] = r, theta
            _, _, ucoef, ubias = planes_from_params(support, params.unsqueeze(0))
            terms = (ucoef[0].abs() * reach).sum(-1) + ubias[0].abs()
            assert (terms <= mag).all(), (lower, upper, w, r, theta, terms, mag)
            worst = max(worst, float((terms / (w.abs() + torch.maximum(lower.abs(), upper.abs()).unsqueeze(1))
                                      .amax(-1)).max()))
    assert worst > 1.5  # the case above: the first bound alone would not cover it
