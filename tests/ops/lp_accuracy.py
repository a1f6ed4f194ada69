"""Accuracy of a backend against a float64 reference: the tolerances the GPU and emulated tests share.

Every backend is compared with the torch path run in float64 on the SAME
inputs (cast up), by the relative norm error ``||a - ref|| / ||ref||`` of
each output and gradient.  Two float32 paths are not compared element-wise:
both carry rounding that grows with p, and at p = 1000 their difference is
larger than either's error (element-wise rtol 1e-4 failed on an H200 while
both paths were within 4.1e-5 of float64).

The tolerance, written down:

    rel_tol(dtype, p, size) = eps(dtype) * (p + sqrt(size))      (finite p)
                              eps(dtype) * sqrt(size)            (p = inf)

``size = max(B, N, D)``.  ``p * eps`` is the rounding of ``t^(p-1)`` (a
relative error of ``t`` is multiplied by ``p - 1``); ``sqrt(size) * eps``
that of sums of ``size`` terms in another order.  On an H200 (float32,
measured 2026-11-30, commit 8b661da) the worst errors were 3.0e-5 (CuPy) and
4.1e-5 (torch) at p = 1000, where the tolerance is 1.2e-4 to 1.3e-4; about
5e-6 at p = 100 (tolerance 1.3e-5 to 2.1e-5); under 2e-6 at p = 8.

p = inf is the exception: its values are exact in the input dtype (a max
of IEEE differences), and float64 would resolve near-ties among the rounded
float32 differences differently, which moves a subgradient to another
coordinate (a different, equally valid answer, not an error).  So at p = inf
the reference is the baseline in the input dtype, and only the gradients'
summation order is left to the tolerance.

"No less accurate": ``err(cupy) <= FACTOR * err(torch) + FLOOR_ULPS * eps``.
The floor keeps a ratio of two errors that are both a few ulps (p = 8,
D = 3072: 2.5e-7 against 4.3e-8) from failing the test.
"""
from __future__ import annotations

import math

import torch

from linf_plugin.ops import lp_dist, lp_dist_interval

__all__ = ["FACTOR", "FLOOR_ULPS", "rel_err", "rel_tol", "lp_outputs", "interval_outputs", "check_accuracy"]

FACTOR = 2.0
FLOOR_ULPS = 16


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||`` in float64 (the plain norm when ``ref`` is 0)."""
    diff = (a.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else diff


def rel_tol(dtype: torch.dtype, p: float, size: int) -> float:
    """The tolerance of the module docstring."""
    eps = torch.finfo(dtype).eps
    return eps * ((0.0 if math.isinf(p) else p) + math.sqrt(size))


def lp_outputs(x, w, g, p, backend, need=("x", "w")) -> dict:
    """``{"y", "grad_x", "grad_w"}`` of ``lp_dist(x, w, p)`` with upstream gradient ``g``.

    ``need`` names the inputs that require grad; only their gradients are returned (the CuPy backend
    takes its fused kernel for both, a single-gradient kernel for one).
    """
    x = x.detach().clone().requires_grad_("x" in need)
    w = w.detach().clone().requires_grad_("w" in need)
    y = lp_dist(x, w, p, backend=backend)
    y.backward(g)
    out = {"y": y.detach(), "grad_x": x.grad, "grad_w": w.grad}
    return {k: v for k, v in out.items() if v is not None}


def interval_outputs(lower, upper, w, p, backend) -> dict:
    """``{"lo", "hi", "grad_lower", "grad_upper", "grad_w"}`` for the loss ``sum(0.3 lo + hi)``."""
    lower, upper, w = (t.detach().clone().requires_grad_() for t in (lower, upper, w))
    lo, hi = lp_dist_interval(lower, upper, w, p, backend=backend)
    (lo * 0.3 + hi).sum().backward()
    return {"lo": lo.detach(), "hi": hi.detach(), "grad_lower": lower.grad, "grad_upper": upper.grad,
            "grad_w": w.grad}


def check_accuracy(run, args, p, size, candidate: str, baseline: str = "torch") -> dict:
    """Run ``run(*args, p, backend)`` for ``candidate``, ``baseline`` and the float64 baseline.

    Asserts, per output: both paths within :func:`rel_tol` of the float64
    reference, and ``candidate`` no less accurate than ``baseline``
    (:data:`FACTOR`, :data:`FLOOR_ULPS`).  For float64 inputs and at
    p = inf the reference IS the baseline, so only the candidate's
    tolerance is checked.  Returns
    the errors ``{output: (err_candidate, err_baseline)}``.
    """
    dtype = args[0].dtype
    exact = math.isinf(p) or dtype == torch.float64
    ref = run(*(a if exact or not a.is_floating_point() else a.double() for a in args), p, baseline)
    got = run(*args, p, candidate)
    base = run(*args, p, baseline)
    tol = rel_tol(dtype, p, size)
    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    errors = {}
    for name, want in ref.items():
        e_c, e_b = rel_err(got[name], want), rel_err(base[name], want)
        errors[name] = (e_c, e_b)
        assert e_c <= tol, f"{candidate} {name}: relative error {e_c:.2e} > {tol:.2e} (p = {p}, {dtype})"
        if exact:
            continue
        assert e_b <= tol, f"{baseline} {name}: relative error {e_b:.2e} > {tol:.2e} (p = {p}, {dtype})"
        assert e_c <= FACTOR * e_b + floor, \
            f"{candidate} {name} is less accurate than {baseline}: {e_c:.2e} vs {e_b:.2e} (p = {p}, {dtype})"
    return errors
