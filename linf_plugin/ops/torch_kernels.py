"""The broadcast reductions of the PyTorch path, one small pure function each.

Each function works on a chunk of rows: ``x (b, D)`` against ``w (n, D)``
(or a box ``lower, upper (b, D)``) and reduces over ``D`` (forward) or over
the rows of the other operand (backward).  Written as plain broadcasting
expressions they are correct in eager mode, where they form ``(b, n, D)``
temporaries (the caller keeps ``b`` small), and ``torch.compile`` (inductor)
fuses each into one loop nest that never forms the temporary: that is the
fast CPU path.  :mod:`linf_plugin.ops.torch_backend` decides which.

p-variants (``pv``): 1, 2 and 8 get exact multiplication chains; 0 is the
general path with ``p`` passed as a 0-dim tensor, so one compiled graph
serves every p (the p schedule of training changes p every epoch).
"""
from __future__ import annotations

import torch

__all__ = ["p_variant", "linf_max", "linf_key", "decode_key", "linf_argmax", "l1_sum", "lp_sum", "lp_grad_x", "lp_grad_w",
           "ival_max", "ival_key", "ival_argmax", "ival_key_excl", "ival_max_excl", "ival_argmax_excl", "ival_l1", "ival_sum", "ival_grad_lower", "ival_grad_upper", "ival_grad_w", "KERNELS"]

_LOW32 = 4294967295  # 2**32 - 1


def p_variant(p: float) -> int:
    """1, 2 or 8 for those exact p (specialised code), else 0 (general p)."""
    return int(p) if p in (1.0, 2.0, 8.0) else 0


def _absdiff(x, w):
    return (x[:, None, :] - w[None, :, :]).abs()


def _pow(t, pv: int, p):
    """``t ** p`` for ``t >= 0``."""
    if pv == 1:
        return t
    if pv == 2:
        return t * t
    if pv == 8:
        t2 = t * t
        t4 = t2 * t2
        return t4 * t4
    return torch.exp2(p * torch.log2(t))          # 2.6x faster than pow() compiled; log2(0) = -inf -> 0


def _odd_pow(t, pv: int, pm1):
    """``sign(t) * |t| ** (p - 1)`` (the l_p gradient factor)."""
    if pv == 1:
        return torch.sign(t)
    if pv == 2:
        return t
    if pv == 8:
        return _pow7(t)                    # t^7 keeps the sign
    return torch.sign(t) * torch.exp2(pm1 * torch.log2(t.abs()))


def _grad_factor(v, r, pv: int, pm1):
    """``(v * r) ** (p - 1)`` for ``v >= 0``; for p = 1, ``[r > 0]`` (zero output -> zero gradient)."""
    if pv == 1:
        return (r > 0).to(v.dtype).expand_as(v)
    t = v * r
    if pv == 2:
        return t
    if pv == 8:
        return _pow7(t)
    return torch.exp2(pm1 * torch.log2(t))


def _pow7(t):
    """``t ** 7`` as ONE op: inductor expands an integer power into multiplications inside a
    single pointwise node.  Spelled as ``t * t2 * (t2 * t2)``, ``t`` and ``t2`` each have two
    users, and an inductor that realises multi-user nodes reading many inputs (torch 2.11 with
    16 threads did, for the interval gradients that read lower, upper, w and r) allocates
    them as ``(b, n, D)`` buffers."""
    return torch.pow(t, 7)


# -- p = inf distances ------------------------------------------------------
def linf_max(x, w):
    """``(b, n)``: ``max_i |x[b, i] - w[n, i]|``.

    Written as the max of two half-width streams, columns ``[0, h)`` and
    ``[D - h, D)`` with ``h = ceil(D / 2)`` (they overlap by one column for odd
    D, which max ignores): the compiled loop then carries two independent
    max chains instead of one latency-bound chain (about 20% faster on CPU).
    """
    D = x.shape[1]
    h = (D + 1) // 2
    a = (x[:, None, :h] - w[None, :, :h]).abs()
    b = (x[:, None, D - h:] - w[None, :, D - h:]).abs()
    return torch.maximum(a, b).amax(-1)


def linf_key(x, w):
    """float32 only: max and lowest argmax in one int64 max-reduction.

    ``|d|`` is non-negative, so its IEEE bits order like its value; the key
    ``bits(|d|) * 2^32 + (2^32 - 1 - i)`` is largest at the largest value
    and, among equal values, at the lowest index.  Decode with
    :func:`decode_key`.  One vectorised pass instead of a scalar argmax.
    """
    bits = _absdiff(x, w).view(torch.int32).to(torch.int64)
    rev = _LOW32 - torch.arange(x.shape[1], device=x.device, dtype=torch.int64)
    return (bits * 4294967296 + rev).amax(-1)


def decode_key(key):
    """``(value float32, index int64)`` from a :func:`linf_key` key."""
    value = torch.div(key, 4294967296, rounding_mode="floor").to(torch.int32).view(torch.float32)
    return value, _LOW32 - torch.remainder(key, 4294967296)


def linf_argmax(x, w, y):
    """Lowest ``i`` with ``|x[b, i] - w[n, i]| == y[b, n]`` (float index; exact in float64)."""
    d = _absdiff(x, w)
    idx = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
    return torch.where(d == y[:, :, None], idx, x.shape[1]).amin(-1)


# -- finite p distances -----------------------------------------------------
def l1_sum(x, w):
    """``(b, n)``: ``sum_i |d_i|`` (p = 1 needs no normalisation)."""
    return _absdiff(x, w).sum(-1)


def lp_sum(x, w, inv_m, p, pv: int):
    """``(b, n)``: ``sum_i (|d_i| * inv_m)^p`` with ``inv_m = 1 / max |d|`` (0 where the max is 0)."""
    return _pow(_absdiff(x, w) * inv_m[:, :, None], pv, p).sum(-1)


def lp_grad_x(x, w, g, r, pm1, pv: int):
    """``(b, D)``: ``sum_n g[b, n] * sign(d) |d r|^(p-1)`` with ``d = x[b] - w[n]``, ``r = 1 / y``."""
    t = (x[:, None, :] - w[None, :, :]) * r[:, :, None]
    return (g[:, :, None] * _odd_pow(t, pv, pm1)).sum(1)


def lp_grad_w(x, w, g, r, pm1, pv: int):
    """``(n, D)``: ``-sum_b g[b, n] * sign(d) |d r|^(p-1)`` (the chunk's part of the w-gradient)."""
    t = (x[:, None, :] - w[None, :, :]) * r[:, :, None]
    return -(g[:, :, None] * _odd_pow(t, pv, pm1)).sum(0)


# -- interval ---------------------------------------------------------------
def _terms(lower, upper, w):
    a = w[None, :, :] - lower[:, None, :]
    c = upper[:, None, :] - w[None, :, :]
    far = torch.maximum(a, c)
    near = torch.clamp(torch.maximum(-a, -c), min=0)
    return a, c, far, near


def ival_max(lower, upper, w):
    """``(lo, hi)`` for p = inf: ``max_i near_i`` and ``max_i far_i``."""
    _, _, far, near = _terms(lower, upper, w)
    return near.amax(-1), far.amax(-1)


def ival_key(lower, upper, w):
    """float32 only: :func:`linf_key` for both ends; ``(key_lo, key_hi)``."""
    _, _, far, near = _terms(lower, upper, w)
    rev = _LOW32 - torch.arange(w.shape[1], device=w.device, dtype=torch.int64)
    k_lo = (near.view(torch.int32).to(torch.int64) * 4294967296 + rev).amax(-1)
    k_hi = (far.view(torch.int32).to(torch.int64) * 4294967296 + rev).amax(-1)
    return k_lo, k_hi


def ival_argmax(lower, upper, w, lo, hi):
    """Lowest argmax of ``near`` and of ``far`` (float indices)."""
    _, _, far, near = _terms(lower, upper, w)
    idx = torch.arange(w.shape[1], device=w.device, dtype=w.dtype)
    D = w.shape[1]
    return (torch.where(near == lo[:, :, None], idx, D).amin(-1), torch.where(far == hi[:, :, None], idx, D).amin(-1))


def ival_key_excl(lower, upper, w, k):
    """float32 only: the :func:`ival_key` key of ``far`` with coordinate ``k[b, n]`` left out
    (the runner-up of the far end; ``-1`` when ``D = 1``)."""
    _, _, far, _ = _terms(lower, upper, w)
    idx = torch.arange(w.shape[1], device=w.device, dtype=torch.int64)
    key = far.view(torch.int32).to(torch.int64) * 4294967296 + (_LOW32 - idx)
    return torch.where(idx == k[:, :, None], -1, key).amax(-1)


def ival_max_excl(lower, upper, w, k):
    """``max_{i != k} far_i`` (``far >= 0``, so 0 stands in for the excluded coordinate)."""
    _, _, far, _ = _terms(lower, upper, w)
    idx = torch.arange(w.shape[1], device=w.device, dtype=torch.int64)
    return torch.where(idx == k[:, :, None], 0.0, far).amax(-1)


def ival_argmax_excl(lower, upper, w, k, m2):
    """Lowest ``i != k`` with ``far_i == m2`` (float index)."""
    _, _, far, _ = _terms(lower, upper, w)
    idx = torch.arange(w.shape[1], device=w.device, dtype=torch.int64)
    hit = (far == m2[:, :, None]) & (idx != k[:, :, None])
    return torch.where(hit, idx.to(w.dtype), w.shape[1]).amin(-1)


def ival_l1(lower, upper, w):
    """``(lo, hi)`` for p = 1: plain sums of ``near`` and ``far``."""
    _, _, far, near = _terms(lower, upper, w)
    return near.sum(-1), far.sum(-1)


def ival_sum(lower, upper, w, inv_lo, inv_hi, p, pv: int):
    """``(s_lo, s_hi)``: normalised power sums of ``near`` and ``far``."""
    _, _, far, near = _terms(lower, upper, w)
    return (_pow(near * inv_lo[:, :, None], pv, p).sum(-1), _pow(far * inv_hi[:, :, None], pv, p).sum(-1))


def _ival_coefs(lower, upper, w, g_lo, r_lo, g_hi, r_hi, pm1, pv):
    """Gradient weights of the far and near ends and the masks that route them."""
    a, c, far, near = _terms(lower, upper, w)
    cf = g_hi[:, :, None] * _grad_factor(far, r_hi[:, :, None], pv, pm1)
    cn = g_lo[:, :, None] * _grad_factor(near, r_lo[:, :, None], pv, pm1)
    up = (c >= a).to(cf.dtype)             # far follows upper (ties -> upper)
    below = (-a > 0).to(cf.dtype)          # lower > w: near = lower - w
    above = (-c > 0).to(cf.dtype)          # w > upper: near = w - upper
    return cf, cn, up, below, above


# One reduction per graph, each weight used once, routed by 0/1 masks: with two
# outputs, or where() on shared subexpressions, inductor materialised (b, n, D)
# buffers (checked by tests/ops/test_torch_backend.py).
def ival_grad_lower(lower, upper, w, g_lo, r_lo, g_hi, r_hi, pm1, pv: int):
    """``(b, D)``: gradient w.r.t. ``lower``, reducing over the rows of ``w``."""
    cf, cn, up, below, above = _ival_coefs(lower, upper, w, g_lo, r_lo, g_hi, r_hi, pm1, pv)
    return (cn * below - cf * (1 - up)).sum(1)


def ival_grad_upper(lower, upper, w, g_lo, r_lo, g_hi, r_hi, pm1, pv: int):
    """``(b, D)``: gradient w.r.t. ``upper``, reducing over the rows of ``w``."""
    cf, cn, up, below, above = _ival_coefs(lower, upper, w, g_lo, r_lo, g_hi, r_hi, pm1, pv)
    return (cf * up - cn * above).sum(1)


def ival_grad_w(lower, upper, w, g_lo, r_lo, g_hi, r_hi, pm1, pv: int):
    """``(n, D)``: this chunk's part of the w-gradient."""
    cf, cn, up, below, above = _ival_coefs(lower, upper, w, g_lo, r_lo, g_hi, r_hi, pm1, pv)
    return (cf * (1 - 2 * up) + cn * (above - below)).sum(0)


KERNELS = {f.__name__: f for f in (linf_max, linf_key, linf_argmax, l1_sum, lp_sum, lp_grad_x, lp_grad_w, ival_max,
                                   ival_key, ival_argmax, ival_key_excl, ival_max_excl, ival_argmax_excl, ival_l1, ival_sum, ival_grad_lower, ival_grad_upper,
                                   ival_grad_w)}
