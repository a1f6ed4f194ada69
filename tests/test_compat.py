"""The auto_LiRPA compat layer: real auto_LiRPA, real bounds, real optimizer steps."""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
import torch.nn as nn

import linf_plugin
from linf_plugin.lirpa import compat

auto_LiRPA = importlib.import_module("auto_LiRPA")
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm  # noqa: E402

IS_03 = compat.needs_legacy_fixes()


def _relu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


def _box(x, eps):
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    return lo, hi, BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=lo, x_U=hi))


def test_apply_is_idempotent_and_recorded():
    first = compat.apply()
    second = compat.apply()
    assert first == second == compat.applied_fixes()
    if IS_03:
        # All four breakages are present on torch 2.14 + numpy 2 with 0.3.
        joined = " ".join(first)
        for needle in ("arraysetops", "_set_opset_version", "Node.__getitem__", "_named_members"):
            assert needle in joined
    else:
        assert first == [], "nothing may be patched on upstream auto_LiRPA"


def test_version_gate():
    assert compat.lirpa_version() == auto_LiRPA.__version__
    assert compat.needs_legacy_fixes() is auto_LiRPA.__version__.startswith("0.3")
    assert compat.needs_legacy_fixes("0.3") and compat.needs_legacy_fixes("0.3.1")
    assert not compat.needs_legacy_fixes("0.7.1") and not compat.needs_legacy_fixes("0.4.0")
    assert not compat.needs_legacy_fixes("unknown")


@pytest.mark.skipif(not IS_03, reason="the fixes only exist on auto_LiRPA 0.3")
def test_fixes_are_feature_detected():
    # Each fix leaves things alone when the feature already exists.
    import torch.onnx.symbolic_helper as sh

    n = len(compat.applied_fixes())
    getitem = torch._C.Node.__getitem__
    compat._fix_node_getitem()
    assert len(compat.applied_fixes()) == n and torch._C.Node.__getitem__ is getitem
    # The import shims exist only while auto_LiRPA is imported, and never replace a real module.
    assert "numpy.lib.arraysetops" not in sys.modules and not hasattr(sh, "_set_opset_version")
    with compat.legacy_import_shims():
        import numpy.lib.arraysetops as aso

        assert aso.isin is __import__("numpy").isin
        assert callable(sh._set_opset_version)
        real = types.ModuleType("numpy.lib.arraysetops")
        sys.modules["numpy.lib.arraysetops"] = real
        with compat.legacy_import_shims():
            assert sys.modules["numpy.lib.arraysetops"] is real
        assert sys.modules["numpy.lib.arraysetops"] is real
    assert sys.modules.pop("numpy.lib.arraysetops") is real  # not ours: left alone
    assert not hasattr(sh, "_set_opset_version")
    assert len(compat.applied_fixes()) == n

    class Modern(nn.Module):
        def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
            return super()._named_members(get_members_fn, prefix, recurse, remove_duplicate)

    assert compat._patch_named_members(Modern) is False

    class Old(nn.Module):
        def _named_members(self, get_members_fn, prefix="", recurse=True):
            return super()._named_members(get_members_fn, prefix, recurse)

    assert compat._patch_named_members(Old) is True
    assert compat._patch_named_members(Old) is False  # idempotent
    old = Old()
    old.lin = nn.Linear(2, 2)
    assert len(list(old.parameters())) == 2


@pytest.mark.skipif(not IS_03, reason="the helper is only restored for auto_LiRPA 0.3")
def test_opset_helper_sets_exporter_opset():
    import torch.onnx.utils as ou

    g = sys.modules[ou._optimize_graph.__module__].GLOBALS
    old = g.export_onnx_opset_version
    try:
        compat._opset_setter()(12)
        assert g.export_onnx_opset_version == 12
    finally:
        g.export_onnx_opset_version = old


@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"])
def test_relu_bounds_contain_outputs(method):
    net = _relu_net()
    bounded = BoundedModule(net, torch.zeros(1, 1, 8, 8), verbose=False)
    torch.manual_seed(1)
    x = torch.rand(6, 1, 8, 8)
    eps = 0.03
    lo, hi, xb = _box(x, eps)
    lb, ub = bounded.compute_bounds(x=(xb,), method=method)
    assert lb.shape == ub.shape == (6, 10)
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
    with torch.no_grad():
        pts = lo.unsqueeze(0) + torch.rand(200, *x.shape) * (hi - lo).unsqueeze(0)
        pts[:4] = torch.where(torch.rand(4, *x.shape) < 0.5, lo, hi)  # a few corners too
        out = net(pts.reshape(-1, 1, 8, 8)).reshape(200, 6, 10)
    tol = 1e-5
    assert (out >= lb - tol).all(), f"{method} lower bound violated"
    assert (out <= ub + tol).all(), f"{method} upper bound violated"
    # Bounds that could never fail are useless: they must be finite and not absurdly loose.
    assert (ub - lb).max() < 50


def test_parameters_match_and_crown_ibp_step_changes_them():
    net = _relu_net()
    bounded = BoundedModule(net, torch.zeros(1, 1, 8, 8), verbose=False)
    params = list(bounded.parameters())
    assert len(params) == len(list(net.parameters()))
    assert {p.data_ptr() for p in params} == {p.data_ptr() for p in net.parameters()}
    names = [n for n, _ in bounded.named_parameters()]
    assert len(names) == len(set(names)) == 6

    opt = torch.optim.SGD(bounded.parameters(), lr=0.1)
    before = [p.detach().clone() for p in params]
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    _, _, xb = _box(x, 0.05)
    c = torch.eye(10)[y].unsqueeze(1) - torch.eye(10).unsqueeze(0)  # (B, 10, 10) margin spec
    keep = torch.arange(10).unsqueeze(0) != y.unsqueeze(1)
    c = c[keep].view(8, 9, 10)
    lb, _ = bounded.compute_bounds(x=(xb,), C=c, method="CROWN-IBP", bound_upper=False)
    loss = nn.functional.cross_entropy(torch.cat([torch.zeros(8, 1), -lb], dim=1), torch.zeros(8, dtype=torch.long))
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in params)
    opt.step()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))


def test_user_import_after_linf_plugin_works():
    # A user who imports linf_plugin and then auto_LiRPA gets a working module.
    import subprocess

    code = ("import linf_plugin, auto_LiRPA, torch;"
            "from auto_LiRPA import BoundedModule;"
            "m = BoundedModule(torch.nn.Linear(3, 2), torch.zeros(1, 3));"
            "print(len(list(m.parameters())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("2")


def test_one_version_check():
    """Every "is this auto_LiRPA 0.3?" decision goes through compat.needs_legacy_fixes:
    no module reads auto_LiRPA's version (metadata or ``__version__``) on its own."""
    import re
    from pathlib import Path

    root = Path(linf_plugin.__file__).parent
    pattern = re.compile(r"metadata\.version\(|auto_LiRPA\"?, \"__version__\"|auto_LiRPA\.__version__|"
                         r"auto_lirpa_version\(\)\.startswith|startswith\(\"0\.3")
    offenders = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py") if path.name != "compat.py"
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
