"""Certified accuracy against eps: ``certified_accuracy_curve`` and ``curve_from_result``.

* ``certified_accuracy_curve(model, data, eps_grid, method)`` certifies:
  margin in ONE pass for the whole grid (its radii); interval and bound
  propagation either once per eps or, with ``bisect=True``, by a per-sample
  bisection of the radius (:func:`~.api.bisect_radius`); a union ``"a+b"``
  runs each member and joins them (:func:`~.result.union_results`).
* ``curve_from_result(result, eps_grid)`` reads a curve off a result that
  holds radii, without certifying again.
"""
from __future__ import annotations

import time
import warnings
from typing import Sequence, Union

import numpy as np
import torch

from ..names import Method
from .api import _name, bisect_radius, certify, check_eps, check_method
from .result import CertResult, CurveResult, union_results

__all__ = ["certified_accuracy_curve", "curve_from_result"]


class _Required:
    """The default of an argument that is required; it only exists to recognise the previous release's calls."""

    def __repr__(self) -> str:
        return "<required>"


_REQUIRED = _Required()


def _check_grid(eps_grid) -> torch.Tensor:
    """``eps_grid`` (a sequence of numbers or a 1-D tensor / array) as a checked float64 CPU tensor."""
    if torch.is_tensor(eps_grid) or isinstance(eps_grid, np.ndarray):
        if eps_grid.ndim != 1:
            raise ValueError(f"eps_grid must be 1-D, got shape {tuple(eps_grid.shape)}")
        eps_grid = eps_grid.tolist()
    if isinstance(eps_grid, (str, bytes)) or not isinstance(eps_grid, Sequence):
        raise TypeError(f"eps_grid must be a sequence of numbers or a 1-D tensor, got {type(eps_grid).__name__}")
    if not len(eps_grid):
        raise ValueError("eps_grid is empty")
    return torch.tensor([check_eps(e, "every eps of eps_grid") for e in eps_grid], dtype=torch.float64)


def curve_from_result(result: Union[CertResult, CurveResult], eps_grid) -> CurveResult:
    """The certified-accuracy curve of a result that holds per-sample radii, with no new certification.

    ``certified[i, j] = correct[i] & (radius[i] > eps_grid[j])``: a radius
    certifies every eps strictly below it; a bisected radius
    (``extra["radius_attained"]``) was certified at itself too, so there
    ``radius[i] >= eps_grid[j]`` (for ``radius[i] > 0``) counts.

    Args:
        result: a :class:`CertResult` or :class:`CurveResult` with ``radius``
            (margin; interval and bound propagation bisected; a union whose
            members all have radii).
        eps_grid: eps values in pixel units (a sequence or a 1-D tensor), each finite and >= 0.

    Returns:
        :class:`CurveResult` with ``eps`` ``(E,)``, ``certified_accuracy``
        ``(E,)``, ``certified`` ``(n, E)``; ``wall_time`` and ``extra`` are the result's.

    Raises:
        ValueError: the result holds no radii, or a bad grid.
    """
    if not isinstance(result, (CertResult, CurveResult)):
        raise TypeError(f"curve_from_result needs a CertResult or CurveResult, got {type(result).__name__}")
    if result.radius is None:
        raise ValueError(f"this {result.method} result holds no radii (margin results do, and interval or bound "
                         "propagation bisected); call certified_accuracy_curve(model, data, eps_grid, method) instead")
    grid = _check_grid(eps_grid)
    radius = result.radius
    correct = result.correct if result.correct is not None else radius > 0
    certified = correct[:, None] & (radius[:, None] > grid[None, :])
    if result.extra.get("radius_attained"):
        certified |= correct[:, None] & (radius[:, None] > 0) & (radius[:, None] == grid[None, :])
    return CurveResult(result.method, result.model_name, grid, certified.to(torch.float64).mean(dim=0),
                       CertResult._mean(correct), result.wall_time, radius,
                       {**result.extra, "float_rigorous": result.float_rigorous}, correct=correct, certified=certified)


def certified_accuracy_curve(model: torch.nn.Module, data=_REQUIRED, eps_grid=_REQUIRED, method=_REQUIRED, *,
                             bisect: bool = False, bisect_steps: int = 12, batch_size: int = 256, device=None,
                             alpha_iterations: int = 20, data_range=None, rigorous: bool = True,
                             float_model: bool = True) -> CurveResult:
    """Certified accuracy of ``model`` on ``data`` at every eps of ``eps_grid`` with ``method``.

    * ``margin``: ONE pass for the whole grid (per-sample radii).
    * ``interval`` and bound propagation: one certification per eps; with
      ``bisect=True`` a per-sample bisection of the radius on
      ``[0, max(eps_grid)]`` instead (``bisect_steps`` halvings; each radius
      is an eps the sample was certified at, see :func:`~.api.bisect_radius`).
    * a union ``"a+b"``: each member as above, joined sample by sample
      (certified at an eps when any member certifies it there).

    Args:
        model: as in :func:`~.api.certify`.
        data: as in :func:`~.api.certify`.
        eps_grid: eps values in pixel units (a sequence or a 1-D tensor), each finite and >= 0.
        method: a method or a union of methods, as in :func:`~.api.certify`.
        bisect, bisect_steps: see above (``bisect`` does not change margin).
        batch_size, device, alpha_iterations, data_range, rigorous, float_model: as in :func:`~.api.certify`.

    Returns:
        :class:`CurveResult`: ``eps`` and ``certified_accuracy`` ``(E,)``,
        ``certified`` ``(n, E)``, ``correct`` ``(n,)``, ``radius`` ``(n,)``
        when the method gives radii; ``extra["float_rigorous"]``.

    Raises:
        As :func:`~.api.certify`; ``ValueError`` for an empty or bad grid.

    The previous release's forms still work for one release, with a
    ``DeprecationWarning``: a result as the first argument (use
    :func:`curve_from_result`) and no ``method`` (it meant ``"margin"``).
    """
    if isinstance(model, (CertResult, CurveResult)):
        warnings.warn("certified_accuracy_curve(result, eps_grid=...) is deprecated and will be removed in the next "
                      "release; use curve_from_result(result, eps_grid)", DeprecationWarning, stacklevel=2)
        return curve_from_result(model, data if eps_grid is _REQUIRED or eps_grid is None else eps_grid)
    missing = [name for name, value in (("data", data), ("eps_grid", eps_grid)) if value is _REQUIRED]
    if missing:
        raise TypeError(f"certified_accuracy_curve() missing required argument(s): {', '.join(missing)} "
                        "(certified_accuracy_curve(model, data, eps_grid, method))")
    if method is _REQUIRED:
        warnings.warn("certified_accuracy_curve(model, data, eps_grid) without a method is deprecated and will be "
                      "an error in the next release; it certifies with 'margin' as before: pass method='margin'",
                      DeprecationWarning, stacklevel=2)
        method = Method.MARGIN
    grid = _check_grid(eps_grid)
    members = check_method(model, method)
    kw = dict(bisect=bisect, bisect_steps=bisect_steps, batch_size=batch_size, device=device,
              alpha_iterations=alpha_iterations, data_range=data_range, rigorous=rigorous, float_model=float_model)
    curves = [_curve(model, data, grid, m, **kw) for m in members]
    return curves[0] if len(curves) == 1 else union_results(curves)


def _curve(model, data, grid: torch.Tensor, method: Method, *, bisect, bisect_steps, batch_size, device,
           alpha_iterations, data_range, rigorous, float_model) -> CurveResult:
    start = time.perf_counter()
    if method == Method.MARGIN:
        res = certify(model, data, 0.0, method, batch_size=batch_size, device=device, data_range=data_range,
                      float_model=float_model)
    elif bisect:
        res = bisect_radius(model, data, method, float(grid.max()), bisect_steps, data_range=data_range,
                            batch_size=batch_size, device=device, alpha_iterations=alpha_iterations,
                            rigorous=rigorous)
    else:
        results = [certify(model, data, e, method, batch_size=batch_size, device=device, data_range=data_range,
                           alpha_iterations=alpha_iterations, rigorous=rigorous) for e in grid.tolist()]
        certified = torch.stack([r.certified for r in results], dim=1)
        return CurveResult(method.value, _name(model), grid, certified.to(torch.float64).mean(dim=0),
                           results[0].clean_accuracy, time.perf_counter() - start,
                           extra={"float_rigorous": all(r.float_rigorous for r in results)},
                           correct=results[0].correct, certified=certified)
    curve = curve_from_result(res, grid)
    curve.wall_time = time.perf_counter() - start
    return curve
