"""Theorem 3.2 and Theorem A.2 nets on the digits set and on the three-point set."""
from __future__ import annotations

import math

import pytest
import torch

from linf_plugin.data import linf_separation, load_dataset, three_point_set
from linf_plugin.models import create_model, theorem32_net, theoremA2_net, theoremA2_width


def _nearest_neighbour_logits(q, x, y, k, chunk=64):
    """``−min_{y_i = j} ||q − x_i||∞`` by brute force (chunked: the full difference tensor is ~1.6 GB)."""
    rows = []
    for part in q.flatten(1).split(chunk):
        dist = (part[:, None, :] - x.flatten(1)[None]).abs().amax(-1)
        inf = torch.tensor(math.inf, dtype=dist.dtype)
        rows.append(-torch.stack([torch.where(y[None] == j, dist, inf).amin(1) for j in range(k)], 1))
    return torch.cat(rows)


def _margin(logits, y):
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return true - other


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "all")


@pytest.fixture(scope="module")
def digits_subset(digits):
    index = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))[:240]
    return digits.subset(index)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_theorem32_certifies_every_digit_at_eps_0_2(digits, dtype):
    assert linf_separation(digits.x, digits.y) == pytest.approx(0.21875)
    x = digits.x.to(dtype)
    net = theorem32_net(x, digits.y)
    assert net.layers[0].weight.dtype == dtype and not net.training
    assert net.lipschitz_linf == 1.0 and "margin" in net.certificates
    assert net.model_name == "theorem32_net" and net.model_config["num_points"] == len(digits)
    with torch.no_grad():
        logits = net(x)
    margin = _margin(logits.double(), digits.y)
    eps = 0.2
    assert bool((margin / 2 > eps * net.lipschitz_linf).all())  # 100 % certified at ε = 0.2
    assert float(margin.min()) == pytest.approx(2 * 0.21875, abs=1e-6)  # margin >= 2r, attained
    assert torch.all(logits.gather(1, digits.y[:, None]) == 0)  # the point itself is its nearest neighbour


def test_theorem32_is_the_nearest_neighbour_function_around_the_data(digits_subset):
    x, y = digits_subset.x.double(), digits_subset.y
    net = theorem32_net(x, y)
    gen = torch.Generator().manual_seed(1)
    near = x + 0.9 * (2 * torch.rand(x.shape, generator=gen, dtype=torch.float64) - 1)
    box = 3 * torch.rand(100, 1, 8, 8, generator=gen, dtype=torch.float64) - 1  # inside box ± diameter
    with torch.no_grad():
        for q in (near, box):
            torch.testing.assert_close(net(q), _nearest_neighbour_logits(q, x, y, 10), atol=1e-12, rtol=0)


def test_theorem_a2_gives_the_same_logits_on_all_digits(digits):
    x = digits.x.double()
    net32, net_a2 = theorem32_net(x, digits.y), theoremA2_net(x, digits.y, depth=2)
    with torch.no_grad():
        torch.testing.assert_close(net_a2(x), net32(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("depth", [3, 4, 7])
def test_theorem_a2_deeper_nets_width_bound_and_logits(digits_subset, depth):
    x, y = digits_subset.x.double(), digits_subset.y
    n, d, k = x.shape[0], 64, 10
    net = theoremA2_net(x, y, depth)
    assert net.depth == depth
    width = math.ceil(n / (depth - 1)) + k + 2 * d
    assert theoremA2_width(n, d, k, depth) == width
    assert [m.out_features for m in net.layers] == [width] * (depth - 1) + [k]
    gen = torch.Generator().manual_seed(depth)
    near = x[:60] + 0.5 * (2 * torch.rand(60, 1, 8, 8, generator=gen, dtype=torch.float64) - 1)
    with torch.no_grad():
        torch.testing.assert_close(net(x), theorem32_net(x, y)(x), atol=1e-12, rtol=0)
        torch.testing.assert_close(net(near), _nearest_neighbour_logits(near, x, y, 10), atol=1e-12, rtol=0)
    assert net.lipschitz_linf == 1.0


def test_float32_a2_and_empty_classes(digits_subset):
    x, y = digits_subset.x.float(), digits_subset.y
    keep = y < 6
    net32 = theorem32_net(x[keep], y[keep], num_classes=10)
    net_a2 = theoremA2_net(x[keep], y[keep], 3, num_classes=10)
    with torch.no_grad():
        a, b = net32(x[keep]), net_a2(x[keep])
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-5, rtol=0)
    assert (a.argmax(1) == y[keep]).all() and (b.argmax(1) == y[keep]).all()
    assert a[:, 6:].max() < a[:, :6].max(1).values.min() and b[:, 6:].max() < b[:, :6].max(1).values.min()


def test_three_point_set_margin_is_2r_with_normalisation():
    data = three_point_set(r=0.5, dim=2)
    net = theorem32_net(data.x, data.y, mean=0.1, std=0.5)
    assert net.lipschitz_linf == pytest.approx(2.0)
    with torch.no_grad():
        margin = _margin(net(data.x), data.y)
    # logits are in normalised units: margin = 2r/std, certified radius margin/(2L) = r in pixel units
    torch.testing.assert_close(margin / (2 * net.lipschitz_linf), torch.full((3,), 0.5, dtype=torch.float64))


def test_registry_rebuilds_the_shapes_and_bad_input_is_refused(digits_subset):
    x, y = digits_subset.x, digits_subset.y
    net = theoremA2_net(x, y, 3)
    again = create_model(**net.model_config)
    assert [m.weight.shape for m in again.layers] == [m.weight.shape for m in net.layers]
    with pytest.raises(ValueError, match="depth >= 2"):
        theoremA2_net(x, y, 1)
    with pytest.raises(ValueError, match="num_classes"):
        theorem32_net(x, y, num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        theorem32_net(x, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        theorem32_net(torch.full_like(x, math.nan), y)
