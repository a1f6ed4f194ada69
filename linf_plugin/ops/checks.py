"""Input validation shared by every l_p-distance entry point.

Every check raises with a message that names the argument and the problem.
Checks that need the tensor's values (NaN, an empty box) are free on CPU but
force a host synchronisation on CUDA; :func:`check_pair` therefore skips the
NaN scan on CUDA unless asked, while :func:`check_box` always checks (a box is
what a certificate is computed from, so correctness wins over the sync).
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["check_p", "check_pair", "check_box", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_p(p) -> float:
    """Return ``p`` as a float in ``[1, inf]`` or raise.

    Args:
        p: a real number (Python, NumPy or a one-element tensor); ``math.inf``
            selects the l_inf distance.

    Returns:
        ``float(p)``.

    Raises:
        TypeError: ``p`` is not a real scalar (a bool, a string, a tensor with
            several elements).
        ValueError: ``p`` is NaN or below 1.
    """
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
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype} (convert with .float() or .double())")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_pair(x: torch.Tensor, w: torch.Tensor, check_nan: bool | None = None, names=("x", "w")) -> None:
    """Validate ``x (B, D)`` against ``w (N, D)``.

    Args:
        x: ``(B, D)`` float32/float64 tensor.
        w: ``(N, D)`` tensor of the same dtype and device.
        check_nan: scan both for NaN.  ``None`` (default) scans CPU tensors
            only, because on CUDA the scan needs a host synchronisation.
        names: the argument names used in error messages.

    Raises:
        TypeError: not a tensor, not float32/float64, mixed dtypes.
        ValueError: wrong rank, ``D`` mismatch or ``D == 0``, mixed devices,
            NaN.
    """
    nx, nw = names
    _check_float(nx, x)
    _check_float(nw, w)
    if x.dim() != 2:
        raise ValueError(f"{nx} must have shape (B, D), got {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"{nw} must have shape (N, D), got {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{nx} has D={x.shape[1]} features but {nw} has D={w.shape[1]} ({nx} {tuple(x.shape)}, "
                         f"{nw} {tuple(w.shape)})")
    if x.shape[1] == 0:
        raise ValueError(f"{nx} and {nw} must have at least one feature (D >= 1), got D=0")
    if x.dtype != w.dtype:
        raise TypeError(f"{nx} and {nw} must share a dtype, got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"{nx} and {nw} must be on the same device, got {x.device} and {w.device}")
    if check_nan is None:
        check_nan = x.device.type == "cpu" and not torch.jit.is_tracing()
    if check_nan:
        if torch.isnan(x).any():
            raise ValueError(f"{nx} contains NaN")
        if torch.isnan(w).any():
            raise ValueError(f"{nw} contains NaN")


def check_box(lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor) -> None:
    """Validate an input box ``[lower, upper]`` (each ``(B, D)``) against ``w (N, D)``.

    Always scans the values (NaN anywhere, ``lower > upper`` anywhere), on
    CUDA too, since a wrong box would give a wrong certificate.

    Raises:
        TypeError / ValueError: as :func:`check_pair`, plus mismatched box
            shapes, dtypes or devices, NaN in the box or in ``w``, and an
            empty box.
    """
    check_pair(lower, w, check_nan=True, names=("lower", "w"))
    _check_float("upper", upper)
    if upper.shape != lower.shape:
        raise ValueError(f"lower and upper must have the same shape, got {tuple(lower.shape)} and "
                         f"{tuple(upper.shape)}")
    if upper.dtype != lower.dtype:
        raise TypeError(f"lower and upper must share a dtype, got {lower.dtype} and {upper.dtype}")
    if upper.device != lower.device:
        raise ValueError(f"lower and upper must be on the same device, got {lower.device} and {upper.device}")
    if torch.isnan(upper).any():
        raise ValueError("upper contains NaN")
    bad = lower > upper
    if bad.any():
        b, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"empty box: lower > upper at [{b}, {i}] ({lower[b, i].item()} > {upper[b, i].item()}); "
                         f"{int(bad.sum())} coordinates in all")
