"""Losses of both families.

ℓ∞-dist nets (Zhang et al. 2022, eq. 9)::

    L = λ · CE(s · g(x), y) + min(hinge(g(x) / θ, y), 1),
    hinge(z, y) = max(max_{i≠y} z_i − z_y + 1, 0),

with a learnable temperature ``s`` (:class:`MixtureLoss` holds it; it is not
part of the model, so certificates always see the unscaled logits) and θ in
LOGIT units.  Models normalise inside by one scalar std, so a net that is
1-Lipschitz in normalised space is (1/std)-Lipschitz in pixels, and a pixel
threshold θ becomes θ/std in logits (:func:`theta_in_logits`), which is what
the authors do when they divide ε by std.

Bound-based training (IBP / CROWN-IBP, auto_LiRPA's examples): a lower bound
``lb`` (B, K−1) on the margins ``z_y − z_j`` gives the robust cross-entropy
``CE([0, −lb], 0)``, i.e. the cross-entropy of the worst-case logits;
it is mixed with the natural cross-entropy (:func:`bound_loss`).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..certification.bound_prop import margin_spec  # one definition, shared with the certificates

__all__ = ["margin_spec", "logit_margins", "clipped_hinge", "MixtureLoss", "robust_cross_entropy", "bound_loss",
           "theta_in_logits"]


def theta_in_logits(theta: float, std: float) -> float:
    """Hinge threshold in logit units for a net that normalises inputs by the scalar ``std``."""
    return float(theta) / float(std)


def logit_margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y − max_{j≠y} z_j`` per sample, shape ``(B,)`` (positive iff correctly classified)."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
    return true - other


def clipped_hinge(logits: torch.Tensor, y: torch.Tensor, theta: float) -> torch.Tensor:
    """``min(hinge(logits / θ, y), 1)`` per sample, shape ``(B,)``.

    Equals ``clamp(1 − margin / θ, 0, 1)``: 0 once the logit margin reaches
    θ, 1 for misclassified samples (which the clipping ignores).
    """
    if theta <= 0:
        raise ValueError(f"the hinge threshold must be positive, got {theta}")
    return (1.0 - logit_margins(logits, y) / theta).clamp(0.0, 1.0)


class MixtureLoss(nn.Module):
    """The ℓ∞-dist mixture loss with its learnable temperature ``scale`` (init 1).

    ``forward(logits, y, lam, theta)`` returns ``(loss, parts)``: the batch
    mean of ``lam · CE(scale · logits, y) + clipped_hinge(logits, y, theta)``
    and a dict with the detached batch means ``ce`` and ``hinge``.  The CE
    term is kept in the graph even when ``lam = 0`` so every parameter gets a
    gradient on every step (DDP needs a static graph).
    """

    def __init__(self, init_scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))

    def forward(self, logits: torch.Tensor, y: torch.Tensor, lam: float, theta: float
                ) -> Tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(logits * self.scale, y)
        hinge = clipped_hinge(logits, y, theta).mean()
        loss = lam * ce + hinge
        return loss, {"ce": ce.detach(), "hinge": hinge.detach()}


def robust_cross_entropy(margin_lower: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the worst-case logits from margin lower bounds, per sample.

    Args:
        margin_lower: ``(B, K−1)`` lower bounds of ``z_y − z_j``.

    Returns:
        ``(B,)``: ``log(1 + Σ_j exp(−lb_j))``, the CE of logits ``[0, −lb]`` at label 0
        (auto_LiRPA's construction).
    """
    padded = torch.cat([margin_lower.new_zeros(margin_lower.shape[0], 1), -margin_lower], dim=1)
    return torch.logsumexp(padded, dim=1)


def bound_loss(logits: torch.Tensor, y: torch.Tensor, margin_lower, natural_weight: float
               ) -> Tuple[torch.Tensor, dict]:
    """Natural CE mixed with robust CE: ``w · CE(logits) + (1 − w) · robustCE(lb)`` (batch means).

    Args:
        logits: ``(B, K)`` clean logits.
        y: ``(B,)`` labels.
        margin_lower: ``(B, K−1)`` margin lower bounds, or None (ε = 0: natural loss only).
        natural_weight: ``w`` in ``[0, 1]``.

    Returns:
        ``(loss, parts)`` with detached batch means ``natural_ce`` and ``robust_ce``.
    """
    natural = F.cross_entropy(logits, y)
    if margin_lower is None:
        return natural, {"natural_ce": natural.detach(), "robust_ce": natural.detach()}
    robust = robust_cross_entropy(margin_lower).mean()
    loss = natural_weight * natural + (1.0 - natural_weight) * robust
    return loss, {"natural_ce": natural.detach(), "robust_ce": robust.detach()}
