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
from ..data.box import linf_box
from .bound_prop import LIRPA_METHODS, BoundPropCertifier
from .interval import interval_certify
from .margin import margin_certify
from .result import CertResult

__all__ = ["certify", "certified_accuracy_curve", "applicable_methods", "METHODS", "CurveResult",
           "MethodNotApplicableError"]

METHODS = ("margin", "interval", "ibp", "crown-ibp", "crown", "alpha-crown")
_BOUND_PROP = tuple(LIRPA_METHODS)


class MethodNotApplicableError(ValueError):
    """The certification method does not apply to this model."""


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _name(model) -> str:
    return getattr(model, "model_name", type(model).__name__)


def applicable_methods(model: torch.nn.Module) -> tuple:
    """The methods of :data:`METHODS` that apply to ``model`` in eval mode."""
    with _eval_mode(model):
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


def _as_tensors(data, model):
    """-> (x, y, data_range, num_classes) from a DatasetSplit, (x, y), Dataset or DataLoader."""
    data_range, num_classes = (0.0, 1.0), getattr(model, "num_classes", None)
    if isinstance(data, DatasetSplit):
        x, y, data_range = data.x, data.y, data.data_range
        num_classes = num_classes or data.num_classes
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
    if x.shape[0] == 0:
        raise ValueError("the data set is empty")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match {x.shape[0]} inputs")
    if not x.is_floating_point():
        raise TypeError(f"inputs must be floating point, got {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError("the inputs contain NaN")
    shape = getattr(model, "input_shape", None)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{_name(model)} expects inputs of shape {tuple(shape)}, got {tuple(x.shape[1:])}")
    y = y.long()
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) for {_name(model)}, got "
                         f"[{int(y.min())}, {int(y.max())}]")
    return x, y, tuple(data_range), num_classes


def _model_device_dtype(model, device):
    p = next(iter(model.parameters()), None)
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    return dev, (p.dtype if p is not None else torch.float32)


def _batches(x, y, batch_size: int, device, dtype) -> Iterable:
    for start in range(0, x.shape[0], batch_size):
        yield (x[start:start + batch_size].to(device=device, dtype=dtype),
               y[start:start + batch_size].to(device=device))


def certify(model: torch.nn.Module, data, eps: float, method: str, *, batch_size: int = 256,
            device: Optional[Union[str, torch.device]] = None, float_model: bool = True,
            alpha_iterations: int = 20, progress: bool = False) -> CertResult:
    """Certify ``model`` on ``data`` at radius ``eps`` with one method.

    Args:
        model: any model of the registry (or any ``nn.Module`` for the
            bound-propagation methods).  Run in eval mode; its train/eval
            state is restored afterwards.
        data: a :class:`~linf_plugin.data.DatasetSplit` (its data range clips
            the box), an ``(x, y)`` pair of tensors (data range ``[0, 1]``), a
            ``TensorDataset`` or a ``DataLoader``.
        eps: l_inf radius in pixel units, finite and >= 0.
        method: ``"margin"`` (Lipschitz margin, l_inf-dist nets at p = inf),
            ``"interval"`` (exact interval propagation, l_inf-dist nets),
            ``"ibp"``, ``"crown-ibp"``, ``"crown"``, ``"alpha-crown"``
            (auto_LiRPA, every model).
        batch_size: samples per batch.
        device: where to run (default: the model's device; the model is
            moved there for the call only if it is not already).
        float_model: margin only; also guarantee the float network as run
            at every perturbed input (see :mod:`linf_plugin.certification.margin`).
        alpha_iterations: alpha-CROWN optimisation steps.
        progress: show a tqdm bar.

    Returns:
        :class:`CertResult` with per-sample ``correct`` / ``certified``
        (and ``radius`` for ``margin``).

    Raises:
        ValueError: unknown method, bad eps, data that does not match the
            model; :class:`MethodNotApplicableError` for a method that does
            not apply (e.g. margin on a hybrid or a p = 8 net).
    """
    eps = _check_eps(eps)
    _check_method(model, method)
    x, y, data_range, num_classes = _as_tensors(data, model)
    dev, dtype = _model_device_dtype(model, device)
    corrects, certs, radii, extra = [], [], [], {}
    start = time.perf_counter()
    orig_device = _model_device_dtype(model, None)[0]
    model.to(dev)
    try:
        with _eval_mode(model):
            certifier = None
            also_margin = method == "interval" and "margin" in applicable_methods(model)
            if method in _BOUND_PROP:
                certifier = BoundPropCertifier(model, x[:1].to(dev, dtype), num_classes or int(y.max()) + 1,
                                               alpha_iterations=alpha_iterations)
                batch_size = certifier.batch_size(method, batch_size)
            batches = _batches(x, y, batch_size, dev, dtype)
            if progress:
                from tqdm.auto import tqdm

                batches = tqdm(batches, total=math.ceil(x.shape[0] / batch_size), desc=f"{method} eps={eps:g}",
                               leave=False)
            for xb, yb in batches:
                if method == "margin":
                    c, k, r, info = margin_certify(model, xb, yb, eps, float_model=float_model)
                    radii.append(r)
                    extra["max_logit_error"] = max(extra.get("max_logit_error", 0.0), info["max_logit_error"])
                    extra.update(lipschitz=info["lipschitz"], float_model=float_model)
                elif method == "interval":
                    lower, upper = linf_box(xb, eps, data_range, outward=True)
                    c, k = interval_certify(model, xb, yb, lower, upper)
                    if also_margin:  # both are sound, so their union is (see interval.py)
                        k = k | margin_certify(model, xb, yb, eps, float_model=False)[1]
                else:
                    with torch.no_grad():
                        c = model(xb).argmax(dim=1) == yb
                    k = certifier.certify(xb, yb, eps, method, data_range, correct=c).cpu()
                    c = c.cpu()
                corrects.append(c)
                certs.append(k)
    finally:
        model.to(orig_device)
    wall = time.perf_counter() - start
    radius = torch.cat(radii).numpy() if radii else None
    return CertResult(method=method, eps=eps, model_name=_name(model), correct=torch.cat(corrects).numpy(),
                      certified=torch.cat(certs).numpy(), radius=radius, wall_time=wall, extra=extra)


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


def _bisect_radius(model, data, method, eps_max, steps, batch_size, device, alpha_iterations):
    """Largest eps in [0, eps_max] certified per sample, to ``eps_max / 2**steps``."""
    x, y, data_range, num_classes = _as_tensors(data, model)
    dev, dtype = _model_device_dtype(model, device)
    radius = torch.zeros(x.shape[0], dtype=torch.float64)
    correct = torch.zeros(x.shape[0], dtype=torch.bool)
    with _eval_mode(model):
        cert = BoundPropCertifier(model, x[:1].to(dev, dtype), num_classes or int(y.max()) + 1,
                                  alpha_iterations=alpha_iterations)
        batch_size = cert.batch_size(method, batch_size)
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].to(dev, dtype)
            yb = y[start:start + batch_size].to(dev)
            with torch.no_grad():
                c = model(xb).argmax(dim=1) == yb
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
    return radius.numpy(), correct.numpy()


def certified_accuracy_curve(result_or_model, data=None, eps_grid: Sequence[float] = (), method: str = "margin", *,
                             bisect: bool = False, bisect_steps: int = 12, batch_size: int = 256, device=None,
                             alpha_iterations: int = 20) -> CurveResult:
    """Certified accuracy at every eps of ``eps_grid``.

    * From a :class:`CertResult` with radii, or for ``method="margin"``: ONE
      forward pass, ``accuracy(eps) = mean(correct & radius > eps)``.
    * Bound propagation: one certification per eps, or with ``bisect=True``
      a per-sample bisection of the radius on ``[0, max(eps_grid)]``
      (``bisect_steps`` halvings; the radius found is a proven lower bound).

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
                                  res.extra)
    model = result_or_model
    if data is None:
        raise ValueError("data is required when a model is given")
    _check_method(model, method)
    start = time.perf_counter()
    if method == "margin":
        res = certify(model, data, 0.0, "margin", batch_size=batch_size, device=device)
        return _curve_from_radius(method, res.model_name, res.radius, res.correct, eps_grid,
                                  time.perf_counter() - start, res.extra)
    if bisect and method in _BOUND_PROP:
        radius, correct = _bisect_radius(model, data, method, max(eps_grid), bisect_steps, batch_size, device,
                                         alpha_iterations)
        return _curve_from_radius(method, _name(model), radius, correct, eps_grid, time.perf_counter() - start,
                                  {"bisect_steps": bisect_steps, "bisect_tolerance": max(eps_grid) / 2 ** bisect_steps})
    results = [certify(model, data, e, method, batch_size=batch_size, device=device,
                       alpha_iterations=alpha_iterations) for e in eps_grid]
    return CurveResult(method, _name(model), eps_grid, [r.certified_accuracy for r in results],
                       results[0].clean_accuracy, time.perf_counter() - start)
