"""Curves, named unions of methods, and the interval method's own bisection."""
from __future__ import annotations

import math

import pytest
import torch

from linf_plugin.certification import api, bisect_radius, certified_accuracy_curve, certify, curve_from_result
from linf_plugin.data import load_dataset, three_point_set
from linf_plugin.models import create_model, theorem32_net


@pytest.fixture(scope="module")
def net_and_data():
    torch.manual_seed(1)
    net = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=3, width=32, mean=0.3, std=0.37)
    net.train()
    net(torch.rand(64, 1, 8, 8))
    return net.eval(), load_dataset("digits", "test").subset(30)


def test_interval_is_its_own_certificate(net_and_data, monkeypatch):
    net, data = net_and_data

    def no_margin(*a, **k):
        raise AssertionError("method='interval' ran the margin certificate")

    monkeypatch.setattr(api, "margin_certify", no_margin)
    res = certify(net, data, 0.01, "interval")
    assert res.method == "interval" and "members" not in res.extra


def test_a_named_union_is_any_member_and_keeps_each(net_and_data):
    net, data = net_and_data
    eps = 0.02
    ibp, crown = certify(net, data, eps, "ibp"), certify(net, data, eps, "crown")
    union = certify(net, data, torch.tensor(eps), "ibp+crown")
    assert union.method == "ibp+crown" and set(union.extra["members"]) == {"ibp", "crown"}
    assert torch.equal(union.certified, ibp.certified | crown.certified)
    assert torch.equal(union.extra["members"]["crown"].certified, crown.certified)
    assert union.radius is None and union.float_rigorous == (ibp.float_rigorous and crown.float_rigorous)
    grid = [0.0, 0.01, 0.03]
    curve = certified_accuracy_curve(net, data, grid, "interval+margin")
    parts = [certified_accuracy_curve(net, data, grid, m) for m in ("interval", "margin")]
    assert curve.method == "interval+margin"
    assert torch.equal(curve.certified, parts[0].certified | parts[1].certified)
    with pytest.raises(ValueError, match="names a method twice"):
        certify(net, data, eps, "ibp+ibp")
    with pytest.raises(ValueError, match="unknown certification method 'deepz'"):
        certify(net, data, eps, "ibp+deepz")
    hybrid = create_model("linf_dist_hybrid", input_shape=(1, 8, 8), num_classes=10, depth=2, width=8).eval()
    with pytest.raises(api.MethodNotApplicableError, match="'margin' does not apply"):
        certify(hybrid, data, eps, "ibp+margin")


def test_interval_bisection_gives_certified_and_tight_radii(net_and_data):
    net, data = net_and_data
    steps, top = 10, 0.05
    res = bisect_radius(net, data, "interval", top, steps)
    tol = res.extra["bisect_tolerance"]
    assert tol == top / 2 ** steps and res.float_rigorous and (res.radius[~res.correct] == 0).all()
    assert (res.radius > 0).any()
    for i in torch.nonzero(res.radius > 0).flatten()[:6].tolist():
        point = (data.x[i:i + 1], data.y[i:i + 1])
        r = float(res.radius[i])
        assert certify(net, point, r, "interval").certified[0]  # the radius itself is a certificate
        if r + tol < top:
            assert not certify(net, point, r + tol, "interval").certified[0]
    grid = [0.0, 0.01, top]
    curve = certified_accuracy_curve(net, data, grid, "interval", bisect=True, bisect_steps=steps)
    per_eps = certified_accuracy_curve(net, data, grid, "interval")
    assert torch.equal(curve.radius, res.radius)
    # every bisected verdict at a grid eps is one the method gives there
    assert not (curve.certified & ~per_eps.certified).any()
    assert torch.equal(curve.certified[:, -1], per_eps.certified[:, -1])  # certified at top counts at top
    assert torch.equal(curve_from_result(res, grid).certified, curve.certified)
    with pytest.raises(ValueError, match="bisection applies to 'interval'"):
        bisect_radius(net, data, "margin", top, steps)
    with pytest.raises(ValueError, match="not 'interval\\+margin'"):
        bisect_radius(net, data, "interval+margin", top, steps)


def test_interval_radius_never_passes_the_exact_radius():
    """Touching three-point set: no method can certify any eps > r (the boxes overlap the other label)."""
    r = 0.75
    data = three_point_set(r=r, dim=2)
    net = theorem32_net(data.x, data.y).eval()
    res = bisect_radius(net, data, "interval", 2 * r, 40)
    tol = res.extra["bisect_tolerance"]
    assert ((res.radius <= r) & (res.radius >= r - tol - 1e-12 * r)).all(), res.radius
    just_past = r * (1 + 2 ** -40)
    assert not certify(net, data, just_past, "interval").certified.any()
    assert certify(net, data, math.nextafter(r, 0) * (1 - 1e-9), "interval").certified.all()
