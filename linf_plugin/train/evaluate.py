"""Periodic evaluation during training: clean accuracy and the family's cheap certificate.

* ℓ∞-dist nets: the Lipschitz-margin certificate at p = ∞ (p is switched
  to ∞ and the model put in eval mode for the evaluation, then both are
  restored, like the authors' "test at inf" logs).
* hybrids and ReLU baselines: IBP.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Optional

import torch
from torch import nn

from ..nn import lp_dist_layers
from .bounds import HybridBounds, input_box
from .losses import logit_margins, margin_spec

__all__ = ["evaluate", "eval_mode", "EVAL_METHODS"]

EVAL_METHODS = {"linf_dist": "margin", "hybrid": "ibp", "relu": "ibp"}


@contextlib.contextmanager
def eval_mode(model: nn.Module, p: Optional[float] = math.inf):
    """Eval mode (and every ℓp-dist layer at ``p``) inside the block; the previous state after it."""
    modes = [(m, m.training) for m in model.modules()]
    layers = list(lp_dist_layers(model))
    ps = [layer.p for layer in layers]
    model.eval()
    if p is not None:
        for layer in layers:
            layer.p = p
    try:
        yield model
    finally:
        for layer, old in zip(layers, ps):
            layer.p = old
        for m, was in modes:
            m.training = was


@torch.no_grad()
def _certified_linf(model, x, y, eps):
    logits = model(x)
    m = logit_margins(logits, y)
    return m > 0, m > 2.0 * eps * model.lipschitz_linf


@torch.no_grad()
def _certified_hybrid(model, x, y, eps, data_range):
    logits, lb = HybridBounds(model, "interval", data_range)(x, y, eps)
    correct = logits.argmax(1) == y
    return correct, correct & (lb > 0).all(1) if lb is not None else correct


@torch.no_grad()
def _certified_relu(model, x, y, eps, data_range):
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    bm = BoundedModule(model, x[:1], device=x.device)
    bm.eval()
    logits = bm(x)
    correct = logits.argmax(1) == y
    if eps <= 0:
        return correct, correct
    lo, hi = input_box(x, eps, data_range)
    bm(BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=lo, x_U=hi)))
    lb, _ = bm.compute_bounds(C=margin_spec(y, model.num_classes, dtype=x.dtype), method="IBP")
    return correct, correct & (lb > 0).all(1)


def evaluate(model: nn.Module, family: str, x: torch.Tensor, y: torch.Tensor, eps: float, *,
             data_range=(0.0, 1.0), batch_size: int = 1024) -> dict:
    """Clean and certified accuracy of ``model`` on ``(x, y)`` at ``eps`` with the family's cheap certificate.

    Args:
        model: the trained model (its mode and p are restored afterwards).
        family: ``linf_dist`` | ``hybrid`` | ``relu``.
        x, y: ``(n, *input_shape)`` inputs on the model's device and ``(n,)`` labels.
        eps: ε in pixel units.
        data_range: pixel range (certification boxes are clipped to it).
        batch_size: evaluation batch.

    Returns:
        ``{"clean_acc", "cert_acc", "method", "n", "eval_time"}``.
    """
    t0 = time.perf_counter()
    method = EVAL_METHODS[family]
    correct, cert = [], []
    with eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            if family == "linf_dist":
                c, v = _certified_linf(model, xb, yb, eps)
            elif family == "hybrid":
                c, v = _certified_hybrid(model, xb, yb, eps, data_range)
            else:
                c, v = _certified_relu(model, xb, yb, eps, data_range)
            correct.append(c.cpu())
            cert.append(v.cpu())
    correct, cert = torch.cat(correct), torch.cat(cert)
    return {"clean_acc": correct.float().mean().item(), "cert_acc": cert.float().mean().item(), "method": method,
            "n": int(correct.numel()), "eval_time": time.perf_counter() - t0}
