"""The comparison harness: ``python -m comparisons {run, mirman, theorem, report}``.

* ``run`` — train (or reuse) an ℓ∞-dist net, a hybrid and IBP / CROWN-IBP
  ReLU baselines, certify each with every method that applies, attack with
  PGD-100, and report side by side (:func:`run_comparison`).
* ``mirman`` — the three-point contrast of Mirman et al. (:func:`run_mirman`).
* ``theorem`` — Theorem 3.2 / A.2 nets on r-separated real data (:func:`run_theorem`).
* ``report`` — re-render a run folder from its ``results.json`` (:func:`render_report`).

The harness only orchestrates and reports; every model, training recipe and
certificate comes from :mod:`linf_plugin`.
"""
from .mirman import MirmanSettings, run_mirman
from .report import render_report
from .run import RunSettings, run_comparison
from .schema import SchemaError, validate_results
from .theorem import TheoremSettings, run_theorem

__all__ = ["run_comparison", "RunSettings", "run_mirman", "MirmanSettings", "run_theorem", "TheoremSettings",
           "render_report", "validate_results", "SchemaError"]
