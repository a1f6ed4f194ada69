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

import contextlib
import copy
import math
import os
import warnings
from typing import Optional

import torch

from ..data.box import linf_box
from ..names import Method
from .float_safety import exact_float, rounding_slack, unit_roundoff_of, widen_box

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

# our name -> auto_LiRPA's method name
LIRPA_METHODS = {Method.IBP: "IBP", Method.CROWN_IBP: "CROWN-IBP", Method.CROWN: "CROWN",
                 Method.ALPHA_CROWN: "CROWN-Optimized"}


def margin_spec(y: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """auto_LiRPA's specification matrix of the margins ``z_y − z_j``, ``j ≠ y``.

    Args:
        y: ``(B,)`` int64 labels.
        num_classes: ``K``.

    Returns:
        ``C`` of shape ``(B, K−1, K)`` with rows ``e_y − e_j`` for every ``j ≠ y``
        in increasing order; ``C @ logits`` are the margins.
    """
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): row j = e_y - e_j
    keep = torch.arange(num_classes, device=y.device).unsqueeze(0) != y.unsqueeze(1)
    return c[keep].view(y.shape[0], num_classes - 1, num_classes)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """auto_LiRPA creates some constants with the default dtype; a float64 model
    needs float64 there too (both 0.3 and 0.7)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


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


def _alpha_nodes(bounded) -> Optional[list]:
    """The optimizable nodes of ``bounded`` that hold alpha, or None when one is not a ReLU
    (only the ReLU's alpha domain [0, 1] is clipped here; other relaxations fall back)."""
    nodes = [n for n in bounded.optimizable_activations if getattr(n, "alpha", None)]
    if any(type(n).__name__ != "BoundRelu" for n in nodes):
        return None
    return nodes


@contextlib.contextmanager
def _quiet_identity():
    """auto_LiRPA warns "Creating an identity matrix ... poor performance" whenever CROWN starts
    from a layer in matrix mode, which is what CROWN does (and what matrix mode is chosen for)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Creating an identity matrix", category=UserWarning)
        yield


class _Bounder:
    """One ``BoundedModule`` of one model in one dtype."""

    def __init__(self, model, example, opts):
        from ..lirpa import bounded_module

        self.model, self.example, self.dtype = model, example, example.dtype
        self.alphas = None  # the last alpha-CROWN run's optimized alphas, {node: {start: (2, spec, B, ...)}}
        with _default_dtype(self.dtype):
            self.bounded = bounded_module(model, example, bound_opts=opts)

    def lower(self, x, y, lower, upper, method, num_classes):
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        ptb = PerturbationLpNorm(norm=math.inf, eps=None, x_L=lower, x_U=upper)
        c = margin_spec(y, num_classes, x.dtype)
        name = LIRPA_METHODS[method]
        if method == Method.ALPHA_CROWN and not self.bounded.optimizable_activations:
            # nothing to optimise (a pure l_inf-dist net): every alpha-CROWN iteration would
            # recompute the same CROWN bound, so compute it once
            name = "CROWN"
        # Only alpha-CROWN differentiates (through its own enable_grad); a
        # graph through the bounds of a wide net would cost gigabytes.
        grad = torch.enable_grad() if name == "CROWN-Optimized" else torch.no_grad()
        with _default_dtype(self.dtype), grad, exact_float(), _quiet_identity():
            lb, _ = self.bounded.compute_bounds(x=(BoundedTensor(x, ptb),), C=c, method=name, bound_upper=False)
        self.alphas = None
        if method == Method.ALPHA_CROWN:
            nodes = _alpha_nodes(self.bounded)
            if nodes is not None:
                self.alphas = {n.name: {k: (v.detach().clone(), getattr(n, "alpha_lookup_idx", {}).get(k))
                                        for k, v in n.alpha.items()} for n in nodes}
        return lb.detach()

    def lower_given_alpha(self, x, y, lower, upper, num_classes, alphas, idx) -> Optional[torch.Tensor]:
        """CROWN lower bounds with alpha fixed to ``alphas`` (another bounder's optimized
        alphas, rows ``idx`` of its batch): one backward pass instead of an optimization.

        Sound for any alpha in the ReLU's domain [0, 1], which is enforced here by the
        node's own clip.  Returns None (the caller optimizes instead) when the alpha
        layout differs (other node names, sparse alpha over other neurons, shapes).
        """
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        ptb = PerturbationLpNorm(norm=math.inf, eps=None, x_L=lower, x_U=upper)
        c = margin_spec(y, num_classes, x.dtype)
        bm = self.bounded
        init = getattr(bm, "init_slope", None) or getattr(bm, "init_alpha")  # 0.3 / 0.7
        with _default_dtype(self.dtype), torch.no_grad(), exact_float(), _quiet_identity():
            init((BoundedTensor(x, ptb),), method="backward", c=c, bound_upper=False)
            nodes = _alpha_nodes(bm)
            if nodes is None or {n.name for n in nodes} != set(alphas):
                return None
            for n in nodes:
                src = alphas[n.name]
                lookup = getattr(n, "alpha_lookup_idx", {}) or {}
                # the start nodes depend on which layers have unstable neurons: a subset of the
                # batch (or the widened float64 box) may need alphas for fewer of them, never more
                if not set(n.alpha) <= set(src):
                    return None
                for k, dst in n.alpha.items():
                    a, src_lookup = src[k]
                    a = a[:, :, idx]  # (2, spec, batch, ...): batch is dim 2
                    mine = lookup.get(k)
                    if a.shape != dst.shape or (mine is None) != (src_lookup is None) or (
                            mine is not None and not torch.equal(mine, src_lookup)):
                        return None
            for n in nodes:
                for k, dst in n.alpha.items():
                    dst.data.copy_(alphas[n.name][k][0][:, :, idx])
                (getattr(n, "clip_alpha_", None) or getattr(n, "clip_alpha"))()
                n.opt_reuse()
            try:
                lb, _ = bm.compute_bounds(x=(BoundedTensor(x, ptb),), C=c, method="CROWN", bound_upper=False)
            finally:
                for n in nodes:
                    n.opt_no_reuse()
        return lb.detach()


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
        opts = {"optimize_bound_args": {"iteration": int(alpha_iterations), "lr_alpha": float(alpha_lr)}}
        if method == Method.ALPHA_CROWN:
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
        self._main = _Bounder(model, example, opts)
        self._double = self._main if self.dtype == torch.float64 else None

    def batch_size(self, method: str, requested: int) -> int:
        """``requested``, capped by :func:`bound_batch_limit` for CROWN, CROWN-IBP and α-CROWN."""
        limit = bound_batch_limit(method, self.model, self.example)
        return requested if limit is None else max(1, min(requested, limit))

    def lower_margins(self, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                      method: str) -> torch.Tensor:
        """Lower bounds ``(B, K-1)`` on ``logit_y - logit_j`` over ``[lower, upper]``, in the model's dtype."""
        return self._main.lower(x, y, lower, upper, method, self.num_classes)

    def _float64(self) -> _Bounder:
        if self._double is None:
            model64 = copy.deepcopy(self.model).double()
            self._double = _Bounder(model64, self.example.double(), self.opts)
        return self._double

    def _above_slack(self, bounder: _Bounder, lb, lower, upper):
        slack, info = rounding_slack(bounder.bounded, lower, upper)
        if slack is None:
            self.float_rigorous, self.reason = False, info.reason
            slack = 64 * unit_roundoff_of(torch.float64) * (1 + lb.abs())
        else:
            slack = slack.unsqueeze(1)
        return (torch.isfinite(lb) & (lb > slack)).all(dim=1)

    def _rigorous_ok(self, bounder: _Bounder, x64, y, eps, method, data_range, alpha_rows=None):
        """Certified flags from float64 bounds over the widened box and the rounding slack.

        alpha-CROWN with ``alpha_rows`` (rows of the float32 batch): the float32 run's
        optimized alphas are evaluated once in float64 first; only the points that
        fail there are optimized again in float64.
        """
        lower, upper = widen_box(*linf_box(x64, eps, data_range, outward=True))
        ok = None
        if method == Method.ALPHA_CROWN and alpha_rows is not None and self._main.alphas is not None:
            lb = bounder.lower_given_alpha(x64, y, lower, upper, self.num_classes, self._main.alphas, alpha_rows)
            if lb is not None:
                ok = self._above_slack(bounder, lb, lower, upper)
                if ok.all():
                    return ok
        if ok is None:
            lb = bounder.lower(x64, y, lower, upper, method, self.num_classes)
            return self._above_slack(bounder, lb, lower, upper)
        redo = torch.nonzero(~ok).flatten()
        lo, hi = lower[redo], upper[redo]
        lb = bounder.lower(x64[redo], y[redo], lo, hi, method, self.num_classes)
        ok[redo] = self._above_slack(bounder, lb, lo, hi)
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
        lb = self.lower_margins(x, y, lower, upper, method)
        if not self.rigorous:
            tol = 64 * unit_roundoff_of(lb.dtype) * (1 + lb.abs())
            ok = (torch.isfinite(lb) & (lb > tol)).all(dim=1)
            return ok if correct is None else ok & correct
        cand = (torch.isfinite(lb) & (lb > 0)).all(dim=1)
        if correct is not None:
            cand &= correct
        ok = torch.zeros_like(cand)
        idx = torch.nonzero(cand).flatten()
        if idx.numel():
            ok[idx] = self._recheck(x, y, eps, method, data_range, idx)
        return ok
