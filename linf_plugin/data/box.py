"""The l_inf box around an input, clipped to the data range, rounded on purpose."""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch

__all__ = ["linf_box", "check_data_range"]


def check_data_range(data_range: Sequence[float], name: str = "data_range") -> Tuple[float, float]:
    """``(lo, hi)`` as floats with ``lo < hi`` (either may be infinite); a clear error otherwise."""
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {data_range!r}") from None
    if math.isnan(lo) or math.isnan(hi) or not lo < hi:
        raise ValueError(f"{name}={data_range!r} is empty: it needs low < high")
    return lo, hi


def _check_inside(x: torch.Tensor, data_range: Tuple[float, float], name: str) -> None:
    lo, hi = data_range
    if x.numel() == 0:
        return
    if torch.isnan(x).any():
        raise ValueError("the inputs contain NaN")
    x_min, x_max = float(x.min()), float(x.max())
    if x_min < lo or x_max > hi:
        raise ValueError(f"the inputs lie in [{x_min:g}, {x_max:g}], outside {name}=({lo:g}, {hi:g}); a box "
                         f"clipped to that range would not contain them. Pass the range your data lives in "
                         f"(e.g. {name}=(0, 255) for raw pixels, (-inf, inf) for normalised inputs)")


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
        x: ``(B, *shape)``, every value inside ``data_range``.
        eps: a float, or a ``(B,)`` tensor of per-sample radii (>= 0).
        data_range: ``(low, high)``, ``low < high``, possibly infinite.
        outward: rounding direction (see above).

    Returns:
        ``(lower, upper)``, each shaped like ``x``, ``lower <= x <= upper``
        (for ``outward=False``: as close to that as x's dtype allows).

    Raises:
        ValueError: an empty ``data_range``, inputs outside it (the clipped
            box would not contain them) or NaN, a negative eps.
    """
    lo, hi = check_data_range(data_range)
    _check_inside(x.detach(), (lo, hi), "data_range")
    x64 = x.detach().to(torch.float64)
    if torch.is_tensor(eps):
        eps = eps.detach().to(device=x.device, dtype=torch.float64).view((-1,) + (1,) * (x.dim() - 1))
        if (eps < 0).any() or torch.isnan(eps).any():
            raise ValueError("eps must be >= 0")
    elif not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    lower64 = (x64 - eps).clamp(min=lo) if math.isfinite(lo) else x64 - eps
    upper64 = (x64 + eps).clamp(max=hi) if math.isfinite(hi) else x64 + eps
    if x.dtype == torch.float64 and outward:
        # x64 -/+ eps rounded to nearest may land inside the real ball: one ulp outward covers it.
        lower64 = torch.where(lower64 > lo, torch.nextafter(lower64, torch.full_like(lower64, -math.inf)), lower64)
        upper64 = torch.where(upper64 < hi, torch.nextafter(upper64, torch.full_like(upper64, math.inf)), upper64)
    lower, upper = lower64.to(x.dtype), upper64.to(x.dtype)
    if x.dtype != torch.float64:
        up, down = torch.full_like(lower, math.inf), torch.full_like(lower, -math.inf)
        if outward:
            lower = torch.where(lower.to(torch.float64) > lower64, torch.nextafter(lower, down), lower)
            upper = torch.where(upper.to(torch.float64) < upper64, torch.nextafter(upper, up), upper)
        else:
            lower = torch.where(lower.to(torch.float64) < lower64, torch.nextafter(lower, up), lower)
            upper = torch.where(upper.to(torch.float64) > upper64, torch.nextafter(upper, down), upper)
    if (upper < lower).any():  # cannot happen for x inside the range; a guard, never a silent fix
        raise ValueError("the box is empty")
    return lower, upper
