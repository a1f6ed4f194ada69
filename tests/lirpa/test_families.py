"""Every family, one API: every registry model through every auto_LiRPA method.

``bounded_module`` + ``compute_bounds`` must work without error (CPU here, CUDA
in the GPU test) on l_inf-dist nets, hybrids and ReLU baselines, and give
bounds that contain the function at sampled points.  The constructed Theorem 3.2
net is also certified on the touching three-point set, where the exact margin
lower bound 2 - 2 eps is known.
"""
from __future__ import annotations

import pytest
import torch

from linf_plugin.data import three_point_set
from linf_plugin.models import create_model, list_models, model_family, theorem32_net

from .lirpa_check import METHODS, assert_contains, box, build, compute, default_dtype, margin_spec, sampled_values

# Small instances of the generic entries; the paper-sized ones have the same graph.
SMALL = {
    "linf_dist_mlp": dict(depth=3, width=12),
    "linf_dist_hybrid": dict(depth=2, width=12, head_hidden=8),
    "mlp_3layer": dict(width=1),
    "cnn_4layer": dict(width=1, linear_size=16),
    "cnn_7layer": dict(width=2, linear_size=16),
    "cnn_7layer_bn": dict(width=2, linear_size=16),
    "theorem32_net": dict(num_points=6),
    "theoremA2_net": dict(num_points=6, depth=3),
}
TOO_BIG = ("5120",)  # 5 or 6 layers of 5120 neurons: minutes of CROWN on a CPU; same graph as above


def _instance(name, device="cpu"):
    torch.manual_seed(0)
    model = create_model(name, input_shape=(1, 8, 8), num_classes=10, **SMALL.get(name, {}))
    if model_family(name) == "relu":
        with torch.no_grad():  # non-trivial batch-norm statistics
            for mod in model.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 2.0)
    return model.to(device).eval()


def _check_all_methods(model, x, radius, device="cpu"):
    bm = build(model, x, device=device)
    lo, hi = box(x, radius, "clip")
    C = margin_spec(model, x).to(device)
    vals = sampled_values(model, lo, hi, 200, C)
    for method in METHODS:
        lb, ub = compute(bm, x, lo, hi, C, method)
        assert lb.shape == (x.shape[0], model.num_classes - 1), method
        assert_contains(lb.detach(), ub.detach(), vals, method)


@pytest.mark.parametrize("name", [n for n in list_models() if not any(t in n for t in TOO_BIG)])
def test_every_registry_model_gets_bounds_from_every_method(name):
    model = _instance(name)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    _check_all_methods(model, x, 0.02)


def test_a_trained_hybrid_gets_bounds_from_every_method():
    from linf_plugin.data import load_dataset

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = create_model("linf_dist_hybrid", input_shape=data.input_shape, num_classes=10, depth=2, width=16,
                         head_hidden=16, mean=data.mean, std=data.std)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(30):
        idx = torch.randint(0, len(data.x), (128,))
        loss = torch.nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    _check_all_methods(model, data.x[:3], 0.01)


@pytest.mark.parametrize("method", METHODS)
def test_constructed_theorem32_net_certifies_the_touching_three_point_set(method):
    with default_dtype(torch.float64):
        data = three_point_set(r=1.0, dim=2)
        model = theorem32_net(data.x, data.y).eval()
        x = data.x
        C = torch.tensor([[[1.0, -1.0]], [[-1.0, 1.0]], [[1.0, -1.0]]])  # true class minus the other
        bm = build(model, x)
        for eps in (0.25, 0.9):
            lb, _ = compute(bm, x, x - eps, x + eps, C, method)
            # The exact margin over the box is 2 - 2 eps (1-Lipschitz logits, touching boxes).
            assert torch.allclose(lb.flatten(), torch.full((3,), 2 - 2 * eps), atol=1e-9), (method, eps, lb)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["linf_dist_mlp", "linf_dist_hybrid", "mlp_3layer", "cnn_7layer_bn"])
def test_every_family_on_gpu(name):
    model = _instance(name, device="cuda")
    x = torch.rand(2, 1, 8, 8, device="cuda")
    _check_all_methods(model, x, 0.02, device="cuda")
