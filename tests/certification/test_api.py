"""certify(): one API, data forms, bad input, curves, results as data."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from linf_plugin.certification import (METHODS, CertResult, CurveResult, applicable_methods, certified_accuracy_curve,
                                      certify, curve_from_result)
from linf_plugin.data import load_dataset
from linf_plugin.models import create_model


@pytest.fixture(scope="module")
def linf_net():
    torch.manual_seed(0)
    net = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=3, width=32, mean=0.3, std=0.37)
    net.train()
    net(torch.rand(64, 1, 8, 8))
    return net.eval()


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "test").subset(40)


def test_applicable_methods():
    net = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=2, width=8)
    assert applicable_methods(net) == METHODS
    assert net.training  # asking did not change the mode
    hybrid = create_model("linf_dist_hybrid", input_shape=(1, 8, 8), num_classes=10, depth=2, width=8)
    assert applicable_methods(hybrid) == ("ibp", "crown-ibp", "crown", "alpha-crown")
    assert applicable_methods(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))) == \
        ("ibp", "crown-ibp", "crown", "alpha-crown")


def test_result_fields_and_json_roundtrip(linf_net, data):
    res = certify(linf_net, data, 0.02, "margin")
    assert isinstance(res, CertResult)
    assert res.n == 40 and res.method == "margin" and res.eps == 0.02
    assert res.model_name == "linf_dist_mlp"
    assert res.correct.dtype == res.certified.dtype == torch.bool and res.radius.dtype == torch.float64
    assert res.radius.shape == (40,) and res.certified.device.type == "cpu"
    assert res.wall_time > 0
    assert not (res.certified & ~res.correct).any()
    assert torch.equal(res.certified, res.correct & (res.radius > 0.02))
    saved = json.loads(json.dumps(res.to_dict()))
    # the saved format: plain lists, as results saved before the fields were tensors
    assert saved["certified"] == [bool(v) for v in res.certified] and isinstance(saved["radius"][0], float)
    back = CertResult.from_dict(saved)
    assert torch.equal(back.certified, res.certified) and torch.equal(back.radius, res.radius)
    assert "certified" in res.summary()


def test_data_forms_agree(linf_net, data):
    ref = certify(linf_net, data, 0.01, "interval")
    for form in ((data.x, data.y), TensorDataset(data.x, data.y), DataLoader(TensorDataset(data.x, data.y),
                                                                              batch_size=7)):
        assert torch.equal(certify(linf_net, form, 0.01, "interval", batch_size=9).certified, ref.certified)


def test_state_is_restored(linf_net, data):
    linf_net.train()
    certify(linf_net, data, 0.01, "margin")
    assert linf_net.training and all(m.training for m in linf_net.modules())
    linf_net.eval()


@pytest.mark.parametrize("eps", [-0.1, math.nan, math.inf])
def test_bad_eps(linf_net, data, eps):
    with pytest.raises(ValueError, match="eps"):
        certify(linf_net, data, eps, "margin")


def test_eps_as_a_0d_tensor(linf_net, data):
    ref = certify(linf_net, data, 0.015, "margin")
    for eps in (torch.tensor(0.015, dtype=torch.float64), np.float64(0.015), np.array(0.015)):
        assert torch.equal(certify(linf_net, data, eps, "margin").certified, ref.certified)
    with pytest.raises(ValueError, match=r"0-d tensor, got a tensor of shape \(2,\)"):
        certify(linf_net, data, torch.tensor([0.01, 0.02]), "margin")
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        certify(linf_net, data, torch.tensor([0.01]), "margin")
    with pytest.raises(TypeError, match="eps"):
        certify(linf_net, data, torch.tensor(True), "margin")
    with pytest.raises(TypeError, match="eps"):
        certify(linf_net, data, "0.1", "margin")


def test_bad_data(linf_net, data):
    with pytest.raises(ValueError, match="unknown certification method"):
        certify(linf_net, data, 0.1, "deepz")
    with pytest.raises(ValueError, match="shape"):
        certify(linf_net, (torch.rand(4, 1, 7, 7), torch.zeros(4, dtype=torch.long)), 0.1, "margin")
    with pytest.raises(ValueError, match="labels"):
        certify(linf_net, (torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long)), 0.1, "margin")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        certify(linf_net, (torch.rand(2, 1, 8, 8), torch.tensor([3, 12])), 0.1, "margin")
    with pytest.raises(ValueError, match="empty"):
        certify(linf_net, (torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), 0.1, "margin")
    with pytest.raises(ValueError, match="NaN"):
        certify(linf_net, (torch.full((2, 1, 8, 8), math.nan), torch.zeros(2, dtype=torch.long)), 0.1, "margin")
    with pytest.raises(TypeError):
        certify(linf_net, "digits", 0.1, "margin")


def test_margin_curve_is_one_pass_and_matches_per_eps(linf_net, data):
    grid = [0.0, 0.005, 0.01, 0.05]
    curve = certified_accuracy_curve(linf_net, data, grid, "margin")
    assert curve.certified_accuracy.dtype == curve.eps.dtype == torch.float64 and curve.certified.shape == (40, 4)
    for j, e in enumerate(grid):
        per_eps = certify(linf_net, data, e, "margin")
        assert curve.certified_accuracy[j] == per_eps.certified_accuracy
        assert torch.equal(curve.certified[:, j], per_eps.certified)
    assert torch.equal(curve.certified_accuracy, curve.certified_accuracy.sort(descending=True).values)
    from_result = curve_from_result(certify(linf_net, data, 0.0, "margin"), grid)
    assert torch.equal(from_result.certified_accuracy, curve.certified_accuracy)
    back = CurveResult.from_dict(json.loads(json.dumps(curve.to_dict())))
    assert torch.equal(back.certified, curve.certified) and torch.equal(back.eps, curve.eps)


def test_curve_signature_method_required_and_the_old_forms_warn(linf_net, data):
    grid = [0.0, 0.01]
    ref = certified_accuracy_curve(linf_net, data, grid, "margin")
    with pytest.warns(DeprecationWarning, match="without a method"):
        old = certified_accuracy_curve(linf_net, data, grid)
    assert torch.equal(old.certified_accuracy, ref.certified_accuracy)
    res = certify(linf_net, data, 0.0, "margin")
    with pytest.warns(DeprecationWarning, match="curve_from_result"):
        old = certified_accuracy_curve(res, eps_grid=grid)
    assert torch.equal(old.certified_accuracy, ref.certified_accuracy)
    with pytest.raises(TypeError, match="missing required argument.*data"):
        certified_accuracy_curve(linf_net, eps_grid=grid, method="margin")
    with pytest.raises(ValueError, match="empty"):
        certified_accuracy_curve(linf_net, data, [], "margin")
    with pytest.raises(ValueError, match="holds no radii"):
        curve_from_result(certify(linf_net, data, 0.01, "interval"), grid)
    assert torch.equal(certified_accuracy_curve(linf_net, data, torch.tensor(grid), "margin").certified_accuracy,
                       ref.certified_accuracy)


def test_bisection_radius_is_certified_and_tight(linf_net, data):
    grid = [0.001, 0.01]
    curve = certified_accuracy_curve(linf_net, data, grid, "ibp", bisect=True, bisect_steps=8)
    radius = curve.radius
    tol = curve.extra["bisect_tolerance"]
    assert tol == pytest.approx(0.01 / 2 ** 8)
    for i in torch.nonzero(radius > 0).flatten()[:5].tolist():
        xi, yi = data.x[i:i + 1], data.y[i:i + 1]
        assert certify(linf_net, (xi, yi), float(radius[i]), "ibp").certified[0]
        if radius[i] + tol < 0.01:
            assert not certify(linf_net, (xi, yi), float(radius[i] + tol), "ibp").certified[0]
    per_eps = certified_accuracy_curve(linf_net, data, grid, "ibp")
    # bisection can only lose what lies within one tolerance of the grid point
    assert (curve.certified_accuracy <= per_eps.certified_accuracy + 1e-12).all()


def test_alpha_crown_batch_limit_follows_the_nonlinear_sizes(monkeypatch):
    from linf_plugin.certification.bound_prop import ALPHA_MEMORY_ENV, alpha_crown_batch_limit

    info = load_dataset("digits", "test")
    mlp = create_model("mlp_3layer", input_shape=(1, 8, 8), num_classes=10, mean=info.mean, std=info.std).eval()
    x = info.x[:3]
    per_sample = 9 / 4 * 4 * (256 + 128) ** 2  # ReLU outputs 256 and 128, float32
    assert alpha_crown_batch_limit(mlp, x, budget_gb=1.0) == int(2 ** 30 // per_sample)
    assert alpha_crown_batch_limit(mlp.double(), x.double(), budget_gb=1.0) == int(2 ** 30 // (2 * per_sample))
    mlp.float()
    assert alpha_crown_batch_limit(mlp, x, budget_gb=1e-9) == 1
    monkeypatch.setenv(ALPHA_MEMORY_ENV, "0.5")
    assert alpha_crown_batch_limit(mlp, x) == int(2 ** 29 // per_sample)
    monkeypatch.setenv(ALPHA_MEMORY_ENV, "-1")
    with pytest.raises(ValueError, match=ALPHA_MEMORY_ENV):
        alpha_crown_batch_limit(mlp, x)


def test_alpha_crown_in_capped_batches_is_still_sound(monkeypatch, data):
    """A budget that forces one sample per batch still gives one verdict per point, none of them broken."""
    from linf_plugin.attacks import pgd_attack
    from linf_plugin.certification.bound_prop import ALPHA_MEMORY_ENV

    info = load_dataset("digits", "test")
    torch.manual_seed(0)
    mlp = create_model("mlp_3layer", input_shape=(1, 8, 8), num_classes=10, mean=info.mean, std=info.std).eval()
    monkeypatch.setenv(ALPHA_MEMORY_ENV, "1e-9")
    pts = info.subset(6)
    res = certify(mlp, pts, 0.01, "alpha-crown", batch_size=256, alpha_iterations=3)
    assert res.n == 6 and res.certified.shape == (6,)
    assert not (res.certified & ~res.correct).any()
    adv = pgd_attack(mlp, pts.x, pts.y, 0.01, steps=20)
    assert not (res.certified & adv.success).any()  # results combine: bool CPU tensors


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_bound_propagation_builds_no_autograd_graph(linf_net, data, method, monkeypatch):
    # A graph through the bounds of a 6x5120 net costs gigabytes per input;
    # only alpha-CROWN needs gradients (for its own parameters).
    from linf_plugin.lirpa.bound import BoundLpDist

    seen = []
    for name in ("interval_propagate", "bound_backward"):
        original = getattr(BoundLpDist, name)

        def spy(self, *a, _original=original, **k):
            seen.append(torch.is_grad_enabled())
            return _original(self, *a, **k)

        monkeypatch.setattr(BoundLpDist, name, spy)
    res = certify(linf_net, data, 0.02, method)
    assert seen and not any(seen)
    assert res.n == 40
