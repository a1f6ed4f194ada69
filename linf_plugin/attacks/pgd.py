"""Projected gradient descent in l_inf (Madry et al.), the paper's PGD-100 evaluation.

PGD gives an *upper* bound on robust accuracy: a success is a concrete
counterexample (checked by running the model on it), a failure proves
nothing.  So certified accuracy <= PGD accuracy <= clean accuracy.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.box import linf_box
from ..results import Result, tensor_to_list

__all__ = ["pgd_attack", "AttackResult", "LOSSES"]

LOSSES = ("ce", "margin")


@dataclass
class AttackResult(Result):
    """Outcome of :func:`pgd_attack`; combines with certification results (``cert.certified & ~adv.success``).

    Attributes:
        x_adv: ``(B, *shape)`` on the inputs' device: for each sample the
            misclassified point found (when ``success``) or the last iterate
            of the last restart.  Always inside ``[x - eps, x + eps]`` and the
            data range.  ``None`` for a result read back with :meth:`from_dict`
            (inputs are not saved).
        success: ``(B,)`` bool CPU tensor: ``model(x_adv)`` does not predict
            ``y`` (this includes inputs already misclassified at ``x``).
        correct: ``(B,)`` bool CPU tensor, the clean prediction equals the label (None when unknown).
        eps: the l_inf radius in pixel units.
        method: ``"pgd"``.
        model_name: the registry name of the model (or its class name).
        wall_time: seconds spent attacking.
        extra: attack settings (steps, restarts, step size, loss).
    """

    x_adv: Optional[torch.Tensor]
    success: torch.Tensor
    correct: Optional[torch.Tensor] = None
    eps: float = math.nan
    method: str = "pgd"
    model_name: str = ""
    wall_time: float = 0.0
    extra: dict = field(default_factory=dict)

    _TENSOR_FIELDS = {"success": torch.bool, "correct": torch.bool}

    def __post_init__(self):
        self._to_tensors()
        if self.success.dim() != 1:
            raise ValueError(f"success must be 1-D, got shape {tuple(self.success.shape)}")
        if self.correct is not None and self.correct.shape != self.success.shape:
            raise ValueError("correct and success must have one entry per sample")

    @property
    def n(self) -> int:
        return int(self.success.shape[0])

    @property
    def robust(self) -> torch.Tensor:
        """``(B,)`` bool: the attack did NOT break the sample (``~success``; no proof of robustness)."""
        return ~self.success

    @property
    def robust_accuracy(self) -> float:
        """Fraction of samples the attack did NOT break (an upper bound on robust accuracy)."""
        return self._mean(~self.success)

    @property
    def clean_accuracy(self) -> float:
        return self._mean(self.correct)

    def to_dict(self, per_sample: bool = True) -> dict:
        """JSON-able dict (without ``x_adv``; per-sample flags as lists unless ``per_sample=False``)."""
        out = {"method": self.method, "eps": float(self.eps), "model_name": self.model_name, "n": self.n,
               "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
               "wall_time": float(self.wall_time), "extra": self.extra}
        if per_sample:
            out["success"] = tensor_to_list(self.success)
            out["correct"] = tensor_to_list(self.correct)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "AttackResult":
        """Inverse of :meth:`to_dict` (``per_sample=True``); ``x_adv`` is None."""
        return cls(x_adv=None, success=d["success"], correct=d.get("correct"), eps=d.get("eps", math.nan),
                   method=d.get("method", "pgd"), model_name=d.get("model_name", ""),
                   wall_time=d.get("wall_time", 0.0), extra=d.get("extra", {}))


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
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 (a float or a 0-d tensor), got {eps!r}")
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
        eps: l_inf radius in input (pixel) units: a float or a 0-d tensor.
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
        :class:`AttackResult` (``success`` and ``correct`` as bool CPU
        tensors, ``x_adv`` on x's device).  Every reported success has been
        verified by evaluating ``model`` at ``x_adv``, which lies inside the box.
    """
    if torch.is_tensor(eps):
        if eps.dim() != 0:
            raise ValueError(f"eps must be a float or a 0-d tensor, got a tensor of shape {tuple(eps.shape)}")
        eps = eps.item()
    _check(model, x, y, eps, steps, restarts, loss)
    start = time.perf_counter()
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
        return AttackResult(best, final & inside, correct=pred == y, eps=float(eps),
                            model_name=getattr(model, "model_name", None) or type(model).__name__,
                            wall_time=time.perf_counter() - start,
                            extra={"steps": steps, "restarts": restarts, "step_size": step_size, "loss": loss,
                                   "random_start": random_start})
    finally:
        model.train(was_training)
