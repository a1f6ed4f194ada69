"""A slow, plain PyTorch reference for the l_p-distance op.

It is written for obviousness, not speed: it forms the (chunk, N, D)
difference tensor directly.  It is the test oracle of the fast backends and
the fallback of last resort.  It follows the op's contract exactly:

* ``y[b, n] = ||x[b] - w[n]||_p`` for p in [1, inf];
* finite p uses the max-normalised form ``m * (sum (|d|/m)^p)^(1/p)``
  (``m = max |d|``), so p up to 1000 and beyond neither overflows nor
  underflows; ``y = 0`` when ``d = 0``;
* p = inf: the gradient is the subgradient at the argmax coordinate with the
  sign of ``d`` there; ties go to the LOWEST index;
* finite p: ``dy/dx_i = (|d_i| / y)^(p-1) * sign(d_i)`` (0 where y = 0).
"""
from __future__ import annotations

import math

import torch

__all__ = ["ReferenceBackend"]


def _chunks(total: int, per_item: int, budget: int = 1 << 24):
    step = max(1, budget // max(1, per_item))
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


def _pnorm(d: torch.Tensor, p: float) -> torch.Tensor:
    """l_p norm over the last dim of a non-negative tensor, max-normalised."""
    m = d.amax(dim=-1, keepdim=True)
    if math.isinf(p):
        return m.squeeze(-1)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return (m * ((d / safe) ** p).sum(dim=-1, keepdim=True) ** (1.0 / p)).squeeze(-1)


class ReferenceBackend:
    """Backend protocol (shared with the fast backends):

    * ``forward(x, w, p) -> (y, aux)``; ``aux`` is an int64 ``(B, N)`` argmax
      for p = inf and ``None`` otherwise;
    * ``backward(grad_y, x, w, y, aux, p, need_x, need_w) -> (gx, gw)``;
    * ``interval(lower, upper, w, p) -> (lo, hi)``.
    """

    name = "reference"

    def forward(self, x, w, p):
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
                yy = y[sl].unsqueeze(2)
                safe = torch.where(yy > 0, yy, torch.ones_like(yy))
                coef = torch.where(yy > 0, (d.abs() / safe) ** (p - 1), torch.zeros_like(d)) * torch.sign(d)
            term = grad_y[sl].unsqueeze(2) * coef
            if need_x:
                gx[sl] = term.sum(dim=1)
            if need_w:
                gw -= term.sum(dim=0)
        return gx, gw

    def interval(self, lower, upper, w, p):
        B, N = lower.shape[0], w.shape[0]
        lo = lower.new_empty(B, N)
        hi = lower.new_empty(B, N)
        for sl in _chunks(B, N * w.shape[1]):
            far = torch.maximum((lower[sl, None, :] - w).abs(), (upper[sl, None, :] - w).abs())
            near = torch.clamp(torch.maximum(lower[sl, None, :] - w, w - upper[sl, None, :]), min=0)
            lo[sl] = _pnorm(near, p)
            hi[sl] = _pnorm(far, p)
        return lo, hi
