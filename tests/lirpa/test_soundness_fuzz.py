"""Soundness fuzz: random l_inf-dist nets and hybrids from the registry through every method.

Each case draws depth, width, p (inf or 8), input dim, class count, normalisation, running
means and biases, and puts first-layer weights at all-coordinate ties, inside the box and on
a box face; it is then bounded on boxes of three radii (symmetric, clipped to [0, 1], and with
degenerate coordinates), for the logits, a margin spec and a random spec, with IBP, CROWN-IBP,
CROWN, forward, forward+backward and alpha-CROWN.  Lower <= f <= upper must hold at 1000
points per box and at PGD's extremes.  The self-checks make the relaxation wrong on purpose
and require the same checker to report it.
"""
from __future__ import annotations

import math

import pytest
import torch

from linf_plugin.lirpa import BoundLpDist
from linf_plugin.lirpa.relaxation import Plane, sanitize_box
from linf_plugin.ops import lp_dist_interval

from linf_plugin.models import create_model

from .lirpa_check import METHODS, Case, check_case, random_case, violating_methods

RELAXATION_METHODS = [m for m in METHODS if m != "IBP"]


def _assert_sound(case, **kw):
    found = check_case(case, **kw)
    assert not found, "\n".join(found[:20])


@pytest.mark.parametrize("seed", range(5))
def test_linf_dist_nets_are_sound(seed):
    _assert_sound(random_case(seed, "linf_dist"))


@pytest.mark.parametrize("seed", [10, 11])
def test_linf_dist_nets_at_p_inf_are_sound(seed):
    _assert_sound(random_case(seed, "linf_dist", p=math.inf))


@pytest.mark.parametrize("seed", range(3))
def test_relu_hybrids_are_sound(seed):
    _assert_sound(random_case(seed, "hybrid"))


def test_tanh_hybrid_is_sound():
    _assert_sound(random_case(30, "hybrid", activation="tanh"))


@pytest.mark.parametrize("family", ["linf_dist", "hybrid"])
def test_float64_nets_are_sound(family):
    _assert_sound(random_case(20, family, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 112))
@pytest.mark.parametrize("family", ["linf_dist", "hybrid"])
def test_more_random_nets_are_sound(seed, family):
    _assert_sound(random_case(seed, family), alpha_specs=("margin", "random"))


# ------------------------------------------------------------------ the checker can fail
def _wrong_relaxation(which, frac=0.05):
    original = BoundLpDist.relaxation

    def relaxation(self, lower, upper, w):
        low, up = original(self, lower, upper, w)
        lo, hi = lp_dist_interval(*sanitize_box(lower, upper), w, self.p)
        delta = frac * (hi - lo)
        if which == "upper":
            up = Plane(up.coef, up.bias - delta, up.index)
        else:
            low = Plane(low.coef, low.bias + delta, low.index)
        return low, up

    return relaxation


def _wrong_alpha_planes(which, frac=0.05):
    """alpha-CROWN's optimisable planes at p = inf (not :meth:`BoundLpDist.relaxation`), shifted likewise."""
    from linf_plugin.lirpa import alpha_planes

    original = alpha_planes.planes_from_params

    def planes_from_params(support, params):
        lcoef, lbias, ucoef, ubias = original(support, params)
        delta = frac * (support.far - support.near)
        if which == "upper":
            return lcoef, lbias, ucoef, ubias - delta
        return lcoef, lbias + delta, ucoef, ubias

    return planes_from_params


@pytest.mark.parametrize("which", ["upper", "lower"])
@pytest.mark.parametrize("p", [math.inf, 8.0])
def test_checker_catches_a_slightly_wrong_relaxation(monkeypatch, which, p):
    """Shift one plane inward by 5% of the neuron's range: every linear method must be caught
    (a one-layer net, where each relaxation is used exactly where it touches)."""
    from linf_plugin.lirpa import bound

    monkeypatch.setattr(BoundLpDist, "relaxation", _wrong_relaxation(which))
    monkeypatch.setattr(bound, "planes_from_params", _wrong_alpha_planes(which))
    found = check_case(_one_layer_case(p), radii=(0.05, 0.3), kinds=("sym",), specs=("logits", "margin"), ties=False)
    assert violating_methods(found) >= set(RELAXATION_METHODS), found


def test_checker_catches_a_wrong_relaxation_in_a_deep_net(monkeypatch):
    monkeypatch.setattr(BoundLpDist, "relaxation", _wrong_relaxation("upper", frac=0.2))
    found = check_case(random_case(0, "linf_dist", p=math.inf), radii=(0.05,), kinds=("sym",),
                       specs=("logits",), methods=("CROWN", "forward"))
    assert found


def test_checker_catches_a_shrunk_interval(monkeypatch):
    original = BoundLpDist.interval_propagate

    def interval_propagate(self, *v):
        lo, hi = original(self, *v)
        return lo, hi - 0.02 * (hi - lo)

    monkeypatch.setattr(BoundLpDist, "interval_propagate", interval_propagate)
    found = check_case(_one_layer_case(math.inf), radii=(0.05,), kinds=("sym",), specs=("logits",),
                       methods=("IBP",), ties=False)
    assert violating_methods(found) == {"IBP"}, found


def _one_layer_case(p):
    torch.manual_seed(3)
    model = create_model("linf_dist_mlp", input_shape=(5,), num_classes=4, depth=1, p=p, mean=0.3,
                         std=0.5, identity_init=False).eval()
    with torch.no_grad():
        model.layers[0].bias.copy_(torch.randn(4))
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(3))
    return Case(model, x, p, "linf_dist", f"one-layer p={p}")
