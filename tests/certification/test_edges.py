"""The edges of certify(): data range, train-mode submodules, NaN, one class, half precision, users' own models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from linf_plugin.certification import (METHODS, MarginCertificateError, applicable_methods, certify, eval_mode,
                                       interval_bounds)
from linf_plugin.data import linf_box
from linf_plugin.models import create_model

BOUND_PROP = ("ibp", "crown-ibp", "crown", "alpha-crown")


def _linf(num_classes=10, seed=0):
    torch.manual_seed(seed)
    net = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=num_classes, depth=3, width=16)
    net.train()
    net(torch.rand(64, 1, 8, 8))
    return net.eval()


# -- 1. data range ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_inputs_outside_the_data_range_raise_on_every_path(method):
    net = _linf()
    torch.manual_seed(0)
    x = 3 + 0.2 * torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    for form in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=5)):
        with pytest.raises(ValueError, match=r"outside data_range=\(0, 1\)"):
            certify(net, form, 1.0, method, alpha_iterations=2)


@pytest.mark.parametrize("method", ["interval", "ibp", "crown"])
def test_the_box_is_clipped_to_a_given_data_range(method):
    net = _linf()
    x = 3 + 0.2 * torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    wide = certify(net, (x, y), 1.0, method, data_range=(-math.inf, math.inf))
    clipped = certify(net, (x, y), 1.0, method, data_range=(3.0, 3.2))
    assert not wide.certified.any()  # eps = 1 around x is far too large without clipping
    assert (clipped.certified >= wide.certified).all()
    tight = certify(net, (x, y), 1.0, method, data_range=(float(x.min()), float(x.max())))
    assert tight.n == 8


def test_empty_or_bad_data_range_raises():
    net = _linf()
    x, y = torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    for bad in ((1.0, 0.0), (0.5, 0.5), (0.0, math.nan)):
        with pytest.raises(ValueError, match="data_range"):
            certify(net, (x, y), 0.1, "ibp", data_range=bad)
    with pytest.raises(ValueError, match="data_range"):
        linf_box(x + 2, 0.1)
    with pytest.raises(ValueError, match="empty"):
        linf_box(x, 0.1, (1.0, 0.0))
    lo, hi = linf_box(x, 0.1, (0.0, 1.0), outward=True)
    assert (lo <= x).all() and (x <= hi).all()


# -- 3. train-mode submodules -------------------------------------------------------------------
def test_interval_bounds_refuse_one_mean_shift_in_train_mode():
    net = _linf()
    shift = next(m for m in net.modules() if type(m).__name__ == "MeanShiftNorm")
    shift.train()
    before = shift.running_mean.clone()
    x = torch.rand(4, 1, 8, 8)
    lo, hi = linf_box(x, 0.01, outward=True)
    with pytest.raises(MarginCertificateError, match="eval mode"):
        interval_bounds(net, lo, hi)
    assert torch.equal(shift.running_mean, before)
    # the margin path refuses the same model the same way
    from linf_plugin.certification import margin_certify
    with pytest.raises(MarginCertificateError):
        margin_certify(net, x, torch.zeros(4, dtype=torch.long), 0.01)
    assert torch.equal(shift.running_mean, before)
    # certify() switches everything to eval for the call and restores the mixed state after
    for method in ("interval", "margin", "ibp"):
        certify(net, (x, net.eval()(x).argmax(1)), 0.01, method)
        shift.train()
        assert torch.equal(shift.running_mean, before)
    shift.train()
    certify(net, (x, torch.zeros(4, dtype=torch.long)), 0.01, "interval")
    assert shift.training and not net.training and torch.equal(shift.running_mean, before)


def test_eval_mode_restores_each_submodule():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    net.eval()
    net[1].train()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == [False, False, True, False]


# -- 4. NaN ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_nan_weight_or_input_is_refused_on_every_method(method):
    net = _linf()
    x, y = torch.rand(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        net.layers[1].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"layers\.1\.weight.*NaN"):
        certify(net, (x, y), 0.01, method, alpha_iterations=2)
    with pytest.raises(ValueError, match="NaN"):
        certify(_linf(), (torch.full((2, 1, 8, 8), math.nan), y[:2]), 0.01, method)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_overflowing_logits_never_certify(method):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[1].weight.fill_(1e37)
        model[3].weight.fill_(1e3)
    x = torch.rand(4, 1, 8, 8)
    res = certify(model, (x, torch.zeros(4, dtype=torch.long)), 0.0, method, alpha_iterations=2)
    assert not res.certified.any() and not res.correct.any()


@pytest.mark.parametrize("method", ["margin", "interval"])
def test_overflowing_logits_never_certify_linf(method):
    net = _linf()
    with torch.no_grad():  # finite weights whose distances overflow float32 in the second layer
        net.layers[0].weight.fill_(3e38)
        net.layers[1].weight.fill_(-3e38)
    x = torch.rand(4, 1, 8, 8)
    res = certify(net, (x, torch.zeros(4, dtype=torch.long)), 0.0, method)
    assert not res.certified.any()


# -- 5. one class, half precision -------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_one_output_is_a_clear_error(method):
    model = _linf(num_classes=1) if method in ("margin", "interval") else \
        nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    with pytest.raises(ValueError, match="at least 2 classes"):
        certify(model, (torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), 0.01, method)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_is_refused_before_any_bound(method, dtype, monkeypatch):
    import linf_plugin.lirpa as lirpa

    def no_bounds(*a, **k):
        raise AssertionError("a bounded module was built for a half-precision model")

    monkeypatch.setattr(lirpa, "bounded_module", no_bounds)
    net = _linf().to(dtype)
    with pytest.raises(TypeError, match="float32 or float64"):
        certify(net, (torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), 0.01, method)


# -- 6. a user's own model ------------------------------------------------------------------------
def _user_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    cnn.train()(torch.rand(64, 1, 8, 8))
    for m in (mlp, cnn):
        with torch.no_grad():
            m[-1].bias[:3] += 3.0  # predictions (and so correct labels) mostly in {0, 1, 2}
    return {"mlp": mlp.eval(), "cnn": cnn.eval()}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("method", BOUND_PROP)
def test_user_models_with_labels_that_miss_classes(name, method):
    model = _user_models()[name]
    assert applicable_methods(model) == BOUND_PROP
    torch.manual_seed(1)
    x = torch.rand(12, 1, 8, 8)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clamp(max=2)  # labels only in {0, 1, 2}: K must come from the model, not from y.max()
    assert int(y.max()) <= 2
    res = certify(model, (x, y), 1e-3, method, alpha_iterations=2)
    assert res.n == 12 and torch.equal(res.correct, pred == y)
    assert res.certified.any() and res.float_rigorous
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        certify(model, (x, torch.full((12,), 10)), 1e-3, method)


def test_inputs_that_the_model_dtype_would_round_are_refused():
    # A float64 input that float32 cannot hold would be certified around its rounded neighbour.
    from linf_plugin.certification import certify

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.full((2, 1, 2, 2), 0.1, dtype=torch.float64)          # 0.1 is not a float32
    y = torch.zeros(2, dtype=torch.long)
    for method in ("ibp", "crown"):
        with pytest.raises(ValueError, match="casting changes"):
            certify(model, (x, y), 0.01, method)
    exact = torch.full((2, 1, 2, 2), 0.25, dtype=torch.float64)      # exactly representable: fine
    assert certify(model, (exact, y), 0.01, "ibp").n == 2
