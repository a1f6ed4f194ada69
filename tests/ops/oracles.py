"""Plain oracles shared by the ops tests."""
from __future__ import annotations

import torch

__all__ = ["box_argmax_oracle", "lp_grad_oracle"]


def box_argmax_oracle(lower, upper, w):
    """``linf_box_argmax`` through ``(B, N, D)`` tensors and ``torch.argmax`` (the first maximal index)."""
    a = w[None] - lower[:, None]
    c = upper[:, None] - w[None]
    far = torch.maximum(a, c)
    near = torch.clamp(torch.maximum(-a, -c), min=0)
    k_far = far.argmax(-1)
    rest = far.scatter(-1, k_far.unsqueeze(-1), -1.0)
    k2 = rest.argmax(-1) if w.shape[1] > 1 else torch.zeros_like(k_far)
    return near.argmax(-1), k_far, k2


def lp_grad_oracle(grad_y, x, w, p):
    """``(grad_x, grad_w)`` of ``y = ||x[b] - w[n]||_p`` (1 <= p < inf) in float64, through ``(B, N, D)`` tensors.

    ``dy / dx[b, i] = sign(t) |t|^(p-1)`` with ``t = (x[b, i] - w[n, i]) / y[b, n]``, and its negative for
    ``w``; an output ``y = 0`` passes no gradient (the kernels' convention: ``1 / y`` is taken as 0).
    NaN inputs give NaN where they enter a term.
    """
    x, w, grad_y = x.double(), w.double(), grad_y.double()
    d = x[:, None] - w[None]                                  # (B, N, D)
    m = d.abs().amax(-1, keepdim=True)                        # scaled by the maximum: no overflow at large p
    y = (m * (d.abs() / torch.where(m > 0, m, torch.ones_like(m))).pow(p).sum(-1, keepdim=True).pow(1.0 / p))[..., 0]
    r = torch.where(y > 0, 1.0 / y, torch.zeros_like(y))
    t = d * r[..., None]
    f = grad_y[..., None] * torch.sign(t) * t.abs().pow(p - 1)
    return f.sum(1), -f.sum(0)
