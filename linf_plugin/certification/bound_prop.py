"""IBP, CROWN-IBP, CROWN and alpha-CROWN certificates through auto_LiRPA.

Each method bounds the margins ``logit_y - logit_j`` (j != y) over the
input box with a margin specification ``C`` of shape ``(B, K-1, K)``; a
sample is certified when it is classified correctly and every lower bound
is > 0.  ℓp-dist layers are bounded by :class:`linf_plugin.lirpa.BoundLpDist`.

What is guaranteed: auto_LiRPA's relaxations are sound in real arithmetic;
its arithmetic is ordinary floating point without directed rounding, so a
lower bound within a few ulps of 0 is not a proof in the strict sense.  We
therefore require ``lower > tol`` with ``tol = 64 u * (1 + |lower|)``
relative to the unit roundoff ``u`` of the computation dtype, and offer
``dtype=torch.float64`` to run the bound computation in double precision.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch

from ..data.box import linf_box
from .margin import unit_roundoff

__all__ = ["LIRPA_METHODS", "margin_spec", "BoundPropCertifier", "alpha_crown_batch_limit", "ALPHA_MEMORY_ENV"]

# α-CROWN keeps, per sample, CROWN matrices and α variables whose size grows with the product of the
# numbers of neurons of the nonlinear layers (dense α on 0.3: one α per (neuron, start neuron) pair).
# Measured on the digits cnn_7layer (Σn = 3712): ~0.5 GB per sample on 0.3 and on 0.7.1, i.e. about
# 9·(Σn)² bytes in float32.  The batch is capped so that estimate stays under a budget.
ALPHA_MEMORY_ENV = "LINF_ALPHA_CROWN_MEMORY_GB"
_ALPHA_BYTES_PER_PAIR = 9 / 4  # × itemsize × (Σn)²


def alpha_crown_batch_limit(model: torch.nn.Module, example: torch.Tensor, budget_gb: Optional[float] = None) -> int:
    """The largest α-CROWN batch whose estimated memory fits ``budget_gb``.

    The estimate is ``9/4 · itemsize · (Σ n)²`` bytes per sample, with ``n`` the
    per-sample output size of each nonlinear layer (ReLU-like activations and
    ℓp-dist layers), measured from one forward pass of ``example``.  The budget
    defaults to ``$LINF_ALPHA_CROWN_MEMORY_GB`` or 4 GiB.  A heuristic: it only
    bounds the batch, it never changes a bound.
    """
    from ..nn import LpDistLinear

    if budget_gb is None:
        budget_gb = float(os.environ.get(ALPHA_MEMORY_ENV, "4"))
    if not (budget_gb > 0):
        raise ValueError(f"{ALPHA_MEMORY_ENV} must be > 0 GiB, got {budget_gb}")
    kinds = (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.ELU, LpDistLinear)
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel()))
             for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    per_sample = _ALPHA_BYTES_PER_PAIR * example.element_size() * float(sum(sizes)) ** 2
    return max(1, int(budget_gb * 2 ** 30 // max(per_sample, 1.0)))

def _is_03() -> bool:
    from ..lirpa.compat import needs_legacy_fixes

    return needs_legacy_fixes()


_AUTO_LIRPA_03 = _is_03()

# our name -> auto_LiRPA's method name
LIRPA_METHODS = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "CROWN-Optimized"}


def margin_spec(y: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """``C (B, K-1, K)`` with rows ``e_y - e_j`` for every ``j != y``."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)
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


class BoundPropCertifier:
    """One ``BoundedModule`` for a model, reused across batches and eps.

    Args:
        model: any registered model (in eval mode; the caller restores state).
        example: one input ``(1, *input_shape)`` for tracing.
        num_classes: K.
        alpha_iterations, alpha_lr: alpha-CROWN optimisation settings.
    """

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, num_classes: int,
                 alpha_iterations: int = 20, alpha_lr: float = 0.1):
        from ..lirpa import bounded_module

        self.model = model
        self.num_classes = num_classes
        opts = {"optimize_bound_args": {"iteration": int(alpha_iterations), "lr_alpha": float(alpha_lr)}}
        if _AUTO_LIRPA_03:
            # 0.3's sparse alpha (its default) breaks alpha-CROWN when the set of
            # unstable ReLUs differs between the init pass and the optimisation
            # (shape mismatch in reconstruct_full_alpha); dense alpha is correct.
            opts.update(sparse_features_alpha=False, sparse_spec_alpha=False)
        self.dtype = example.dtype
        self.example = example
        with _default_dtype(self.dtype):
            self.bounded = bounded_module(model, example, bound_opts=opts)

    def batch_size(self, method: str, requested: int) -> int:
        """``requested``, capped for α-CROWN by :func:`alpha_crown_batch_limit`."""
        if method != "alpha-crown":
            return requested
        return min(requested, alpha_crown_batch_limit(self.model, self.example))

    def lower_margins(self, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                      method: str) -> torch.Tensor:
        """Lower bounds ``(B, K-1)`` on ``logit_y - logit_j`` over ``[lower, upper]``."""
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        ptb = PerturbationLpNorm(norm=math.inf, eps=None, x_L=lower, x_U=upper)
        c = margin_spec(y, self.num_classes, x.dtype)
        # Only alpha-CROWN differentiates (through its own enable_grad); a
        # graph through the bounds of a wide net would cost gigabytes.
        grad = torch.enable_grad() if method == "alpha-crown" else torch.no_grad()
        with _default_dtype(self.dtype), grad:
            lb, _ = self.bounded.compute_bounds(x=(BoundedTensor(x, ptb),), C=c, method=LIRPA_METHODS[method],
                                                bound_upper=False)
        return lb.detach()

    def certify(self, x, y, eps, method, data_range, correct: Optional[torch.Tensor] = None):
        """Certified flags ``(B,)`` at one eps (per-sample eps tensors allowed)."""
        lower, upper = linf_box(x, eps, data_range, outward=True)
        lb = self.lower_margins(x, y, lower, upper, method)
        tol = 64 * unit_roundoff(lb.dtype) * (1 + lb.abs())
        ok = (lb > tol).all(dim=1)
        return ok if correct is None else ok & correct

