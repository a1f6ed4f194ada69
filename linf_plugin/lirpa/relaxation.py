r"""Linear relaxations of one l_p-distance neuron over an input box.

For a neuron ``g(x) = ||x - w||_p`` (``p`` in ``[1, inf]``) and a box
``l <= x <= u`` this module builds two affine functions of ``x``

    L(x) = a . x + c_L  <=  g(x)  <=  U(x) = sigma . x + c_U     on the box,

one pair per (batch row ``b``, neuron ``n``).  They are what
:class:`~linf_plugin.lirpa.bound.BoundLpDist` hands to CROWN (backward mode)
and to forward-mode LiRPA.  Everything here is plain PyTorch; auto_LiRPA is
not imported.

Notation: ``h_i(t) = |t - w_i|``; per coordinate the farthest and nearest
distances over ``[l_i, u_i]`` are ``far_i = max(|l_i - w_i|, |u_i - w_i|)``
and ``near_i = max(l_i - w_i, w_i - u_i, 0)``, so the exact range of ``g``
over the box is ``[||near||_p, ||far||_p]`` (the IBP bounds).

Lower plane (a supporting hyperplane)
-------------------------------------
``g`` is a norm of ``x - w``.  By Hoelder, ``a . (x - w) <= ||a||_q ||x - w||_p``
with ``1/p + 1/q = 1``, so

    L(x) = a . (x - w)   is a valid lower bound for EVERY a with ||a||_q <= 1,

on the whole space, not only on the box.  It touches ``g`` exactly where
``a`` is a subgradient of ``g`` (Hoelder's equality case).  Taking ``a`` =
the gradient of ``g`` at a point ``x0`` gives the tangent plane at ``x0``
(``g`` is positively homogeneous, so ``g(x0) = a . (x0 - w)``).  The points
``x0`` offered (``lower=`` option):

* ``"projection"`` (default): ``x0`` = the point of the box nearest ``w``
  (``clamp(w, l, u)``).  Because ``x0`` minimises the convex ``g`` over the
  box, ``a . (x - x0) >= 0`` on the box, so ``min_box L = g(x0)``: the plane
  reproduces the exact IBP lower bound, and it is as steep as ``g`` allows
  there.  When ``w`` lies inside the box, ``g(x0) = 0`` and ``a = 0``.
* ``"centre"``: ``x0`` = the box centre (tight in the middle, may dip below
  zero at the box's edges).
* ``"face"``: ``a = s e_k`` with ``k = argmax_i max(l_i - w_i, w_i - u_i)``
  (the coordinate where ``w`` is farthest outside, or nearest a face) and ``s``
  the sign of ``centre_k - w_k``; for ``p = inf`` and ``w`` outside the box it
  coincides with ``"projection"``.

For ``p = inf`` the gradient at ``x0`` is ``sign(x0_k - w_k) e_k`` with
``k`` the argmax coordinate of ``|x0 - w|`` (ties: lowest index), so the plane
is stored sparsely (one coordinate); for finite ``p`` it is
``a_i = (|d_i| / ||d||_p)^(p-1) sign(d_i)`` with ``d = x0 - w`` (dense).

Upper plane (the chord of the dominant coordinate)
--------------------------------------------------
For a chosen coordinate ``k`` bound every other coordinate by its farthest
distance: ``g(x) <= phi_k(x_k) = (h_k(x_k)^p + S_k)^(1/p)`` with
``S_k = sum_{i != k} far_i^p`` (``p = inf``: ``phi_k = max(h_k(x_k), M_k)``
with ``M_k = max_{i != k} far_i``).  ``t -> (t^p + S)^(1/p)`` is convex and
non-decreasing on ``t >= 0`` and ``h_k`` is convex, so ``phi_k`` is convex on
``[l_k, u_k]`` and lies under its chord:

    U(x) = phi_k(l_k) + (phi_k(u_k) - phi_k(l_k)) / (u_k - l_k) * (x_k - l_k).

Properties:

* ``U`` touches ``g`` at the two corners where ``x_k`` is at ``l_k`` or
  ``u_k`` and every other coordinate is at the endpoint farther from ``w_i``
  (there ``g = phi_k``).
* ``max_box U = max(phi_k(l_k), phi_k(u_k)) = ||far||_p``: on its own it is
  never worse than the constant IBP upper bound, and it is better everywhere
  else on the box.
* ``k`` is chosen to make the chord as low as possible on average (the mean
  of ``U`` over the box is ``(||far||_p + phi_k(nearer end)) / 2``):
  ``k = argmax_i far_i^p - min(|l_i-w_i|, |u_i-w_i|)^p``; for ``p = inf``
  this is the dominant coordinate ``argmax_i far_i`` (ties: lowest index).
  When one coordinate dominates (``min(|l_k-w_k|, |u_k-w_k|) >= M_k`` for
  ``p = inf``) ``U`` is the exact chord of ``|x_k - w_k|``.
* For ``p = inf`` this is at least as tight as "chord of ``h_k`` plus the
  constant slack ``max(0, M_k - min chord)``": both are lines, and at the two
  endpoints ``max(h_k, M_k) <= chord + slack``.
* For ``p = 1`` ``g = sum_i h_i`` is separable, and the sum of all per-coordinate
  chords is used instead (dense); it is exact at every corner of the box.

Computation
-----------
The choices (``k`` above) are argmaxes over ``D`` per (row, neuron).  For
``p = inf`` with the default ``"projection"`` point they come from
:func:`linf_plugin.ops.linf_box_argmax` (fused reductions, no ``(B, N, D)``
tensor; about 20x faster on a 5120-wide layer on CPU) and every value is
gathered at them, so autograd sees only ``(B, N)`` tensors.  Otherwise the
neurons are processed in chunks of ``(B, chunk, D)`` temporaries, under
:func:`torch.utils.checkpoint.checkpoint` when autograd records, so that
CROWN-IBP training keeps no chunk temporaries for its backward pass.

Floating point
--------------
Both relaxations are exactly sound in real arithmetic.  In floating point:

* The chord's intercept is taken as ``max(phi(l_k) - s l_k, phi(u_k) - s u_k)``
  with the slope ``s`` clamped to ``[-1, 1]`` (``phi_k`` is 1-Lipschitz): any
  line above a convex function at both endpoints is above it in between, so
  rounding in ``s`` cannot break soundness.  Boxes thinner than a few ulps in
  coordinate ``k`` get the flat plane ``max(phi(l_k), phi(u_k))``.
* The lower plane's ``a`` is renormalised so that the computed ``||a||_q``
  does not exceed 1.
* Each plane is then moved outward by a slack of
  ``c * eps * (magnitude of the terms)`` (``eps`` the dtype's machine epsilon;
  ``c`` = 5 for the p = inf lower plane, 4 for the p = inf upper plane,
  ``4 + D`` for the finite-p lower plane and the p = 1 upper plane, ``8 + D``
  for the finite-p upper plane; derived in ``docs/relaxations.md``), which
  covers the rounding of our own coefficients and of one evaluation of the
  plane.  The rest of auto_LiRPA's arithmetic is covered by the float64
  re-check of the certificate (``docs/certificates.md``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..ops import linf_box_argmax

__all__ = ["Plane", "LOWER_POINTS", "lower_plane", "upper_plane", "sanitize_box", "lower_direction"]

LOWER_POINTS = ("projection", "centre", "face")

# Budget (elements) for the (B, chunk, D) temporaries.
_CHUNK_ELEMS = 1 << 24


@dataclass
class Plane:
    """Affine functions of ``x``, one per (batch row ``b``, neuron ``n``).

    Sparse form (``index`` is not None): ``P[b, n](x) = coef[b, n] * x[index[b, n]] + bias[b, n]``
    with ``index`` int64 ``(B, N)`` and ``coef`` ``(B, N)``.
    Dense form (``index`` is None): ``P[b, n](x) = coef[b, n, :] . x + bias[b, n]`` with
    ``coef`` ``(B, N, D)``.
    """

    coef: torch.Tensor
    bias: torch.Tensor
    index: Optional[torch.Tensor] = None

    @property
    def sparse(self) -> bool:
        return self.index is not None

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate at points ``x`` of shape ``(..., B, D)`` (row ``b`` against plane row ``b``).

        Returns:
            ``(..., B, N)``.
        """
        if self.sparse:
            lead = x.shape[:-2]
            idx = self.index.expand(*lead, *self.index.shape)
            vals = torch.gather(x, -1, idx)
            return self.coef * vals + self.bias
        return torch.einsum("...bd,bnd->...bn", x, self.coef) + self.bias


def sanitize_box(lower: torch.Tensor, upper: torch.Tensor):
    """Order the box corners elementwise.

    Intermediate bounds computed by separate float concretisations can cross by
    an ulp on (near-)degenerate boxes; the hull is the sound reading.
    """
    return torch.minimum(lower, upper), torch.maximum(lower, upper)


def _chunks(B: int, N: int, D: int):
    step = max(1, _CHUNK_ELEMS // max(1, B * D))
    for start in range(0, N, step):
        yield slice(start, min(N, start + step))


def _eps(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).eps


def _gradient_direction(d: torch.Tensor, p: float):
    """Gradient of ``||.||_p`` at ``d`` (``(B, n, D)``), 0 where ``d = 0``.

    Returns ``(index, coef)`` (sparse, p = inf) or ``(None, dense coef)``.
    """
    if math.isinf(p):
        k = d.abs().argmax(dim=-1)  # first maximal index: ties -> lowest
        s = torch.sign(torch.gather(d, -1, k.unsqueeze(-1)).squeeze(-1))
        return k, s
    mag = d.abs()
    m = mag.amax(dim=-1, keepdim=True)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    r = mag / safe
    if p == 1.0:
        a = torch.sign(d)
    else:
        norm = (r ** p).sum(-1, keepdim=True) ** (1.0 / p)  # >= 1 where m > 0
        a = (r / norm) ** (p - 1.0) * torch.sign(d)
        # Renormalise so that the computed dual norm does not exceed 1.
        q = p / (p - 1.0)
        am = a.abs().amax(dim=-1, keepdim=True)
        am_safe = torch.where(am > 0, am, torch.ones_like(am))
        nq = am * ((a.abs() / am_safe) ** q).sum(-1, keepdim=True) ** (1.0 / q)
        a = a / torch.clamp(nq * (1 + 4 * _eps(d)), min=1.0)
    a = torch.where(m > 0, a, torch.zeros_like(a))
    return None, a


def _chunk_call(fn, *args):
    """``fn(*args)`` for one neuron chunk; under autograd through
    :func:`torch.utils.checkpoint.checkpoint`.

    A chunk's temporaries are ``(B, chunk, D)``.  Left to autograd they would
    be kept for the backward pass for every chunk of every layer at once
    (CROWN-IBP training backpropagates through the planes), which on a
    5120-wide layer is gigabytes per batch row.  Checkpointing keeps only the
    inputs and the ``(B, chunk)`` outputs and recomputes one chunk at a time
    in the backward pass; the recomputation is deterministic (same argmax)."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _lower_chunk(lower, upper, wc, p: float, point: str):
    """:func:`lower_direction` for the neurons ``wc`` (``(n, D)``)."""
    wc = wc.unsqueeze(0)
    lo, hi = lower.unsqueeze(1), upper.unsqueeze(1)
    if point == "face":
        m = torch.maximum(lo - wc, wc - hi)
        k = m.argmax(dim=-1)
        lk = torch.gather(lo.expand_as(m), -1, k.unsqueeze(-1)).squeeze(-1)
        uk = torch.gather(hi.expand_as(m), -1, k.unsqueeze(-1)).squeeze(-1)
        wk = torch.gather(wc.expand_as(m), -1, k.unsqueeze(-1)).squeeze(-1)
        s = torch.where(lk - wk >= wk - uk, torch.ones_like(wk), -torch.ones_like(wk))
        return k, s
    if point == "projection":
        d = torch.minimum(torch.maximum(wc, lo), hi) - wc
    else:
        d = (lo + hi) * 0.5 - wc
    return _gradient_direction(d, p)


def lower_direction(lower, upper, w, p: float, point: str = "projection", indices=None):
    """The direction ``a`` of the lower plane ``a . (x - w)`` (``||a||_q <= 1``).

    Args:
        lower, upper: ``(B, D)`` box corners.
        w: ``(N, D)``.
        p: in ``[1, inf]``.
        point: one of :data:`LOWER_POINTS`.
        indices: a precomputed ``linf_box_argmax(lower, upper, w)`` (p = inf).

    Returns:
        ``(index, coef)``: sparse (``index`` ``(B, N)`` int64, ``coef`` ``(B, N)``)
        for ``p = inf`` or ``point="face"``, else ``(None, coef (B, N, D))``.
    """
    if point not in LOWER_POINTS:
        raise ValueError(f"unknown lower-plane point {point!r}; choose from {LOWER_POINTS}")
    lower, upper = sanitize_box(lower, upper)
    B, D = lower.shape
    N = w.shape[0]
    if math.isinf(p) and point == "projection":
        k = (indices if indices is not None else linf_box_argmax(lower, upper, w))[0]
        with torch.no_grad():
            wk = _gather_w(w, k)
            d = torch.minimum(torch.maximum(wk, torch.gather(lower, 1, k)), torch.gather(upper, 1, k)) - wk
            return k, torch.sign(d)
    sparse = math.isinf(p) or point == "face"
    idx_parts, coef_parts = [], []
    for sl in _chunks(B, N, D):
        if sparse:
            # A signed unit vector: piecewise constant in (box, w), so no graph is needed.
            with torch.no_grad():
                k, a = _lower_chunk(lower, upper, w[sl], p, point)
        else:
            k, a = _chunk_call(_lower_chunk, lower, upper, w[sl], p, point)
        idx_parts.append(k)
        coef_parts.append(a)
    coef = torch.cat(coef_parts, dim=1)
    index = torch.cat(idx_parts, dim=1) if sparse else None
    return index, coef


def lower_plane(lower, upper, w, p: float, point: str = "projection", indices=None) -> Plane:
    """A lower plane ``L <= ||x - w||_p`` (valid everywhere, see the module docstring).

    Args:
        lower, upper: ``(B, D)`` box corners (used to choose the plane and for the
            float slack).
        w: ``(N, D)`` weights.
        p: in ``[1, inf]``.
        point: where the tangent plane touches (:data:`LOWER_POINTS`).
        indices: a precomputed ``linf_box_argmax(lower, upper, w)`` (p = inf).

    Returns:
        A :class:`Plane` (sparse for ``p = inf`` or ``point="face"``).
    """
    lower, upper = sanitize_box(lower, upper)
    index, coef = lower_direction(lower, upper, w, p, point, indices)
    D = lower.shape[1]
    r = torch.maximum(lower.abs(), upper.abs())  # (B, D)
    if index is not None:
        wk = _gather_w(w, index)
        rk = torch.gather(r, 1, index)
        bias = -coef * wk
        slack = 5 * _eps(lower) * coef.abs() * (wk.abs() + rk)
        return Plane(coef, bias - slack, index)
    bias = -torch.einsum("bnd,nd->bn", coef, w)
    mag = torch.einsum("bnd,nd->bn", coef.abs(), w.abs()) + torch.einsum("bnd,bd->bn", coef.abs(), r)
    slack = (4 + D) * _eps(lower) * mag
    return Plane(coef, bias - slack, None)


def _gather_w(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``w[n, index[b, n]]`` as ``(B, N)``.

    Indexes the flattened weight: a gather from ``w`` expanded to
    ``(B, N, D)`` would have a dense ``(B, N, D)`` gradient."""
    N, D = w.shape
    flat = index + torch.arange(N, device=index.device).unsqueeze(0) * D
    return w.reshape(-1)[flat]


def _upper_chunk(lower, upper, wc, p: float):
    """Finite p: the chord's coordinate ``k`` and ``phi_k`` at both ends, for the neurons ``wc`` (``(n, D)``)."""
    wc = wc.unsqueeze(0)
    hl = (lower.unsqueeze(1) - wc).abs()
    hu = (upper.unsqueeze(1) - wc).abs()
    far = torch.maximum(hl, hu)
    m = far.amax(dim=-1, keepdim=True)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    rf, rl, ru = far / safe, hl / safe, hu / safe
    score = rf ** p - torch.minimum(rl, ru) ** p
    k = score.argmax(dim=-1)
    # R = ||far_{-k}||_p, normalised by its own largest term (so the
    # largest term never underflows, whatever the scale of far_k).
    rest_far = far.scatter(-1, k.unsqueeze(-1), torch.zeros_like(far[..., :1]))
    m_rest = rest_far.amax(dim=-1, keepdim=True)
    safe_rest = torch.where(m_rest > 0, m_rest, torch.ones_like(m_rest))
    R = (m_rest * ((rest_far / safe_rest) ** p).sum(-1, keepdim=True) ** (1.0 / p)).squeeze(-1)
    hlk = torch.gather(hl, -1, k.unsqueeze(-1)).squeeze(-1)
    huk = torch.gather(hu, -1, k.unsqueeze(-1)).squeeze(-1)
    return k, _norm2(hlk, R, p), _norm2(huk, R, p)


def upper_plane(lower, upper, w, p: float, indices=None) -> Plane:
    """The chord upper plane ``U >= ||x - w||_p`` on the box (see the module docstring).

    Args:
        lower, upper: ``(B, D)`` box corners.
        w: ``(N, D)``.
        p: in ``[1, inf]``.
        indices: a precomputed ``linf_box_argmax(lower, upper, w)`` (p = inf).

    Returns:
        A sparse :class:`Plane` (dense for ``p = 1``).
    """
    lower, upper = sanitize_box(lower, upper)
    B, D = lower.shape
    N = w.shape[0]
    eps = _eps(lower)
    if p == 1.0:
        return _upper_plane_p1(lower, upper, w)
    if math.isinf(p):
        # The coordinates come from fused reductions; the values are gathered
        # from them, so autograd sees only (B, N) tensors.
        _, k, j = indices if indices is not None else linf_box_argmax(lower, upper, w)
        lk, uk, wk = torch.gather(lower, 1, k), torch.gather(upper, 1, k), _gather_w(w, k)
        if D > 1:
            wj = _gather_w(w, j)
            m_rest = torch.maximum((torch.gather(lower, 1, j) - wj).abs(), (torch.gather(upper, 1, j) - wj).abs())
        else:
            m_rest = torch.zeros_like(lk)
        phil = torch.maximum((lk - wk).abs(), m_rest)
        phiu = torch.maximum((uk - wk).abs(), m_rest)
    else:
        ks, phil, phiu = [], [], []
        for sl in _chunks(B, N, D):
            k, pl, pu = _chunk_call(_upper_chunk, lower, upper, w[sl], p)
            ks.append(k)
            phil.append(pl)
            phiu.append(pu)
        k = torch.cat(ks, dim=1)
        phil, phiu = torch.cat(phil, dim=1), torch.cat(phiu, dim=1)
        lk = torch.gather(lower, 1, k)
        uk = torch.gather(upper, 1, k)
    slope, bias = _chord(lk, uk, phil, phiu)
    c = 4.0 if math.isinf(p) else 8.0 + D
    slack = c * eps * (bias.abs() + slope.abs() * torch.maximum(lk.abs(), uk.abs()) + torch.maximum(phil, phiu))
    return Plane(slope, bias + slack, k)


def _norm2(a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    """``(a^p + b^p)^(1/p)`` for ``a, b >= 0``, as ``max * (1 + (min/max)^p)^(1/p)`` (no overflow or
    harmful underflow: a vanishing ratio term is below the rounding of the result)."""
    hi = torch.maximum(a, b)
    lo = torch.minimum(a, b)
    safe = torch.where(hi > 0, hi, torch.ones_like(hi))
    return hi * (1.0 + (lo / safe) ** p) ** (1.0 / p)


def _chord(lk, uk, phil, phiu):
    """Slope and intercept of a line above a convex 1-Lipschitz function at both ends of [lk, uk]."""
    eps = _eps(lk)
    width = uk - lk
    thin = width <= 4 * eps * torch.maximum(lk.abs(), uk.abs())
    finite = torch.isfinite(phil) & torch.isfinite(phiu) & torch.isfinite(lk) & torch.isfinite(uk)
    use = ~thin & finite
    slope = torch.where(use, (phiu - phil) / torch.where(use, width, torch.ones_like(width)), torch.zeros_like(width))
    slope = slope.clamp(-1.0, 1.0)
    # Any line above a convex function at both endpoints dominates it in between.
    bias = torch.where(use, torch.maximum(phil - slope * lk, phiu - slope * uk), torch.maximum(phil, phiu))
    return slope, bias


def _upper_p1_chunk(lower, upper, wc):
    """:func:`_upper_plane_p1` for the neurons ``wc`` (``(n, D)``): ``(slope (B, n, D), bias (B, n))``."""
    D = lower.shape[1]
    wc = wc.unsqueeze(0)
    lo = lower.unsqueeze(1).expand(-1, wc.shape[1], -1)
    hi = upper.unsqueeze(1).expand(-1, wc.shape[1], -1)
    hl, hu = (lo - wc).abs(), (hi - wc).abs()
    slope, bias = _chord(lo, hi, hl, hu)
    mag = bias.abs() + slope.abs() * torch.maximum(lo.abs(), hi.abs()) + torch.maximum(hl, hu)
    return slope, bias.sum(-1) + (4 + D) * _eps(lower) * mag.sum(-1)


def _upper_plane_p1(lower, upper, w) -> Plane:
    """p = 1: the sum of the per-coordinate chords (dense, exact at every corner)."""
    B, D = lower.shape
    N = w.shape[0]
    coefs, biases = [], []
    for sl in _chunks(B, N, D):
        slope, bias = _chunk_call(_upper_p1_chunk, lower, upper, w[sl])
        coefs.append(slope)
        biases.append(bias)
    return Plane(torch.cat(coefs, dim=1), torch.cat(biases, dim=1), None)
