"""Projected gradient descent in l_inf (Madry et al.), the paper's PGD-100 evaluation.

PGD gives an *upper* bound on robust accuracy: a success is a concrete
counterexample (checked by running the model on it), a failure proves
nothing.  So certified accuracy <= PGD accuracy <= clean accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.box import linf_box

__all__ = ["pgd_attack", "AttackResult", "LOSSES"]

LOSSES = ("ce", "margin")


@dataclass
class AttackResult:
    """Outcome of :func:`pgd_attack`.

    Attributes:
        x_adv: ``(B, *shape)`` for each sample the misclassified point found
            (when ``success``) or the last iterate of the last restart.  Always
            inside ``[x - eps, x + eps]`` and the data range.
        success: ``(B,)`` bool: ``model(x_adv)`` does not predict ``y``
            (this includes inputs already misclassified at ``x``).
    """

    x_adv: torch.Tensor
    success: torch.Tensor

    @property
    def robust_accuracy(self) -> float:
        """Fraction of samples the attack did NOT break (an upper bound on robust accuracy)."""
        return 1.0 - self.success.float().mean().item()


def _loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -math.inf).amax(dim=1)
    return (other - true).sum()


def _check(model, x, y, eps, steps, restarts, loss):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be a 1-D label tensor with {x.shape[0]} entries, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(steps, int) and steps >= 0) or not (isinstance(restarts, int) and restarts >= 1):
        raise ValueError(f"steps must be an int >= 0 and restarts an int >= 1, got {steps!r}, {restarts!r}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
    if torch.isnan(x).any():
        raise ValueError("x contains NaN")


def pgd_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 100,
               step_size: Optional[float] = None, restarts: int = 1, random_start: bool = True, loss: str = "ce",
               data_range: Sequence[float] = (0.0, 1.0), generator: Optional[torch.Generator] = None) -> AttackResult:
    """Untargeted l_inf PGD with random start and restarts.

    Args:
        model: maps ``(B, *shape)`` to logits ``(B, K)``; run in eval mode
            (its train/eval state is restored afterwards).
        x: ``(B, *shape)`` clean inputs inside ``data_range``.
        y: ``(B,)`` int64 labels.
        eps: l_inf radius in input (pixel) units.
        steps: gradient steps per restart (100 = the paper's PGD-100).
        step_size: step length; default ``eps / 4`` as in the authors' code.
        restarts: independent random starts; a sample counts as broken if
            any restart breaks it.
        random_start: start uniformly in the box (else at ``x``).
        loss: ``"ce"`` (cross-entropy, the paper's) or ``"margin"``
            (max other logit minus true logit).
        data_range: ``(low, high)``; the box is clipped to it.
        generator: for the random starts.

    Returns:
        :class:`AttackResult`.  Every reported success has been verified by
        evaluating ``model`` at ``x_adv``, which lies inside the box.
    """
    _check(model, x, y, eps, steps, restarts, loss)
    step_size = eps / 4 if step_size is None else float(step_size)
    lower, upper = linf_box(x, eps, data_range)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pred = model(x).argmax(dim=1)
        success = pred != y
        best = x.detach().clone()
        for _ in range(restarts):
            if random_start and eps > 0:
                noise = torch.rand(x.shape, generator=generator, dtype=x.dtype,
                                   device=x.device if generator is None else generator.device).to(x.device)
                cur = lower + noise * (upper - lower)
            else:
                cur = x.detach().clone()
            for _ in range(steps + 1):
                cur.requires_grad_(True)
                with torch.enable_grad():
                    logits = model(cur)
                    grad, = torch.autograd.grad(_loss(logits, y, loss), cur)
                with torch.no_grad():
                    broke = (logits.argmax(dim=1) != y) & ~success
                    best[broke] = cur.detach()[broke]
                    success |= broke
                    cur = torch.minimum(torch.maximum(cur.detach() + step_size * grad.sign(), lower), upper)
                if success.all():
                    break
            with torch.no_grad():
                best[~success] = cur[~success]
        # Re-verify: a success must be a real counterexample at a point in the box.
        with torch.no_grad():
            final = model(best).argmax(dim=1) != y
        inside = ((best >= lower) & (best <= upper)).flatten(1).all(dim=1)
        return AttackResult(best, final & inside)
    finally:
        model.train(was_training)
