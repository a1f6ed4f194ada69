"""PGD: stays in the box, verifies its successes, breaks undefended models."""
from __future__ import annotations

import math

import pytest
import torch

from linf_plugin.attacks import pgd_attack
from linf_plugin.data import load_dataset
from linf_plugin.models import create_model


@pytest.fixture(scope="module")
def plain_mlp():
    """An undefended digits MLP trained for a few seconds with plain cross-entropy."""
    torch.manual_seed(0)
    tr = load_dataset("digits", "train")
    net = create_model("mlp_3layer", input_shape=(1, 8, 8), num_classes=10, mean=0.3, std=0.37)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(15):
        for xb, yb in tr.loader(batch_size=128, shuffle=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
    return net.eval()


def test_pgd_breaks_an_undefended_net_and_stays_in_the_box(plain_mlp):
    te = load_dataset("digits", "test")
    clean = (plain_mlp(te.x).argmax(1) == te.y).float().mean().item()
    assert clean > 0.9
    eps = 0.1
    res = pgd_attack(plain_mlp, te.x, te.y, eps, steps=20)
    assert res.robust_accuracy < clean - 0.3  # an undefended net falls apart at eps = 0.1
    delta = (res.x_adv.double() - te.x.double()).abs()
    assert (delta <= eps).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    # every success is a real misclassification at x_adv
    pred = plain_mlp(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != te.y)


def test_more_steps_and_restarts_never_hurt(plain_mlp):
    te = load_dataset("digits", "test").subset(120)
    weak = pgd_attack(plain_mlp, te.x, te.y, 0.05, steps=1, random_start=False)
    strong = pgd_attack(plain_mlp, te.x, te.y, 0.05, steps=30, restarts=3, generator=torch.Generator().manual_seed(1))
    assert strong.success.sum() >= weak.success.sum()
    assert strong.success.sum() > weak.success.sum()
    margin = pgd_attack(plain_mlp, te.x, te.y, 0.1, steps=30, loss="margin")
    assert margin.success.float().mean() > 0.3


def test_eps_zero_only_reports_clean_errors(plain_mlp):
    te = load_dataset("digits", "test")
    res = pgd_attack(plain_mlp, te.x, te.y, 0.0, steps=5)
    assert torch.equal(res.x_adv, te.x)
    assert torch.equal(res.success, plain_mlp(te.x).argmax(1) != te.y)


def test_train_mode_is_restored(plain_mlp):
    te = load_dataset("digits", "test").subset(8)
    plain_mlp.train()
    pgd_attack(plain_mlp, te.x, te.y, 0.05, steps=2)
    assert plain_mlp.training
    plain_mlp.eval()


@pytest.mark.parametrize("kw, match", [
    (dict(eps=-0.1), "eps"), (dict(eps=math.nan), "eps"), (dict(eps=math.inf), "eps"),
    (dict(loss="hinge"), "loss"), (dict(steps=-1), "steps"), (dict(restarts=0), "restarts"),
])
def test_bad_input(plain_mlp, kw, match):
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    args = dict(eps=0.1)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        pgd_attack(plain_mlp, x, y, **args)
    with pytest.raises(ValueError, match="y must"):
        pgd_attack(plain_mlp, x, torch.zeros(3, dtype=torch.long), 0.1)
