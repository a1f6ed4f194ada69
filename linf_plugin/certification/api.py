"""One call for every certificate: ``certify(model, data, eps, method)``.

A method is one of :data:`METHODS` or a union of them joined by ``+``
(``"interval+margin"``): every member certifies on its own, a sample is
certified when any member certifies it (each certificate is sound, so their
union is), and the result keeps each member's own result in
``extra["members"]`` (see :func:`~.result.union_results`).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..data import DatasetSplit
from ..data.box import check_data_range, linf_box
from ..names import BOUND_PROPAGATION_METHODS, METHODS, Method, split_method
from .distributed import certify_sharded, shared_certifier, wants_shards
from .float_safety import exact_float, value_ranges
from .interval import interval_certify
from .margin import margin_certify
from .result import CertResult, union_results

__all__ = ["certify", "applicable_methods", "METHODS", "MethodNotApplicableError", "eval_mode", "check_eps",
           "check_method", "prepare_data"]

_BOUND_PROP = BOUND_PROPAGATION_METHODS
_MOVED = {"certified_accuracy_curve": "curves", "CurveResult": "result"}


def __getattr__(name: str):
    if name in _MOVED:  # deprecated: these lived here before 0.2
        import importlib

        warnings.warn(f"linf_plugin.certification.api.{name} is deprecated and will be removed in the next release; "
                      f"import it from linf_plugin.certification", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MethodNotApplicableError(ValueError):
    """The certification method does not apply to this model."""


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Every submodule in eval mode inside the block; each one's own previous mode after it.

    (``model.train(was)`` would flatten a mix of train and eval submodules
    into one state.)
    """
    modes = [(m, m.training) for m in model.modules()]
    if any(was for _, was in modes):
        model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            if m.training != was:  # setting a module attribute is slow; most are unchanged
                m.training = was


def _name(model) -> str:
    return getattr(model, "model_name", type(model).__name__)


def applicable_methods(model: torch.nn.Module) -> tuple:
    """The methods of :data:`METHODS` that apply to ``model`` in eval mode."""
    with eval_mode(model):
        certs = getattr(model, "certificates", None)
    if certs is None:
        return _BOUND_PROP
    return tuple(m for m in METHODS if m in certs)


_WHY_NOT = {Method.MARGIN: "it needs an l_inf Lipschitz constant: a pure l_inf-dist net with every layer at p = inf",
            Method.INTERVAL: "it propagates intervals through l_inf-dist layers only (pure l_inf-dist nets)"}


def check_method(model, method) -> tuple:
    """The members of ``method`` (one, or several for a union ``"a+b"``), each applicable to ``model``.

    Raises:
        ValueError: an unknown method (the choices are listed).
        MethodNotApplicableError: a member that does not apply to ``model`` (the reason and the
            applicable methods are named).
    """
    members = split_method(method)
    ok = applicable_methods(model)
    for m in members:
        if m not in ok:
            raise MethodNotApplicableError(
                f"method {m.value!r} does not apply to {_name(model)} ({_WHY_NOT.get(m, 'not supported')}); "
                f"applicable: {tuple(str(a) for a in ok)}")
    return members


def check_eps(eps, what: str = "eps") -> float:
    """``eps`` as a float: a Python or numpy number, or a 0-d tensor or array; finite and >= 0.

    Raises:
        TypeError: not a number (a bool, a string, ...).
        ValueError: a tensor or array with more than one element, NaN, inf or a negative value.
    """
    if torch.is_tensor(eps) or isinstance(eps, np.ndarray):
        if eps.ndim != 0:
            raise ValueError(f"{what} must be a float or a 0-d tensor, got a tensor of shape {tuple(eps.shape)}; "
                             "certify one eps per call, or pass a grid to certified_accuracy_curve")
        eps = eps.item()  # a bool or complex tensor gives a bool or complex: refused below
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"{what} must be a float or a 0-d tensor, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {eps}")
    return eps


def prepare_data(data, model, data_range=None):
    """-> (x, y, data_range) from a DatasetSplit, (x, y), Dataset or DataLoader, checked.

    ``data_range`` defaults to the DatasetSplit's own, else ``(0, 1)``; every
    input must lie inside it (the box is clipped to it).
    """
    own_range = None
    if isinstance(data, DatasetSplit):
        x, y, own_range = data.x, data.y, data.data_range
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
    elif isinstance(data, TensorDataset):
        x, y = data.tensors[:2]
    elif isinstance(data, (DataLoader, Dataset)):
        xs, ys = zip(*[(a, b) for a, b in data]) if isinstance(data, DataLoader) else zip(*[data[i] for i in
                                                                                           range(len(data))])
        if not xs:
            raise ValueError("the data set is empty")
        x = torch.cat(xs) if isinstance(data, DataLoader) else torch.stack(xs)
        y = torch.cat(ys) if isinstance(data, DataLoader) else torch.as_tensor(ys)
    else:
        raise TypeError("data must be a DatasetSplit, an (x, y) pair of tensors, a TensorDataset or a DataLoader, "
                        f"got {type(data).__name__}")
    data_range = check_data_range(data_range if data_range is not None else own_range or (0.0, 1.0))
    if x.shape[0] == 0:
        raise ValueError("the data set is empty")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match {x.shape[0]} inputs")
    if not x.is_floating_point():
        raise TypeError(f"inputs must be floating point, got {x.dtype}")
    # One pass for NaN, inf and the range: min and max are NaN when any input is.
    x_min, x_max = (float(v) for v in torch.aminmax(x))
    if math.isnan(x_min) or math.isnan(x_max):
        raise ValueError("the inputs contain NaN")
    if math.isinf(x_min) or math.isinf(x_max):
        raise ValueError("the inputs contain inf")
    lo, hi = data_range
    if x_min < lo or x_max > hi:
        raise ValueError(f"the inputs lie in [{x_min:g}, {x_max:g}], outside data_range=({lo:g}, {hi:g}); "
                         "certify(..., data_range=(low, high)) must name the range your inputs live in "
                         "(the l_inf box is clipped to it)")
    shape = getattr(model, "input_shape", None)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{_name(model)} expects inputs of shape {tuple(shape)}, got {tuple(x.shape[1:])}")
    return x, y.long(), data_range


def _check_finite(model) -> None:
    """Refuse NaN or inf in any floating parameter or buffer (one min/max reduction per tensor, one sync)."""
    named = [("parameter", n, t) for n, t in model.named_parameters()]
    named += [("buffer", n, t) for n, t in model.named_buffers()]
    named = [(kind, n, t) for kind, n, t in named if t.is_floating_point() and t.numel()]
    for (kind, name, _), (lo, hi) in zip(named, value_ranges([t for _, _, t in named])):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"the model's {kind} {name!r} contains NaN or inf; no certificate can hold")


def _to_device(model, dev) -> bool:
    """Move ``model`` to ``dev`` unless every parameter and buffer is already there; True when moved."""
    stack = [model]  # a plain walk: named_modules' prefixes and memo cost more than the check itself
    while stack:
        m = stack.pop()
        if any(t is not None and t.device != dev for t in (*m._parameters.values(), *m._buffers.values())):
            break
        stack.extend(c for c in m._modules.values() if c is not None)
    else:
        return False
    model.to(dev)
    return True


def _check_model(model, x, y, device, probe: bool = True, finite: bool = True) -> tuple:
    """-> (device, dtype, K), with the model moved to the device (in eval mode: the forward must not train).

    Refuses half precision and non-finite parameters before any bound is
    computed; K comes from one forward pass, never from the labels.  With
    ``probe=False`` (the margin method, whose pass returns the logits and
    checks their shape itself) K is None: call :func:`_check_logits` on the
    first logits instead.  ``finite=False`` leaves the parameters' finiteness
    to the method (margin checks every tensor its pass uses).
    """
    dev, dtype = _model_device_dtype(model, device)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"certification needs a float32 or float64 model, {_name(model)} is {dtype} (bounds in "
                        "half precision cannot be made rigorous); call model.float() first")
    if finite:
        _check_finite(model)
    if x.dtype != dtype and not torch.equal(x.to(dtype).to(x.dtype), x):
        # The box would be built around the rounded inputs, not the user's: a certificate for a neighbour.
        raise ValueError(f"the inputs are {x.dtype} but {_name(model)} computes in {dtype}, and casting changes "
                         f"their values; certify a {x.dtype} copy of the model (model.to({x.dtype})) or pass "
                         f"inputs that are exactly {dtype}")
    _to_device(model, dev)
    if not probe:
        return dev, dtype, None
    with torch.no_grad():
        out = model(x[:1].to(dev, dtype))
    return dev, dtype, _check_logits(model, out.shape, y)


def _check_logits(model, shape, y) -> int:
    """K from the logits' ``shape``, refusing one that is not ``(batch, K)``, K < 2, and labels outside ``[0, K)``."""
    if len(shape) != 2:
        raise ValueError(f"{_name(model)} returns logits of shape {tuple(shape)} for one input; "
                         "certification needs (batch, num_classes)")
    k = int(shape[1])
    if k < 2:
        raise ValueError(f"{_name(model)} has {k} output; certifying a prediction needs at least 2 classes")
    y_min, y_max = (int(v) for v in torch.aminmax(y))
    if y_min < 0 or y_max >= k:
        raise ValueError(f"labels must lie in [0, {k}) for {_name(model)} ({k} outputs), got [{y_min}, {y_max}]")
    return k


def _model_device_dtype(model, device):
    p = next(iter(model.parameters()), None)
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    return dev, (p.dtype if p is not None else torch.float32)


def _predict(model, xb, yb):
    """``correct`` flags: finite logits whose argmax is the label (the same verdict on every device)."""
    with torch.no_grad():
        logits = model(xb)
    return torch.isfinite(logits).all(dim=1) & (logits.argmax(dim=1) == yb)


def _batches(x, y, batch_size: int, device, dtype) -> Iterable:
    for start in range(0, x.shape[0], batch_size):
        yield (x[start:start + batch_size].to(device=device, dtype=dtype),
               y[start:start + batch_size].to(device=device))


def certify(model: torch.nn.Module, data, eps: Union[float, torch.Tensor], method: str, *, data_range=None,
            batch_size: int = 256, device: Optional[Union[str, torch.device]] = None, float_model: bool = True,
            alpha_iterations: int = 20, rigorous: bool = True, progress: bool = False,
            distributed: Optional[bool] = None, chunk_dir=None, resume: bool = False) -> CertResult:
    """Certify ``model`` on ``data`` at radius ``eps`` with one method (or a named union of methods).

    Args:
        model: any model of the registry (or any ``nn.Module`` for the
            bound-propagation methods), float32 or float64, returning
            ``(batch, K)`` logits (K is read from one forward pass).  Run in
            eval mode; each submodule's train/eval state is restored afterwards.
        data: a :class:`~linf_plugin.data.DatasetSplit`, an ``(x, y)`` pair
            of tensors ``(n, *input_shape)`` and ``(n,)``, a ``TensorDataset``
            or a ``DataLoader``.
        eps: l_inf radius in pixel units, finite and >= 0: a float or a 0-d tensor.
        method: a :class:`~linf_plugin.names.Method` or its string:
            ``"margin"`` (Lipschitz margin, l_inf-dist nets at p = inf),
            ``"interval"`` (exact interval propagation, l_inf-dist nets),
            ``"ibp"``, ``"crown-ibp"``, ``"crown"``, ``"alpha-crown"``
            (auto_LiRPA, every model); or several joined by ``+`` for their
            union (``"interval+margin"``, ``"crown+ibp"``): certified when any
            member certifies.
        data_range: ``(low, high)`` the inputs live in; the box is clipped to
            it.  Default: the DatasetSplit's own, else ``(0, 1)``.  Inputs
            outside it raise (a clipped box would not contain them).
        batch_size: samples per batch (capped for CROWN, CROWN-IBP and
            alpha-CROWN by a memory estimate, ``$LINF_BOUND_MEMORY_GB``).
        device: where to run (default: the model's device; the model is
            moved there for the call only if it is not already).
        float_model: margin only; also guarantee the float network as run
            at every perturbed input (see :mod:`linf_plugin.certification.margin`).
        alpha_iterations: alpha-CROWN optimisation steps.
        rigorous: bound propagation only; re-check every candidate in
            float64 with a derived rounding slack (default).  ``False`` trusts
            the float32 bound up to a relative slack and marks the result
            ``float_rigorous=False``.
        progress: show a tqdm bar (under torchrun: one, on rank 0).
        distributed: ``None``: when this process is one of several started
            by ``torchrun`` (or in a process group of several ranks), each
            rank certifies its share of the batches and every rank returns
            the whole result, equal to one process's (see
            :mod:`linf_plugin.certification.distributed`); ``False``: this
            process certifies all of ``data`` alone; ``True``: shard, or
            raise when there is only one process.
        chunk_dir: a folder where each finished batch's results are saved
            at once (rank 0 writes; a union's members in sub-folders), so
            that a stopped job can resume.
        resume: continue the job saved in ``chunk_dir`` (refused, naming the
            difference, when the model, data, method, eps or a setting
            changed).

    Returns:
        :class:`CertResult` with per-sample ``correct`` / ``certified``
        (``(n,)`` bool CPU tensors), ``radius`` (``(n,)`` float64, margin
        only; a union has one when every member has one: their maximum) and
        ``float_rigorous``.  A union's ``method`` is the joined name and
        ``extra["members"]`` holds each member's own result.

    Raises:
        ValueError: unknown method, bad eps (a tensor with more than one
            element included), data that does not match the model or lies
            outside ``data_range``, NaN/inf inputs or parameters, fewer than
            2 classes;
            TypeError: eps that is no number, a float16/bfloat16 model;
            :class:`MethodNotApplicableError` for a method that does not
            apply (e.g. margin on a hybrid or a p = 8 net);
            ``chunks.ResumeError`` for a ``chunk_dir`` that holds another job
            (or any job, without ``resume``);
            ``distributed.Interrupted`` (a KeyboardInterrupt) on SIGTERM or
            Ctrl-C during a sharded or chunked job, after saving;
            ``linf_plugin.distributed.RankFailure`` when another rank died,
            hung or raised.
    """
    eps = check_eps(eps)
    members = check_method(model, method)
    if resume and chunk_dir is None:
        raise ValueError("certify(..., resume=True) needs the chunk_dir of the job to resume")
    kw = dict(data_range=data_range, batch_size=batch_size, device=device, float_model=float_model,
              alpha_iterations=alpha_iterations, rigorous=rigorous, progress=progress, distributed=distributed,
              resume=resume)
    if len(members) > 1:
        return union_results([_certify_one(model, data, eps, m, chunk_dir=None if chunk_dir is None else
                                           Path(chunk_dir) / m.value, **kw) for m in members])
    return _certify_one(model, data, eps, members[0], chunk_dir=chunk_dir, **kw)


def _certify_one(model, data, eps: float, method: Method, *, data_range, batch_size, device, float_model,
                 alpha_iterations, rigorous, progress, distributed, chunk_dir, resume) -> CertResult:
    x, y, data_range = prepare_data(data, model, data_range)
    if wants_shards(distributed, device if device is not None else _model_device_dtype(model, None)[0]) \
            or chunk_dir is not None:
        return certify_sharded(model, x, y, eps, method.value, data_range=data_range, batch_size=batch_size,
                               device=device, float_model=float_model, alpha_iterations=alpha_iterations,
                               rigorous=rigorous, progress=progress, chunk_dir=chunk_dir, resume=resume)
    corrects, certs, radii, extra = [], [], [], {}
    start = time.perf_counter()
    orig_device = dev = _model_device_dtype(model, None)[0]
    rigorous_flag, reason = True, ""
    try:
        with eval_mode(model), exact_float():
            dev, dtype, num_classes = _check_model(model, x, y, device, probe=method != Method.MARGIN,
                                                   finite=method != Method.MARGIN)
            certifier = None
            if method in _BOUND_PROP:
                certifier = shared_certifier(model, x[:1].to(dev, dtype), num_classes,
                                             alpha_iterations=alpha_iterations, rigorous=rigorous,
                                             method=method.value)
                batch_size = certifier.batch_size(method.value, batch_size)
            batches = _batches(x, y, batch_size, dev, dtype)
            if progress:
                from tqdm.auto import tqdm

                batches = tqdm(batches, total=math.ceil(x.shape[0] / batch_size), desc=f"{method} eps={eps:g}",
                               leave=False)
            for xb, yb in batches:
                if method == Method.MARGIN:
                    c, k, r, info = margin_certify(model, xb, yb, eps, float_model=float_model)
                    if num_classes is None:  # the pass's own logits stand in for a probe forward
                        num_classes = _check_logits(model, (xb.shape[0], info["num_classes"]), y)
                    k = k & torch.isfinite(r)
                    radii.append(r)
                    extra["max_logit_error"] = max(extra.get("max_logit_error", 0.0), info["max_logit_error"])
                    extra.update(lipschitz=info["lipschitz"], float_model=float_model)
                elif method == Method.INTERVAL:
                    lower, upper = linf_box(xb, eps, data_range, outward=True)
                    c, k = interval_certify(model, xb, yb, lower, upper)
                else:
                    c = _predict(model, xb, yb)
                    k = certifier.certify(xb, yb, eps, method.value, data_range, correct=c).cpu()
                    c = c.cpu()
                corrects.append(c)
                certs.append(k)
            if certifier is not None:
                rigorous_flag, reason = certifier.float_rigorous, certifier.reason
    finally:
        if dev != orig_device:  # _check_model moved the model (to dev, all of it); else it is where it was
            _to_device(model, orig_device)
    if reason:
        extra["float_rigorous_reason"] = reason
    wall = time.perf_counter() - start
    return CertResult(method=method.value, eps=eps, model_name=_name(model), correct=torch.cat(corrects),
                      certified=torch.cat(certs), radius=torch.cat(radii) if radii else None, wall_time=wall,
                      extra=extra, float_rigorous=rigorous_flag)


def bisect_radius(model: torch.nn.Module, data, method: str, eps_max: float, steps: int, *, data_range=None,
                  batch_size: int = 256, device=None, alpha_iterations: int = 20,
                  rigorous: bool = True) -> CertResult:
    """Per-sample certified radius of ``interval`` or a bound-propagation method, by bisection on ``[0, eps_max]``.

    Both are monotone in eps (a larger box gives wider bounds), so bisection
    applies.  Each sample is certified at ``eps_max`` or, with ``steps``
    halvings, at a sequence of midpoints; its radius is the largest eps at
    which it WAS certified (0 when none was), so the true radius of the
    method lies in ``[radius, radius + eps_max / 2**steps)`` (``eps_max``
    itself when certified there).  Every radius is a verified certificate,
    with the promise of :func:`certify` at that eps: the real network is
    robust on the ball of that radius, hence at every smaller eps.

    Args:
        model, data, data_range, batch_size, device, alpha_iterations, rigorous: as in :func:`certify`.
        method: ``"interval"``, ``"ibp"``, ``"crown-ibp"``, ``"crown"`` or ``"alpha-crown"``.
        eps_max: the top of the range, > 0.
        steps: halvings, >= 0.

    Returns:
        A :class:`CertResult` at ``eps = 0`` with ``radius`` (``(n,)``
        float64; 0 for misclassified samples and for samples certified at no
        eps tried), ``certified = radius > 0``, and ``extra["bisect_steps"]``,
        ``extra["bisect_tolerance"]`` and ``extra["radius_attained"] = True``
        (a sample is certified at every eps <= its radius > 0, the radius included).
    """
    members = check_method(model, method)
    if len(members) != 1 or members[0] not in (Method.INTERVAL, *_BOUND_PROP):
        raise ValueError(f"bisection applies to 'interval' and the bound-propagation methods "
                         f"{[m.value for m in _BOUND_PROP]}, not {str(method)!r}; margin gives its radius in one "
                         "pass (certify(..., 'margin').radius), and a union bisects each member on its own")
    method = members[0]
    eps_max = check_eps(eps_max, "eps_max")
    if not eps_max > 0 or isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"bisection needs eps_max > 0 and an int steps >= 0, got {eps_max}, {steps!r}")
    x, y, data_range = prepare_data(data, model, data_range)
    radius = torch.zeros(x.shape[0], dtype=torch.float64)
    correct = torch.zeros(x.shape[0], dtype=torch.bool)
    start = time.perf_counter()
    orig_device = dev = _model_device_dtype(model, None)[0]
    rigorous_flag, reason = True, ""
    try:
        with eval_mode(model), exact_float():
            dev, dtype, num_classes = _check_model(model, x, y, device)
            if method == Method.INTERVAL:
                def certified_at(xb, yb, eps, c):
                    return interval_certify(model, xb, yb, *linf_box(xb, eps, data_range, outward=True))[1].to(
                        c.device) & c
            else:
                cert = shared_certifier(model, x[:1].to(dev, dtype), num_classes,
                                        alpha_iterations=alpha_iterations, rigorous=rigorous, method=method.value)
                batch_size = cert.batch_size(method.value, batch_size)

                def certified_at(xb, yb, eps, c):
                    return cert.certify(xb, yb, eps, method.value, data_range, correct=c)
            for first in range(0, x.shape[0], batch_size):
                xb = x[first:first + batch_size].to(dev, dtype)
                yb = y[first:first + batch_size].to(dev)
                c = _predict(model, xb, yb)
                lo = torch.zeros(xb.shape[0], dtype=torch.float64, device=dev)
                hi = torch.full_like(lo, eps_max)
                top = certified_at(xb, yb, hi, c)
                lo = torch.where(top, hi, lo)
                for _ in range(steps):
                    mid = (lo + hi) / 2
                    ok = certified_at(xb, yb, mid, c)
                    lo = torch.where(ok & ~top, mid, lo)
                    hi = torch.where(ok | top, hi, mid)
                radius[first:first + xb.shape[0]] = torch.where(c, lo, torch.zeros_like(lo)).cpu()
                correct[first:first + xb.shape[0]] = c.cpu()
            if method != Method.INTERVAL:
                rigorous_flag, reason = cert.float_rigorous, cert.reason
    finally:
        if dev != orig_device:
            _to_device(model, orig_device)
    # each radius > 0 was certified AT that eps (a margin radius is only approached from below)
    extra = {"bisect_steps": steps, "bisect_tolerance": eps_max / 2 ** steps, "bisect_eps_max": eps_max,
             "radius_attained": True}
    if reason:
        extra["float_rigorous_reason"] = reason
    return CertResult(method=method.value, eps=0.0, model_name=_name(model), correct=correct,
                      certified=radius > 0, radius=radius, wall_time=time.perf_counter() - start, extra=extra,
                      float_rigorous=rigorous_flag)
