"""Invariants between certificates and attacks on trained digits models, and a
soundness fuzz: no certified point may ever be broken."""
from __future__ import annotations

import pytest
import torch

from linf_plugin.attacks import pgd_attack
from linf_plugin.certification import certify
from linf_plugin.data import linf_box
from linf_plugin.models import create_model

EPS = (0.05, 0.1)


def _methods(model, fast=True):
    from linf_plugin.certification import applicable_methods

    return [m for m in applicable_methods(model) if not (fast and m == "alpha-crown")]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["linf", "relu", "hybrid"])
def test_certified_implies_pgd_fails_and_accuracies_are_ordered(family, request, digits_test):
    model = request.getfixturevalue(f"trained_{family}")
    data = digits_test
    for eps in EPS:
        pgd = pgd_attack(model, data.x, data.y, eps, steps=100, generator=torch.Generator().manual_seed(0))
        success = pgd.success
        pgd_acc = pgd.robust_accuracy
        results = {m: certify(model, data, eps, m) for m in _methods(model)}
        sub = data.subset(48)  # alpha-CROWN is slow; check it on a subset
        results["alpha-crown"] = certify(model, sub, eps, "alpha-crown", alpha_iterations=10)
        for method, res in results.items():
            n = res.n
            broken = res.certified & success[:n]
            assert not broken.any(), f"{method} certified {broken.sum()} points PGD broke at eps={eps}"
            if n == len(data):
                assert res.certified_accuracy <= pgd_acc + 1e-12 <= res.clean_accuracy + 1e-12
        if "margin" in results:
            assert (results["interval"].certified | ~results["margin"].certified).all()
        assert pgd_acc < results[_methods(model)[0]].clean_accuracy + 1e-12
        if eps == EPS[0]:  # trained models certify real points: the checks above are not vacuous
            assert max(r.certified_accuracy for r in results.values()) > 0.2


def _random_models(seed):
    torch.manual_seed(seed)
    linf = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=3, width=24, mean=0.3,
                        std=0.4)
    linf.train()
    linf(torch.rand(64, 1, 8, 8))
    hybrid = create_model("linf_dist_hybrid", input_shape=(1, 8, 8), num_classes=10, depth=2, width=16,
                          head_hidden=16, mean=0.3, std=0.4)
    hybrid.train()
    hybrid(torch.rand(64, 1, 8, 8))
    relu = create_model("mlp_3layer", input_shape=(1, 8, 8), num_classes=10)
    return [m.eval() for m in (linf, hybrid, relu)]


def _random_search_breaks(model, x, y, eps, n=400, generator=None):
    """Uniform samples and corners of the (inward-rounded) box; True where any sample flips the prediction."""
    lo, hi = linf_box(x, eps)
    broken = torch.zeros(x.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for kind in ("uniform", "corner"):
            r = torch.rand((n,) + x.shape, generator=generator)
            pts = lo + r * (hi - lo) if kind == "uniform" else torch.where(r < 0.5, lo, hi)
            pred = model(pts.reshape(-1, *x.shape[1:])).argmax(1).reshape(n, -1)
            broken |= (pred != y).any(0)
    return broken


@pytest.mark.parametrize("seed", [0, 1])
def test_soundness_fuzz_no_certified_point_is_broken(seed):
    g = torch.Generator().manual_seed(100 + seed)
    certified_total = 0
    for model in _random_models(seed):
        x = torch.rand(24, 1, 8, 8, generator=g)
        y = model(x).argmax(1)  # labels = predictions: any certificate is about robustness only
        for method in _methods(model, fast=False):
            # radii at which random nets certify some but not all points; the cheap
            # methods also get a larger one
            for eps in (0.01, 0.03) if method in ("margin", "interval", "ibp") else (0.01,):
                res = certify(model, (x, y), eps, method, alpha_iterations=5)
                idx = torch.nonzero(res.certified).flatten()
                if len(idx) == 0:
                    continue
                certified_total += len(idx)
                xs, ys = x[idx], y[idx]
                pgd = pgd_attack(model, xs, ys, eps, steps=30, restarts=2, loss="margin", generator=g)
                assert not pgd.success.any(), f"{method} eps={eps}: PGD broke a certified point"
                assert not _random_search_breaks(model, xs, ys, eps, generator=g).any(), \
                    f"{method} eps={eps}: random search broke a certified point"
    assert certified_total > 50  # the fuzz exercised real certificates
