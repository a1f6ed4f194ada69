"""The optimisable planes of an l_inf-distance neuron (linf_plugin.lirpa.alpha_planes).

Every parameter value must give planes that hold on the whole box: checked at
every vertex of small boxes and at random interior points (the neuron is
convex, the planes linear), for arbitrary parameters, on random boxes with
degenerate coordinates, weights inside the box and all-coordinate ties.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from linf_plugin.lirpa.alpha_planes import (clip_params, default_params, parameter_count, plane_support,
                                            planes_from_params)
from linf_plugin.lirpa.relaxation import lower_plane, upper_plane
from linf_plugin.ops import linf_box_argmax, lp_dist, lp_dist_interval


def _box(seed, dtype, D=4, N=5, B=2, kind="random"):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(B, D, generator=gen, dtype=dtype)
    r = torch.rand(B, D, generator=gen, dtype=dtype) * [0.0, 0.05, 0.7, 3.0][seed % 4]
    r = torch.where(torch.rand(B, D, generator=gen) < 0.2, torch.zeros_like(r), r)  # degenerate coordinates
    w = torch.randn(N, D, generator=gen, dtype=dtype)
    if kind == "inside":
        w[0] = c[0]
    elif kind == "ties":
        w[0] = c[0] + 0.5 * r[0].max() * torch.where(torch.arange(D) % 2 == 0, 1.0, -1.0).to(dtype)
    return c - r, c + r, w


def _support(lo, hi, w, k=3):
    return plane_support(lo, hi, w, linf_box_argmax(lo, hi, w)[0], k)


def _evaluate(coef, bias, index, xs):
    """Planes (``(S, B, N, slots)`` on ``index``) at points ``xs`` ``(R, B, D)`` -> ``(R, S, B, N)``."""
    R = xs.shape[0]
    S, B, N, slots = coef.shape
    vals = torch.gather(xs[:, :, None, :].expand(R, B, N, -1), -1, index.unsqueeze(0).expand(R, -1, -1, -1))
    return (coef.unsqueeze(0) * vals.unsqueeze(1)).sum(-1) + bias.unsqueeze(0)


def _points(lo, hi, n=200, seed=0):
    D = lo.shape[1]
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)), dtype=lo.dtype)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, *lo.shape, generator=gen, dtype=lo.dtype)
    return torch.cat([lo + bits[:, None, :] * (hi - lo), lo + u * (hi - lo)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "inside", "ties"])
def test_every_parameter_value_gives_sound_planes_in_the_default_envelope(dtype, kind):
    for seed in range(8):
        lo, hi, w = _box(seed, dtype, D=1 + seed % 5, kind=kind)
        sup = _support(lo, hi, w)
        slots = sup.index.shape[-1]
        gen = torch.Generator().manual_seed(100 + seed)
        params = default_params(sup).unsqueeze(0).repeat(6, 1, 1, 1)
        params[1:] += 3 * torch.randn(params[1:].shape, generator=gen, dtype=dtype)  # far outside the domain too
        lc, lb, uc, ub = planes_from_params(sup, params)
        xs = _points(lo, hi)
        g = torch.stack([lp_dist(x, w, math.inf) for x in xs]).unsqueeze(1)  # (R, 1, B, N)
        assert (_evaluate(lc, lb, sup.index, xs) <= g).all(), (seed, kind)
        assert (_evaluate(uc, ub, sup.index, xs) >= g).all(), (seed, kind)
        # the envelope the float64 re-check's rounding argument covers: l1 norm <= 1, and the upper
        # plane's absolute terms sum to at most far + 2 max|x| on the box
        assert (lc.abs().sum(-1) <= 1).all() and (uc.abs().sum(-1) <= 1).all()
        reach = torch.maximum(sup.lo.abs(), sup.hi.abs())
        terms = (uc.abs() * reach).sum(-1) + ub.abs()
        # up to the outward rounding slack of the upper bias: (8 + 2K) eps times a magnitude of at most
        # about 8 (far + 2 max|x|)
        tol = 8 * (8 + 2 * (slots - 1)) * torch.finfo(dtype).eps
        assert (terms <= (sup.far + 2 * reach.amax(-1)) * (1 + tol)).all()
        assert params.shape[-1] == parameter_count(slots)


def test_default_parameters_are_the_default_planes():
    lo, hi, w = _box(3, torch.float64, D=4, N=6)
    sup = _support(lo, hi, w)
    lc, lb, uc, ub = planes_from_params(sup, default_params(sup).unsqueeze(0))
    xs = _points(lo, hi, n=50)
    torch.testing.assert_close(_evaluate(lc, lb, sup.index, xs)[:, 0],
                               lower_plane(lo, hi, w, math.inf).evaluate(xs), rtol=0, atol=1e-12)
    torch.testing.assert_close(_evaluate(uc, ub, sup.index, xs)[:, 0],
                               upper_plane(lo, hi, w, math.inf).evaluate(xs), rtol=0, atol=1e-12)


def test_the_upper_family_spans_the_constant_and_multi_coordinate_planes():
    # two coordinates far from w on the same side: g = max(x0 + 2, x1 + 2) on [0, 1]^2
    lo = torch.zeros(1, 2, dtype=torch.float64)
    hi = torch.ones(1, 2, dtype=torch.float64)
    w = torch.tensor([[-2.0, -2.0]], dtype=torch.float64)
    sup = _support(lo, hi, w, k=2)
    base = default_params(sup)[0, 0]
    corners = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]], dtype=torch.float64)
    g = torch.stack([lp_dist(c, w, math.inf) for c in corners])[:, 0, 0]

    def upper(r, theta):
        p = base.clone()
        p[-2], p[-1] = r, theta
        _, _, uc, ub = planes_from_params(sup, p.view(1, 1, 1, -1))
        return _evaluate(uc, ub, sup.index, corners)[:, 0, 0, 0]

    _, ibp_hi = lp_dist_interval(lo, hi, w, math.inf)
    torch.testing.assert_close(upper(1.0, 1.0), ibp_hi.reshape(1).expand(4), atol=1e-12, rtol=0)  # tau = far: constant
    torch.testing.assert_close(upper(0.5, 0.0), ibp_hi.reshape(1).expand(4), atol=1e-12, rtol=0)  # theta = 0: constant
    # tau = 2 (r = 2/3): chords of (h_i - 2)^+ in both coordinates, slope 1 each, so theta is capped at
    # 1/2 (l1 norm 1): 2.5 + (x0 + x1) / 2, below the default chord (here the constant 3) at the near corner
    multi, chord = upper(2.0 / 3.0, 1.0), upper(float(base[-2]), 1.0)
    torch.testing.assert_close(multi, torch.tensor([2.5, 3.0, 3.0, 3.5], dtype=torch.float64), atol=1e-9, rtol=0)
    assert (multi >= g).all() and multi[0] < chord[0] - 0.4


def test_clipping_projects_onto_the_domain_without_changing_valid_parameters():
    lo, hi, w = _box(5, torch.float64)
    sup = _support(lo, hi, w)
    p = default_params(sup)
    q = p.clone()
    clip_params(q, sup.index.shape[-1])
    torch.testing.assert_close(p, q)
    wild = 5 * torch.randn(p.shape, dtype=p.dtype)
    clip_params(wild, sup.index.shape[-1])
    slots = sup.index.shape[-1]
    t = wild[..., :slots + 1]
    assert (t >= 0).all() and torch.allclose(t.sum(-1), torch.ones_like(t[..., 0]))
    assert (wild[..., slots + 1:].abs() <= 1).all() and (wild[..., 2 * slots + 1:] >= 0).all()
