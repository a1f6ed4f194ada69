"""The l_p-distance op: ``lp_dist(x, w, p)`` and its exact interval ``lp_dist_interval``.

Dispatch: ``backend="auto" | "torch" | "cupy" | "reference"`` (argument, else
the environment variable ``LINF_LP_DIST_BACKEND``, else ``auto``).  ``auto``
picks CuPy for CUDA tensors when CuPy imports, else the PyTorch path, and
says which once in debug logging.
"""
from __future__ import annotations

import logging
import math
import os

import torch
from torch.autograd.function import once_differentiable

from .checks import check_box, check_p, check_pair
from .reference import ReferenceBackend

__all__ = ["lp_dist", "lp_dist_interval", "LpDistFunction", "get_backend", "resolve_backend",
           "BACKEND_ENV", "BACKENDS"]

log = logging.getLogger(__name__)
BACKEND_ENV = "LINF_LP_DIST_BACKEND"
BACKENDS = ("auto", "torch", "cupy", "reference")

_instances: dict = {"reference": ReferenceBackend()}
_announced: set = set()


def get_backend(name: str):
    """The backend object for a concrete name (``torch``, ``cupy``, ``reference``)."""
    if name not in _instances:
        if name == "torch":
            _instances[name] = _instances["reference"]  # replaced by the fast path
        elif name == "cupy":
            raise RuntimeError("the CuPy backend is not available")
        else:
            raise ValueError(f"unknown lp_dist backend {name!r}; choose from {BACKENDS}")
    return _instances[name]


def resolve_backend(backend, tensor: torch.Tensor) -> str:
    """Turn ``None``/``"auto"``/a name into a concrete backend name for ``tensor``."""
    name = backend or os.environ.get(BACKEND_ENV) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown lp_dist backend {name!r}; choose from {BACKENDS}")
    if name == "auto":
        name = "torch"
        if tensor.is_cuda:
            try:
                get_backend("cupy")
                name = "cupy"
            except (RuntimeError, ImportError):
                pass
        key = (name, tensor.device.type)
        if key not in _announced:
            _announced.add(key)
            log.debug("lp_dist: backend 'auto' uses %r for %s tensors", name, tensor.device.type)
    elif name == "cupy" and not tensor.is_cuda:
        raise ValueError("the CuPy backend needs CUDA tensors; use backend='torch' for CPU tensors")
    return name


class LpDistFunction(torch.autograd.Function):
    """``y = ||x[b] - w[n]||_p`` with the backend's forward and backward.

    ``apply(x, w, p, backend)``; ``p`` a float in [1, inf], ``backend`` a
    concrete name.  Its ONNX ``symbolic`` emits ``custom::LpDist`` with ``p``
    as the float attribute ``p`` (inf is representable), which is how
    auto_LiRPA sees the op (see :mod:`linf_plugin.lirpa`).
    """

    @staticmethod
    def forward(ctx, x, w, p, backend):
        impl = get_backend(backend)
        y, aux = impl.forward(x, w, p)
        ctx.p, ctx.impl = p, impl
        ctx.save_for_backward(x, w, y, aux if aux is not None else torch.empty(0))
        ctx.has_aux = aux is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w, y, aux = ctx.saved_tensors
        gx, gw = ctx.impl.backward(grad_y.contiguous(), x, w, y, aux if ctx.has_aux else None, ctx.p,
                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gw, None, None

    @staticmethod
    def symbolic(g, x, w, p, backend):
        return g.op("custom::LpDist", x, w, p_f=float(p))


def lp_dist(x: torch.Tensor, w: torch.Tensor, p: float = math.inf, *, backend: str | None = None) -> torch.Tensor:
    """Pairwise l_p distances between the rows of ``x`` and the rows of ``w``.

    Args:
        x: ``(B, D)`` float32 or float64.
        w: ``(N, D)``, same dtype and device as ``x``.
        p: in ``[1, inf]``; ``math.inf`` (default) is the l_inf distance.
        backend: ``"auto"`` (default), ``"torch"``, ``"cupy"`` or ``"reference"``.

    Returns:
        ``(B, N)`` tensor ``y[b, n] = ||x[b] - w[n]||_p``, differentiable in
        ``x`` and ``w``.  For p = inf the gradient is the subgradient at the
        argmax coordinate (ties: lowest index) with the sign of the difference.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices, p, or NaN input.
    """
    p = check_p(p)
    check_pair(x, w)
    name = resolve_backend(backend, x)
    return LpDistFunction.apply(x.contiguous(), w.contiguous(), p, name)


def lp_dist_interval(lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor, p: float = math.inf,
                     *, backend: str | None = None):
    """Exact range of ``||x - w[n]||_p`` over the box ``lower <= x <= upper``.

    The function is separable per coordinate, so the range is exact for
    every p: the maximum is at the corner farthest from ``w[n]`` (each
    coordinate at the endpoint farther from ``w[n, i]``), the minimum at the
    projection of ``w[n]`` onto the box, with per-coordinate distances
    ``far_i = max(|l_i - w_i|, |u_i - w_i|)`` and
    ``near_i = max(l_i - w_i, w_i - u_i, 0)``.

    Args:
        lower, upper: ``(B, D)`` box corners, ``lower <= upper``.
        w: ``(N, D)``.
        p: in ``[1, inf]``.

    Returns:
        ``(lo, hi)``, each ``(B, N)``.
    """
    p = check_p(p)
    check_box(lower, upper, w)
    name = resolve_backend(backend, lower)
    return get_backend(name).interval(lower.contiguous(), upper.contiguous(), w.contiguous(), p)
