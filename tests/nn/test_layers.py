"""LpDistLinear, MeanShiftNorm, InputNormalize and set_p against plain torch."""
from __future__ import annotations

import math

import pytest
import torch

from linf_plugin.nn import InputNormalize, LpDistLinear, MeanShiftNorm, get_p, lp_dist_layers, set_p


def _plain(x, w, p):
    d = (x[:, None, :] - w[None]).abs()
    return d.amax(-1) if math.isinf(p) else (d ** p).sum(-1) ** (1 / p)


@pytest.mark.parametrize("p", [1.0, 2.0, 8.0, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_plain_distance(p, dtype):
    torch.manual_seed(0)
    layer = LpDistLinear(7, 5, p=p, bias=True, mean_shift=False, dtype=dtype)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(4, 7, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (4, 5)
    torch.testing.assert_close(y, _plain(x, layer.weight, p) + layer.bias)


def test_identity_init_sets_minus_c_at_i_mod_in():
    torch.manual_seed(0)
    layer = LpDistLinear(3, 8, identity_value=7.5)
    rows = torch.arange(8)
    assert torch.all(layer.weight[rows, rows % 3] == -7.5)
    mask = torch.ones_like(layer.weight, dtype=torch.bool)
    mask[rows, rows % 3] = False
    assert layer.weight[mask].abs().max() < 7.5  # the rest is the Gaussian init
    # in > out: no identity init (as in the authors' code)
    wide = LpDistLinear(8, 3, identity_value=7.5)
    assert not torch.any(wide.weight == -7.5)
    # on a bounded domain an identity neuron fetches one coordinate: ||x - w|| = x_i + C
    x = torch.rand(6, 3)
    no_noise = LpDistLinear(3, 3, bias=False, identity_value=10.0, weight_std=1e-6)
    torch.testing.assert_close(no_noise(x), x + 10.0, atol=1e-5, rtol=0)


def test_gradients_flow_to_x_weight_and_bias():
    torch.manual_seed(1)
    layer = LpDistLinear(6, 4, p=8.0, bias=True, mean_shift=True)
    x = torch.randn(5, 6, requires_grad=True)
    layer(x).square().sum().backward()
    for t in (x.grad, layer.weight.grad, layer.bias.grad):
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0


def test_mean_shift_train_uses_batch_mean_eval_uses_running_mean():
    torch.manual_seed(2)
    ms = MeanShiftNorm(3, momentum=0.25)
    x = torch.randn(10, 3) + torch.tensor([1.0, -2.0, 3.0])
    y = ms(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(ms.running_mean, 0.25 * x.mean(0))
    ms.eval()
    x2 = torch.randn(4, 3)
    torch.testing.assert_close(ms(x2), x2 - 0.25 * x.mean(0))
    before = ms.running_mean.clone()
    ms(x2)
    assert torch.equal(ms.running_mean, before)  # eval never updates


def test_layer_order_is_distance_then_mean_shift_then_bias():
    torch.manual_seed(3)
    layer = LpDistLinear(4, 4, bias=True, mean_shift=True)
    with torch.no_grad():
        layer.bias.fill_(0.5)
    x = torch.randn(8, 4)
    d = _plain(x, layer.weight, math.inf)
    torch.testing.assert_close(layer(x), d - d.mean(0) + 0.5)


def test_set_p_and_get_p():
    model = torch.nn.Sequential(LpDistLinear(3, 4), torch.nn.Identity(), LpDistLinear(4, 2))
    assert get_p(model) == math.inf
    assert set_p(model, 8) is model
    assert [m.p for m in lp_dist_layers(model)] == [8.0, 8.0]
    model[0].p = 16
    with pytest.raises(ValueError, match="different p"):
        get_p(model)
    assert get_p(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match=">= 1"):
        set_p(model, 0.5)
    with pytest.raises(ValueError, match=">= 1"):
        model[0].p = 0


def test_bad_shapes_and_arguments_are_refused():
    layer = LpDistLinear(3, 2)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3\)"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="positive int"):
        LpDistLinear(0, 2)
    with pytest.raises(ValueError, match="backend"):
        LpDistLinear(2, 2, backend="fast")
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        MeanShiftNorm(2)(torch.randn(3, 3))


def test_input_normalize_per_channel_mean_scalar_std():
    norm = InputNormalize((0.1, 0.2, 0.3), 0.5, (3, 2, 2))
    x = torch.rand(2, 3, 2, 2)
    expect = (x - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)) / 0.5
    torch.testing.assert_close(norm(x), expect)
    assert norm.scalar_std == 0.5 and norm.lipschitz_linf == 2.0
    assert InputNormalize(0.0, (0.3, 0.3, 0.3), (3, 2, 2)).scalar_std == 0.3  # equal entries are one scalar
    with pytest.raises(ValueError, match="ONE scalar std"):
        InputNormalize(0.0, (0.2, 0.3, 0.4), (3, 2, 2))
    relu_style = InputNormalize(0.0, (0.2, 0.3, 0.4), (3, 2, 2), scalar_std=False)
    assert relu_style.scalar_std is None and relu_style.lipschitz_linf == pytest.approx(5.0)
    with pytest.raises(ValueError, match="channels"):
        InputNormalize((0.1, 0.2), 1.0, (3, 2, 2))
    with pytest.raises(ValueError, match="positive"):
        InputNormalize(0.0, 0.0)
    # vectors (d,): one mean per coordinate
    vec = InputNormalize((1.0, 2.0), 2.0, (2,))
    torch.testing.assert_close(vec(torch.tensor([[3.0, 4.0]])), torch.tensor([[1.0, 1.0]]))


def test_input_normalize_conv_form_matches_and_keeps_full_rank_buffers():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    plain = InputNormalize(mean, std, (3, 4, 4), scalar_std=False)
    conv = InputNormalize(mean, std, (3, 4, 4), scalar_std=False, as_conv=True)
    assert plain.mean.shape == (1, 3, 1, 1) and InputNormalize(0.5, 0.2, (3, 4, 4)).std.shape == (1, 1, 1, 1)
    x = torch.rand(5, 3, 4, 4)
    torch.testing.assert_close(conv(x), plain(x))
    assert conv.lipschitz_linf == pytest.approx(plain.lipschitz_linf, rel=1e-6)
    with pytest.raises(ValueError, match="image inputs"):
        InputNormalize(0.0, 1.0, (5,), as_conv=True)
    # the Lipschitz constant is that of the std the forward divides by (float32 here)
    mnist = InputNormalize(0.1307, 0.3081, (1, 28, 28))
    assert mnist.lipschitz_linf == 1.0 / float(torch.tensor(0.3081))
