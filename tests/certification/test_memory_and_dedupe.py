"""CROWN and CROWN-IBP batch by a memory estimate (#13 item 4); one margin_spec, one eval_mode, one box."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from linf_plugin.certification import certify
from linf_plugin.certification.bound_prop import BOUND_MEMORY_ENV, bound_batch_limit
from linf_plugin.models import create_model


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()


def test_bound_batch_limit_follows_the_estimate(monkeypatch):
    model, x = _mlp(), torch.rand(3, 1, 8, 8)
    monkeypatch.delenv(BOUND_MEMORY_ENV, raising=False)
    n_max, sizes = 64, [64, 48, 48, 10]  # leaf outputs (Flatten, Linear, ReLU, Linear) and the input
    assert bound_batch_limit("crown", model, x, budget_gb=1.0) == int(2 ** 30 // (20 * 4 * n_max ** 2))
    assert bound_batch_limit("crown", model.double(), x.double(), budget_gb=1.0) == \
        int(2 ** 30 // (20 * 8 * n_max ** 2))
    model.float()
    assert bound_batch_limit("crown-ibp", model, x, budget_gb=1.0) == \
        int(2 ** 30 // (16 * 4 * 10 * (sum(sizes) + 64)))
    assert bound_batch_limit("ibp", model, x) is None
    assert bound_batch_limit("crown", model, x) == int(8 * 2 ** 30 // (20 * 4 * n_max ** 2))  # CPU default 8 GiB
    monkeypatch.setenv(BOUND_MEMORY_ENV, "0.001")
    assert bound_batch_limit("crown", model, x) == int(0.001 * 2 ** 30 // (20 * 4 * n_max ** 2))
    for bad in ("-1", "zero"):
        monkeypatch.setenv(BOUND_MEMORY_ENV, bad)
        with pytest.raises(ValueError, match=BOUND_MEMORY_ENV):
            bound_batch_limit("crown", model, x)


def test_the_6x5120_cifar_net_gets_a_batch_that_fits_the_budget(monkeypatch):
    monkeypatch.delenv(BOUND_MEMORY_ENV, raising=False)
    net = create_model("linf_dist_mlp", input_shape=(3, 32, 32), num_classes=10, depth=6, width=5120).eval()
    x = torch.rand(1, 3, 32, 32)
    # measured on an H200: 2.6 GiB at 1 input, 7.5 at 4, 27.2 at 16, 122 at 74 (1.64 GiB per input)
    limit = bound_batch_limit("crown", net, x)
    assert 1 <= limit and 1.0 + 1.64 * limit <= 8 + 1.0
    assert bound_batch_limit("crown", net, x, budget_gb=24.0) <= (24 - 2.6) / 1.64 + 1
    assert bound_batch_limit("crown-ibp", net, x) >= 64  # cheap: 1.6 GiB at 16 and 1.7 at 64 measured


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_a_tiny_budget_bounds_one_input_at_a_time_with_the_same_verdicts(method, monkeypatch):
    from auto_LiRPA import BoundedModule

    model, x = _mlp(), torch.rand(7, 1, 8, 8)
    y = model(x).argmax(1)
    ref = certify(model, (x, y), 0.01, method, rigorous=False)
    batches = []
    original = BoundedModule.compute_bounds

    def spy(self, *a, **k):
        batches.append(k["x"][0].shape[0])
        return original(self, *a, **k)

    monkeypatch.setattr(BoundedModule, "compute_bounds", spy)
    monkeypatch.setenv(BOUND_MEMORY_ENV, "1e-9")
    res = certify(model, (x, y), 0.01, method, rigorous=False)
    assert batches == [1] * 7
    assert np.array_equal(res.certified, ref.certified)


def test_one_margin_spec_one_box_one_eval_mode():
    from linf_plugin.certification import bound_prop
    from linf_plugin.certification.api import eval_mode
    from linf_plugin.nn import lp_dist_layers
    from linf_plugin.training import evaluate, losses

    assert losses.margin_spec is bound_prop.margin_spec
    net = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=3, width=8)
    for layer in lp_dist_layers(net):
        layer.p = 8.0
    net.eval()
    net.layers[1].train()  # a mixed state must come back as it was
    state = [m.training for m in net.modules()]
    for manager in (eval_mode(net), evaluate.eval_mode(net)):
        with manager:
            assert not any(m.training for m in net.modules())
        assert [m.training for m in net.modules()] == state
    assert all(layer.p == 8.0 for layer in lp_dist_layers(net))
    with evaluate.eval_mode(net):
        assert all(math.isinf(layer.p) for layer in lp_dist_layers(net))
