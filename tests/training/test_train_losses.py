"""Losses and the training-time bounds: formulas, gradients, and soundness by sampling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linf_plugin.models import create_model
from linf_plugin.nn import set_p
from linf_plugin.training.bounds import HybridBounds, LirpaBounds, elided_margin_lower
from linf_plugin.training.losses import (MixtureLoss, bound_loss, clipped_hinge, logit_margins, margin_spec,
                                      robust_cross_entropy, theta_in_logits)


def _authors_clipped_hinge(logits, y, theta):
    """The paper's eq. 9 term written as in the authors' code: bounds ±θ/2 on every logit, margin/θ, clamp, max."""
    lower, upper = logits - theta / 2, logits + theta / 2
    margin = upper - lower.gather(1, y.view(-1, 1))  # z_j - z_y + θ
    margin = margin.scatter(1, y.view(-1, 1), 0.0)
    return (margin / theta).clamp(0, 1).max(dim=1).values


def test_clipped_hinge_matches_paper_form():
    torch.manual_seed(0)
    logits = torch.randn(64, 10) * 3
    y = torch.randint(0, 10, (64,))
    for theta in (0.1, 1.0, 5.0):
        assert torch.allclose(clipped_hinge(logits, y, theta), _authors_clipped_hinge(logits, y, theta), atol=1e-6)


def test_clipped_hinge_values():
    y = torch.tensor([0, 0, 0, 0])
    logits = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.5, 0.0], [-1.0, 0.0]])
    # margins 3, 1, 0.5, -1 with θ = 1: 0 (beyond θ), 0 (exactly θ), 0.5, 1 (misclassified: clipped)
    assert clipped_hinge(logits, y, 1.0).tolist() == [0.0, 0.0, 0.5, 1.0]
    assert theta_in_logits(0.9, 0.3081) == pytest.approx(0.9 / 0.3081)


def test_mixture_loss_and_temperature_gradient():
    torch.manual_seed(1)
    loss_fn = MixtureLoss()
    assert loss_fn.scale.item() == 1.0
    logits = torch.randn(32, 10, requires_grad=True)
    y = torch.randint(0, 10, (32,))
    loss, parts = loss_fn(logits, y, 0.05, 2.0)
    expect = 0.05 * F.cross_entropy(logits, y) + clipped_hinge(logits, y, 2.0).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    loss.backward()
    assert loss_fn.scale.grad is not None and loss_fn.scale.grad.abs() > 0
    # λ = 0 (the last phase): the temperature stays in the graph with a zero gradient (static graph for DDP)
    loss_fn.zero_grad()
    loss0, _ = loss_fn(logits.detach(), y, 0.0, 2.0)
    loss0.backward()
    assert loss_fn.scale.grad is not None and loss_fn.scale.grad.item() == 0.0
    assert loss0.item() == pytest.approx(parts["hinge"].item(), rel=1e-6)


def test_margin_spec_and_robust_ce():
    torch.manual_seed(2)
    logits = torch.randn(16, 10)
    y = torch.randint(0, 10, (16,))
    c = margin_spec(y, 10)
    assert c.shape == (16, 9, 10)
    margins = torch.einsum("bjk,bk->bj", c, logits)
    for b in range(16):
        others = [logits[b, y[b]] - logits[b, j] for j in range(10) if j != y[b]]
        assert torch.allclose(margins[b], torch.stack(others))
    assert torch.allclose(logit_margins(logits, y), margins.min(dim=1).values)
    # with exact margins as "bounds", robust CE is the ordinary CE
    assert torch.allclose(robust_cross_entropy(margins), F.cross_entropy(logits, y, reduction="none"), atol=1e-5)
    lb = margins - 1.0
    padded = torch.cat([torch.zeros(16, 1), -lb], 1)
    ref = F.cross_entropy(padded, torch.zeros(16, dtype=torch.long), reduction="none")
    assert torch.allclose(robust_cross_entropy(lb), ref, atol=1e-6)
    loss, parts = bound_loss(logits, y, lb, 0.25)
    assert loss.item() == pytest.approx(0.25 * F.cross_entropy(logits, y).item() + 0.75 * ref.mean().item(), rel=1e-5)
    natural, _ = bound_loss(logits, y, None, 0.25)
    assert natural.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_elided_last_layer_is_sound_and_tight():
    torch.manual_seed(3)
    lin = torch.nn.Linear(6, 4)
    lower = torch.randn(5, 6)
    upper = lower + torch.rand(5, 6)
    y = torch.randint(0, 4, (5,))
    lb = elided_margin_lower(lower, upper, lin, y)
    c = margin_spec(y, 4)
    h = lower + (upper - lower) * torch.rand(2000, 5, 6)
    m = torch.einsum("bjk,nbk->nbj", c, lin(h))
    assert (m >= lb - 1e-5).all()
    # tight: the box corner chosen by the sign of each merged weight row attains it
    w = torch.matmul(c, lin.weight)
    corner = torch.where(w > 0, lower.unsqueeze(1), upper.unsqueeze(1))  # (B, K-1, H)
    attained = torch.einsum("bjh,bjh->bj", w, corner) + torch.matmul(c, lin.bias)
    assert torch.allclose(attained, lb, atol=1e-5)


def _digits_like(n=24, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _sample_box(x, eps, k, seed=5):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    u = torch.rand((k,) + x.shape, generator=g)
    u = torch.where(torch.rand((k,) + x.shape, generator=g) < 0.3, (u > 0.5).float(), u)  # corners too
    return lo + (hi - lo) * u


@pytest.mark.parametrize("mode", ["lipschitz", "interval"])
def test_hybrid_bounds_are_sound_at_p_inf(mode):
    torch.manual_seed(6)
    model = create_model("linf_dist_hybrid", input_shape=(1, 8, 8), num_classes=10, depth=2, width=32,
                         head_hidden=16, mean=(0.3,), std=0.4).double()
    x, y = _digits_like()
    x = x.double()
    model.train()
    model(x)  # give the mean shift a non-trivial running mean
    model.eval()
    set_p(model, math.inf)
    eps = 0.05
    logits, lb = HybridBounds(model, mode)(x, y, eps)
    assert torch.allclose(logits, model(x))
    c = margin_spec(y, 10, dtype=x.dtype)
    with torch.no_grad():
        for xs in _sample_box(x, eps, 40):
            m = torch.einsum("bjk,bk->bj", c, model(xs))
            assert (m >= lb - 1e-9).all()


def test_hybrid_interval_bounds_tighter_than_lipschitz_and_differentiable():
    torch.manual_seed(7)
    model = create_model("linf_dist_hybrid", input_shape=(1, 8, 8), num_classes=10, depth=2, width=32,
                         head_hidden=16, mean=(0.3,), std=0.4)
    x, y = _digits_like()
    model.train()
    set_p(model, math.inf)
    _, lb_l = HybridBounds(model, "lipschitz")(x, y, 0.1)
    logits, lb_i = HybridBounds(model, "interval")(x, y, 0.1)
    assert (lb_i >= lb_l - 1e-5).all() and (lb_i > lb_l + 1e-4).any()
    lb_i.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # ε = 0: clean logits only
    logits0, none = HybridBounds(model, "interval")(x, y, 0.0)
    assert none is None and torch.allclose(logits0, logits)


@pytest.mark.parametrize("bound", ["ibp", "crown-ibp"])
def test_lirpa_bounds_are_sound(bound):
    torch.manual_seed(8)
    model = create_model("cnn_4layer", input_shape=(1, 8, 8), num_classes=10, mean=(0.3,), std=0.4)
    x, y = _digits_like(12)
    lb_mod = LirpaBounds(model, x[:2])
    lb_mod.eval()
    eps = 0.03
    logits, lb = lb_mod(x, y, eps, bound, crown_factor=0.5)
    assert torch.allclose(logits, model(x), atol=1e-5)
    c = margin_spec(y, 10)
    with torch.no_grad():
        for xs in _sample_box(x, eps, 30):
            m = torch.einsum("bjk,bk->bj", c, model(xs))
            assert (m >= lb - 1e-4).all()
    if bound == "crown-ibp":
        _, ibp = lb_mod(x, y, eps, "ibp")
        _, crown_only = lb_mod(x, y, eps, "crown-ibp", crown_factor=1.0)
        assert torch.allclose(lb, 0.5 * crown_only + 0.5 * ibp, atol=1e-5)
    lb_mod.train()  # auto_LiRPA detaches the weights in eval mode; training uses train mode
    _, lb = lb_mod(x, y, eps, bound, crown_factor=0.5)
    lb.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lirpa_bounds_load_a_resumed_models_weights_and_batch_norm_statistics():
    """A resume loads the checkpoint into the model, then into the BoundedModule (which keeps its own
    batch-norm statistics); auto_LiRPA 0.7's load_state_dict wants node names, not the model's."""
    torch.manual_seed(9)
    model = create_model("cnn_7layer_bn", input_shape=(1, 8, 8), num_classes=10, width=4, linear_size=16,
                         mean=(0.3,), std=0.4)
    x, y = _digits_like(6)
    lb_mod = LirpaBounds(model, x[:2])
    saved = create_model("cnn_7layer_bn", input_shape=(1, 8, 8), num_classes=10, width=4, linear_size=16,
                         mean=(0.3,), std=0.4)
    with torch.no_grad():
        for t in list(saved.parameters()) + [b for n, b in saved.named_buffers() if "running" in n]:
            t.add_(torch.rand_like(t))
    model.load_state_dict(saved.state_dict())
    lb_mod.load_from(model)
    mine = dict(lb_mod.bounded.named_buffers())
    running = [n for n, _ in model.named_buffers() if "running" in n]
    assert running and all(torch.equal(mine[n], dict(model.named_buffers())[n]) for n in running)
    lb_mod.eval()
    model.eval()
    logits, _ = lb_mod(x, y, 0.0)
    assert torch.allclose(logits, model(x), atol=1e-5)
