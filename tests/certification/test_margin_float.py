"""The margin certificate keeps its promise under floating point."""
from __future__ import annotations


import pytest
import torch

from linf_plugin.certification import MethodNotApplicableError, certify
from linf_plugin.certification.margin import MarginCertificateError, margin_certify
from linf_plugin.models import create_model
from linf_plugin.nn import set_p


def _one_layer_net():
    """x in R^1 -> two l_inf-dist neurons, logits = -distance (std 1)."""
    net = create_model("linf_dist_mlp", input_shape=(1,), num_classes=2, depth=1)
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.tensor([[-(2.0 ** -25)], [-(2.0 ** -22)]]))
        net.layers[0].bias.zero_()
    return net.eval()


def test_naive_float32_check_is_fooled_and_ours_is_not():
    net = _one_layer_net()
    x = torch.tensor([[1.0]])
    y = torch.tensor([0])
    # float32: |1 + 2^-25| rounds to 1, so the winning distance looks 2^-25 too small.
    logits32 = net(x)[0]
    margin32 = (logits32[0] - logits32[1]).item()
    assert margin32 == 2.0 ** -22
    exact = net.double()(x.double())[0]
    margin_exact = (exact[0] - exact[1]).item()
    assert margin_exact == 2.0 ** -22 - 2.0 ** -25
    net.float()
    eps = margin_exact / 2  # exactly the true radius: NOT certifiable (needs margin/2 > eps)
    assert margin32 / 2 > eps, "the naive float32 check would certify this point"
    assert not margin_exact / 2 > eps
    correct, certified, radius, info = margin_certify(net, x, y, eps)
    assert bool(correct[0]) and not bool(certified[0])
    assert radius[0] <= eps
    assert not certify(net, (x, y), eps, "margin").certified[0]


def _random_linf_net(seed, depth=4, width=48, std=0.3, dtype=torch.float32):
    torch.manual_seed(seed)
    net = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=depth, width=width,
                       mean=0.3, std=std)
    net.train()
    for _ in range(3):  # non-zero running means
        net(torch.rand(32, 1, 8, 8))
    with torch.no_grad():
        net.layers[-1].bias.normal_(0, 3)
    return net.eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recheck_near_threshold_in_higher_precision(dtype):
    """Certify just below each point's radius, then re-check the exact margin."""
    checked = 0
    for seed in range(4):
        net = _random_linf_net(seed, dtype=dtype)
        x = torch.rand(200, 1, 8, 8, dtype=dtype)
        y = net(x).argmax(1)  # labels = predictions, so every point can be certified
        _, _, radius, info = margin_certify(net, x, y, 0.0)
        assert (radius > 0).all()
        below, above = radius * (1 - 1e-9), radius * (1 + 1e-9)
        # certified at eps just below the radius, not at eps just above it
        for eps_vec, expect in ((below, True), (above, False)):
            flags = torch.tensor([bool(margin_certify(net, x[i:i + 1], y[i:i + 1], float(eps_vec[i]))[1][0])
                                  for i in range(0, 200, 20)])
            assert flags.all() if expect else not flags.any()
        # Re-check with a float64 evaluation of the same stored parameters (for a
        # float64 model this is the same arithmetic, so it checks the bookkeeping).
        exact_net = net.double()
        with torch.no_grad():
            logits = exact_net(x.double())
        top2 = logits.topk(2, dim=1).values
        exact_margin = top2[:, 0] - top2[:, 1]
        lip = 1.0 / exact_net.normalize.std.min().item()
        assert (exact_margin / (2 * lip) > below).all(), "a certified radius exceeds the exact one"
        # the float-safety slack is small in pixel units: the certificate stays useful
        naive = exact_margin / (2 * lip)
        assert (naive - radius).max() < (2e-4 if dtype == torch.float32 else 1e-9)
        net.to(dtype)
        checked += 200
    assert checked == 800


def test_float_model_holds_at_perturbed_inputs():
    net = _random_linf_net(7)
    x = torch.rand(50, 1, 8, 8)
    y = net(x).argmax(1)
    _, _, radius, _ = margin_certify(net, x, y, 0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        delta = (torch.rand(x.shape, generator=g) * 2 - 1) * radius.float().view(-1, 1, 1, 1) * 0.999
        corner = torch.sign(torch.randn(x.shape, generator=g)) * radius.float().view(-1, 1, 1, 1) * 0.999
        for pert in (delta, corner):
            assert torch.equal(net(x + pert).argmax(1), y)


def test_margin_refuses_models_without_lipschitz_constant():
    hybrid = create_model("linf_dist_hybrid", input_shape=(1, 8, 8), num_classes=10, depth=2, width=16).eval()
    data = (torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(MethodNotApplicableError, match="margin"):
        certify(hybrid, data, 0.1, "margin")
    net = _random_linf_net(0)
    set_p(net, 8.0)
    with pytest.raises(MethodNotApplicableError, match="p = inf"):
        certify(net, data, 0.1, "margin")
    relu = create_model("mlp_3layer", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(MethodNotApplicableError):
        certify(relu, data, 0.1, "margin")


def test_nothing_certifies_just_past_the_exact_radius():
    """The one-layer net's exact radius is known in closed form; eps a hair past it must not certify."""
    net = _one_layer_net()
    x, y = torch.tensor([[1.0]]), torch.tensor([0])
    exact_radius = (2.0 ** -22 - 2.0 ** -25) / 2
    for eps in (exact_radius * (1 + 2.0 ** -20), exact_radius * (1 + 1e-6), exact_radius * 1.01):
        assert not bool(margin_certify(net, x, y, eps)[1][0])
    # and on random nets, against the float64 margin of the same stored parameters
    for dtype in (torch.float32, torch.float64):
        net = _random_linf_net(3, dtype=dtype)
        xs = torch.rand(100, 1, 8, 8, dtype=dtype)
        ys = net(xs).argmax(1)
        with torch.no_grad():
            top2 = net.double()(xs.double()).topk(2, dim=1).values
        net.to(dtype)
        past = (top2[:, 0] - top2[:, 1]) / (2 / net.normalize.std.double().min()) * (1 + 1e-9)
        flags = [bool(margin_certify(net, xs[i:i + 1], ys[i:i + 1], float(past[i]))[1][0]) for i in range(100)]
        assert not any(flags)


def test_unit_roundoff_is_the_computation_dtype():
    """A float32 input to a float64 model computes in float64 (u = 2^-53); the reverse is refused clearly."""
    net64 = _random_linf_net(5, dtype=torch.float64)
    x32 = torch.rand(20, 1, 8, 8)
    y = net64(x32).argmax(1)
    info = margin_certify(net64, x32, y, 0.0)[3]
    assert info["unit_roundoff"] == 2.0 ** -53
    r_mixed = margin_certify(net64, x32, y, 0.0)[2]
    r_same = margin_certify(net64, x32.double(), y, 0.0)[2]
    assert torch.equal(r_mixed, r_same)  # the same float64 computation, the same certificate
    net32 = _random_linf_net(5, dtype=torch.float32)
    assert margin_certify(net32, x32, y, 0.0)[3]["unit_roundoff"] == 2.0 ** -24
    with pytest.raises(MarginCertificateError, match="float64.*float32"):
        margin_certify(net32, x32.double(), y, 0.0)


def test_hooked_trace_and_direct_trace_agree():
    """A model with its own forward is traced with hooks; both paths bound the same values."""
    from linf_plugin.models import LinfDistNet

    class Wrapped(LinfDistNet):
        def forward(self, x):  # same function, other code object: takes the hook path
            return super().forward(x)

    net = _random_linf_net(6)
    other = Wrapped(net.input_shape, net.num_classes, [48, 48, 48], mean=0.3, std=0.3).eval()
    other.load_state_dict(net.state_dict())
    x = torch.rand(30, 1, 8, 8)
    y = net(x).argmax(1)
    a, b = margin_certify(net, x, y, 0.0), margin_certify(other, x, y, 0.0)
    assert torch.equal(a[2], b[2]) and a[3] == b[3]

    class Cheat(LinfDistNet):
        def forward(self, x):  # logits that are not the last layer's output
            return super().forward(x) * 2

    cheat = Cheat(net.input_shape, net.num_classes, [48, 48, 48], mean=0.3, std=0.3).eval()
    cheat.load_state_dict(net.state_dict())
    with pytest.raises(MarginCertificateError, match="not the last"):
        margin_certify(cheat, x, y, 0.0)
