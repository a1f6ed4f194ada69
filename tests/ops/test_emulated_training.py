"""Every registered l_inf-dist and hybrid model trains one step through the CuPy path on the CPU.

Inside ``cupy_on_cpu`` (see conftest) every ``lp_dist`` / ``lp_dist_interval``
call of the model goes to ``CupyBackend`` -> the real ``CupyLauncher`` -> the
CPU stand-in for CuPy -> the g++-compiled ``.cu`` kernels.  A step is what
training does: the family's objective (the mixture loss; for hybrids the
interval bounds through every feature layer, ``feature_bounds="interval"``),
backward through the autograd Functions, and an optimizer step.  Loss,
gradients and updated parameters must match the same step on the torch
backend.  Before the launcher detached its arguments this failed at the first
layer (``BufferError``: DLPack refuses tensors that require grad), exactly
as on the GPU.

Widths are kept small so the emulator stays fast: entries that take a width
get one; the three 5120-wide entries have a fixed architecture, so their
constructor runs at emulator width here (``STAND_IN``), and the full-width
models train on a GPU in ``test_gpu.py``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from linf_plugin.models import create_model, list_models, model_family
from linf_plugin.nn import set_p
from linf_plugin.training.objectives import HybridObjective, LinfDistObjective
from linf_plugin.training.schedules import ScheduleState

FAMILIES = ("linf_dist", "hybrid")
NAMES = [n for n in list_models() if model_family(n) in FAMILIES]
INPUT = (1, 4, 4)
SMALL = {"linf_dist_mlp": dict(depth=3, width=16), "linf_dist_hybrid": dict(depth=3, width=16, head_hidden=8),
         "theorem32_net": dict(num_points=8), "theoremA2_net": dict(num_points=4, depth=3)}
STAND_IN = {"linf_dist_mlp_5x5120": ("linf_dist_mlp", dict(depth=5, width=24)),
            "linf_dist_mlp_6x5120": ("linf_dist_mlp", dict(depth=6, width=24)),
            "linf_dist_hybrid_5x5120": ("linf_dist_hybrid", dict(depth=5, width=24, head_hidden=16))}


def _model(name: str):
    entry, kwargs = STAND_IN.get(name, (name, SMALL.get(name, {})))
    torch.manual_seed(0)
    model = create_model(entry, input_shape=INPUT, num_classes=4, **kwargs)
    assert model.family == model_family(name)
    return model


def _state(p: float) -> ScheduleState:
    return ScheduleState(step=0, epoch=0, p=p, lam=0.5, eps=0.05, lr=0.05, natural_weight=0.5, crown_factor=0.0)


def _objective(model):
    if model.family == "linf_dist":
        return LinfDistObjective(model, theta=0.2, eps=0.05)
    return HybridObjective(model, feature_bounds="interval")


def _train_step(model, p: float) -> dict:
    set_p(model, p)
    objective = _objective(model)
    opt = torch.optim.SGD(objective.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, *INPUT, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    loss, stats = objective(x, y, _state(p))
    loss.backward()
    grads = {k: v.grad.clone() for k, v in objective.named_parameters() if v.grad is not None}
    opt.step()
    return {"loss": loss.detach(), "stats": stats, "grads": grads,
            "params": {k: v.detach().clone() for k, v in objective.named_parameters()}}


def test_every_family_model_has_a_size_here():
    fixed = {"linf_dist_mlp_5x128", "linf_dist_hybrid_4x128"}      # already small: run as registered
    assert set(NAMES) <= set(SMALL) | set(STAND_IN) | fixed, sorted(set(NAMES) - set(SMALL) - set(STAND_IN) - fixed)


@pytest.mark.parametrize("p", (8.0, math.inf), ids=("p8", "pinf"))
@pytest.mark.parametrize("name", NAMES)
def test_training_step_through_the_cupy_path_matches_the_torch_path(request, name, p):
    model = _model(name)
    twin = copy.deepcopy(model)
    want = _train_step(twin, p)                                   # torch backend (CPU auto)
    backend = request.getfixturevalue("cupy_on_cpu")              # from here on: the CuPy path
    got = _train_step(model, p)
    launched = {n.split("<")[0] for n, _ in backend.launcher.calls}
    assert "linf_forward" in launched and ("linf_backward" in launched or "lp_backward" in launched)
    if model.family == "hybrid":
        assert {"interval_inf_forward", "interval_lp_forward"} & launched, launched
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["loss"], want["loss"], **tol)
    torch.testing.assert_close(got["stats"], want["stats"], **tol)
    assert got["grads"].keys() == want["grads"].keys() and got["grads"]
    for key in want["grads"]:
        torch.testing.assert_close(got["grads"][key], want["grads"][key], **tol, msg=lambda m, k=key: f"{k}: {m}")
    for key in want["params"]:
        torch.testing.assert_close(got["params"][key], want["params"][key], **tol, msg=lambda m, k=key: f"{k}: {m}")
