"""The l_inf box around an input, clipped to the data range, rounded on purpose."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

__all__ = ["linf_box"]


def linf_box(x: torch.Tensor, eps: Union[float, torch.Tensor], data_range: Sequence[float] = (0.0, 1.0),
             outward: bool = False):
    """``[x - eps, x + eps]`` intersected with ``data_range``, in x's dtype.

    The corners are formed in float64 and rounded in a chosen direction when
    cast back (a plain float32 ``x - eps`` can round either way by one ulp):

    * ``outward=False`` (attacks): toward ``x``, so every point of the box is
      inside the real l_inf ball -- a counterexample found in it is genuine;
    * ``outward=True`` (certificates): away from ``x``, so the box contains
      the whole real ball -- bounds over it cover every allowed input.

    Args:
        x: ``(B, *shape)``.
        eps: a float, or a ``(B,)`` tensor of per-sample radii.
        data_range: ``(low, high)``, possibly infinite.
        outward: rounding direction (see above).

    Returns:
        ``(lower, upper)``, each shaped like ``x``.
    """
    lo, hi = data_range
    x64 = x.detach().to(torch.float64)
    if torch.is_tensor(eps):
        eps = eps.detach().to(device=x.device, dtype=torch.float64).view((-1,) + (1,) * (x.dim() - 1))
    lower64 = (x64 - eps).clamp(min=lo) if math.isfinite(lo) else x64 - eps
    upper64 = (x64 + eps).clamp(max=hi) if math.isfinite(hi) else x64 + eps
    lower, upper = lower64.to(x.dtype), upper64.to(x.dtype)
    if x.dtype != torch.float64:
        up, down = torch.full_like(lower, math.inf), torch.full_like(lower, -math.inf)
        if outward:
            lower = torch.where(lower.to(torch.float64) > lower64, torch.nextafter(lower, down), lower)
            upper = torch.where(upper.to(torch.float64) < upper64, torch.nextafter(upper, up), upper)
        else:
            lower = torch.where(lower.to(torch.float64) < lower64, torch.nextafter(lower, up), lower)
            upper = torch.where(upper.to(torch.float64) > upper64, torch.nextafter(upper, down), upper)
    return lower, torch.maximum(upper, lower)
