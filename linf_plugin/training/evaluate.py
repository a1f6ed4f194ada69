"""Periodic evaluation during training: clean accuracy and the family's cheap certificate.

Through :func:`linf_plugin.certification.certify`:

* ℓ∞-dist nets: the Lipschitz-margin certificate (float-safe) at p = ∞; p
  is switched to ∞ and the model put in eval mode for the evaluation, then
  both are restored, like the authors' "test at inf" logs;
* hybrids and ReLU baselines: IBP (auto_LiRPA), and ℓ∞-dist nets that the
  margin certificate refuses (a forward hook, a modified part).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional

import torch
from torch import nn

from ..names import Family, Method
from ..nn import lp_dist_layers

__all__ = ["evaluate", "eval_mode", "EVAL_METHODS"]

EVAL_METHODS = {Family.LINF_DIST: Method.MARGIN, Family.HYBRID: Method.IBP, Family.RELU: Method.IBP}
log = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: nn.Module, p: Optional[float] = math.inf):
    """Eval mode (and every ℓp-dist layer at ``p``) inside the block; the previous state after it."""
    from ..certification import eval_mode as modules_in_eval

    layers = list(lp_dist_layers(model))
    ps = [layer.p for layer in layers]
    with modules_in_eval(model):
        if p is not None:
            for layer in layers:
                layer.p = p
        try:
            yield model
        finally:
            for layer, old in zip(layers, ps):
                layer.p = old


def evaluate(model: nn.Module, family: str, x: torch.Tensor, y: torch.Tensor, eps: float, *,
             data_range=(0.0, 1.0), batch_size: int = 1024) -> dict:
    """Clean and certified accuracy of ``model`` on ``(x, y)`` at ``eps`` with the family's cheap certificate.

    Args:
        model: the trained model (its mode and p are restored afterwards).
        family: ``linf_dist`` | ``hybrid`` | ``relu``.
        x, y: ``(n, *input_shape)`` inputs and ``(n,)`` labels.
        eps: ε in pixel units.
        data_range: pixel range (certification boxes are clipped to it).
        batch_size: evaluation batch.

    Returns:
        ``{"clean_acc", "cert_acc", "method", "n", "eval_time"}``.
    """
    from ..certification import MarginCertificateError, certify
    from ..data import DatasetSplit

    method = EVAL_METHODS[family]
    data = DatasetSplit(x, y, name="eval", split="test", num_classes=int(model.num_classes),
                        data_range=tuple(data_range))
    # rank 0 alone evaluates during DDP training: certify must not wait for the other ranks
    with eval_mode(model):
        try:
            res = certify(model, data, eps, method, batch_size=batch_size, distributed=False)
        except MarginCertificateError as exc:
            # a hook or a modified part (the user's) voids the Lipschitz argument, not
            # the training run: IBP traces whatever the model computes
            log.warning("evaluation: %s; certifying with IBP instead", exc)
            method = Method.IBP
            res = certify(model, data, eps, method, batch_size=batch_size, distributed=False)
    return {"clean_acc": float(res.clean_accuracy), "cert_acc": float(res.certified_accuracy), "method": method.value,
            "n": int(res.n), "eval_time": float(res.wall_time)}
