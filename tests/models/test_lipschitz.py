"""|g(x) − g(x')|∞ <= L·|x − x'|∞ for ℓ∞-dist nets at p = inf in eval mode, L = model.lipschitz_linf.

Nets use a non-trivial normalisation (CIFAR's mean and std, or MNIST's)
and a non-zero running mean (a few train-mode batches first).  Pairs are
random and adversarial (signed-gradient steps and a short PGD on the
difference quotient); the adversarial search reaches the bound (the
constant is tight), and the same search breaks the bound for a p = 8 net,
so the test is able to fail.
"""
from __future__ import annotations

import math

import pytest
import torch

from linf_plugin.data import dataset_info
from linf_plugin.models import create_model
from linf_plugin.nn import set_p

REL_TOL = 1e-9  # float64


def _warmed(name, data, depth=4, width=48, seed=0, **kw):
    torch.manual_seed(seed)
    info = dataset_info(data)
    extra = {"depth": depth, "width": width} if name in ("linf_dist_mlp", "linf_dist_hybrid") else {}
    net = create_model(name, info.input_shape, info.num_classes, mean=info.mean, std=info.std, **extra, **kw)
    net = net.double().train()
    with torch.no_grad():
        for _ in range(3):  # running means become non-zero
            net(torch.rand(32, *info.input_shape, dtype=torch.float64))
    return net.eval(), info


def _ratio(net, x, x2):
    with torch.no_grad():
        num = (net(x) - net(x2)).abs().amax(1)
    den = (x - x2).flatten(1).abs().amax(1)
    return num / den


def _adversarial_ratio(net, x, delta, steps=8, seed=0, outputs=4):
    """Best difference quotient found near ``x`` at radius ``delta``.

    Two searches: a signed-gradient step for each of the first ``outputs``
    logits (exact on a linear piece of an ℓ∞-dist net, so it attains the
    constant), and a short PGD on
    ``|g(x') − g(x)|∞`` in the ℓ∞ ball of radius ``delta``.
    """
    gen = torch.Generator().manual_seed(seed)
    x1 = x.clone().requires_grad_(True)
    out = net(x1)
    best = torch.zeros(x.shape[0], dtype=x.dtype)
    for k in range(min(outputs, out.shape[1])):
        (g,) = torch.autograd.grad(out[:, k].sum(), x1, retain_graph=True)
        best = torch.maximum(best, _ratio(net, x, x + delta * g.sign()))
    base = out.detach()
    x2 = (x + delta * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1)).requires_grad_(True)
    for _ in range(steps):
        (g,) = torch.autograd.grad((net(x2) - base).abs().amax(1).sum(), x2)
        with torch.no_grad():
            x2 = (x + (x2 + delta / 4 * g.sign() - x).clamp(-delta, delta)).requires_grad_(True)
    return torch.maximum(best, _ratio(net, x, x2.detach()))


@pytest.mark.parametrize("name,data", [("linf_dist_mlp", "cifar10"), ("linf_dist_mlp", "mnist"),
                                       ("linf_dist_mlp_5x128", "digits")])
def test_random_pairs_respect_the_bound(name, data):
    net, info = _warmed(name, data)
    lip = net.lipschitz_linf
    assert lip == pytest.approx(1 / info.std)
    assert any(m.mean_shift.running_mean.abs().max() > 0 for m in net.layers[:-1])
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for scale in (1e-4, 1e-2, 0.1, 1.0):
        x = torch.rand(64, *info.input_shape, generator=gen, dtype=torch.float64)
        x2 = x + scale * (2 * torch.rand(x.shape, generator=gen, dtype=torch.float64) - 1)
        worst = max(worst, float((_ratio(net, x, x2) / lip).max()))
    far = torch.rand(64, *info.input_shape, generator=gen, dtype=torch.float64)
    worst = max(worst, float((_ratio(net, far, torch.rand_like(far)) / lip).max()))
    assert worst <= 1 + REL_TOL


@pytest.mark.parametrize("name,data", [("linf_dist_mlp", "cifar10"), ("linf_dist_mlp_5x128", "digits")])
def test_adversarial_pairs_reach_but_never_exceed_the_bound(name, data):
    net, info = _warmed(name, data, depth=3, width=32)
    lip = net.lipschitz_linf
    x = torch.rand(6, *info.input_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for delta in (1e-3, 0.05):
        ratio = _adversarial_ratio(net, x, delta) / lip
        assert ratio.max() <= 1 + REL_TOL
        assert ratio.max() >= 0.999  # the search is strong enough to find the (tight) constant


def test_a_p8_net_breaks_the_bound_the_same_search_respects_at_p_inf():
    """At p = 8 an ℓp-dist layer is only d^(1/8)-Lipschitz, so 1/std is no bound: the test can fail."""
    net, info = _warmed("linf_dist_mlp", "digits", depth=4, width=64, seed=3)
    lip_inf = net.lipschitz_linf
    set_p(net, 8.0)
    assert net.lipschitz_linf is None
    x = torch.rand(6, *info.input_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ratio_p8 = _adversarial_ratio(net, x, 0.05) / lip_inf
    assert ratio_p8.max() > 1.05
    set_p(net, math.inf)
    assert (_adversarial_ratio(net, x, 0.05) / net.lipschitz_linf).max() <= 1 + REL_TOL


def test_float32_nets_respect_the_bound_up_to_rounding():
    net, info = _warmed("linf_dist_mlp", "cifar10")
    net = net.float()
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(64, *info.input_shape, generator=gen)
    x2 = x + 0.01 * (2 * torch.rand(x.shape, generator=gen) - 1)
    with torch.no_grad():
        num = (net(x) - net(x2)).abs().amax(1)
    # rounding of values of magnitude ~|g| adds a few ulps
    slack = 8 * torch.finfo(torch.float32).eps * net(x).abs().amax(1).detach()
    assert torch.all(num <= net.lipschitz_linf * (x - x2).flatten(1).abs().amax(1) + slack)
