"""The linear relaxations of one l_p-distance neuron (linf_plugin.lirpa.relaxation).

Soundness is checked at every vertex of small boxes (the functions are convex,
the planes linear, so vertices and the touching points are where violations
would show) and at random interior points; touching is checked where the
module docstring says the planes touch.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linf_plugin.lirpa.relaxation import LOWER_POINTS, lower_direction, lower_plane, upper_plane
from linf_plugin.ops import lp_dist, lp_dist_interval

PS = [1.0, 1.5, 2.0, 3.0, 8.0, 50.0, 1000.0, math.inf]


def _vertices(lo, hi):
    """``(2^D, B, D)`` every vertex of each box row."""
    D = lo.shape[1]
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)), dtype=lo.dtype)
    return lo + bits[:, None, :] * (hi - lo)


def _points(lo, hi, n, gen):
    u = torch.rand(n, *lo.shape, generator=gen, dtype=lo.dtype)
    return torch.cat([_vertices(lo, hi), lo + u * (hi - lo)])


def _g(xs, w, p):
    return torch.stack([lp_dist(x, w, p) for x in xs])


def _tol(values):
    eps = torch.finfo(values.dtype).eps
    return 8 * eps * (1 + values.abs())


def _check_sound(lo, hi, w, p, point="projection", n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = _points(lo, hi, n, gen)
    g = _g(xs, w, p)
    L = lower_plane(lo, hi, w, p, point).evaluate(xs)
    U = upper_plane(lo, hi, w, p).evaluate(xs)
    assert (L <= g + _tol(g)).all(), f"lower plane above g by {(L - g).max().item():.3g} (p={p}, {point})"
    assert (U >= g - _tol(g)).all(), f"upper plane below g by {(g - U).max().item():.3g} (p={p})"


@st.composite
def boxes(draw):
    D = draw(st.integers(1, 5))
    N = draw(st.integers(1, 4))
    B = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(B, D, generator=gen, dtype=dtype) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    r = torch.rand(B, D, generator=gen, dtype=dtype) * draw(st.sampled_from([0.0, 1e-6, 0.1, 2.0]))
    zero = torch.rand(B, D, generator=gen) < 0.25  # some degenerate coordinates
    r = torch.where(zero, torch.zeros_like(r), r)
    lo, hi = c - r, c + r
    w = torch.randn(N, D, generator=gen, dtype=dtype) * float(c.abs().max() + 1)
    kind = draw(st.sampled_from(["random", "inside", "endpoint", "ties"]))
    if kind == "inside":
        w[0] = c[0]
    elif kind == "endpoint":
        w[0] = torch.where(torch.rand(D, generator=gen) < 0.5, lo[0], hi[0])
    elif kind == "ties":
        w[0] = c[0] + 0.7 * r[0].max() * torch.where(torch.rand(D, generator=gen) < 0.5, 1.0, -1.0).to(dtype)
    p = draw(st.sampled_from(PS))
    return lo, hi, w, p


@settings(max_examples=150, deadline=None)
@given(boxes(), st.sampled_from(LOWER_POINTS))
def test_planes_are_sound_on_random_boxes(case, point):
    lo, hi, w, p = case
    _check_sound(lo, hi, w, p, point)


def _random_box(D=4, N=5, B=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(B, D, generator=gen, dtype=dtype)
    r = 0.5 * torch.rand(B, D, generator=gen, dtype=dtype)
    w = torch.randn(N, D, generator=gen, dtype=dtype)
    return c - r, c + r, w


@pytest.mark.parametrize("p", PS)
def test_projection_plane_touches_at_the_nearest_point_and_gives_the_ibp_lower_bound(p):
    lo, hi, w = _random_box(seed=1)
    plane = lower_plane(lo, hi, w, p, "projection")
    ibp_lo, _ = lp_dist_interval(lo, hi, w, p)
    # The nearest point of each box to each w[n]: (B, N, D).
    x0 = torch.minimum(torch.maximum(w.unsqueeze(0), lo.unsqueeze(1)), hi.unsqueeze(1))
    for n in range(w.shape[0]):
        at = plane.evaluate(x0[:, n])[:, n]
        assert torch.allclose(at, lp_dist(x0[:, n], w, p)[:, n], rtol=1e-9, atol=1e-9)
    # min over the box of a linear function is at a vertex; it equals the IBP lower bound.
    vmin = plane.evaluate(_vertices(lo, hi)).min(0).values
    assert torch.allclose(vmin, ibp_lo, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("p", PS)
def test_centre_plane_touches_at_the_centre(p):
    lo, hi, w = _random_box(seed=2)
    c = (lo + hi) / 2
    plane = lower_plane(lo, hi, w, p, "centre")
    assert torch.allclose(plane.evaluate(c), lp_dist(c, w, p), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("p", PS)
def test_upper_plane_touches_at_its_two_corners_and_its_max_is_the_ibp_upper_bound(p):
    lo, hi, w = _random_box(seed=3)
    plane = upper_plane(lo, hi, w, p)
    _, ibp_hi = lp_dist_interval(lo, hi, w, p)
    vmax = plane.evaluate(_vertices(lo, hi)).max(0).values
    assert torch.allclose(vmax, ibp_hi, rtol=1e-9, atol=1e-9)  # never worse than IBP, and equal at best
    if p == 1.0:  # the dense sum of chords is exact at every vertex
        V = _vertices(lo, hi)
        assert torch.allclose(plane.evaluate(V), _g(V, w, p), rtol=1e-9, atol=1e-9)
        return
    B, N = plane.index.shape
    for b in range(B):
        for n in range(N):
            k = int(plane.index[b, n])
            far = torch.where((lo[b] - w[n]).abs() >= (hi[b] - w[n]).abs(), lo[b], hi[b])
            for end in (lo[b, k], hi[b, k]):
                corner = far.clone()
                corner[k] = end
                val = plane.evaluate(corner.expand(B, -1))[b, n]
                true = lp_dist(corner[None], w[n:n + 1], p)[0, 0]
                assert torch.isclose(val, true, rtol=1e-9, atol=1e-9), (b, n, k)


def test_linf_upper_plane_is_the_exact_chord_when_one_coordinate_dominates():
    lo = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    hi = torch.tensor([[1.0, 0.2, 0.2]], dtype=torch.float64)
    w = torch.tensor([[0.3, 0.1, 0.1]], dtype=torch.float64)  # |x0 - 0.3| >= 0.3 > 0.1 elsewhere
    plane = upper_plane(lo, hi, w, math.inf)
    assert int(plane.index[0, 0]) == 0
    assert torch.isclose(plane.coef[0, 0], torch.tensor((0.7 - 0.3) / 1.0, dtype=torch.float64))
    assert torch.isclose(plane.bias[0, 0], torch.tensor(0.3, dtype=torch.float64), atol=1e-12)


def test_linf_upper_plane_is_at_least_as_tight_as_chord_plus_slack():
    gen = torch.Generator().manual_seed(4)
    lo, hi, w = _random_box(D=5, N=20, B=3, seed=4)
    plane = upper_plane(lo, hi, w, math.inf)
    k = plane.index
    lk, uk = torch.gather(lo, 1, k), torch.gather(hi, 1, k)
    wk = torch.gather(w.unsqueeze(0).expand(lo.shape[0], -1, -1), 2, k.unsqueeze(2)).squeeze(2)
    far = torch.maximum((lo.unsqueeze(1) - w).abs(), (hi.unsqueeze(1) - w).abs())
    m_rest = far.scatter(2, k.unsqueeze(2), torch.zeros_like(far[..., :1])).amax(2)
    cl, cu = (lk - wk).abs(), (uk - wk).abs()
    slack = torch.clamp(m_rest - torch.minimum(cl, cu), min=0)
    for end, c in ((lk, cl), (uk, cu)):  # both are lines: compare at the two endpoints
        ours = plane.coef * end + plane.bias
        assert (ours <= c + slack + 1e-12).all()
    del gen


def test_degenerate_box_gives_planes_through_the_point():
    x = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    w = torch.tensor([[0.0, 0.0, 0.0], [0.3, -1.0, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    for p in PS:
        g = lp_dist(x, w, p)
        assert torch.allclose(lower_plane(x, x, w, p).evaluate(x), g, atol=1e-12)
        assert torch.allclose(upper_plane(x, x, w, p).evaluate(x), g, atol=1e-12)


@pytest.mark.parametrize("p", [2.0, 8.0, 1000.0])
def test_finite_p_lower_direction_lies_in_the_dual_unit_ball(p):
    lo, hi, w = _random_box(D=6, N=10, seed=5, dtype=torch.float32)
    for point in ("projection", "centre"):
        _, a = lower_direction(lo, hi, w, p, point)
        q = p / (p - 1)
        assert ((a.abs().double() ** q).sum(-1) ** (1 / q) <= 1.0 + 1e-12).all()


def test_large_p_and_large_magnitudes_stay_finite_and_sound():
    lo, hi, w = _random_box(D=4, N=3, seed=7, dtype=torch.float32)
    lo, hi, w = lo * 1e4, hi * 1e4, w * 1e4
    for p in (1000.0, 1e6):
        low, up = lower_plane(lo, hi, w, p), upper_plane(lo, hi, w, p)
        assert torch.isfinite(low.coef).all() and torch.isfinite(low.bias).all()
        assert torch.isfinite(up.coef).all() and torch.isfinite(up.bias).all()
        _check_sound(lo, hi, w, p)


def test_crossed_box_corners_are_read_as_their_hull():
    lo, hi, w = _random_box(D=3, N=2, seed=8)
    a, b = upper_plane(hi, lo, w, 8.0), upper_plane(lo, hi, w, 8.0)
    assert torch.equal(a.coef, b.coef) and torch.equal(a.bias, b.bias)


def test_unknown_lower_point_is_refused():
    lo, hi, w = _random_box()
    with pytest.raises(ValueError, match="lower-plane point"):
        lower_plane(lo, hi, w, 2.0, "middle")


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn()``."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("p", [1.0, 8.0, math.inf])
def test_planes_keep_no_chunk_temporaries_for_the_backward_pass(p):
    # CROWN-IBP training backpropagates through the planes.  The (B, chunk, D)
    # temporaries must not be kept: on a 6x5120 CIFAR net they were gigabytes
    # per batch row, and certification ran out of memory at 8 inputs.
    B, N, D = 4, 64, 2048
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, D, generator=gen).requires_grad_(True)
    x = torch.randn(B, D, generator=gen)
    lo, hi = x - 0.1, x + 0.1
    bnd = B * N * D * w.element_size()
    assert _saved_bytes(lambda: upper_plane(lo, hi, w, p)) < bnd / 2
    # The finite-p lower plane is dense, (B, N, D) by nature: allow its own size a few times.
    assert _saved_bytes(lambda: lower_plane(lo, hi, w, p)) < (bnd / 2 if math.isinf(p) else 3 * bnd)


@pytest.mark.parametrize("p", [1.0, 2.5, 8.0, math.inf])
def test_checkpointed_planes_have_the_gradients_of_the_plain_computation(p, monkeypatch):
    from linf_plugin.lirpa import relaxation

    gen = torch.Generator().manual_seed(1)
    B, N, D = 3, 10, 7
    w0 = torch.randn(N, D, generator=gen, dtype=torch.float64)
    x0 = torch.randn(B, D, generator=gen, dtype=torch.float64)
    r0 = torch.rand(B, D, generator=gen, dtype=torch.float64) * 0.5
    monkeypatch.setattr(relaxation, "_CHUNK_ELEMS", B * D * 3)  # several chunks

    def grads():
        w, x, r = (t.clone().requires_grad_(True) for t in (w0, x0, r0))
        lo, hi = x - r, x + r
        up, low = upper_plane(lo, hi, w, p), lower_plane(lo, hi, w, p, "centre")
        xs = _points(lo.detach(), hi.detach(), 5, torch.Generator().manual_seed(2))
        (up.evaluate(xs).sum() + 0.5 * low.evaluate(xs).sum()).backward()
        return w.grad, x.grad, r.grad

    checkpointed = grads()
    monkeypatch.setattr(relaxation, "checkpoint", lambda fn, *a, **k: fn(*a))
    plain = grads()
    for a, b in zip(checkpointed, plain):
        assert torch.equal(a, b)
    assert checkpointed[0].abs().sum() > 0
