"""User-style models (nothing from linf_plugin), a sampling soundness check, and a script that bounds them.

``python user_models.py plain|plugin OUT`` bounds every model of
:data:`MODELS` with every method of :data:`METHODS` and saves
``{"model/method": (lower, upper) or "ErrorType: message"}`` to OUT
(``torch.save``).

* ``plugin``: ``import linf_plugin`` first (compat layer, operator fixes,
  ``custom::LpDist`` registered) -- what a user of the plugin gets.
* ``plain``: only the compat layer's import shims (``linf_plugin/lirpa/
  compat.py`` loaded by its path, so no other part of the plugin runs), then
  ``import auto_LiRPA``.  auto_LiRPA 0.3 cannot even be imported on numpy 2 /
  torch 2.14 without them, and they restore missing numpy / torch API only
  (nothing that computes a bound), so this is the fairest "without the
  plugin".  On upstream 0.7.x the shims do nothing.

The two runs are separate processes because importing the plugin patches
auto_LiRPA's classes for the rest of the process.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["MODELS", "METHODS", "EPS", "build_model", "example_input", "bound_all", "assert_sound"]

METHODS = ("IBP", "CROWN-IBP", "CROWN", "forward")
EPS = 0.05


class WithBuffers(nn.Module):
    """A CNN that normalises with registered buffers and shifts by a flat buffer,
    as users write input normalisation by hand."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, 16))
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x) - self.shift))


def _cnn_bn():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    for m in net:
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics and affine map
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(),
                                  nn.Linear(12, 5)), (3, 4, 4)),
    "cnn_bn": (_cnn_bn, (3, 8, 8)),
    "buffers": (WithBuffers, (3, 8, 8)),
}


def build_model(name: str) -> nn.Module:
    """The model ``name`` of :data:`MODELS`, seeded, in eval mode."""
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def example_input(name: str, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, *MODELS[name][1])


def bound_all() -> dict:
    """Bounds of every model and method (or the error's type and message)."""
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    out = {}
    for name in MODELS:
        model, x = build_model(name), example_input(name)
        try:
            bounded = BoundedModule(model, torch.zeros_like(x), verbose=False)
        except Exception as exc:  # noqa: BLE001  (recorded, compared between the runs)
            out.update({f"{name}/{m}": f"{type(exc).__name__}: {exc}" for m in METHODS})
            continue
        for method in METHODS:
            xb = BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=EPS))
            try:
                with torch.no_grad():
                    lb, ub = bounded.compute_bounds(x=(xb,), method=method)
                out[f"{name}/{method}"] = (lb.detach().clone(), ub.detach().clone())
            except Exception as exc:  # noqa: BLE001
                out[f"{name}/{method}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def assert_sound(model, x, eps, method, bound_opts=None):
    """Bound ``model`` on the l_inf ball and check every sampled output lies within.

    Returns:
        ``(lower, upper)``, each ``(B, K)``.
    """
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    from .lirpa_check import assert_contains, sampled_values  # not at the top: the script runs without the plugin

    bounded = BoundedModule(model, torch.zeros_like(x), bound_opts=bound_opts, verbose=False)
    xb = BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=eps))
    # alpha-CROWN differentiates through its own optimisation
    with torch.enable_grad() if method == "CROWN-Optimized" else torch.no_grad():
        lb, ub = bounded.compute_bounds(x=(xb,), method=method)
    lb, ub = lb.detach(), ub.detach()
    assert_contains(lb, ub, sampled_values(model, x - eps, x + eps), method)
    return lb, ub


def _load_compat_only():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "linf_plugin" / "lirpa" / "compat.py"
    spec = importlib.util.spec_from_file_location("_compat_only", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.apply()
    assert "linf_plugin" not in sys.modules


if __name__ == "__main__":
    mode, target = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == "plugin":
        import linf_plugin  # noqa: F401
    elif mode == "plain":
        _load_compat_only()
    else:
        raise SystemExit(f"mode must be 'plain' or 'plugin', got {mode!r}")
    torch.save(bound_all(), target)
