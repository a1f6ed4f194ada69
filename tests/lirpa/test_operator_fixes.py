"""Every operator fix (linf_plugin/lirpa/operator_fixes.py, fixes 5-13) on shapes chosen to trip it.

A fix may turn a crash into a correct bound, never into a wrong one: each case
bounds a small user-style model with real auto_LiRPA and checks the bounds
against the model's outputs at sampled points and vertices of the box.  On
auto_LiRPA 0.3 without the fixes every case here crashes (the fix named in the
case id is the one it needs); on upstream 0.7.x they run unpatched and are
checked the same way.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from linf_plugin.lirpa import applied_operator_fixes, compat
from .user_models import assert_sound, build_model

LEGACY = compat.needs_legacy_fixes()


class Affine(nn.Module):
    """``f(x) op c`` between two linear layers (or after a conv)."""

    def __init__(self, head: nn.Module, op, const: torch.Tensor, tail: nn.Module, buffer: bool):
        super().__init__()
        self.head, self.tail, self.op = head, tail, op
        if buffer:
            self.register_buffer("c", const)
        else:
            self.c = const  # a plain tensor attribute: traced as a constant

    def forward(self, x):
        return self.tail(self.op(self.head(x), self.c))


def _mlp(op, const, buffer=True, bn=False):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
    if bn:
        head.append(nn.BatchNorm1d(8))
    return Affine(head, op, const, nn.Sequential(nn.ReLU(), nn.Linear(8, 3)), buffer)


def _conv_after(op, const, buffer=True, in_c=3, kernel=3):
    """``conv(x op c)``: the constant meets a Patches A matrix in CROWN."""
    torch.manual_seed(0)
    tail = nn.Sequential(nn.Conv2d(in_c, 4, kernel, padding=kernel // 2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))
    return Affine(nn.Identity(), op, const, tail, buffer)


def _signed(*shape):
    torch.manual_seed(3)
    return torch.randn(*shape)  # negative entries exercise the sign split


sub, mul, div = torch.sub, torch.mul, torch.div

# (id, model builder, input shape, batch, methods)
CASES = [
    ("5-buffer-sub-crown", lambda: _mlp(sub, _signed(8)), (1, 3, 4), 2, ("CROWN", "CROWN-IBP")),
    ("6-const-sub-forward", lambda: _mlp(sub, _signed(8), buffer=False), (1, 3, 4), 2, ("forward",)),
    ("7-const-mul-forward", lambda: _mlp(mul, _signed(8), buffer=False), (1, 3, 4), 2, ("forward",)),
    ("7-const-div-forward", lambda: _mlp(div, _signed(8).abs() + 0.5, buffer=False), (1, 3, 4), 2,
     ("forward",)),
    ("8-flat-add-patches", lambda: _mlp(torch.add, _signed(8)), (1, 3, 4), 2, ("CROWN",)),
    ("9-batchnorm1d-forward", lambda: _mlp(mul, _signed(8), bn=True), (1, 3, 4), 2, ("forward",)),
    ("9-batchnorm2d-forward", lambda: build_model("cnn_bn"), (3, 8, 8), 2, ("forward",)),
    ("10-scalar-div-patches", lambda: _conv_after(div, torch.tensor(0.3), buffer=False), (3, 5, 5), 2, ("CROWN",)),
    ("10-channel-mul-patches", lambda: _conv_after(mul, _signed(3, 1, 1)), (3, 5, 5), 2, ("CROWN",)),
    ("10-channel4d-mul-patches", lambda: _conv_after(mul, _signed(1, 3, 1, 1)), (3, 5, 5), 3, ("CROWN",)),
    ("11-full-rank-mean-sub", lambda: _mlp(sub, _signed(1, 8)), (1, 3, 4), 2, ("CROWN", "forward")),
    ("11-full-rank-scalar-sub", lambda: _mlp(sub, _signed(1, 1)), (1, 3, 4), 2, ("CROWN",)),
    ("5+11-user-buffers", lambda: build_model("buffers"), (3, 8, 8), 2, ("CROWN", "CROWN-IBP", "forward")),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fixed_operator_bounds_are_sound(case):
    _, make, shape, batch, methods = case
    model = make().eval()
    torch.manual_seed(11)
    x = torch.rand(batch, *shape)
    for method in methods:
        assert_sound(model, x, 0.05, method)


@pytest.mark.skipif(not LEGACY, reason="the operator fixes are applied on auto_LiRPA 0.3 only")
def test_every_operator_fix_was_needed_and_applied():
    joined = " ".join(applied_operator_fixes())
    for needle in ("BoundBuffers", "BoundSub.bound_forward", "BoundMul.bound_forward", "BoundDiv.bound_forward",
                   "get_sparse_C", "BoundBatchNormalization", "_multiply_by_const", "broadcast_backward"):
        assert needle in joined


@pytest.mark.parametrize("in_c", [3, 2])
def test_per_sample_constant_before_conv_is_never_unsound(in_c):
    """A ``(B, 1, 1, 1)`` constant scales each sample.  With ``B`` equal to the
    conv's input channels it used to be taken as per-channel, and patches-mode
    CROWN returned bounds that outputs exceeded by 0.035.  It may raise
    (auto_LiRPA's own assertion, 0.3 and 0.7.1 alike), it must not be wrong;
    matrix mode must work and be sound."""
    scale = torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1, 1)  # batch 3
    model = _conv_after(mul, scale, in_c=in_c).eval()
    torch.manual_seed(5)
    x = torch.rand(3, in_c, 5, 5)
    try:
        assert_sound(model, x, 0.05, "CROWN")
    except AssertionError as exc:
        if "sampled outputs" in str(exc):
            raise
    assert_sound(model, x, 0.05, "CROWN", bound_opts={"conv_mode": "matrix"})



def test_alpha_crown_start_node_without_alpha_is_bounded_soundly():
    """Fix 12: a one-point batch whose ReLUs of one layer are all stable when alpha is
    initialised, then not, used to raise ``KeyError('/input.19')`` (0.3) or
    ``KeyError('/input-19')`` (0.7.1) inside alpha-CROWN; this width-1 CNN at the first
    digits test point does it.  Now those start nodes get the CROWN relaxation, and the
    bounds must hold at sampled points."""
    from linf_plugin.data import dataset_info, load_dataset
    from linf_plugin.lirpa import default_bound_opts
    from linf_plugin.models import create_model

    info = dataset_info("digits")
    torch.manual_seed(0)
    model = create_model("cnn_7layer", input_shape=(1, 8, 8), num_classes=10, mean=info.mean, std=info.std,
                         width=1, linear_size=16).eval()
    x = load_dataset("digits", "test").x[:1]
    opts = {**default_bound_opts(), "optimize_bound_args": {"iteration": 2}}
    if LEGACY:
        opts["sparse_features_alpha"] = False
    assert_sound(model, x, 0.2, "CROWN-Optimized", bound_opts=opts)
    assert any("start node without alpha" in f for f in applied_operator_fixes())


def test_s_shaped_tangent_tables_are_computed_once_and_bound_the_same():
    """Fix 13: every BoundTanh / BoundSigmoid used to recompute its 50,000-point tangent table in its
    constructor (2 s of a 2.6 s BoundedModule build of the digits hybrid on 0.3).  A second model's
    nodes now share the first one's table, and their bounds hold at sampled points."""
    from linf_plugin.lirpa import bounded_module

    torch.manual_seed(1)
    nets = [nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3)).eval() for act in (nn.Tanh, nn.Sigmoid)]
    x = torch.rand(2, 4)
    assert any("precompute_relaxation" in f for f in applied_operator_fixes())
    for net in nets:
        first, second = (bounded_module(net, x) for _ in range(2))
        a, b = ([n for n in bm._modules.values() if type(n).__name__ in ("BoundTanh", "BoundSigmoid")][0]
                for bm in (first, second))
        assert a.d_lower is b.d_lower and a.d_upper is b.d_upper
        assert_sound(net, x, 0.5, "CROWN")
