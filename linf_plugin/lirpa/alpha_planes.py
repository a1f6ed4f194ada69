r"""Optimisable planes of an l_inf-distance neuron (what alpha-CROWN tunes in ``BoundLpDist``).

For ``g(x) = max_i h_i(x_i)``, ``h_i(t) = |t - w_i|``, on a box ``[l, u]``
(notation of :mod:`linf_plugin.lirpa.relaxation`: ``far_i``, ``near_i``)
two families of planes, each valid for EVERY value of its parameters, so an
optimiser may move them freely (derivation in ``docs/relaxations.md``):

Lower: ``L = sum_j t_j s_j (x_{k_j} - w_{k_j}) + t_c near_max``
    a convex combination (``t_j, t_c >= 0``, summing to 1) of per-coordinate
    planes ``s_j (x_k - w_k) <= |x_k - w_k| <= g`` (``s_j`` in [-1, 1], valid
    everywhere) and the constant ``near_max = min_box g``, over ``K + 1``
    coordinates ``k_j`` (slot 0: the coordinate of the projection plane;
    slots 1..K: the ``K`` coordinates of largest ``far_i``).  Its
    coefficients have l1 norm ``sum_j t_j |s_j| <= 1``.  ``t_0 = 1``,
    ``s_0 = `` the projection sign is the default projection plane; the other
    slots start with ``s_j`` = the sign of ``centre - w`` there.

Upper: ``U = theta * U_tau + (1 - theta) * far_max``
    ``U_tau(x) = tau + sum_{i in top K} chord_i(x_i)`` with ``chord_i`` the
    chord of ``(h_i - tau)^+`` over ``[l_i, u_i]``.  Since
    ``max_i h_i <= tau + sum_i (h_i - tau)^+`` for any ``tau``, and
    ``(h_i - tau)^+ = 0`` on the box for every coordinate outside the top K
    once ``tau >= tau_lo`` (the largest ``far_i`` outside them), ``U_tau``
    is valid for ``tau`` in ``[tau_lo, far_max]``: ``tau = far_(2)`` is the
    default chord of the dominant coordinate, ``tau = far_max`` the constant
    interval bound, smaller ``tau`` planes slope in several coordinates.
    ``tau = tau_lo + r (far_max - tau_lo)``, ``r`` in [0, 1]; ``theta`` in
    [0, 1] is capped where needed so that the plane stays in the envelope of
    the default planes (coefficients of l1 norm <= 1, absolute terms summing
    to at most ``far_max + 2 max|x|`` on the box), which the float64
    re-check's rounding argument covers.

Parameters per (start node side, spec, batch row, neuron), last dim
``2 (K + 1) + 3``: ``[t_0 .. t_K, t_c, s_0 .. s_K, r, theta]``.  The weights
``t`` are normalised by their sum (so a gradient step trades them off),
everything else is clamped to its range when the planes are built (soundness
never depends on the optimiser's clipping, which :func:`clip_params` also
does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .relaxation import _chunks, sanitize_box

__all__ = ["PlaneSupport", "plane_support", "default_params", "planes_from_params", "clip_params",
           "parameter_count", "DEFAULT_COORDINATES"]

DEFAULT_COORDINATES = 3


@dataclass
class PlaneSupport:
    """What the optimisable planes of one box need (``(B, N, ...)`` tensors, no gradient to the box needed).

    Attributes:
        index: ``(B, N, K + 1)`` int64 coordinates of the slots.
        lo, hi, w: ``(B, N, K + 1)`` box ends and weights at the slots.
        sign: ``(B, N, K + 1)`` the initial signs: the projection plane's on
            slot 0, the sign of ``centre - w`` on the others.
        near, far: ``(B, N)`` the interval bounds ``min_box g`` and ``max_box g``.
        tau_lo, tau0: ``(B, N)`` the lowest valid ``tau`` and the default (``far_(2)``).
    """

    index: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    w: torch.Tensor
    sign: torch.Tensor
    near: torch.Tensor
    far: torch.Tensor
    tau_lo: torch.Tensor
    tau0: torch.Tensor

    @property
    def coordinates(self) -> int:
        """``K``, the number of top-``far`` coordinates."""
        return self.index.shape[-1] - 1


def _top_far_index(lower, upper, w, k: int) -> torch.Tensor:
    """``(B, N, min(D, k + 1))``: per (row, neuron) the coordinates of the ``k + 1`` largest ``far_i``
    (descending), in neuron chunks of ``(B, chunk, D)`` temporaries."""
    B, D = lower.shape
    N = w.shape[0]
    parts = []
    with torch.no_grad():
        for sl in _chunks(B, N, D):
            wc = w[sl].unsqueeze(0)
            far = torch.maximum((lower.unsqueeze(1) - wc).abs(), (upper.unsqueeze(1) - wc).abs())
            parts.append(far.topk(min(D, k + 1), dim=-1).indices)
    return torch.cat(parts, 1)


def _gather3(t, index):
    """``t[b, index[b, n, s]]`` as ``(B, N, S)`` for ``t`` ``(B, D)``."""
    B, N, S = index.shape
    return torch.gather(t, 1, index.reshape(B, N * S)).view(B, N, S)


def _slot_weights(w, index):
    """``w[n, index[b, n, s]]`` as ``(B, N, S)`` (a gather from the flat weight: no dense gradient)."""
    N, D = w.shape
    flat = index + (torch.arange(N, device=index.device) * D).view(1, N, 1)
    return w.reshape(-1)[flat]


def plane_support(lower, upper, w, projection_index, coordinates: int = DEFAULT_COORDINATES) -> PlaneSupport:
    """The :class:`PlaneSupport` of a box.

    Args:
        lower, upper: ``(B, D)`` box of the neurons' input.
        w: ``(N, D)`` weights.
        projection_index: ``(B, N)`` the default lower plane's coordinate
            (``linf_box_argmax(...)[0]``).
        coordinates: ``K`` (capped at ``D``).

    Returns:
        A :class:`PlaneSupport`; its values are gathered from ``lower``,
        ``upper`` and ``w`` (differentiable in them), its coordinates not.
    """
    lower, upper = sanitize_box(lower, upper)
    k = max(1, min(int(coordinates), lower.shape[1]))
    top = _top_far_index(lower, upper, w, k)
    index = torch.cat([projection_index.unsqueeze(-1), top[..., :k]], dim=-1)
    lo, hi, ws = _gather3(lower, index), _gather3(upper, index), _slot_weights(w, index)
    near = torch.maximum(torch.maximum(lo[..., 0] - ws[..., 0], ws[..., 0] - hi[..., 0]), torch.zeros_like(lo[..., 0]))
    d0 = torch.minimum(torch.maximum(ws[..., 0], lo[..., 0]), hi[..., 0]) - ws[..., 0]
    far_top = torch.maximum((lo[..., 1:] - ws[..., 1:]).abs(), (hi[..., 1:] - ws[..., 1:]).abs())
    if top.shape[-1] > k:  # the largest far outside the top k
        rest = top[..., k:]
        wr = _slot_weights(w, rest)
        tau_lo = torch.maximum((_gather3(lower, rest) - wr).abs(), (_gather3(upper, rest) - wr).abs())[..., 0]
    else:
        tau_lo = torch.zeros_like(near)
    far = far_top[..., 0]
    tau0 = far_top[..., 1] if k > 1 else tau_lo
    sign = torch.sign((lo + hi) * 0.5 - ws)
    sign = torch.cat([torch.sign(d0).unsqueeze(-1), sign[..., 1:]], dim=-1).detach()
    return PlaneSupport(index, lo, hi, ws, sign, near, far, tau_lo, torch.maximum(tau0, tau_lo))


def parameter_count(slots: int) -> int:
    """Length of the parameter vector for ``slots = K + 1`` lower-plane slots."""
    return 2 * slots + 3


def default_params(support: PlaneSupport) -> torch.Tensor:
    """``(B, N, 2 (K + 1) + 3)`` parameters of the default planes (projection plane, dominant chord)."""
    B, N, S = support.index.shape
    p = support.lo.new_zeros(B, N, parameter_count(S))
    p[..., 0] = 1.0  # t_0
    p[..., S + 1:2 * S + 1] = support.sign
    span = support.far - support.tau_lo
    r0 = torch.where(span > 0, (support.tau0 - support.tau_lo) / torch.where(span > 0, span, torch.ones_like(span)),
                     torch.zeros_like(span))
    p[..., 2 * S + 1] = r0.clamp(0, 1)
    p[..., 2 * S + 2] = 1.0
    return p


def clip_params(params: torch.Tensor, slots: int) -> None:
    """Project ``params`` (``(..., 2 slots + 3)``, in place) onto the parameter domain."""
    with torch.no_grad():
        t = params[..., :slots + 1]
        t.clamp_(min=0.0)
        total = t.sum(-1, keepdim=True)
        t.div_(torch.where(total > 0, total, torch.ones_like(total)))
        t[..., slots].add_((total.squeeze(-1) <= 0).to(t))  # all zero: the constant plane
        params[..., slots + 1:].clamp_(-1.0, 1.0)
        params[..., 2 * slots + 1:].clamp_(0.0, 1.0)


def planes_from_params(support: PlaneSupport, params: torch.Tensor):
    """The lower and upper planes for ``params`` (``(S, B, N, 2 (K + 1) + 3)``).

    Returns:
        ``(lower_coef, lower_bias, upper_coef, upper_bias)``: coefficients
        ``(S, B, N, K + 1)`` on the slots of ``support.index`` and biases
        ``(S, B, N)``; each plane moved outward by its rounding slack.
    """
    slots = support.index.shape[-1]
    K = slots - 1
    eps = torch.finfo(support.lo.dtype).eps
    lo, hi, w = support.lo, support.hi, support.w
    # lower: a convex combination of per-coordinate planes and the constant near_max
    t = params[..., :slots + 1].clamp(min=0.0)
    total = t.sum(-1, keepdim=True)
    t = torch.where(total > 0, t / torch.where(total > 0, total, torch.ones_like(total)),
                    torch.nn.functional.one_hot(torch.tensor(slots), slots + 1).to(t))
    signs = params[..., slots + 1:2 * slots + 1].clamp(-1.0, 1.0)
    # rounding could leave sum t_j |s_j| a few ulps above 1
    lcoef = t[..., :slots] * signs / (1 + (slots + 3) * eps)
    t_c = t[..., slots]
    reach = torch.maximum(lo.abs(), hi.abs())
    lbias = -(lcoef * w).sum(-1) + t_c * support.near
    lmag = (lcoef.abs() * (w.abs() + reach)).sum(-1) + support.near
    lbias = lbias - (6 + K) * eps * lmag
    # upper: theta * U_tau + (1 - theta) * far, on the top-K slots (1..K)
    r = params[..., 2 * slots + 1].clamp(0.0, 1.0)
    tau = torch.maximum(support.tau_lo + r * (support.far - support.tau_lo), support.tau_lo)
    lo_k, hi_k, w_k = lo[..., 1:], hi[..., 1:], w[..., 1:]
    dl, du = (lo_k - w_k).abs(), (hi_k - w_k).abs()
    el, eu = (dl - tau.unsqueeze(-1)).clamp(min=0), (du - tau.unsqueeze(-1)).clamp(min=0)
    width = hi_k - lo_k
    thin = width <= 4 * eps * torch.maximum(lo_k.abs(), hi_k.abs())
    slope = torch.where(thin, torch.zeros_like(el), (eu - el) / torch.where(thin, torch.ones_like(width), width))
    slope = slope.clamp(-1.0, 1.0)
    # any line above a convex function at both ends of an interval dominates it in between
    icpt = torch.where(thin, torch.maximum(el, eu), torch.maximum(el - slope * lo_k, eu - slope * hi_k))
    n1u = slope.abs().sum(-1)
    # theta is capped so the plane stays in the default planes' envelope: coefficients of l1 norm <= 1
    # and absolute terms summing to <= far + 2 R on the box (R: the largest |x| at the slots), which
    # the float64 re-check's rounding argument covers
    big_r = reach.amax(-1)
    terms = tau + icpt.abs().sum(-1) + (slope.abs() * reach[..., 1:]).sum(-1)
    excess = (terms - support.far).clamp(min=0)
    cap = torch.where(excess > 0, 2 * big_r / torch.where(excess > 0, excess, torch.ones_like(excess)),
                      torch.ones_like(excess))
    theta = params[..., 2 * slots + 2].clamp(0.0, 1.0) / torch.clamp(n1u * (1 + (K + 2) * eps), min=1.0)
    theta = torch.minimum(theta, cap * (1 - 4 * eps))
    ucoef = torch.cat([torch.zeros_like(theta).unsqueeze(-1), theta.unsqueeze(-1) * slope], dim=-1)
    ubias = theta * (tau + icpt.sum(-1)) + (1 - theta) * support.far
    umag = tau + (icpt.abs() + slope.abs() * reach[..., 1:] + dl + du).sum(-1) + support.far
    ubias = ubias + (8 + 2 * K) * eps * umag
    return lcoef, lbias, ucoef, ubias
