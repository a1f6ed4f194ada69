"""Input validation shared by every l_p-distance entry point."""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["check_p", "check_pair", "check_box"]

_FLOATS = (torch.float32, torch.float64)


def check_p(p) -> float:
    """Return ``p`` as a float in ``[1, inf]`` or raise ``ValueError``/``TypeError``."""
    if isinstance(p, torch.Tensor):
        if p.numel() != 1:
            raise TypeError(f"p must be a scalar, got a tensor of shape {tuple(p.shape)}")
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number in [1, inf], got {p!r}")
    p = float(p)
    if math.isnan(p):
        raise ValueError("p must be a real number in [1, inf], got NaN")
    if p < 1:
        raise ValueError(f"p must be >= 1 (l_p is not a norm below 1), got {p}")
    return p


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")


def check_pair(x: torch.Tensor, w: torch.Tensor, check_nan: bool | None = None) -> None:
    """Validate ``x (B, D)`` against ``w (N, D)``.

    NaN is checked on CPU tensors (cheap next to the B*N*D work) but not on
    CUDA tensors by default, because it needs a host synchronisation; pass
    ``check_nan=True`` to force it.
    """
    _check_float("x", x)
    _check_float("w", w)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, D), got {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"w must have shape (N, D), got {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} features but w has D={w.shape[1]} (x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)})")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w must share a dtype, got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"x and w must be on the same device, got {x.device} and {w.device}")
    if check_nan is None:
        check_nan = x.device.type == "cpu"
    if check_nan:
        if torch.isnan(x).any():
            raise ValueError("x contains NaN")
        if torch.isnan(w).any():
            raise ValueError("w contains NaN")


def check_box(lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor) -> None:
    """Validate an input box ``[lower, upper]`` (each ``(B, D)``) against ``w (N, D)``."""
    check_pair(lower, w, check_nan=True)
    _check_float("upper", upper)
    if upper.shape != lower.shape:
        raise ValueError(f"lower and upper must have the same shape, got {tuple(lower.shape)} and "
                         f"{tuple(upper.shape)}")
    if upper.dtype != lower.dtype or upper.device != lower.device:
        raise TypeError("lower and upper must share dtype and device")
    if torch.isnan(upper).any():
        raise ValueError("upper contains NaN")
    if (lower > upper).any():
        raise ValueError("empty box: lower > upper somewhere")
