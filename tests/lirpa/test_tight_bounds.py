"""CROWN on graphs with l_p-dist layers: intermediate bounds within the interval bounds, interval-exact
S-shaped lines, and an alpha-CROWN that optimises the l_inf-dist planes (sound by sampling)."""
from __future__ import annotations

import warnings

import pytest
import torch

from linf_plugin.lirpa import bounded_module
from linf_plugin.lirpa.interval_guard import interval_lines
from .lirpa_check import bounded_input, extremes
from .nets import HybridNet, LinfNet


def _build(model, x, **lp_opts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bounded_module(model, x, bound_opts={"lp_dist": lp_opts,
                                                    "optimize_bound_args": {"iteration": 20, "lr_alpha": 0.05}})


def _bounds(bm, x, lo, hi, C, method):
    with warnings.catch_warnings(), torch.set_grad_enabled(method == "CROWN-Optimized"):
        warnings.simplefilter("ignore")
        lb, _ = bm.compute_bounds(x=(bounded_input(x, lo, hi),), C=C, method=method, bound_upper=False)
    return lb.detach()


def _lp_inputs(bm):
    return [n.inputs[0] for n in bm._modules.values() if type(n).__name__ == "BoundLpDist"][1:]


@pytest.mark.parametrize("on", [True, False])
def test_crown_intermediate_bounds_are_intersected_with_the_interval_bounds(on):
    torch.manual_seed(0)
    net = LinfNet(5, [8, 8, 8], 4).eval()
    x = torch.rand(3, 5)
    lo, hi = x - 0.3, x + 0.3
    bm = _build(net, x, intersect_interval=on)
    _bounds(bm, x, lo, hi, None, "IBP")
    ibp = [(n.lower.clone(), n.upper.clone()) for n in _lp_inputs(bm)]
    _bounds(bm, x, lo, hi, None, "CROWN")
    crown = [(n.lower, n.upper) for n in _lp_inputs(bm)]
    inside = all(bool((cl >= il).all() and (cu <= iu).all()) for (cl, cu), (il, iu) in zip(crown, ibp))
    # without the intersection CROWN's back-substitution (and its planes' rounding slack) ends up looser
    # than the exact interval bounds somewhere
    assert inside == on


def test_interval_lines_are_sound_and_exact_at_the_box_ends():
    gen = torch.Generator().manual_seed(1)
    for kind, f in (("BoundTanh", torch.tanh), ("BoundSigmoid", torch.sigmoid)):
        for dtype in (torch.float32, torch.float64):
            c = 4 * torch.randn(400, generator=gen, dtype=dtype)
            r = torch.rand(400, generator=gen, dtype=dtype) * torch.tensor([0.0, 1e-6, 0.5, 6.0], dtype=dtype)[
                torch.arange(400) % 4]
            lo, hi = c - r, c + r
            kl, bl, ku, bu = interval_lines(kind, lo, hi)
            t = torch.rand(257, 400, generator=gen, dtype=dtype)
            t[0], t[-1] = 0, 1
            xs = lo + t * (hi - lo)
            fx = f(xs)
            assert (kl * xs + bl <= fx).all() and (ku * xs + bu >= fx).all(), (kind, dtype)
            # extremes over the box: the interval bounds f(l) and f(u), up to the rounding slack
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(kl * lo + bl, f(lo), atol=tol, rtol=0)
            torch.testing.assert_close(ku * hi + bu, f(hi), atol=tol, rtol=0)


@pytest.mark.parametrize("on", [True, False])
def test_crown_is_never_below_ibp_through_a_tanh_head_on_wide_boxes(on):
    torch.manual_seed(2)
    net = HybridNet(6, [8, 8], 12, 5, act="tanh").eval()
    with torch.no_grad():
        net.fc1.weight.mul_(4)  # wide pre-activation boxes: tanh's tangent lines are weak there
    x = torch.rand(4, 6)
    lo, hi = x - 0.4, x + 0.4
    C = torch.randn(4, 6, 5)
    bm = _build(net, x, interval_activations=on)
    ibp = _bounds(bm, x, lo, hi, C, "IBP")
    slack = 1e-4 * (1 + ibp.abs())
    for method in ("CROWN-IBP", "CROWN"):
        lb = _bounds(bm, x, lo, hi, C, method)
        if on:
            assert (lb >= ibp - slack).all(), method
        else:
            assert (lb < ibp - 0.1).any(), method
        fmin, _ = extremes(net, C, lo, hi)
        assert (lb <= fmin + 1e-4 * (1 + fmin.abs())).all(), method


def test_alpha_crown_optimises_the_linf_dist_planes_soundly():
    torch.manual_seed(3)
    net = LinfNet(6, [8, 8], 4, seed=3).eval()
    x = torch.rand(3, 6)
    lo, hi = x - 0.2, x + 0.2
    C = torch.randn(3, 2, 4)
    bm = _build(net, x)
    # (0.7.1 also lists the input normalisation's constant 1/std, a BoundReciprocal, as optimisable)
    assert "BoundLpDist" in {type(n).__name__ for n in bm.optimizable_activations}
    crown = _bounds(bm, x, lo, hi, C, "CROWN")
    alpha = _bounds(bm, x, lo, hi, C, "CROWN-Optimized")
    assert (alpha >= crown - 1e-4 * (1 + crown.abs())).all()  # the two paths differ by rounding slack
    assert (alpha - crown).max() > 0.2  # the planes moved: a fixed relaxation gives CROWN's bound
    fmin, _ = extremes(net, C, lo, hi)
    assert (alpha <= fmin + 1e-5 * (1 + fmin.abs())).all()
