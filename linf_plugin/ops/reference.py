"""A slow, plain PyTorch reference for the l_p-distance op.

It is written for obviousness, not speed: it forms the ``(chunk, N, D)``
difference tensor directly.  It is the test oracle of the fast backends and
the fallback of last resort.  It fixes the op's contract:

* ``y[b, n] = ||x[b] - w[n]||_p`` for p in [1, inf];
* finite p uses the max-normalised form ``m * (sum (|d|/m)^p)^(1/p)``
  (``m = max |d|``), so p up to 1000 and beyond neither overflows nor
  underflows; ``y = 0`` when ``d = 0``;
* p = inf: the gradient is the subgradient at the argmax coordinate with the
  sign of ``d`` there; ties go to the LOWEST index;
* finite p: ``dy/dx_i = (|d_i| / y)^(p-1) * sign(d_i)``;
* an output that is exactly 0 has gradient 0 (every p, every function).

The interval ``[lo, hi]`` of ``||x - w[n]||_p`` over ``lower <= x <= upper``
uses, per coordinate, ``a = w - lower`` and ``c = upper - w``:
``far = max(a, c)`` and ``near = max(-a, -c, 0)``; ``hi = ||far||_p``,
``lo = ||near||_p``.  Gradients (subgradient conventions, shared by every
backend): ``far`` follows the upper end when ``c >= a`` (ties go to
``upper``), else the lower end; ``near`` is ``lower - w`` when
``lower > w``, ``w - upper`` when ``w > upper``, and constant 0 otherwise;
for p = inf only the argmax coordinate (lowest index on ties) carries
gradient.
"""
from __future__ import annotations

import math

import torch

__all__ = ["ReferenceBackend", "interval_terms"]


def _chunks(total: int, per_item: int, budget: int = 1 << 24):
    step = max(1, budget // max(1, per_item))
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


def interval_terms(lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor):
    """Per-coordinate ``(a, c, far, near)`` of a box against weights (broadcasting).

    ``a = w - lower``, ``c = upper - w``, ``far = max(a, c)``,
    ``near = max(-a, -c, 0)``.  Every backend computes these with exactly
    these operations, so p = inf results agree bit for bit.
    """
    a = w - lower
    c = upper - w
    far = torch.maximum(a, c)
    near = torch.clamp(torch.maximum(-a, -c), min=0)
    return a, c, far, near


def _pnorm(d: torch.Tensor, p: float) -> torch.Tensor:
    """l_p norm over the last dim of a non-negative tensor, max-normalised."""
    m = d.amax(dim=-1, keepdim=True)
    if math.isinf(p):
        return m.squeeze(-1)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return (m * ((d / safe) ** p).sum(dim=-1, keepdim=True) ** (1.0 / p)).squeeze(-1)


def _pnorm_grad(v: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
    """``d ||v||_p / d v_i = (v_i / y)^(p-1)`` for ``v >= 0`` (0 where ``y == 0``)."""
    yy = y.unsqueeze(-1)
    safe = torch.where(yy > 0, yy, torch.ones_like(yy))
    return torch.where(yy > 0, (v / safe) ** (p - 1), torch.zeros_like(v))


class ReferenceBackend:
    """Backend protocol (shared with the fast backends):

    * ``forward(x, w, p, need_aux=True) -> (y, aux)``;
    * ``backward(grad_y, x, w, y, aux, p, need_x, need_w) -> (gx, gw)``;
    * ``interval_forward(lower, upper, w, p, need_aux=True) -> (lo, hi, aux)``;
    * ``interval_backward(grad_lo, grad_hi, lower, upper, w, lo, hi, aux, p,
      need_lower, need_upper, need_w) -> (g_lower, g_upper, g_w)``
      (``grad_lo``/``grad_hi`` may be ``None`` for "zero");
    * ``interval(lower, upper, w, p) -> (lo, hi)``.

    ``aux`` is private to the backend that produced it (here: the int64
    argmax for p = inf, ``None`` for finite p); ``need_aux=False`` promises
    that no backward will follow.
    """

    name = "reference"

    # -- distances ---------------------------------------------------------
    def forward(self, x, w, p, need_aux=True):
        B, N = x.shape[0], w.shape[0]
        y = x.new_empty(B, N)
        aux = torch.empty(B, N, dtype=torch.int64, device=x.device) if math.isinf(p) else None
        for sl in _chunks(B, N * w.shape[1]):
            d = (x[sl, None, :] - w[None, :, :]).abs()
            if math.isinf(p):
                # torch.max returns the first maximal index: ties -> lowest index.
                y[sl], aux[sl] = d.max(dim=2)
            else:
                y[sl] = _pnorm(d, p)
        return y, aux

    def backward(self, grad_y, x, w, y, aux, p, need_x=True, need_w=True):
        B, N, D = x.shape[0], w.shape[0], x.shape[1]
        gx = torch.zeros_like(x) if need_x else None
        gw = torch.zeros_like(w) if need_w else None
        for sl in _chunks(B, N * D):
            d = x[sl, None, :] - w[None, :, :]
            if math.isinf(p):
                coef = torch.zeros_like(d)
                idx = aux[sl].unsqueeze(2)
                coef.scatter_(2, idx, torch.sign(d.gather(2, idx)))
            else:
                coef = _pnorm_grad(d.abs(), y[sl], p) * torch.sign(d)
            term = grad_y[sl].unsqueeze(2) * coef
            if need_x:
                gx[sl] = term.sum(dim=1)
            if need_w:
                gw -= term.sum(dim=0)
        return gx, gw

    # -- interval ----------------------------------------------------------
    def interval(self, lower, upper, w, p):
        lo, hi, _ = self.interval_forward(lower, upper, w, p, need_aux=False)
        return lo, hi

    def interval_forward(self, lower, upper, w, p, need_aux=True):
        B, N = lower.shape[0], w.shape[0]
        lo = lower.new_empty(B, N)
        hi = lower.new_empty(B, N)
        aux = torch.empty(2, B, N, dtype=torch.int64, device=lower.device) if math.isinf(p) else None
        for sl in _chunks(B, N * w.shape[1]):
            _, _, far, near = interval_terms(lower[sl, None, :], upper[sl, None, :], w[None])
            if math.isinf(p):
                lo[sl], aux[0, sl] = near.max(dim=2)
                hi[sl], aux[1, sl] = far.max(dim=2)
            else:
                lo[sl] = _pnorm(near, p)
                hi[sl] = _pnorm(far, p)
        return lo, hi, aux

    def interval_backward(self, grad_lo, grad_hi, lower, upper, w, lo, hi, aux, p,
                          need_lower=True, need_upper=True, need_w=True):
        B, N, D = lower.shape[0], w.shape[0], w.shape[1]
        g_l = torch.zeros_like(lower)
        g_u = torch.zeros_like(upper)
        g_w = torch.zeros_like(w)
        for sl in _chunks(B, N * D):
            a, c, far, near = interval_terms(lower[sl, None, :], upper[sl, None, :], w[None])
            if math.isinf(p):
                # Only the argmax coordinate carries gradient; an output of 0 has none.
                cf = torch.zeros_like(far).scatter_(2, aux[1, sl].unsqueeze(2), 1.0) * (hi[sl] > 0).unsqueeze(2)
                cn = torch.zeros_like(near).scatter_(2, aux[0, sl].unsqueeze(2), 1.0) * (lo[sl] > 0).unsqueeze(2)
            else:
                cf = _pnorm_grad(far, hi[sl], p)
                cn = _pnorm_grad(near, lo[sl], p)
            zero = torch.zeros_like(far)
            cf = cf * (grad_hi[sl].unsqueeze(2) if grad_hi is not None else zero)
            cn = cn * (grad_lo[sl].unsqueeze(2) if grad_lo is not None else zero)
            up = c >= a                       # far follows upper (ties -> upper)
            below = -a > 0                    # lower > w: near = lower - w
            above = -c > 0                    # w > upper: near = w - upper
            g_l[sl] += (torch.where(up, zero, -cf) + torch.where(below, cn, zero)).sum(1)
            g_u[sl] += (torch.where(up, cf, zero) - torch.where(above, cn, zero)).sum(1)
            g_w += (torch.where(up, -cf, cf) - torch.where(below, cn, zero) + torch.where(above, cn, zero)).sum(0)
        return (g_l if need_lower else None, g_u if need_upper else None, g_w if need_w else None)
