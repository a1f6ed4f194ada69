"""One API for every certificate.

``certify(model, data, eps, method) -> CertResult`` with ``method`` one of
``margin`` (Lipschitz margin, float-safe), ``interval`` (exact interval
propagation, rounded outward), ``ibp``, ``crown-ibp``, ``crown``,
``alpha-crown`` (auto_LiRPA), or several joined by ``+`` for their union;
``certified_accuracy_curve(model, data, eps_grid, method)`` for eps grids and
``curve_from_result(result, eps_grid)`` for a result that holds radii.
"""
from ..names import METHODS, Method
from .api import MethodNotApplicableError, applicable_methods, bisect_radius, certify, eval_mode
from .curves import certified_accuracy_curve, curve_from_result
from .interval import interval_bounds
from .margin import MarginCertificateError, margin_certify
from .result import CertResult, CurveResult, union_results

__all__ = ["certify", "certified_accuracy_curve", "curve_from_result", "bisect_radius", "union_results",
           "applicable_methods", "METHODS", "Method", "CertResult", "CurveResult", "MethodNotApplicableError",
           "MarginCertificateError", "margin_certify", "interval_bounds", "eval_mode"]
