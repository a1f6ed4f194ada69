"""The fast margin pass (#16 item 4) certifies exactly what ``model(x)`` computes, from the current weights.

The pass runs a plain l_inf-dist net's layer arithmetic itself (no per-layer
checks) and ``certify(..., "margin")`` no longer runs a probe forward.  These
tests pin what that must not change: hooks and parts with a forward of
their own refuse the certificate, subclasses take the module path, weight
changes between calls are seen (nothing is cached), NaN never certifies,
and the pass runs the network once.
"""
from __future__ import annotations

import math

import pytest
import torch

from linf_plugin.certification import MarginCertificateError, certify, margin_certify
from linf_plugin.certification.margin import _plain_parts
from linf_plugin.models import LinfDistNet, create_model
from linf_plugin.ops import use_backend
from linf_plugin.ops.torch_backend import TorchBackend
from .test_margin_float import _random_linf_net as _net  # the same small net, non-zero running means


def _fresh_copy(net):
    other = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=len(net.layers),
                         width=net.layers[0].out_features, mean=0.3, std=0.3).to(net.layers[0].weight.dtype)
    other.load_state_dict(net.state_dict())
    return other.eval()


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a[:3], b[:3])) and a[3] == b[3]


def _module_path(fn, *args):
    """``fn(*args)`` with the fast path switched off: every layer runs as a module call."""
    import linf_plugin.certification.margin as margin

    plain = margin._plain_parts
    margin._plain_parts = lambda model: None
    try:
        return fn(*args)
    finally:
        margin._plain_parts = plain


def test_plain_and_module_paths_agree_bit_for_bit():
    net = _net(1)
    x = torch.rand(64, 1, 8, 8)
    y = net(x).argmax(1)
    assert _plain_parts(net) is not None
    fast = margin_certify(net, x, y, 0.01)
    slow = _module_path(margin_certify, net, x, y, 0.01)
    assert _same(fast, slow)
    with torch.no_grad():
        assert torch.equal(fast[0], net(x).argmax(1) == y)


@pytest.mark.parametrize("where", ["layer", "mean_shift", "normalize", "model", "global", "pre"])
def test_a_forward_hook_anywhere_refuses_the_margin_certificate(where):
    """A hook can return a new output (here: logits scaled by 50, which multiplies the Lipschitz constant
    by 50): the margin certificate must refuse rather than certify the unhooked net's radius for it, even
    for a hook that returns nothing (it could act only away from the clean input)."""
    net = _net(2)
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    before = margin_certify(net, x, y, 0.01)
    scale = (lambda _m, _i, out: out * 50)
    target = {"layer": net.layers[-1], "mean_shift": net.layers[0].mean_shift, "normalize": net.normalize,
              "model": net}
    if where == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, out: out * 50 if m is net.layers[-1] else None)
    elif where == "pre":
        handle = net.layers[1].register_forward_pre_hook(lambda _m, _i: None)
    else:
        handle = target[where].register_forward_hook(scale)
    try:
        with pytest.raises(MarginCertificateError, match="hook"):
            margin_certify(net, x, y, 0.01)
        for method in ("margin", "interval"):  # interval propagation ignores hooks just the same
            with pytest.raises(MarginCertificateError, match="hook"):
                certify(net, (x, y), 0.01, method)
    finally:
        handle.remove()
    assert _same(margin_certify(net, x, y, 0.01), before)  # removed: certifies as before


@pytest.mark.parametrize("how", ["instance_forward", "subclass_forward", "foreign_layer"])
def test_a_part_with_its_own_forward_refuses_the_margin_certificate(how):
    """Only the library's parts are 1-Lipschitz: a layer whose forward scales its output by 3, or a plain
    nn.Linear swapped in, must not be certified with the l_inf-dist net's constant."""
    from linf_plugin.nn import LpDistLinear

    net = _net(5)
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    layer = net.layers[1]
    if how == "instance_forward":
        layer.forward = lambda z: LpDistLinear.forward(layer, z) * 3.0
    elif how == "subclass_forward":
        class Scaled(LpDistLinear):
            def forward(self, z):
                return super().forward(z) * 3.0

        layer.__class__ = Scaled
    else:
        net.layers[1] = torch.nn.Linear(layer.in_features, layer.out_features).eval()
        assert net.lipschitz_linf is not None  # the model alone does not notice
    with pytest.raises(MarginCertificateError, match="layer 1"):
        margin_certify(net, x, y, 0.01)
    with pytest.raises(MarginCertificateError, match="layer 1"):
        certify(net, (x, y), 0.01, "interval")


def test_a_forward_of_its_own_must_chain_the_layers():
    """A model's own forward that rescales between the layers feeds a layer something else than its
    predecessor's output: refused, even though the logits are the last layer's output."""
    class Between(LinfDistNet):
        def forward(self, x):
            z = self.normalize(x).flatten(1)
            for k, layer in enumerate(self.layers):
                z = layer(z * 3.0 if k == 1 else z)
            return -z if self.negate_output else z

    net = _net(6)
    other = Between(net.input_shape, net.num_classes, [48, 48, 48], mean=0.3, std=0.3).eval()
    other.load_state_dict(net.state_dict())
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        y = other(x).argmax(1)
    with pytest.raises(MarginCertificateError, match="layer 1 is not fed layer 0"):
        margin_certify(other, x, y, 0.01)
    with pytest.raises(MarginCertificateError, match="forward of its own"):
        certify(other, (x, y), 0.01, "interval")   # it would propagate LinfDistNet.forward instead


def test_subclass_and_per_instance_forward_take_the_module_path():
    class Sub(LinfDistNet):
        pass

    net = _net(3)
    sub = Sub(net.input_shape, net.num_classes, [48, 48, 48], mean=0.3, std=0.3).eval()
    sub.load_state_dict(net.state_dict())
    assert _plain_parts(sub) is not None  # same forward, plain parts: fine
    layer = net.layers[2]
    layer.forward = lambda z: type(layer).forward(layer, z) * 1.0
    assert _plain_parts(net) is None
    del layer.forward
    assert _plain_parts(net) is not None
    net.layers[1].mean_shift.train()
    assert _plain_parts(net) is None


def test_weight_changes_between_calls_are_seen():
    """Nothing derived from the weights is cached: after any kind of update the certificate is a fresh one's."""
    net = _net(4)
    x = torch.rand(80, 1, 8, 8)
    y = net(x).argmax(1)
    margin_certify(net, x, y, 0.01)
    certify(net, (x, y), 0.01, "margin")

    def check():
        assert _same(margin_certify(net, x, y, 0.01), margin_certify(_fresh_copy(net), x, y, 0.01))
        a, b = certify(net, (x, y), 0.0, "margin"), certify(_fresh_copy(net), (x, y), 0.0, "margin")
        assert (a.radius == b.radius).all() and (a.correct == b.correct).all()

    before = margin_certify(net, x, y, 0.0)[2]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)  # an optimizer step
    net.train()
    loss = -net(x).gather(1, y[:, None]).sum()
    loss.backward()
    opt.step()
    net.eval()
    check()
    assert not torch.equal(before, margin_certify(net, x, y, 0.0)[2])
    other = _net(5)
    net.load_state_dict(other.state_dict())  # load_state_dict
    check()
    with torch.no_grad():
        net.layers[-1].bias.data.add_(torch.linspace(0, 3, 10))  # a write the version counter does not see
        net.layers[1].mean_shift.running_mean.data.mul_(2)
    check()
    net.normalize.std.data.fill_(0.6)  # the Lipschitz constant follows the std buffer
    check()
    assert margin_certify(net, x, y, 0.0)[3]["lipschitz"] == pytest.approx(1 / 0.6)


def test_dtype_and_input_range_changes_are_seen():
    net = _net(6)
    x = torch.rand(40, 1, 8, 8)
    y = net(x).argmax(1)
    r32 = margin_certify(net, x, y, 0.0)
    net.double()
    r64 = margin_certify(net, x.double(), y, 0.0)
    assert r32[3]["unit_roundoff"] == 2.0 ** -24 and r64[3]["unit_roundoff"] == 2.0 ** -53
    assert r64[3]["max_logit_error"] < r32[3]["max_logit_error"]
    net.float()
    # pixels far outside [0, 1]: the error bound grows with the activations (computed per sample)
    far = margin_certify(net, x + 100.0, y, 0.0)
    assert far[3]["max_logit_error"] > 10 * r32[3]["max_logit_error"]
    with torch.no_grad():
        exact = net.double()(x.double() + 100.0)
    net.float()
    top2 = exact.topk(2, dim=1).values
    exact_radius = (top2[:, 0] - top2[:, 1]) * net.normalize.std.double().min() / 2
    assert (far[2] <= exact_radius).all()


def test_nan_and_inf_never_certify():
    net = _net(7)
    x = torch.rand(6, 1, 8, 8)
    y = net(x).argmax(1)
    ok = margin_certify(net, x, y, 0.0)
    assert ok[0].all() and (ok[2] > 0).all()
    bad = x.clone()
    bad[1, 0, 3, 3] = math.nan
    bad[2, 0, 0, 0] = math.inf
    correct, certified, radius, _ = margin_certify(net, bad, y, 0.0)
    assert not correct[1] and not correct[2] and (radius[1:3] == 0).all() and not certified[1:3].any()
    keep = torch.tensor([0, 3, 4, 5])
    assert torch.equal(radius[keep], ok[2][keep]) and torch.equal(correct[keep], ok[0][keep])
    with torch.no_grad():
        net.layers[2].weight[3, 1] = math.nan
    with pytest.raises(MarginCertificateError, match=r"layers\.2\.weight.*NaN"):
        margin_certify(net, x, y, 0.0)


def test_certify_runs_the_network_once_per_batch():
    """No probe forward for margin: each layer's distance is computed once per batch."""

    class Counting(TorchBackend):
        def __init__(self):
            super().__init__(compile=False)
            self.rows = 0

        def forward(self, x, w, p, need_aux=True):
            self.rows += x.shape[0]
            return super().forward(x, w, p, need_aux)

    net = _net(8, depth=3)
    x = torch.rand(30, 1, 8, 8)
    y = net(x).argmax(1)
    counting = Counting()
    with use_backend(counting, "cpu"):
        res = certify(net, (x, y), 0.01, "margin", batch_size=16)
    assert counting.rows == 30 * 3
    assert (res.radius == certify(net, (x, y), 0.01, "margin").radius).all()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        certify(net, (x, torch.full((30,), 10)), 0.01, "margin")


def test_the_stack_graph_gives_the_module_paths_values():
    """At the digits pass's sizes the plain path runs the whole stack as ONE graph of the torch backend
    (inductor): the same logits and radii as the module path, bit for bit, the same magnitudes and ranges
    as eager reductions, and one graph for every batch size."""
    from torch._dynamo.utils import counters

    from linf_plugin.certification.margin import _named_tensors, _trace
    from linf_plugin.ops import get_backend

    backend = get_backend("torch")
    if not backend._compiles_on(torch.zeros(1)):
        pytest.skip("the torch backend does not compile here")
    net = _net(9, depth=3, width=128)
    x = torch.rand(360, 1, 8, 8)
    y = net(x).argmax(1)
    calls = backend.compiled_calls
    fast = margin_certify(net, x, y, 0.0)
    assert backend.compiled_calls == calls + 1                      # one graph call for the three layers
    assert (("linf_stack", "fixed", (((128, 64, True, False), (128, 128, True, False), (10, 128, False, True)), 2))
            in backend._compiled)
    slow = _module_path(margin_certify, net, x, y, 0.0)
    assert _same(fast, slow)
    logits, z0, outs, (row_max, ranges, named) = _trace(net, x)
    assert torch.equal(row_max, torch.stack([t.abs().amax(1) for t in (z0, *outs)]))
    assert [t for _, _, t in named] == [t for _, _, t in _named_tensors(list(net.layers), net.normalize)]
    assert torch.equal(ranges, torch.tensor([[t.min().item(), t.max().item()] for _, _, t in named],
                                            dtype=torch.float64))
    graphs = counters["stats"]["unique_graphs"]
    part = margin_certify(net, x[:200], y[:200], 0.0)  # another batch size: the same graph, the same values
    assert all(torch.equal(a, b[:200]) for a, b in zip(part[:3], fast[:3]))
    assert counters["stats"]["unique_graphs"] == graphs


def test_autocast_and_tf32_settings_change_nothing():
    net = _net(10)
    x = torch.rand(50, 1, 8, 8)
    y = net(x).argmax(1)
    ref = margin_certify(net, x, y, 0.01)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _same(margin_certify(net, x, y, 0.01), ref)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.parametrize("where", ["normalize.mean", "normalize.std", "layers.0.mean_shift.running_mean",
                                   "layers.3.bias"])
def test_every_tensor_the_pass_uses_is_checked(where):
    """certify(..., "margin") leaves the finiteness check to the pass, which names the tensor."""
    net = _net(11)
    x = torch.rand(4, 1, 8, 8)
    y = net(x).argmax(1)
    with torch.no_grad():
        t = net.get_parameter(where) if where.endswith("bias") else net.get_buffer(where)
        t.view(-1)[0] = math.inf if where.endswith("std") else math.nan
    match = where.replace(".", r"\.") + ".*NaN or inf"
    with pytest.raises(MarginCertificateError, match=match):
        margin_certify(net, x, y, 0.0)
    with pytest.raises(ValueError, match=match):
        certify(net, (x, y), 0.0, "margin")


def test_the_ddp_mean_shift_is_the_librarys_own_in_eval_mode():
    """DDP training swaps every mean shift for SyncMeanShiftNorm; in eval mode it is MeanShiftNorm.forward, so
    margin and interval keep certifying the converted model, with the same radii."""
    from linf_plugin.training.ddp import SyncMeanShiftNorm, convert_sync_mean_shift

    net = _net(11)
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    before = _module_path(margin_certify, net, x, y, 0.01)
    convert_sync_mean_shift(net)
    assert isinstance(net.layers[0].mean_shift, SyncMeanShiftNorm)
    assert _same(margin_certify(net, x, y, 0.01), before)
    certify(net, (x, y), 0.01, "interval")

    class Mine(SyncMeanShiftNorm):  # the marker is not inherited by a forward of the user's
        def forward(self, z):
            return super().forward(z) * 2

    net.layers[0].mean_shift.__class__ = Mine
    with pytest.raises(MarginCertificateError, match="mean shift"):
        margin_certify(net, x, y, 0.01)


def test_training_evaluation_falls_back_to_ibp_for_a_hooked_net():
    """The trainer's evaluation must not die on a user's hook: the margin certificate refuses, IBP certifies."""
    from linf_plugin.training.evaluate import evaluate

    net = _net(12, depth=3, width=32)
    x = torch.rand(24, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    assert evaluate(net, "linf_dist", x, y, 0.01)["method"] == "margin"
    handle = net.register_forward_hook(lambda m, i, out: None)
    try:
        got = evaluate(net, "linf_dist", x, y, 0.01)
    finally:
        handle.remove()
    assert got["method"] == "ibp" and got["clean_acc"] == 1.0


def test_a_stack_the_modules_would_refuse_is_left_to_them():
    """A layer in another dtype: the stack's graph would promote (or fail, and switch the backend's compiled
    path off for good); the plain pass leaves it to the module, whose check refuses it."""
    from linf_plugin.ops import get_backend

    backend = get_backend("torch")
    net = _net(11, depth=3, width=128)
    net.layers[1].double()
    x = torch.rand(360, 1, 8, 8)
    with pytest.raises(TypeError, match="share a dtype"):
        margin_certify(net, x, torch.zeros(360, dtype=torch.long), 0.0)
    assert backend.compile_failed is None
