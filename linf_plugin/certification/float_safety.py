r"""Floating point in bound-propagation certificates: exact float32 settings, boxes, and a rigorous slack.

auto_LiRPA computes its bounds in ordinary floating point (round to nearest,
no directed rounding).  A certificate from it is made float-rigorous here in
three steps (the argument is written out in docs/certificates.md, "What a
certificate promises"):

1. :func:`exact_float` turns TF32 and autocast off while bounds are computed
   (TF32 has a unit roundoff of 2^-11, and autocast would run matmuls in
   bf16/fp16), and restores the caller's settings afterwards.
2. :func:`widen_box` pushes the box outward by more than auto_LiRPA's own
   rounding can pull it in when it recomputes the centre ``(U + L) / 2`` and
   radius ``(U - L) / 2`` in the input dtype.
3. :func:`rounding_slack` bounds the rounding error of the float64 margin
   lower bound by ``gamma_N * T`` with ``T`` the sum of the absolute values
   of the terms the bound is made of (a "|W| pass" over auto_LiRPA's graph:
   every weight, bias, buffer and input replaced by its absolute value) and
   ``N`` the longest chain of roundings (fan-ins summed over the graph).
   Only operators whose relaxations have coefficients bounded by that pass
   are supported; any other operator makes the result non-rigorous (the
   certificate then still uses float64 and a relative slack, and says so).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["exact_float", "widen_box", "rounding_slack", "unit_roundoff_of", "SlackInfo", "value_ranges"]


def value_ranges(tensors) -> list:
    """``[(min, max)]`` of each tensor as Python floats (NaN where it holds a NaN), with one transfer.

    One ``aminmax`` per tensor (each non-empty), stacked (in float64 when the
    dtypes differ: float32 and float64 extremes are exact there) and read
    back once: the finiteness and magnitude checks of the certificates cost
    one synchronisation, not one per tensor.
    """
    with torch.no_grad():
        ends = [v for t in tensors for v in torch.aminmax(t)]
        if not ends:
            return []
        if len({v.dtype for v in ends}) > 1:
            ends = [v.double() for v in ends]
        if len({v.device for v in ends}) > 1:
            ends = [v.cpu() for v in ends]
        flat = torch.stack(ends).tolist()
    return list(zip(flat[::2], flat[1::2]))


def unit_roundoff_of(dtype: torch.dtype) -> float:
    """Unit roundoff of a float dtype (half precision included, for the checks that refuse it)."""
    return torch.finfo(dtype).eps / 2


@contextlib.contextmanager
def exact_float():
    """TF32 off, float32 matmul precision "highest", autocast off (CPU and CUDA); restored on exit."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch deprecates the allow_tf32 flags in favour of fp32_precision
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast("cpu", enabled=False), _no_cuda_autocast():
            yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
            torch.set_float32_matmul_precision(precision)


def _no_cuda_autocast():
    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    return torch.autocast("cuda", enabled=False)


def widen_box(lower: torch.Tensor, upper: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[lower, upper]`` pushed outward so that ``centre -/+ radius`` recomputed in the dtype still covers it.

    ``c = fl((U + L) / 2)`` and ``r = fl((U - L) / 2)`` are each within
    ``u * max(|L|, |U|)`` of their exact values (one rounding each; halving is
    exact), so ``c - r`` can exceed ``L`` by ``2u max(|L|, |U|)``.  Widening by
    ``4u max(|L|, |U|)`` plus the smallest normal number, then one ulp
    outward for the widening's own rounding, covers that.
    """
    u = unit_roundoff_of(lower.dtype)
    tiny = torch.finfo(lower.dtype).tiny
    mag = torch.maximum(lower.abs(), upper.abs())
    delta = 4 * u * mag + tiny
    lo = torch.nextafter(lower - delta, torch.full_like(lower, -math.inf))
    hi = torch.nextafter(upper + delta, torch.full_like(upper, math.inf))
    return lo, hi


class SlackInfo:
    """What :func:`rounding_slack` found: ``rigorous`` and, when not, ``reason``."""

    def __init__(self, rigorous: bool, reason: str = "", chain: int = 0, nonlinear: int = 0):
        self.rigorous, self.reason, self.chain, self.nonlinear = rigorous, reason, chain, nonlinear


# Operators by how the |W| pass goes through them (auto_LiRPA class names, the same in 0.3 and 0.7).
_CONST = {"BoundParams", "BoundBuffers", "BoundConstant"}
_SHAPE = {"BoundFlatten", "BoundReshape", "BoundUnsqueeze", "BoundSqueeze", "BoundTranspose", "BoundSlice"}
_SAME = {"BoundRelu", "BoundTanh", "BoundNeg", "BoundDropout", "BoundIdentity"}  # |f(x)| <= |x|, slopes in [0, 1]
_MULTILINEAR = {"BoundLinear", "BoundMatMul", "BoundConv", "BoundMul", "BoundAdd", "BoundConcat"}
_NONLINEAR = {"BoundRelu", "BoundTanh", "BoundSigmoid", "BoundLpDist"}


def _value(node):
    v = getattr(node, "forward_value", None)
    if v is None:
        v = getattr(node, "value", None)
    return torch.as_tensor(v) if v is not None and not torch.is_tensor(v) else v


def _forward_without_side_effects(node, *args):
    """``node.forward(*args)`` with the node's attributes restored (some forwards cache shapes or statistics)."""
    saved = dict(node.__dict__)
    try:
        return node.forward(*args)
    finally:
        node.__dict__.clear()
        node.__dict__.update(saved)


def _fan_in(kind: str, node, mags) -> int:
    if kind in ("BoundLinear", "BoundMatMul"):
        return int(mags[0].shape[-1])
    if kind == "BoundConv":
        return int(mags[1][0].numel())
    if kind == "BoundLpDist":
        return int(mags[1].shape[-1])
    return 1


class _Unsupported(Exception):
    pass


def _constant_magnitude(node, what: str) -> torch.Tensor:
    """|value| of a constant divisor (``what``: the operation, for the reason given when it is not one)."""
    if type(node).__name__ not in _CONST:
        raise _Unsupported(f"{what} by a non-constant")
    den = _value(node).abs()
    if (den == 0).any():
        raise _Unsupported(f"{what} by zero")
    return den


def _magnitude(node, mags, kind: str):
    """An elementwise bound on |value| and on the sum of |terms| of one node, from its inputs' bounds."""
    if kind in _SAME:
        return mags[0]
    if kind == "BoundSigmoid":
        return mags[0] + 1  # output in (0, 1); relaxation slopes <= 1/4, intercepts <= 1 + |x|
    if kind in _SHAPE:
        rest = [_value(i) for i in node.inputs[1:]]
        return _forward_without_side_effects(node, mags[0], *rest)
    if kind == "BoundSub":
        return mags[0] + mags[1]
    if kind == "BoundDiv":
        return mags[0] / _constant_magnitude(node.inputs[1], "division")
    if kind == "BoundReciprocal":
        # auto_LiRPA 0.7 traces x / c as x * (1 / c): the reciprocal of a constant is one more rounding,
        # counted like the division's
        return 1 / _constant_magnitude(node.inputs[0], "reciprocal")
    if kind == "BoundLinear":
        # Gemm's scalars: alpha/beta on 0.3, alpha_linear/beta_linear on 0.7 (where alpha is alpha-CROWN's)
        scalars = [getattr(node, name, 1.0) for name in ("alpha_linear", "beta_linear")] if \
            hasattr(node, "alpha_linear") else [getattr(node, name, 1.0) for name in ("alpha", "beta")]
        if any(not isinstance(v, (int, float)) or v < 0 for v in scalars):
            raise _Unsupported("Gemm with a negative or unknown alpha or beta")
        return _forward_without_side_effects(node, *mags)
    if kind in _MULTILINEAR:
        return _forward_without_side_effects(node, *mags)
    if kind == "BoundBatchNormalization":
        x, w, b, m, v = mags[0], mags[1], mags[2], _value(node.inputs[3]), _value(node.inputs[4])
        if getattr(node, "training", False):
            raise _Unsupported("batch norm in training mode")
        return F.batch_norm(x, -m.abs(), v, w, b, False, 0.0, float(getattr(node, "eps", 1e-5)))
    if kind == "BoundLpDist":
        if not math.isinf(node.p):
            raise _Unsupported(f"an l_p-dist layer at p = {node.p:g} (only p = inf is covered)")
        # max_i |z_i - w_ni| <= max_i (|z_i| + |w_ni|); the p = inf planes have l1-norm <= 1 coefficients.
        # alpha-CROWN's threshold planes keep their absolute terms under far_max + 2 max_i |z_i| (the cap in
        # lirpa.alpha_planes), which can be ~3x the first bound: count both, for every method.
        return (mags[0].unsqueeze(-2) + mags[1]).amax(dim=-1) + 2 * mags[0].amax(dim=-1, keepdim=True)
    raise _Unsupported(f"operator {kind}")


def _topological(bounded) -> list:
    """The graph's nodes, each after its inputs (auto_LiRPA 0.7 does not keep ``_modules`` in that order
    for every graph, e.g. the hybrid's)."""
    nodes = list(bounded._modules.values())
    seen, order = set(), []
    for root in nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node.name in seen:
                continue
            if expanded:
                seen.add(node.name)
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((i, False) for i in reversed(list(getattr(node, "inputs", []))) if i.name not in seen)
    return order


def rounding_slack(bounded, lower: torch.Tensor, upper: torch.Tensor) -> Tuple[Optional[torch.Tensor], SlackInfo]:
    """A bound ``(B,)`` on the rounding error of every margin lower bound auto_LiRPA computed over the box.

    Call it right after ``compute_bounds`` on the same ``bounded`` (constants
    are read from the nodes' forward values).  ``slack = 4 (L + 1) gamma_{2N} T``
    with ``T = 2 max_k M_k`` (a margin row is ``e_y - e_j``: two logits), ``M``
    the |W| pass at the logits, ``N`` the summed fan-ins of the graph (+2 per
    node) and ``L`` the number of nonlinear nodes (each relaxation is built
    from rounded intermediate bounds, which adds at most their error, weighted
    by the same |W| products, once per nonlinear layer).

    Returns:
        ``(slack, info)``; ``slack`` is ``None`` (and ``info.reason`` says why)
        when the graph holds an operator the argument does not cover.
    """
    dtype = lower.dtype
    u = unit_roundoff_of(dtype)
    mags, chain, nonlinear = {}, 0, 0
    order = _topological(bounded)
    try:
        for node in order:
            kind = type(node).__name__
            if kind == "BoundInput":
                mags[node.name] = torch.maximum(lower.abs(), upper.abs())
                continue
            if kind in _CONST:
                v = _value(node)
                if v is None:
                    raise _Unsupported(f"constant {node.name} without a value")
                mags[node.name] = v.detach().to(dtype).abs() if v.is_floating_point() else v
                continue
            missing = [i.name for i in node.inputs if i.name not in mags]
            if missing:
                raise _Unsupported(f"graph not in topological order at {node.name}")
            ins = [mags[i.name] for i in node.inputs]
            mags[node.name] = _magnitude(node, ins, kind)
            chain += _fan_in(kind, node, ins) + 2
            nonlinear += kind in _NONLINEAR
    except _Unsupported as why:
        return None, SlackInfo(False, f"not float-rigorous: {why}")
    out = mags[bounded.final_name].detach().to(torch.float64).flatten(1)
    n = 2 * chain
    if n * u >= 0.01:
        return None, SlackInfo(False, f"not float-rigorous: {n} chained roundings are too many for this dtype")
    gamma = n * u / (1 - n * u)
    slack = 4 * (nonlinear + 1) * gamma * 2 * out.amax(dim=1)
    if not torch.isfinite(slack).all():
        return None, SlackInfo(False, "not float-rigorous: the |W| pass overflowed")
    return slack, SlackInfo(True, "", n, nonlinear)
