"""Per-step schedules of both training families, as pure functions of the global step.

Every quantity that changes during training (p, λ, ε, the learning rate,
the natural-loss weight and the CROWN-IBP factor) is a function of the
global step ``t = epoch * steps_per_epoch + batch`` and the config only.
Nothing here keeps state, so a resumed run recomputes exactly the values the
uninterrupted run used, and a DDP rank needs nothing from the others.

ℓ∞-dist family (Zhang et al. 2022, Appendix B; semantics checked against the
authors' ``create_schedule``): with ``r = clip((t − e1·S) / (e2·S), 0, 1)``
(``S`` steps per epoch),

* ``p = p_start · (p_end / p_start)^r`` while ``r < 1``, then ``p = ∞``;
* ``λ = λ0 · (λend / λ0)^r`` while ``r < 1``, then ``λ = 0`` (the paper;
  the authors' code keeps ``λend`` in the last phase, a vanishing
  difference);
* ``lr = lr0 · (1 + cos(π t / T)) / 2`` over all ``T`` steps.

ReLU / hybrid family (auto_LiRPA's certified-training examples): ε follows
:func:`smoothed_ramp`, the same curve as auto_LiRPA's ``SmoothedScheduler``
(exponential start of power ``beta`` that turns linear at ``mid``), or a
linear ramp; the lr decays stepwise at epoch milestones; the CROWN-IBP
factor is ``(ε_max − ε) / ε_max``.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["ScheduleState", "Schedule", "ramp_ratio", "geometric", "lp_value", "mixing_coefficient",
           "cosine_lr", "step_lr", "smoothed_ramp", "linear_ramp", "crown_ibp_factor"]


@dataclass(frozen=True)
class ScheduleState:
    """Everything that varies during training, at one step.

    Attributes:
        step: global step (0-based).
        epoch: 0-based epoch of the step.
        p: norm of every ℓp-dist layer (``math.inf`` at the end; ``math.inf``
            for models without such layers).
        lam: λ, the weight of the cross-entropy term of the mixture loss.
        eps: the training ε of the bound-based loss, pixel units.
        lr: learning rate of the main parameter group.
        natural_weight: weight of the natural cross-entropy in the bound-based
            loss (``1 − κ_robust``).
        crown_factor: weight of the CROWN-IBP bound in the mixed lower bound
            (1 = pure CROWN-IBP, 0 = pure IBP).
    """

    step: int
    epoch: int
    p: float
    lam: float
    eps: float
    lr: float
    natural_weight: float
    crown_factor: float

    def as_log(self, family: Optional[str] = None) -> dict:
        """JSON-able dict of the values that matter for ``family`` (all when None).

        ``p = inf`` is written as the string ``"inf"``.
        """
        out = {"p": "inf" if math.isinf(self.p) else self.p, "lam": self.lam, "eps": self.eps, "lr": self.lr,
               "natural_weight": self.natural_weight, "crown_factor": self.crown_factor}
        drop = {"linf_dist": ("eps", "natural_weight", "crown_factor"), "hybrid": ("lam", "crown_factor"),
                "relu": ("p", "lam")}.get(family, ())
        return {k: v for k, v in out.items() if k not in drop}


def ramp_ratio(step: float, start: float, length: float) -> float:
    """Progress through a ramp: 0 before ``start``, 1 after ``start + length``, linear between.

    A ramp of zero length jumps from 0 to 1 at ``start``.
    """
    if length <= 0:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / length, 0.0), 1.0)


def geometric(start: float, end: float, ratio: float) -> float:
    """``start · (end / start)^ratio``: exponential interpolation (both positive)."""
    if start <= 0 or end <= 0:
        raise ValueError(f"geometric interpolation needs positive end points, got {start} and {end}")
    return start * math.exp(math.log(end / start) * ratio)


def lp_value(ratio: float, p_start: float, p_end: float) -> float:
    """p of the ℓp-relaxation at ramp progress ``ratio``: geometric, then ∞ once the ramp is done."""
    return math.inf if ratio >= 1.0 else geometric(p_start, p_end, ratio)


def mixing_coefficient(ratio: float, lam0: float, lam_end: float) -> float:
    """λ at ramp progress ``ratio``: geometric λ0 → λend, then 0 once the ramp is done."""
    if lam0 == 0:
        return 0.0
    return 0.0 if ratio >= 1.0 else geometric(lam0, lam_end, ratio)


def cosine_lr(step: float, total: float, base: float, start: float = 0.0) -> float:
    """Cosine annealing to 0: ``base`` until ``start``, ``base · (1 + cos(π r)) / 2`` after, r the progress."""
    r = ramp_ratio(step, start, total - start)
    return 0.5 * base * (1.0 + math.cos(math.pi * r))


def step_lr(epoch: int, base: float, milestones: Sequence[int], gamma: float) -> float:
    """``base · gamma^k`` with k the number of milestones ≤ ``epoch`` (torch's ``MultiStepLR``)."""
    return base * gamma ** bisect.bisect_right(sorted(milestones), epoch)


def smoothed_ramp(step: int, start: int, length: int, final: float, mid: float = 0.25, beta: float = 4.0) -> float:
    """auto_LiRPA's ``SmoothedScheduler`` curve as a function of the 0-based step.

    0 until ``start``; then ``α (t − start)^beta`` up to the step
    ``start + ⌊mid · length⌋``; then linear, reaching ``final`` at
    ``start + length`` and staying there.  ``α`` makes the two pieces meet
    with the same slope.  (auto_LiRPA counts epochs from 1: its
    ``start=s`` is ``start = (s − 1) · steps_per_epoch`` here.)

    Args:
        step: 0-based global step.
        start, length: first step of the ramp and its length in steps.
        final: the value reached (``ε_max``).
        mid: fraction of the ramp that is polynomial, in ``[0, 1]``.
        beta: power of the polynomial part, ``≥ 2``.
    """
    if beta < 2.0 or not 0.0 <= mid <= 1.0:
        raise ValueError(f"smoothed ramp needs beta >= 2 and 0 <= mid <= 1, got beta={beta}, mid={mid}")
    if step <= start:
        return 0.0
    end = start + length
    if length <= 0 or step >= end:
        return final
    mid_step = int(length * mid) + start
    if mid_step == start:  # no polynomial part (mid = 0 or a very short ramp): purely linear
        return min(final * (step - start) / length, final)
    t = float(mid_step - start) ** (beta - 1.0)
    alpha = final / ((end - mid_step) * beta * t + (mid_step - start) * t)
    if step < mid_step:
        return alpha * float(step - start) ** beta
    mid_value = alpha * float(mid_step - start) ** beta
    return min(mid_value + (final - mid_value) * (step - mid_step) / (end - mid_step), final)


def linear_ramp(step: int, start: int, length: int, final: float) -> float:
    """0 until ``start``, then linear to ``final`` at ``start + length``."""
    return final * ramp_ratio(step, start, length)


def crown_ibp_factor(eps: float, eps_max: float) -> float:
    """Weight of the CROWN-IBP bound: ``(ε_max − ε) / ε_max`` (1 at ε = 0, 0 at ε_max)."""
    if eps_max <= 0:
        return 0.0
    return min(max((eps_max - eps) / eps_max, 0.0), 1.0)


class Schedule:
    """All schedules of one run, evaluated at any step.

    Args:
        config: a :class:`~linf_plugin.training.config.TrainConfig` (resolved).
        steps_per_epoch: optimizer steps per epoch (global batches).
    """

    def __init__(self, config, steps_per_epoch: int):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.config = config
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = int(config.epochs) * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def p_ratio(self, step: int) -> float:
        c, s = self.config, self.steps_per_epoch
        return ramp_ratio(step, c.p_ramp_start * s, c.p_ramp_epochs * s)

    def p(self, step: int) -> float:
        c = self.config
        if c.p_start is None:
            return math.inf
        return lp_value(self.p_ratio(step), c.p_start, c.p_end)

    def lam(self, step: int) -> float:
        return mixing_coefficient(self.p_ratio(step), self.config.lam0, self.config.lam_end)

    def eps(self, step: int) -> float:
        c, s = self.config, self.steps_per_epoch
        if not c.eps_train:
            return 0.0
        start, length = c.eps_ramp_start * s, c.eps_ramp_epochs * s
        if c.eps_ramp == "smoothed":
            return smoothed_ramp(step, start, length, c.eps_train, c.eps_ramp_mid, c.eps_ramp_beta)
        if c.eps_ramp == "linear":
            return linear_ramp(step, start, length, c.eps_train)
        raise ValueError(f"unknown eps_ramp {c.eps_ramp!r}; choose from ('smoothed', 'linear')")

    def lr(self, step: int) -> float:
        c = self.config
        if c.lr_schedule == "cosine":
            return cosine_lr(step, self.total_steps, c.lr, c.lr_cosine_start * self.steps_per_epoch)
        if c.lr_schedule == "step":
            return step_lr(self.epoch_of(step), c.lr, c.lr_milestones, c.lr_gamma)
        if c.lr_schedule == "constant":
            return c.lr
        raise ValueError(f"unknown lr_schedule {c.lr_schedule!r}; choose from ('cosine', 'step', 'constant')")

    def natural_weight(self, step: int) -> float:
        c, s = self.config, self.steps_per_epoch
        r = ramp_ratio(step, c.eps_ramp_start * s, c.eps_ramp_epochs * s)
        return c.natural_weight_start + (c.natural_weight_end - c.natural_weight_start) * r

    def at(self, step: int, eps_override: Optional[float] = None) -> ScheduleState:
        """The :class:`ScheduleState` of global step ``step``."""
        eps = self.eps(step) if eps_override is None else eps_override
        return ScheduleState(step=step, epoch=self.epoch_of(step), p=self.p(step), lam=self.lam(step), eps=eps,
                             lr=self.lr(step), natural_weight=self.natural_weight(step),
                             crown_factor=crown_ibp_factor(eps, self.config.eps_train or 0.0))
