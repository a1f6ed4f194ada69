"""The ReLU baselines, normalisation included, are bounded soundly by the installed auto_LiRPA."""
from __future__ import annotations

import pytest
import torch

import linf_plugin  # noqa: F401  (compat layer before auto_LiRPA)
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from linf_plugin.models import create_model, list_models

from ..lirpa.lirpa_check import assert_contains, sampled_values


def _cases():
    for name in list_models(family="relu"):
        for method in ("IBP", "CROWN"):
            slow = name.startswith("cnn_7") and method == "CROWN"  # ~10 s each on 2 busy cores
            yield pytest.param(name, method, marks=[pytest.mark.slow] if slow else [], id=f"{name}-{method}")


@pytest.mark.parametrize("name,method", list(_cases()))
def test_auto_lirpa_bounds_contain_sampled_outputs(name, method):
    torch.manual_seed(0)
    small = {"width": 8, "linear_size": 32} if name.startswith("cnn_7") else {}
    model = create_model(name, (3, 8, 8), 10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), **small)
    model(torch.rand(8, 3, 8, 8))  # non-trivial batch-norm statistics
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    eps = 0.02
    bounded = BoundedModule(model, x)
    lower, upper = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=eps)),),
                                          method=method)
    assert_contains(lower.detach(), upper.detach(), sampled_values(model, x - eps, x + eps, n=40), method)
    assert torch.all(upper - lower > 0)
