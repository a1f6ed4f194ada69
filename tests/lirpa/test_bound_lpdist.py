"""BoundLpDist inside real auto_LiRPA: registration, exactness, options, flags, gradients."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from linf_plugin import lirpa
from linf_plugin.lirpa import BoundLpDist, bounded_module, custom_ops, is_registered, register, unregister
from linf_plugin.lirpa.bound import _dense_spec
from linf_plugin.models import create_model
from linf_plugin.ops import lp_dist_interval

from .lirpa_check import METHODS, box, build, compute, default_dtype, extremes, margin_spec, violations

from auto_LiRPA import BoundedModule  # noqa: E402

IS_03 = lirpa.compat.needs_legacy_fixes()


def _linf_net(depth=3, width=6, d=5, k=4, p=math.inf, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    m = create_model("linf_dist_mlp", input_shape=(d,), num_classes=k, depth=depth, width=width, p=p,
                     mean=0.2, std=0.4, **kw).to(dtype).eval()
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b))
        for name, prm in m.named_parameters():
            if name.endswith("bias"):
                prm.copy_(torch.randn_like(prm))
    return m


def _exact_layerwise(model, lo, hi):
    """Interval propagation by hand: exact range of every layer given its input box."""
    z_lo, z_hi = model.normalize(lo).flatten(1), model.normalize(hi).flatten(1)
    for layer in model.layers:
        a, b = lp_dist_interval(z_lo, z_hi, layer.weight, layer.p)
        if layer.mean_shift is not None:
            a, b = a - layer.mean_shift.running_mean, b - layer.mean_shift.running_mean
        if layer.bias is not None:
            a, b = a + layer.bias, b + layer.bias
        z_lo, z_hi = a, b
    return (-z_hi, -z_lo) if model.negate_output else (z_lo, z_hi)


# ------------------------------------------------------------------ registration
def test_importing_linf_plugin_registers_the_op():
    assert is_registered()
    assert lirpa.OP_NAME == "custom::LpDist"


def test_user_built_bounded_module_works_after_only_import_linf_plugin():
    code = textwrap.dedent("""
        import math, torch
        import linf_plugin
        from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
        from linf_plugin.models import create_model
        from linf_plugin.lirpa import BoundLpDist
        torch.manual_seed(0)
        m = create_model("linf_dist_mlp", input_shape=(6,), num_classes=3, depth=2, width=5).eval()
        x = torch.rand(2, 6)
        bm = BoundedModule(m, x)  # the layers use the default (fast torch) backend
        assert sum(isinstance(n, BoundLpDist) for n in bm.modules()) == 2
        ptb = PerturbationLpNorm(norm=math.inf, eps=0.01)
        lb, ub = bm.compute_bounds(x=(BoundedTensor(x, ptb),), method="CROWN")
        f = m(x)
        assert (lb <= f + 1e-5).all() and (f <= ub + 1e-5).all()
        print("USER-BUILT OK")
    """)
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "USER-BUILT OK" in res.stdout
    # Tracing goes through the op's symbolic cleanly, whatever backend the layer uses.
    assert "TracerWarning" not in res.stderr and "shape inference" not in res.stderr, res.stderr[-3000:]


def test_registering_twice_is_harmless():
    m = _linf_net(depth=2)
    x = torch.rand(2, 5)
    lo, hi = box(x, 0.05, "sym")
    before = compute(build(m, x), x, lo, hi, None, "CROWN")
    register()
    register()
    assert is_registered()
    after = compute(build(m, x), x, lo, hi, None, "CROWN")
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_custom_ops_argument_works_without_the_global_registration():
    m = _linf_net(depth=2)
    x = torch.rand(2, 5)
    lo, hi = box(x, 0.05, "sym")
    try:
        unregister()
        assert not is_registered()
        bm = BoundedModule(m, x, custom_ops=custom_ops())
        lb, ub = compute(bm, x, lo, hi, None, "CROWN")
    finally:
        register()
    f = m(x)
    assert (lb <= f + 1e-5).all() and (f <= ub + 1e-5).all()


def test_operator_fixes_are_recorded_and_idempotent():
    first = lirpa.apply_operator_fixes()
    assert lirpa.apply_operator_fixes() == first == lirpa.applied_operator_fixes()
    if IS_03:
        joined = " ".join(first)
        for needle in ("BoundBuffers", "BoundSub.bound_forward", "BoundMul.bound_forward", "BoundDiv",
                       "get_sparse_C", "BoundBatchNormalization", "Patches", "broadcast_backward"):
            assert needle in joined


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("p", [math.inf, 8.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ibp_equals_layerwise_exact_interval_propagation(p, dtype):
    with default_dtype(dtype):
        _ibp_equals_layerwise(p, dtype)


def _ibp_equals_layerwise(p, dtype):
    m = _linf_net(depth=4, width=7, p=p, dtype=dtype, seed=1)
    x = torch.rand(3, 5, dtype=dtype)
    for radius in (0.0, 0.01, 0.2):
        lo, hi = box(x, radius, "clip")
        lb, ub = compute(build(m, x), x, lo, hi, None, "IBP")
        elb, eub = _exact_layerwise(m, lo, hi)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        assert torch.allclose(lb, elb, rtol=tol, atol=tol) and torch.allclose(ub, eub, rtol=tol, atol=tol)


@pytest.mark.parametrize("p", [math.inf, 8.0, 2.0])
@pytest.mark.parametrize("method", ["CROWN", "forward", "CROWN-IBP", "forward+backward"])
def test_linear_bounds_touch_the_function_on_a_single_layer(p, method):
    """One l_p-dist layer: the lower plane's minimum over the box is the exact minimum (it touches at
    the nearest point), the upper plane's maximum the exact maximum (it touches at the far corners),
    so every linear method returns the exact range, which IBP also gives."""
    with default_dtype(torch.float64):
        _touch_single_layer(p, method)


def _touch_single_layer(p, method):
    m = _linf_net(depth=1, d=6, k=5, p=p, dtype=torch.float64, seed=2)
    x = torch.rand(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bm = build(m, x)
    w, std, mean = m.layers[0].weight, float(m.normalize.std), float(m.normalize.mean)
    for radius in (0.01, 0.3):
        lo, hi = box(x, radius, "sym")
        ilb, iub = compute(bm, x, lo, hi, None, "IBP")
        lb, ub = compute(bm, x, lo, hi, None, method)
        assert torch.allclose(lb, ilb, rtol=1e-9, atol=1e-9) and torch.allclose(ub, iub, rtol=1e-9, atol=1e-9)
        # Both ends are attained: logit k = -(||z - w_k||_p + b_k) is largest at the point of the box
        # nearest w_k and smallest at the corner farthest from it (z = (x - mean) / std).
        zl, zh = (lo - mean) / std, (hi - mean) / std
        for k in range(w.shape[0]):
            near = torch.minimum(torch.maximum(w[k], zl), zh) * std + mean
            far = torch.where((zl - w[k]).abs() >= (zh - w[k]).abs(), lo, hi)
            with torch.no_grad():
                assert torch.allclose(m(near)[:, k], ub[:, k], rtol=1e-9, atol=1e-9)
                assert torch.allclose(m(far)[:, k], lb[:, k], rtol=1e-9, atol=1e-9)


@default_dtype(torch.float64)
def test_crown_margin_bounds_are_at_least_as_tight_as_ibp_on_a_two_layer_linf_net():
    m = _linf_net(depth=2, width=8, d=6, k=5, dtype=torch.float64, seed=3)
    x = torch.rand(4, 6, dtype=torch.float64)
    bm = build(m, x)
    C = margin_spec(m, x)
    lo, hi = box(x, 0.05, "sym")
    ilb, _ = compute(bm, x, lo, hi, C, "IBP", bound_upper=False)
    clb, _ = compute(bm, x, lo, hi, C, "CROWN-IBP", bound_upper=False)
    # CROWN-IBP keeps IBP's intermediate boxes; on the last layer its planes are never worse.
    assert (clb >= ilb - 1e-9).all()


# ------------------------------------------------------------------ API details
def test_bound_lower_and_bound_upper_flags():
    m = _linf_net(depth=3, p=8.0, seed=4)
    x = torch.rand(2, 5)
    bm = build(m, x)
    C = margin_spec(m, x)
    lo, hi = box(x, 0.05, "sym")
    for method in METHODS:
        lb, ub = compute(bm, x, lo, hi, C, method)
        lb_only, _ = compute(bm, x, lo, hi, C, method, bound_upper=False)
        _, ub_only = compute(bm, x, lo, hi, C, method, bound_lower=False)
        # (0.3 returns None for the side not asked for; 0.7 may return both.)
        assert torch.allclose(lb_only, lb, atol=1e-5) and torch.allclose(ub_only, ub, atol=1e-5), method


def test_batch_rows_are_bounded_independently():
    m = _linf_net(depth=3, seed=5)
    x = torch.rand(3, 5)
    lo, hi = box(x, 0.05, "sym")
    hi = hi + torch.tensor([[0.0], [0.1], [0.3]])  # different box sizes per row
    bm = build(m, x)
    for method in ("CROWN", "forward", "IBP"):
        lb, ub = compute(bm, x, lo, hi, None, method)
        for b in range(3):
            bm1 = build(m, x[b:b + 1])
            lb1, ub1 = compute(bm1, x[b:b + 1], lo[b:b + 1], hi[b:b + 1], None, method)
            assert torch.allclose(lb[b:b + 1], lb1, atol=1e-5) and torch.allclose(ub[b:b + 1], ub1, atol=1e-5)


@pytest.mark.parametrize("point", ["projection", "centre", "face"])
def test_lower_point_option_is_used_and_sound(point):
    m = _linf_net(depth=2, p=8.0, seed=6)
    x = torch.rand(2, 5)
    bm = build(m, x, bound_opts={"lp_dist": {"lower": point}})
    assert all(n.lower_point == point for n in bm.modules() if isinstance(n, BoundLpDist))
    lo, hi = box(x, 0.1, "sym")
    C = margin_spec(m, x)
    fmin, fmax = extremes(m, C, lo, hi)
    for method in ("CROWN", "forward"):
        lb, ub = compute(bm, x, lo, hi, C, method)
        assert not violations(lb, ub, fmin, fmax, method)


def test_unknown_lower_point_option_is_refused():
    m = _linf_net(depth=1)
    with pytest.raises(ValueError, match="lp_dist"):
        bounded_module(m, torch.rand(1, 5), bound_opts={"lp_dist": {"lower": "middle"}})


def test_bounded_module_checks_its_example_input():
    m = _linf_net(depth=1)
    with pytest.raises(TypeError, match="float"):
        bounded_module(m, torch.ones(1, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch"):
        bounded_module(m, torch.rand(5))


def test_patches_a_matrix_is_refused_with_a_clear_message():
    from auto_LiRPA.patches import Patches

    patches = Patches(patches=torch.ones(1, 1, 1, 1, 2, 3, 3), stride=1, padding=1, shape=(1, 1, 1, 1, 2, 3, 3))
    with pytest.raises(NotImplementedError, match="flat"):
        _dense_spec(patches, 4, torch.float32)


@pytest.mark.parametrize("method", ["CROWN-IBP", "CROWN", "IBP"])
def test_bounds_are_differentiable_in_the_weights(method):
    m = _linf_net(depth=2, p=8.0, seed=7)
    x = torch.rand(2, 5)
    bm = build(m, x)
    bm.train()  # auto_LiRPA 0.3 hands out parameters with requires_grad only in training mode
    C = margin_spec(m, x)
    lo, hi = box(x, 0.05, "sym")
    lb, _ = compute(bm, x, lo, hi, C, method, bound_upper=False)
    lb.sum().backward()
    grads = [prm.grad for name, prm in bm.named_parameters() if prm.dim() == 2]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_perturbed_weights_are_refused_with_a_clear_error(method):
    from auto_LiRPA import BoundedParameter, BoundedTensor, PerturbationLpNorm

    m = _linf_net(depth=1, d=4, k=3)
    m.layers[0].weight = BoundedParameter(m.layers[0].weight.data, PerturbationLpNorm(norm=math.inf, eps=0.01))
    x = torch.rand(2, 4)
    bm = BoundedModule(m, x)
    with pytest.raises(NotImplementedError, match="weights of an l_p-dist layer"):
        bm.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.01)),), method=method)


def test_one_bound_node_per_layer_with_its_p():
    m = _linf_net(depth=3, p=8.0)
    m.layers[1].p = math.inf
    bm = build(m, torch.rand(2, 5))
    nodes = [n for n in bm.modules() if isinstance(n, BoundLpDist)]
    assert [n.p for n in nodes] == [8.0, math.inf, 8.0]


def test_planes_are_computed_once_per_node_and_box(monkeypatch):
    calls = []
    original = BoundLpDist.relaxation

    def counting(self, lower, upper, w):
        calls.append(self.name)
        return original(self, lower, upper, w)

    monkeypatch.setattr(BoundLpDist, "relaxation", counting)
    m = _linf_net(depth=4)
    x = torch.rand(2, 5)
    bm = build(m, x)
    lo, hi = box(x, 0.05, "sym")
    compute(bm, x, lo, hi, None, "CROWN")
    # Without reuse the first layer alone would be relaxed once per later layer and for the output.
    assert len(calls) == len(set(calls)) == 4
    compute(bm, x, lo, 2 * hi - lo, None, "CROWN")  # a new box: new planes
    assert len(calls) == 8
