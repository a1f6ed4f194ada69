"""The l_p-distance op: ``lp_dist(x, w, p)`` and its exact interval ``lp_dist_interval``.

Dispatch: ``backend="auto" | "torch" | "cupy" | "native" | "reference"``
(argument, else the environment variable ``LINF_LP_DIST_BACKEND``, else
``auto``).  ``auto`` picks CuPy for CUDA tensors when CuPy imports, sees the
GPU, the GPU has compute capability 7.5 or higher and NVRTC loads; the native
kernels for CPU tensors when they build; else the PyTorch path, and then it
says why in a warning, once per device and reason.  Which backend ``auto``
uses is logged once per (backend, device type) at debug level.  Backends:

* ``torch`` (:mod:`.torch_backend`): chunked broadcast reductions, compiled
  with inductor on CPU; any device; the fallback of the other two;
* ``cupy`` (:mod:`.cupy_backend`): the CUDA kernels of ``kernels/*.cu``;
* ``native`` (:mod:`.native_backend`): the vectorised C++ CPU kernels of
  ``cpu_kernels/*.cpp``, built at first use (needs a C++ compiler);
* ``reference`` (:mod:`.reference`): plain and slow, the test oracle.

All of them follow the conventions written down in :mod:`.reference`.

:func:`use_backend` routes the calls on one device type to a backend
*instance* for the duration of a ``with`` block; the test suite uses it to
run models on CPU tensors through the CuPy backend's real launcher with the
kernels emulated on the CPU.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings

import torch
from torch.autograd.function import once_differentiable

from .checks import check_box, check_p, check_pair
from .reference import ReferenceBackend

__all__ = ["lp_dist", "lp_dist_interval", "linf_box_argmax", "LpDistFunction", "LpDistIntervalFunction", "get_backend",
           "resolve_backend", "use_backend", "BACKEND_ENV", "BACKENDS"]

log = logging.getLogger(__name__)
BACKEND_ENV = "LINF_LP_DIST_BACKEND"
BACKENDS = ("auto", "torch", "cupy", "native", "reference")

_instances: dict = {"reference": ReferenceBackend()}
_unavailable: dict = {}
_announced: set = set()
_routes: dict = {}          # device type -> (backend name it stands for, key in _instances)


def get_backend(name: str):
    """The backend object for a concrete name (``torch``, ``cupy``, ``native``, ``reference``).

    Raises:
        ValueError: unknown name.
        RuntimeError: ``cupy`` without CuPy or without a CUDA device, ``native``
            without a C++ compiler or with a failed build (the reason is
            remembered, so later calls fail fast).
    """
    if name in _instances:
        return _instances[name]
    if name == "torch":
        from .torch_backend import TorchBackend
        _instances[name] = TorchBackend()
    elif name == "cupy":
        if name in _unavailable:
            raise RuntimeError(_unavailable[name])
        try:
            from .cupy_backend import CupyBackend
            _instances[name] = CupyBackend()
        except (ImportError, RuntimeError) as exc:
            _unavailable[name] = f"the CuPy backend is not available: {type(exc).__name__}: {exc}"
            raise RuntimeError(_unavailable[name]) from exc
    elif name == "native":
        if name in _unavailable:
            raise RuntimeError(_unavailable[name])
        from .native_build import NativeBuildError
        try:
            from .native_backend import NativeBackend
            _instances[name] = NativeBackend(fallback=get_backend("torch"))
        except NativeBuildError as exc:
            _unavailable[name] = f"the native CPU kernels are not available: {exc}"
            raise RuntimeError(_unavailable[name]) from exc
    else:
        raise ValueError(f"unknown lp_dist backend {name!r}; choose from {BACKENDS}")
    return _instances[name]


def resolve_backend(backend, tensor: torch.Tensor) -> str:
    """Turn ``None``/``"auto"``/a name into a concrete backend name for ``tensor``."""
    name = backend or os.environ.get(BACKEND_ENV) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown lp_dist backend {name!r}; choose from {BACKENDS}")
    route = _routes.get(tensor.device.type)
    if route is not None and name in ("auto", route[0]):
        return route[1]
    if name == "auto":
        name = "cupy" if tensor.is_cuda and _cupy_serves(tensor.device, warn=True) else "torch"
        if tensor.device.type == "cpu":
            try:
                get_backend("native")
                name = "native"
            except RuntimeError as exc:
                if "native" not in _announced:
                    _announced.add("native")
                    log.warning("lp_dist: %s; CPU tensors use the torch backend (set %s=torch to choose it "
                                "without trying the build)", exc, BACKEND_ENV)
        key = (name, tensor.device.type)
        if key not in _announced:
            _announced.add(key)
            log.debug("lp_dist: backend 'auto' uses %r for %s tensors", name, tensor.device.type)
    elif name == "cupy" and not tensor.is_cuda:
        raise ValueError("the CuPy backend needs CUDA tensors; use backend='torch' for CPU tensors")
    elif name == "cupy":
        _cupy_serves(tensor.device, warn=False)
    elif name == "native" and tensor.device.type != "cpu":
        raise ValueError(f"the native backend needs CPU tensors, got {tensor.device.type} tensors; "
                         "use backend='auto' or 'torch'")
    return name


def _cupy_serves(device: torch.device, warn: bool) -> bool:
    """Whether the CuPy backend can run on ``device``.  If not: ``warn`` (for ``auto``, which then falls
    back to the PyTorch path) says why once per device and reason; otherwise it raises with the reason."""
    try:
        backend = get_backend("cupy")
        reason = backend.unsupported(device) if hasattr(backend, "unsupported") else None
    except RuntimeError as exc:
        reason = str(exc)
    if reason is None:
        return True
    if not warn:
        raise RuntimeError(f"backend='cupy' cannot run on {device}: {reason}")
    key = ("fallback", str(device), reason)
    if key not in _announced:
        _announced.add(key)
        warnings.warn(f"lp_dist: backend 'auto' uses the PyTorch path for {device} tensors, much slower there than "
                      f"the CUDA kernels: {reason}", UserWarning, stacklevel=4)
    return False


@contextlib.contextmanager
def use_backend(instance, device_type: str = "cpu"):
    """Within the block, calls on ``device_type`` tensors use the backend object ``instance``.

    Applies to :func:`lp_dist`, :func:`lp_dist_interval` and
    :func:`linf_box_argmax` when their backend resolves to ``"auto"`` or to
    ``instance.name``; an explicit other name (``backend="torch"``) is
    obeyed.  Process-wide (not per thread); blocks nest, the innermost wins.
    This is how the CPU suite runs whole models through
    ``CupyBackend(launcher=...)`` with emulated kernels.

    Args:
        instance: an object with the backend protocol of
            :class:`linf_plugin.ops.reference.ReferenceBackend` and a ``name``
            in :data:`BACKENDS`.
        device_type: ``"cpu"``, ``"cuda"``, ...

    Raises:
        ValueError: ``instance.name`` is not a concrete backend name.
    """
    name = getattr(instance, "name", None)
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"use_backend needs an instance whose name is one of {BACKENDS[1:]}, got {name!r}")
    key = f"{name}@{device_type}#{id(instance)}"
    saved = _routes.get(device_type)
    _instances[key] = instance
    _routes[device_type] = (name, key)
    try:
        yield instance
    finally:
        if saved is None:
            _routes.pop(device_type, None)
        else:
            _routes[device_type] = saved
        _instances.pop(key, None)


class LpDistFunction(torch.autograd.Function):
    """``y = ||x[b] - w[n]||_p`` with the backend's forward and backward.

    ``apply(x, w, p, backend)``; ``p`` a float in [1, inf], ``backend`` a
    concrete name.  Its ONNX ``symbolic`` emits ``custom::LpDist`` with ``p``
    as the float attribute ``p`` (inf is representable), which is how
    auto_LiRPA sees the op (see :mod:`linf_plugin.lirpa`).  ``x`` and ``w``
    must already be valid (see :func:`lp_dist`, which checks them).
    """

    @staticmethod
    def forward(ctx, x, w, p, backend):
        # auto_LiRPA builds its graph with torch.jit tracing, which records this
        # Function through `symbolic`; the fast path's integer bit views cannot
        # be traced, and the traced values are only used for shapes.
        tracing = torch.jit.is_tracing()
        impl = get_backend("reference" if tracing else backend)
        x, w = x.contiguous(), w.contiguous()
        need_aux = any(ctx.needs_input_grad[:2])
        if tracing:
            # The reference's chunk sizes come from (traced) shapes; harmless here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                y, aux = impl.forward(x, w, p, need_aux=need_aux)
        elif x.shape[0] == 0 or w.shape[0] == 0:
            y, aux = x.new_zeros(x.shape[0], w.shape[0]), None
        else:
            y, aux = impl.forward(x, w, p, need_aux=need_aux)
        ctx.p, ctx.impl = p, impl
        ctx.save_for_backward(x, w, y, aux if aux is not None else torch.empty(0))
        ctx.has_aux = aux is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w, y, aux = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if y.numel() == 0:
            return (torch.zeros_like(x) if need_x else None, torch.zeros_like(w) if need_w else None, None, None)
        gx, gw = ctx.impl.backward(grad_y.contiguous(), x, w, y, aux if ctx.has_aux else None, ctx.p,
                                   need_x, need_w)
        return gx, gw, None, None

    @staticmethod
    def symbolic(g, x, w, p, backend):
        y = g.op("custom::LpDist", x, w, p_f=float(p))
        # Tell ONNX shape inference the output is (B, N); without it torch warns
        # that the custom op's shape is unknown.
        from torch.onnx import symbolic_helper

        xs, ws = symbolic_helper._get_tensor_sizes(x), symbolic_helper._get_tensor_sizes(w)
        if xs and ws:
            y.setType(x.type().with_sizes([xs[0], ws[0]]))
        return y


class LpDistIntervalFunction(torch.autograd.Function):
    """``(lo, hi)`` of ``||x - w[n]||_p`` over the box ``[lower, upper]``, differentiable.

    ``apply(lower, upper, w, p, backend)``.  The backward uses the
    subgradient conventions of :mod:`linf_plugin.ops.reference` (IBP
    certified training backpropagates through it).
    """

    @staticmethod
    def forward(ctx, lower, upper, w, p, backend):
        impl = get_backend("reference" if torch.jit.is_tracing() else backend)
        lower, upper, w = lower.contiguous(), upper.contiguous(), w.contiguous()
        need_aux = any(ctx.needs_input_grad[:3])
        if lower.shape[0] == 0 or w.shape[0] == 0:
            lo = lower.new_zeros(lower.shape[0], w.shape[0])
            hi, aux = lo.clone(), None
        else:
            lo, hi, aux = impl.interval_forward(lower, upper, w, p, need_aux=need_aux)
        ctx.p, ctx.impl = p, impl
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(lower, upper, w, lo, hi, aux if aux is not None else torch.empty(0))
        ctx.has_aux = aux is not None
        return lo, hi

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lo, grad_hi):
        lower, upper, w, lo, hi, aux = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if lo.numel() == 0 or (grad_lo is None and grad_hi is None):
            zeros = [torch.zeros_like(t) if n else None for t, n in zip((lower, upper, w), needs)]
            return (*zeros, None, None)
        grads = ctx.impl.interval_backward(
            grad_lo.contiguous() if grad_lo is not None else None,
            grad_hi.contiguous() if grad_hi is not None else None,
            lower, upper, w, lo, hi, aux if ctx.has_aux else None, ctx.p, *needs)
        return (*grads, None, None)


def lp_dist(x: torch.Tensor, w: torch.Tensor, p: float = math.inf, *, backend: str | None = None) -> torch.Tensor:
    """Pairwise l_p distances between the rows of ``x`` and the rows of ``w``.

    Args:
        x: ``(B, D)`` float32 or float64.
        w: ``(N, D)``, same dtype and device as ``x``.
        p: in ``[1, inf]``; ``math.inf`` (default) is the l_inf distance.
        backend: ``"auto"`` (default), ``"torch"``, ``"cupy"``, ``"native"`` or ``"reference"``.

    Returns:
        ``(B, N)`` tensor ``y[b, n] = ||x[b] - w[n]||_p``, differentiable in
        ``x`` and ``w``.  For p = inf the gradient is the subgradient at the
        argmax coordinate (ties: lowest index) with the sign of the difference.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices, p, or NaN input.
    """
    p = check_p(p)
    if torch.jit.is_tracing():
        # Shapes are traced values here (comparisons would warn); the trace
        # only records the op, and the same call ran checked before tracing.
        return LpDistFunction.apply(x, w, p, "reference")
    check_pair(x, w)
    name = resolve_backend(backend, x)
    if not torch.is_grad_enabled() and x.shape[0] and w.shape[0]:
        # Inside no_grad, Function.apply still reports needs_input_grad for a
        # parameter w, which would make the forward compute the argmax that
        # only a backward uses (about a third of an inference pass at p = inf).
        return get_backend(name).forward(x.contiguous(), w.contiguous(), p, need_aux=False)[0]
    return LpDistFunction.apply(x, w, p, name)


def lp_dist_interval(lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor, p: float = math.inf,
                     *, backend: str | None = None):
    """Exact range of ``||x - w[n]||_p`` over the box ``lower <= x <= upper``.

    The function is separable per coordinate, so the range is exact for
    every p.  The maximum is attained at the corner farthest from ``w[n]``
    (coordinate i at ``upper_i`` when ``upper_i - w_i >= w_i - lower_i``,
    else at ``lower_i``), the minimum at the projection of ``w[n]`` onto the
    box (``clamp(w[n], lower, upper)``).  Per coordinate, with
    ``a = w - lower`` and ``c = upper - w``: ``far = max(a, c)``,
    ``near = max(-a, -c, 0)``; ``hi = ||far||_p``, ``lo = ||near||_p``.

    Differentiable in ``lower``, ``upper`` and ``w`` (interval bound
    propagation trains through it) with the subgradient conventions of
    :mod:`linf_plugin.ops.reference`: the far end follows the corner above
    (ties to ``upper``), the near end is constant 0 inside the box, p = inf
    uses the lowest argmax, and an output of exactly 0 passes no gradient.

    Args:
        lower, upper: ``(B, D)`` box corners, ``lower <= upper``, no NaN.
        w: ``(N, D)``, same dtype and device.
        p: in ``[1, inf]``.
        backend: as :func:`lp_dist`.

    Returns:
        ``(lo, hi)``, each ``(B, N)``.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices or p, NaN, or an
            empty box (``lower > upper`` somewhere; checked on every device).
    """
    p = check_p(p)
    check_box(lower, upper, w)
    name = resolve_backend(backend, lower)
    return LpDistIntervalFunction.apply(lower, upper, w, p, name)


def linf_box_argmax(lower: torch.Tensor, upper: torch.Tensor, w: torch.Tensor, *, backend: str | None = None):
    """The coordinates that decide the l_inf distance's range over a box.

    Per coordinate, with the notation of :func:`lp_dist_interval`,
    ``far_i = max(w_i - lower_i, upper_i - w_i)`` and
    ``near_i = max(lower_i - w_i, w_i - upper_i, 0)``.  Returns the lowest
    argmax of ``near`` (where the projection of ``w[n]`` onto the box is
    farthest from it), of ``far``, and of ``far`` with that coordinate left
    out (the runner-up; 0 when ``D = 1``).  Values compare as numbers
    (``-0.0 == 0.0``).  CROWN's p = inf relaxation
    (:mod:`linf_plugin.lirpa.relaxation`) needs exactly these, and finding
    them with fused reductions avoids its ``(B, N, D)`` temporaries.

    Indices only, so nothing to differentiate.  Dispatch as :func:`lp_dist`:
    the CuPy backend runs one kernel (``kernels/linf_box_argmax.cu``), the
    torch backend fused reductions; ``reference`` uses the torch backend.

    Args:
        lower, upper: ``(B, D)`` box corners, ``lower <= upper``, no NaN.
        w: ``(N, D)``, same dtype and device.
        backend: as :func:`lp_dist`.

    Returns:
        ``(k_near, k_far, k_far2)``, each ``(B, N)`` int64.
    """
    check_box(lower, upper, w)
    name = resolve_backend(backend, lower)
    B, N = lower.shape[0], w.shape[0]
    if B == 0 or N == 0:
        empty = torch.zeros(B, N, dtype=torch.int64, device=w.device)
        return empty, empty.clone(), empty.clone()
    impl = get_backend(name)
    if not hasattr(impl, "linf_box_argmax"):
        impl = get_backend("torch")
    with torch.no_grad():
        return impl.linf_box_argmax(lower.detach().contiguous(), upper.detach().contiguous(),
                                    w.detach().contiguous())
