"""Plain oracles shared by the ops tests."""
from __future__ import annotations

import torch

__all__ = ["box_argmax_oracle"]


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
