"""One call for every certificate: ``certify(model, data, eps, method)``."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..data import DatasetSplit
from ..data.box import check_data_range, linf_box
from .bound_prop import LIRPA_METHODS
from .distributed import certify_sharded, shared_certifier, wants_shards
from .float_safety import exact_float, value_ranges
from .interval import interval_certify
from .margin import margin_certify
from .result import CertResult

__all__ = ["certify", "certified_accuracy_curve", "applicable_methods", "METHODS", "CurveResult",
           "MethodNotApplicableError", "eval_mode"]

METHODS = ("margin", "interval", "ibp", "crown-ibp", "crown", "alpha-crown")
_BOUND_PROP = tuple(LIRPA_METHODS)


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


def _check_method(model, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown certification method {method!r}; choose from {METHODS}")
    ok = applicable_methods(model)
    if method not in ok:
        why = {"margin": "it needs an l_inf Lipschitz constant: a pure l_inf-dist net with every layer at p = inf",
               "interval": "it propagates intervals through l_inf-dist layers only (pure l_inf-dist nets)"}
        raise MethodNotApplicableError(f"method {method!r} does not apply to {_name(model)} "
                                       f"({why.get(method, 'not supported')}); applicable: {ok}")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _as_tensors(data, model, data_range=None):
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


def certify(model: torch.nn.Module, data, eps: float, method: str, *, data_range=None, batch_size: int = 256,
            device: Optional[Union[str, torch.device]] = None, float_model: bool = True,
            alpha_iterations: int = 20, rigorous: bool = True, progress: bool = False,
            distributed: Optional[bool] = None, chunk_dir=None, resume: bool = False) -> CertResult:
    """Certify ``model`` on ``data`` at radius ``eps`` with one method.

    Args:
        model: any model of the registry (or any ``nn.Module`` for the
            bound-propagation methods), float32 or float64, returning
            ``(batch, K)`` logits (K is read from one forward pass).  Run in
            eval mode; each submodule's train/eval state is restored afterwards.
        data: a :class:`~linf_plugin.data.DatasetSplit`, an ``(x, y)`` pair
            of tensors, a ``TensorDataset`` or a ``DataLoader``.
        eps: l_inf radius in pixel units, finite and >= 0.
        method: ``"margin"`` (Lipschitz margin, l_inf-dist nets at p = inf),
            ``"interval"`` (exact interval propagation, l_inf-dist nets),
            ``"ibp"``, ``"crown-ibp"``, ``"crown"``, ``"alpha-crown"``
            (auto_LiRPA, every model).
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
            at once (rank 0 writes), so that a stopped job can resume.
        resume: continue the job saved in ``chunk_dir`` (refused, naming the
            difference, when the model, data, method, eps or a setting
            changed).

    Returns:
        :class:`CertResult` with per-sample ``correct`` / ``certified``
        (and ``radius`` for ``margin``) and ``float_rigorous``.

    Raises:
        ValueError: unknown method, bad eps, data that does not match the
            model or lies outside ``data_range``, NaN/inf inputs or
            parameters, fewer than 2 classes;
            TypeError: a float16/bfloat16 model;
            :class:`MethodNotApplicableError` for a method that does not
            apply (e.g. margin on a hybrid or a p = 8 net);
            ``chunks.ResumeError`` for a ``chunk_dir`` that holds another job
            (or any job, without ``resume``);
            ``distributed.Interrupted`` (a KeyboardInterrupt) on SIGTERM or
            Ctrl-C during a sharded or chunked job, after saving;
            ``linf_plugin.distributed.RankFailure`` when another rank died,
            hung or raised.
    """
    eps = _check_eps(eps)
    _check_method(model, method)
    x, y, data_range = _as_tensors(data, model, data_range)
    if resume and chunk_dir is None:
        raise ValueError("certify(..., resume=True) needs the chunk_dir of the job to resume")
    if wants_shards(distributed, device if device is not None else _model_device_dtype(model, None)[0]) \
            or chunk_dir is not None:
        return certify_sharded(model, x, y, eps, method, data_range=data_range, batch_size=batch_size,
                               device=device, float_model=float_model, alpha_iterations=alpha_iterations,
                               rigorous=rigorous, progress=progress, chunk_dir=chunk_dir, resume=resume)
    corrects, certs, radii, extra = [], [], [], {}
    start = time.perf_counter()
    orig_device = dev = _model_device_dtype(model, None)[0]
    rigorous_flag, reason = True, ""
    try:
        with eval_mode(model), exact_float():
            dev, dtype, num_classes = _check_model(model, x, y, device, probe=method != "margin",
                                                   finite=method != "margin")
            certifier = None
            also_margin = method == "interval" and "margin" in applicable_methods(model)
            if method in _BOUND_PROP:
                certifier = shared_certifier(model, x[:1].to(dev, dtype), num_classes,
                                               alpha_iterations=alpha_iterations, rigorous=rigorous,
                                               method=method)
                batch_size = certifier.batch_size(method, batch_size)
            batches = _batches(x, y, batch_size, dev, dtype)
            if progress:
                from tqdm.auto import tqdm

                batches = tqdm(batches, total=math.ceil(x.shape[0] / batch_size), desc=f"{method} eps={eps:g}",
                               leave=False)
            for xb, yb in batches:
                if method == "margin":
                    c, k, r, info = margin_certify(model, xb, yb, eps, float_model=float_model)
                    if num_classes is None:  # the pass's own logits stand in for a probe forward
                        num_classes = _check_logits(model, (xb.shape[0], info["num_classes"]), y)
                    k = k & torch.isfinite(r)
                    radii.append(r)
                    extra["max_logit_error"] = max(extra.get("max_logit_error", 0.0), info["max_logit_error"])
                    extra.update(lipschitz=info["lipschitz"], float_model=float_model)
                elif method == "interval":
                    lower, upper = linf_box(xb, eps, data_range, outward=True)
                    c, k = interval_certify(model, xb, yb, lower, upper)
                    if also_margin:  # both are sound, so their union is (see interval.py)
                        k = k | (c & margin_certify(model, xb, yb, eps, float_model=False)[1])
                else:
                    c = _predict(model, xb, yb)
                    k = certifier.certify(xb, yb, eps, method, data_range, correct=c).cpu()
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
    radius = torch.cat(radii).numpy() if radii else None
    return CertResult(method=method, eps=eps, model_name=_name(model), correct=torch.cat(corrects).numpy(),
                      certified=torch.cat(certs).numpy(), radius=radius, wall_time=wall, extra=extra,
                      float_rigorous=rigorous_flag)


@dataclass
class CurveResult:
    """Certified accuracy against eps for one model and method."""

    method: str
    model_name: str
    eps: list
    certified_accuracy: list
    clean_accuracy: float
    wall_time: float
    radius: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "model_name": self.model_name, "eps": list(map(float, self.eps)),
                "certified_accuracy": list(map(float, self.certified_accuracy)),
                "clean_accuracy": float(self.clean_accuracy), "wall_time": float(self.wall_time),
                "radius": None if self.radius is None else [float(r) for r in self.radius], "extra": self.extra}


def _curve_from_radius(method, name, radius, correct, eps_grid, wall, extra=None):
    acc = [float(np.mean(correct & (radius > e))) for e in eps_grid]
    return CurveResult(method, name, list(eps_grid), acc, float(np.mean(correct)), wall, radius, extra or {})


def _bisect_radius(model, data, method, eps_max, steps, batch_size, device, alpha_iterations, data_range, rigorous):
    """Largest eps in [0, eps_max] certified per sample, to ``eps_max / 2**steps``."""
    x, y, data_range = _as_tensors(data, model, data_range)
    radius = torch.zeros(x.shape[0], dtype=torch.float64)
    correct = torch.zeros(x.shape[0], dtype=torch.bool)
    orig_device = _model_device_dtype(model, None)[0]
    try:
        with eval_mode(model), exact_float():
            dev, dtype, num_classes = _check_model(model, x, y, device)
            cert = shared_certifier(model, x[:1].to(dev, dtype), num_classes, alpha_iterations=alpha_iterations,
                                      rigorous=rigorous, method=method)
            batch_size = cert.batch_size(method, batch_size)
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size].to(dev, dtype)
                yb = y[start:start + batch_size].to(dev)
                c = _predict(model, xb, yb)
                lo = torch.zeros(xb.shape[0], dtype=torch.float64, device=dev)
                hi = torch.full_like(lo, eps_max)
                top = cert.certify(xb, yb, hi, method, data_range, correct=c)
                lo = torch.where(top, hi, lo)
                for _ in range(steps):
                    mid = (lo + hi) / 2
                    ok = cert.certify(xb, yb, mid, method, data_range, correct=c)
                    lo = torch.where(ok & ~top, mid, lo)
                    hi = torch.where(ok | top, hi, mid)
                radius[start:start + xb.shape[0]] = torch.where(c, lo, torch.zeros_like(lo)).cpu()
                correct[start:start + xb.shape[0]] = c.cpu()
    finally:
        _to_device(model, orig_device)
    return radius.numpy(), correct.numpy(), cert.float_rigorous, cert.reason


def certified_accuracy_curve(result_or_model, data=None, eps_grid: Sequence[float] = (), method: str = "margin", *,
                             bisect: bool = False, bisect_steps: int = 12, batch_size: int = 256, device=None,
                             alpha_iterations: int = 20, data_range=None, rigorous: bool = True) -> CurveResult:
    """Certified accuracy at every eps of ``eps_grid``.

    * From a :class:`CertResult` with radii, or for ``method="margin"``: ONE
      forward pass, ``accuracy(eps) = mean(correct & radius > eps)``.
    * Bound propagation: one certification per eps, or with ``bisect=True``
      a per-sample bisection of the radius on ``[0, max(eps_grid)]``
      (``bisect_steps`` halvings; the radius found is a proven lower bound).

    ``data_range`` and ``rigorous`` as in :func:`certify`; ``extra`` holds
    ``float_rigorous``.

    Returns:
        :class:`CurveResult`.
    """
    eps_grid = [_check_eps(e) for e in eps_grid]
    if not eps_grid:
        raise ValueError("eps_grid is empty")
    if isinstance(result_or_model, CertResult):
        res = result_or_model
        if res.radius is None:
            raise ValueError(f"this {res.method} result holds no radii; pass the model and data instead")
        return _curve_from_radius(res.method, res.model_name, res.radius, res.correct, eps_grid, res.wall_time,
                                  {**res.extra, "float_rigorous": res.float_rigorous})
    model = result_or_model
    if data is None:
        raise ValueError("data is required when a model is given")
    start = time.perf_counter()
    if method == "margin":  # certify() checks the method
        res = certify(model, data, 0.0, "margin", batch_size=batch_size, device=device, data_range=data_range)
        return _curve_from_radius(method, res.model_name, res.radius, res.correct, eps_grid,
                                  time.perf_counter() - start, {**res.extra, "float_rigorous": res.float_rigorous})
    _check_method(model, method)
    if bisect and method in _BOUND_PROP:
        radius, correct, exact, why = _bisect_radius(model, data, method, max(eps_grid), bisect_steps, batch_size,
                                                     device, alpha_iterations, data_range, rigorous)
        extra = {"bisect_steps": bisect_steps, "bisect_tolerance": max(eps_grid) / 2 ** bisect_steps,
                 "float_rigorous": exact, **({"float_rigorous_reason": why} if why else {})}
        return _curve_from_radius(method, _name(model), radius, correct, eps_grid, time.perf_counter() - start,
                                  extra)
    results = [certify(model, data, e, method, batch_size=batch_size, device=device, data_range=data_range,
                       alpha_iterations=alpha_iterations, rigorous=rigorous) for e in eps_grid]
    return CurveResult(method, _name(model), eps_grid, [r.certified_accuracy for r in results],
                       results[0].clean_accuracy, time.perf_counter() - start,
                       extra={"float_rigorous": all(r.float_rigorous for r in results)})
