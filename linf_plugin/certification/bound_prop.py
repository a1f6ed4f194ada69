"""IBP, CROWN-IBP, CROWN and alpha-CROWN certificates through auto_LiRPA.

Each method bounds the margins ``logit_y - logit_j`` (j != y) over the
input box with a margin specification ``C`` of shape ``(B, K-1, K)``; a
sample is certified when it is classified correctly and every lower bound
is positive.  ℓp-dist layers are bounded by :class:`linf_plugin.lirpa.BoundLpDist`.

Floating point (see :mod:`.float_safety` and the README): a float32 pass
finds the candidates; every candidate is re-bounded in float64 (model and
box cast to float64, the box widened outward) and certified only when each
float64 lower bound exceeds :func:`~.float_safety.rounding_slack`, a bound
on the float64 rounding error derived from the magnitudes of the terms.
Graphs with operators outside that argument fall back to a relative slack
``64 u (1 + |lb|)`` and are reported as not float-rigorous.

Memory: CROWN, CROWN-IBP and alpha-CROWN run in batches sized by an
estimate of their per-sample memory (:func:`bound_batch_limit`) under a
budget, ``$LINF_BOUND_MEMORY_GB`` (alpha-CROWN: ``$LINF_ALPHA_CROWN_MEMORY_GB``
first).
"""
from __future__ import annotations

import copy
import math
import os
from typing import Optional

import torch

from ..data.box import linf_box
from ..names import Method
from .bounders import LIRPA_METHODS, Bounder, all_margins_positive, bounder_for, margin_spec
from .float_safety import rounding_slack, unit_roundoff_of, widen_box

__all__ = ["LIRPA_METHODS", "margin_spec", "conv_mode_for", "MATRIX_MODE_MAX_NEURONS", "BoundPropCertifier",
           "alpha_crown_batch_limit", "bound_batch_limit", "ALPHA_MEMORY_ENV", "BOUND_MEMORY_ENV"]

# α-CROWN keeps, per sample, CROWN matrices and α variables whose size grows with the product of the
# numbers of neurons of the nonlinear layers (dense α on 0.3: one α per (neuron, start neuron) pair).
# Measured on the digits cnn_7layer (Σn = 3712): ~0.5 GB per sample on 0.3 and on 0.7.1, i.e. about
# 9·(Σn)² bytes in float32.  The batch is capped so that estimate stays under a budget.
ALPHA_MEMORY_ENV = "LINF_ALPHA_CROWN_MEMORY_GB"
_ALPHA_BYTES_PER_PAIR = 9 / 4  # × itemsize × (Σn)²
# CROWN bounds every intermediate layer by a backward pass that starts from an identity of the layer's
# width n: per sample a few (n, n') matrices at once.  Measured on an H200 on the 6x5120 net (float32):
# 2.6 / 7.5 / 27.2 / 122 GiB peak at 1 / 4 / 16 / 74 inputs, i.e. 1.64 GiB = 16.8·4·5120² bytes per
# input.  CROWN-IBP only goes backward from the K logits: 1.6 / 1.7 GiB at 16 / 64 inputs.
BOUND_MEMORY_ENV = "LINF_BOUND_MEMORY_GB"
_CROWN_BYTES_PER_PAIR = 20  # × itemsize × n_max²  (16.8 measured, + 20 %)
_CROWN_IBP_BYTES = 16  # × itemsize × K × Σn  (conservative: ~2 MB per input measured at Σn = 6·5120)
_DEFAULT_BUDGET_GB = {"cuda": 16.0, "cpu": 8.0}


def _budget(env: str, device: torch.device, fallback_env: Optional[str] = None, default: Optional[float] = None):
    raw = os.environ.get(env)
    name = env
    if raw is None and fallback_env is not None:
        raw, name = os.environ.get(fallback_env), fallback_env
    if raw is None:
        return default if default is not None else _DEFAULT_BUDGET_GB.get(device.type, 8.0)
    try:
        budget = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of GiB, got {raw!r}") from None
    if not (budget > 0) or math.isinf(budget):
        raise ValueError(f"{name} must be > 0 GiB, got {budget}")
    return budget


def _output_sizes(model: torch.nn.Module, example: torch.Tensor, kinds=None) -> list:
    """Per-sample output sizes of the modules of ``kinds`` (default: every leaf module), one forward pass."""
    mods = [m for m in model.modules() if (isinstance(m, kinds) if kinds else not any(True for _ in m.children()))]
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel()) if torch.is_tensor(out)
                                     else None) for m in mods]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return sizes


def alpha_crown_batch_limit(model: torch.nn.Module, example: torch.Tensor, budget_gb: Optional[float] = None) -> int:
    """The largest α-CROWN batch whose estimated memory fits ``budget_gb``.

    The estimate is ``9/4 · itemsize · (Σ n)²`` bytes per sample, with ``n`` the
    per-sample output size of each nonlinear layer (ReLU-like activations and
    ℓp-dist layers), measured from one forward pass of ``example``.  The budget
    defaults to ``$LINF_ALPHA_CROWN_MEMORY_GB``, else ``$LINF_BOUND_MEMORY_GB``,
    else 4 GiB.  A heuristic: it only bounds the batch, it never changes a bound.
    """
    from ..nn import LpDistLinear

    if budget_gb is None:
        budget_gb = _budget(ALPHA_MEMORY_ENV, example.device, BOUND_MEMORY_ENV, default=4.0)
    if not (budget_gb > 0):
        raise ValueError(f"{ALPHA_MEMORY_ENV} must be > 0 GiB, got {budget_gb}")
    kinds = (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.ELU, LpDistLinear)
    sizes = _output_sizes(model, example, kinds)
    per_sample = _ALPHA_BYTES_PER_PAIR * example.element_size() * float(sum(sizes)) ** 2
    return max(1, int(budget_gb * 2 ** 30 // max(per_sample, 1.0)))


def bound_batch_limit(method: str, model: torch.nn.Module, example: torch.Tensor,
                      budget_gb: Optional[float] = None) -> Optional[int]:
    """The largest batch whose estimated bound memory fits ``budget_gb`` (``None``: no cap, IBP).

    Per sample, with ``n`` the output sizes of the model's leaf modules
    (measured by one forward pass of ``example``), ``K`` the number of logits
    and ``s`` the itemsize:

    * ``crown``: ``20 s n_max²`` (an identity of every intermediate layer's
      width goes backward; measured 16.8 s·5120² on the 6x5120 net);
    * ``crown-ibp``: ``16 s K Σn``;
    * ``alpha-crown``: :func:`alpha_crown_batch_limit`.

    The budget defaults to ``$LINF_BOUND_MEMORY_GB``, else 16 GiB on CUDA and
    8 GiB elsewhere.  It bounds the batch only; bounds never depend on it.
    """
    if method == Method.ALPHA_CROWN:
        return alpha_crown_batch_limit(model, example, budget_gb)
    if method not in (Method.CROWN, Method.CROWN_IBP):
        return None
    if budget_gb is None:
        budget_gb = _budget(BOUND_MEMORY_ENV, example.device)
    if not (budget_gb > 0):
        raise ValueError(f"{BOUND_MEMORY_ENV} must be > 0 GiB, got {budget_gb}")
    sizes = _output_sizes(model, example) + [example[0].numel()]
    s = example.element_size()
    if method == Method.CROWN:
        per_sample = _CROWN_BYTES_PER_PAIR * s * float(max(sizes)) ** 2
    else:
        with torch.no_grad():
            num_logits = model(example[:1]).shape[-1]
        per_sample = _CROWN_IBP_BYTES * s * num_logits * float(sum(sizes))
    return max(1, int(budget_gb * 2 ** 30 // max(per_sample, 1.0)))


def _is_03() -> bool:
    from ..lirpa.compat import needs_legacy_fixes

    return needs_legacy_fixes()


_AUTO_LIRPA_03 = _is_03()

# auto_LiRPA's patches mode saves memory on large images, but on small ones unfolding the patches
# dominates alpha-CROWN: digits cnn_7layer (8x8), 2 points, 20 iterations: 89 s in patches mode, 31 s
# in matrix mode, the same bounds.  Matrix mode holds an identity of each layer's width per sample
# (n² entries), so it is only chosen while every layer has at most this many outputs, and only for
# alpha-CROWN (small batches): plain CROWN on 16 points of the same CNN took 5.2 s in matrix mode
# against 2.2 s in patches mode.
MATRIX_MODE_MAX_NEURONS = 4096


def conv_mode_for(model: torch.nn.Module, example: torch.Tensor) -> str:
    """``"matrix"`` when the input and every leaf module's per-sample output have at most
    :data:`MATRIX_MODE_MAX_NEURONS` entries, else ``"patches"`` (auto_LiRPA's default)."""
    sizes = _output_sizes(model, example) + [example[0].numel()]
    return "matrix" if max(sizes) <= MATRIX_MODE_MAX_NEURONS else "patches"


# relative tolerance below zero of a float32 margin bound that still sends the point to the float64 re-check
CANDIDATE_TOLERANCE = 2.0 ** -12


class BoundPropCertifier:
    """Bound-propagation certificates for one model, reused across batches and eps.

    Args:
        model: any model (in eval mode; the caller restores state), float32 or float64.
        example: one input ``(1, *input_shape)`` for tracing.
        num_classes: K (the model's output width).
        alpha_iterations, alpha_lr: alpha-CROWN optimisation settings.
        rigorous: re-check every float32 candidate in float64 with the
            magnitude-derived slack (see the module docstring); ``False``
            keeps the float32 bound and a relative slack (not float-rigorous).
        method: the method this certifier will mostly run; ``"alpha-crown"``
            bounds the convolutions of small inputs in matrix mode
            (:func:`conv_mode_for`), every other method in auto_LiRPA's default.

    Attributes:
        float_rigorous: every certificate so far is float-rigorous.
        reason: why not, when not.
    """

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, num_classes: int,
                 alpha_iterations: int = 20, alpha_lr: float = 0.1, rigorous: bool = True,
                 method: Optional[str] = None):
        self.model = model
        self.num_classes = num_classes
        # alpha-CROWN stops once every margin of every point is positive (those points certify either way)
        opts = {"optimize_bound_args": {"iteration": int(alpha_iterations), "lr_alpha": float(alpha_lr),
                                        "stop_criterion_func": all_margins_positive}}
        if method == "alpha-crown":
            opts["conv_mode"] = conv_mode_for(model, example)
        if _AUTO_LIRPA_03:
            # 0.3's sparse alpha (its default) breaks alpha-CROWN when the set of
            # unstable ReLUs differs between the init pass and the optimisation
            # (shape mismatch in reconstruct_full_alpha); dense alpha is correct.
            opts.update(sparse_features_alpha=False, sparse_spec_alpha=False)
        self.opts = opts
        self.dtype = example.dtype
        self.example = example
        self.rigorous = rigorous
        self.float_rigorous = rigorous
        self.reason = "" if rigorous else "not float-rigorous: rigorous=False (float32 bounds, relative slack)"
        self._main = bounder_for(model, example, opts)
        self._double = self._main if self.dtype == torch.float64 else None

    def batch_size(self, method: str, requested: int) -> int:
        """``requested``, capped by :func:`bound_batch_limit` for CROWN, CROWN-IBP and α-CROWN."""
        limit = bound_batch_limit(method, self.model, self.example)
        return requested if limit is None else max(1, min(requested, limit))

    def lower_margins(self, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                      method: str, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Lower bounds ``(B, K-1)`` on ``logit_y - logit_j`` over ``[lower, upper]``, in the model's dtype.

        ``rows``: alpha-CROWN on models with l_p-dist layers optimises only
        these rows (a ``(B,)`` bool mask; the others keep the CROWN bound)."""
        return self._main.lower(x, y, lower, upper, method, self.num_classes, rows=rows)

    def _float64(self) -> Bounder:
        if self._double is None:
            self._double = bounder_for(self.model, self.example.double(), self.opts,
                                       build=lambda: copy.deepcopy(self.model).double())
        return self._double

    def _above_slack(self, bounder: Bounder, lb, lower, upper):
        slack, info = rounding_slack(bounder.bounded, lower, upper)
        if slack is None:
            self.float_rigorous, self.reason = False, info.reason
            slack = 64 * unit_roundoff_of(torch.float64) * (1 + lb.abs())
        else:
            slack = slack.unsqueeze(1)
        return (torch.isfinite(lb) & (lb > slack)).all(dim=1)

    def _rigorous_ok(self, bounder: Bounder, x64, y, eps, method, data_range, alpha_rows=None):
        """Certified flags from float64 bounds over the widened box and the rounding slack.

        alpha-CROWN: on models with l_p-dist layers the float64 CROWN bound
        (alpha-CROWN's first iteration) comes first; then, for the points
        still open and with ``alpha_rows`` (their rows in the float32 batch),
        the float32 run's optimised alphas are evaluated once in float64;
        only the points that fail both are optimised again in float64.
        """
        lower, upper = widen_box(*linf_box(x64, eps, data_range, outward=True))
        if method != "alpha-crown":
            lb = bounder.lower(x64, y, lower, upper, method, self.num_classes)
            return self._above_slack(bounder, lb, lower, upper)
        n = x64.shape[0]
        ok = torch.zeros(n, dtype=torch.bool, device=x64.device)
        if bounder.lp_dist:
            ok = self._above_slack(bounder, bounder.lower(x64, y, lower, upper, "crown", self.num_classes),
                                   lower, upper)
        open_ = torch.nonzero(~ok).flatten()
        main = self._main
        if open_.numel() and alpha_rows is not None and main.alphas is not None:
            rows = alpha_rows[open_]
            if main.alpha_rows is None:  # the alphas cover the whole float32 batch
                pos = rows
            else:
                lookup = torch.full((int(max(rows.max(), main.alpha_rows.max())) + 1,), -1, dtype=torch.long,
                                    device=rows.device)
                lookup[main.alpha_rows.to(rows.device)] = torch.arange(main.alpha_rows.numel(), device=rows.device)
                pos = lookup[rows]
            have = pos >= 0
            sel, pos = open_[have], pos[have]
            if sel.numel():
                lb = bounder.lower_given_alpha(x64[sel], y[sel], lower[sel], upper[sel], self.num_classes,
                                               main.alphas, pos)
                if lb is not None:
                    ok[sel] = self._above_slack(bounder, lb, lower[sel], upper[sel])
            open_ = torch.nonzero(~ok).flatten()
        if open_.numel():
            lo, hi = lower[open_], upper[open_]
            lb = bounder.lower(x64[open_], y[open_], lo, hi, method, self.num_classes)
            ok[open_] = self._above_slack(bounder, lb, lo, hi)
        return ok

    def _recheck(self, x, y, eps, method, data_range, idx):
        """Certified flags for ``x[idx]``, re-bounded in float64."""
        b64 = self._float64()
        ok = torch.zeros(idx.shape[0], dtype=torch.bool, device=x.device)
        per_eps = torch.is_tensor(eps) and eps.dim() > 0
        step = max(1, self.batch_size(method, idx.shape[0]) // 2)  # float64: twice the bytes
        for s in range(0, idx.shape[0], step):
            sub = idx[s:s + step]
            ok[s:s + step] = self._rigorous_ok(b64, x[sub].double(), y[sub], eps[sub] if per_eps else eps, method,
                                               data_range, alpha_rows=sub)
        return ok

    def certify(self, x, y, eps, method, data_range, correct: Optional[torch.Tensor] = None):
        """Certified flags ``(B,)`` at one eps (per-sample eps tensors allowed)."""
        if self.rigorous and self.dtype == torch.float64:
            ok = self._rigorous_ok(self._main, x, y, eps, method, data_range)
            return ok if correct is None else ok & correct
        lower, upper = widen_box(*linf_box(x, eps, data_range, outward=True))
        lb = self.lower_margins(x, y, lower, upper, method, rows=correct)
        if not self.rigorous:
            tol = 64 * unit_roundoff_of(lb.dtype) * (1 + lb.abs())
            ok = (torch.isfinite(lb) & (lb > tol)).all(dim=1)
            return ok if correct is None else ok & correct
        # The float32 pass only picks the candidates the float64 re-check decides on.  Relaxations move
        # their planes outward by a float32 rounding slack (l_p-dist planes: a few ulps of the terms per
        # layer), so a point whose exact bound is barely positive can get a float32 bound a little below
        # zero; such points are re-checked too.
        cand = (torch.isfinite(lb) & (lb > -CANDIDATE_TOLERANCE * (1 + lb.abs()))).all(dim=1)
        if correct is not None:
            cand &= correct
        ok = torch.zeros_like(cand)
        idx = torch.nonzero(cand).flatten()
        if idx.numel():
            ok[idx] = self._recheck(x, y, eps, method, data_range, idx)
        return ok
