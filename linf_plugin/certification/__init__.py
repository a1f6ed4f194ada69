"""One API for every certificate.

``certify(model, data, eps, method) -> CertResult`` with ``method`` one of
``margin`` (Lipschitz margin, float-safe), ``interval`` (exact interval
propagation, rounded outward), ``ibp``, ``crown-ibp``, ``crown``,
``alpha-crown`` (auto_LiRPA); ``certified_accuracy_curve`` for eps grids.
"""
from .api import (METHODS, CurveResult, MethodNotApplicableError, applicable_methods, certified_accuracy_curve,
                  certify, eval_mode)
from .interval import interval_bounds
from .margin import MarginCertificateError, margin_certify
from .result import CertResult

__all__ = ["certify", "certified_accuracy_curve", "applicable_methods", "METHODS", "CertResult", "CurveResult",
           "MethodNotApplicableError", "MarginCertificateError", "margin_certify", "interval_bounds", "eval_mode"]
