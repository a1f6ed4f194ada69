"""Interval certification: outward-rounded exact interval propagation."""
from __future__ import annotations

import math

import pytest
import torch

from linf_plugin.certification import certify, interval_bounds
from linf_plugin.data import linf_box
from linf_plugin.models import create_model
from linf_plugin.nn import set_p
from linf_plugin.ops import lp_dist_interval


def _net(seed, p=math.inf, depth=3, width=32):
    torch.manual_seed(seed)
    net = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=depth, width=width,
                       mean=0.3, std=0.4)
    net.train()
    net(torch.rand(64, 1, 8, 8))
    set_p(net, p)
    return net.eval()


@pytest.mark.parametrize("p", [math.inf, 8.0])
def test_interval_bounds_contain_outputs(p):
    net = _net(0, p)
    x = torch.rand(8, 1, 8, 8)
    lo_box, hi_box = linf_box(x, 0.05, outward=True)
    lo, hi = interval_bounds(net, lo_box, hi_box)
    pts = lo_box + torch.rand(300, *x.shape) * (hi_box - lo_box)
    corners = torch.where(torch.rand(300, *x.shape) < 0.5, lo_box, hi_box)
    with torch.no_grad():
        for cloud in (pts, corners):
            out = net(cloud.reshape(-1, 1, 8, 8)).reshape(300, 8, 10)
            assert (out >= lo).all() and (out <= hi).all()


def test_interval_matches_exact_float64_propagation():
    net = _net(1)
    x = torch.rand(5, 1, 8, 8)
    lo_box, hi_box = linf_box(x, 0.03, outward=True)
    lo, hi = interval_bounds(net, lo_box, hi_box)
    n64 = net.double()
    zl, zu = n64.normalize(lo_box.double()).flatten(1), n64.normalize(hi_box.double()).flatten(1)
    for layer in n64.layers:
        zl, zu = lp_dist_interval(zl, zu, layer.weight, layer.p)
        if layer.mean_shift is not None:
            zl, zu = zl - layer.mean_shift.running_mean, zu - layer.mean_shift.running_mean
        if layer.bias is not None:
            zl, zu = zl + layer.bias, zu + layer.bias
    exact_lo, exact_hi = -zu, -zl
    assert (lo.double() <= exact_lo).all() and (hi.double() >= exact_hi).all()  # outward
    assert torch.allclose(lo.double(), exact_lo, atol=1e-4) and torch.allclose(hi.double(), exact_hi, atol=1e-4)


def test_interval_certifies_at_least_margin():
    net = _net(2)
    x = torch.rand(300, 1, 8, 8)
    y = net(x).argmax(1)
    for eps in (0.001, 0.01, 0.03):
        m = certify(net, (x, y), eps, "margin")
        i = certify(net, (x, y), eps, "interval")
        assert (i.certified | ~m.certified).all()
        assert i.certified.sum() >= m.certified.sum()
    assert i.certified.any()


def test_interval_on_p8_net_is_sound():
    net = _net(3, p=8.0)
    x = torch.rand(20, 1, 8, 8)
    y = net(x).argmax(1)
    res = certify(net, (x, y), 0.01, "interval")
    assert 0 < res.certified.sum() < 20
    lo_box, hi_box = linf_box(x, 0.01)
    for i in torch.nonzero(torch.as_tensor(res.certified)).flatten().tolist():
        cloud = lo_box[i] + torch.rand(500, 1, 8, 8) * (hi_box[i] - lo_box[i])
        assert (net(cloud).argmax(1) == y[i]).all()
