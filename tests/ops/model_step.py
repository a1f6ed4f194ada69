"""One training step of a registered l_inf-dist or hybrid model (shared by the emulated and GPU tests).

A step is what training does: the family's objective (the mixture loss; for
hybrids the interval bounds through every feature layer,
``feature_bounds="interval"``), backward through the autograd Functions, and
an SGD-with-momentum step.
"""
from __future__ import annotations

import torch

from linf_plugin.models import create_model, list_models, model_family
from linf_plugin.nn import set_p
from linf_plugin.training.objectives import HybridObjective, LinfDistObjective
from linf_plugin.training.schedules import ScheduleState

__all__ = ["FAMILY_MODELS", "SMALL", "STAND_IN", "AS_REGISTERED", "build", "train_step", "assert_same_step"]

FAMILY_MODELS = [n for n in list_models() if model_family(n) in ("linf_dist", "hybrid")]
# Emulator-sized keyword arguments for the entries that take them ...
SMALL = {"linf_dist_mlp": dict(depth=3, width=16), "linf_dist_hybrid": dict(depth=3, width=16, head_hidden=8),
         "theorem32_net": dict(num_points=8), "theoremA2_net": dict(num_points=4, depth=3)}
# ... the same constructor at emulator width for the fixed 5120-wide architectures ...
STAND_IN = {"linf_dist_mlp_5x5120": ("linf_dist_mlp", dict(depth=5, width=24)),
            "linf_dist_mlp_6x5120": ("linf_dist_mlp", dict(depth=6, width=24)),
            "linf_dist_hybrid_5x5120": ("linf_dist_hybrid", dict(depth=5, width=24, head_hidden=16))}
# ... and the entries that are small as registered.
AS_REGISTERED = {"linf_dist_mlp_5x128", "linf_dist_hybrid_4x128"}


def build(name: str, input_shape=(1, 4, 4), small: bool = True, device="cpu"):
    """The model ``name`` (emulator-sized when ``small``), seeded, on ``device``."""
    entry, kwargs = STAND_IN.get(name, (name, SMALL.get(name, {}))) if small else (name, {})
    torch.manual_seed(0)
    model = create_model(entry, input_shape=input_shape, num_classes=4, **kwargs).to(device)
    assert model.family == model_family(name)
    return model


def train_step(model, p: float, batch: int = 6) -> dict:
    """One step at norm ``p``; returns loss, stats, gradients and the updated parameters."""
    set_p(model, p)
    device = next(model.parameters()).device
    if model.family == "linf_dist":
        objective = LinfDistObjective(model, theta=0.2, eps=0.05)
    else:
        objective = HybridObjective(model, feature_bounds="interval")
    opt = torch.optim.SGD(objective.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, *model.input_shape, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    state = ScheduleState(step=0, epoch=0, p=p, lam=0.5, eps=0.05, lr=0.05, natural_weight=0.5, crown_factor=0.0)
    loss, stats = objective(x, y, state)
    loss.backward()
    grads = {k: v.grad.clone() for k, v in objective.named_parameters() if v.grad is not None}
    opt.step()
    return {"loss": loss.detach(), "stats": stats, "grads": grads,
            "params": {k: v.detach().clone() for k, v in objective.named_parameters()}}


def assert_same_step(got: dict, want: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Loss, stats, every gradient and every updated parameter agree."""
    tol = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(got["loss"], want["loss"], **tol)
    torch.testing.assert_close(got["stats"], want["stats"], **tol)
    assert got["grads"].keys() == want["grads"].keys() and got["grads"]
    for part in ("grads", "params"):
        for key, value in want[part].items():
            torch.testing.assert_close(got[part][key], value, **tol, msg=lambda m, k=key: f"{part} {k}: {m}")
