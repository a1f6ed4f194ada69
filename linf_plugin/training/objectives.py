"""One training objective per family: a module whose forward returns the loss and batch statistics.

The objective is what DDP wraps, so it holds every trained parameter (the
model's, and the mixture loss's temperature) and its forward is one whole
step's computation.  ``forward(x, y, state)`` returns ``(loss, stats)``:
``loss`` the batch mean to back-propagate, ``stats`` a detached float
tensor of batch SUMS in the order of :data:`STAT_NAMES` (so ranks can
all-reduce it and epochs can accumulate it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .bounds import HybridBounds, LirpaBounds
from .losses import MixtureLoss, bound_loss, logit_margins, theta_in_logits
from .schedules import ScheduleState

__all__ = ["STAT_NAMES", "LinfDistObjective", "HybridObjective", "LirpaObjective", "make_objective",
           "summarize_stats"]

# n: samples; loss: summed batch-mean losses × n; correct: clean hits; bounded: samples whose
# margin bounds were computed; certified: of those, certified at the current training ε (for the
# ℓ∞-dist family: logit margin > 2·eps/std, a proxy while p < ∞ or in train mode); part_a / part_b:
# the two loss terms (ℓ∞-dist: ce, hinge; bound-based: natural_ce, robust_ce) × n.
STAT_NAMES = ("n", "loss", "correct", "bounded", "certified", "part_a", "part_b")
PART_NAMES = {"linf_dist": ("ce", "hinge"), "hybrid": ("natural_ce", "robust_ce"),
              "relu": ("natural_ce", "robust_ce")}


def _stats(loss, n, correct, bounded, certified, a, b, device) -> torch.Tensor:
    vals = [float(n), loss.detach() * n, correct, bounded, certified, a * n, b * n]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in vals])


def summarize_stats(stats: torch.Tensor, family: str) -> dict:
    """Turn summed stats (:data:`STAT_NAMES` order) into means: loss, accuracy, certified fraction, parts."""
    s = stats.detach().double().cpu().tolist()
    n, bounded = s[0], s[3]
    a, b = PART_NAMES[family]
    return {"loss": s[1] / n if n else math.nan, "acc": s[2] / n if n else math.nan,
            "cert": s[4] / bounded if bounded else None, a: s[5] / n if n else math.nan,
            b: s[6] / n if n else math.nan}


class LinfDistObjective(nn.Module):
    """Mixture loss of an ℓ∞-dist net (Zhang et al. 2022, eq. 9).

    Args:
        model: a ``LinfDistNet``.
        theta: hinge threshold in PIXEL units (θ = 2·ε_train); divided by the
            model's input std here to get logit units.
        eps: the evaluation ε, for the training-time certified proxy.
    """

    family = "linf_dist"

    def __init__(self, model: nn.Module, theta: float, eps: float):
        super().__init__()
        std = getattr(getattr(model, "normalize", None), "scalar_std", None)
        if std is None:
            raise ValueError("an ℓ∞-dist net needs ONE scalar input std to express θ in logit units")
        self.model = model
        self.loss = MixtureLoss()
        self.theta_logits = theta_in_logits(theta, std)
        self.cert_margin = 2.0 * eps / std

    def forward(self, x: torch.Tensor, y: torch.Tensor, state: ScheduleState):
        logits = self.model(x)
        loss, parts = self.loss(logits, y, state.lam, self.theta_logits)
        with torch.no_grad():
            m = logit_margins(logits, y)
            stats = _stats(loss, y.shape[0], (m > 0).sum(), y.shape[0], (m > self.cert_margin).sum(),
                           parts["ce"], parts["hinge"], x.device)
        return loss, stats

    def extra_param_groups(self) -> list:
        """The temperature, trained at ``scale_lr_factor`` times the lr."""
        return [("scale", [self.loss.scale])]


class _BoundObjective(nn.Module):
    def _finish(self, logits, y, lb, state):
        loss, parts = bound_loss(logits, y, lb, state.natural_weight)
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == y).sum()
            if lb is None:
                bounded, cert = 0, 0
            else:
                bounded, cert = y.shape[0], (lb > 0).all(dim=1).sum()
            stats = _stats(loss, y.shape[0], correct, bounded, cert, parts["natural_ce"], parts["robust_ce"],
                           logits.device)
        return loss, stats

    def extra_param_groups(self) -> list:
        return []


class HybridObjective(_BoundObjective):
    """Robust + natural cross-entropy on the interval margin bounds of an ℓ∞-dist + MLP hybrid.

    Args:
        model: a ``LinfDistHybrid``.
        feature_bounds: ``lipschitz`` | ``interval`` (see :mod:`linf_plugin.training.bounds`).
        data_range: pixel range of the data.
    """

    family = "hybrid"

    def __init__(self, model: nn.Module, feature_bounds: str = "lipschitz", data_range=(0.0, 1.0)):
        super().__init__()
        self.model = model
        self.bounds = HybridBounds(model, feature_bounds, data_range)

    def forward(self, x: torch.Tensor, y: torch.Tensor, state: ScheduleState):
        logits, lb = self.bounds(x, y, state.eps)
        return self._finish(logits, y, lb, state)


class LirpaObjective(_BoundObjective):
    """IBP / CROWN-IBP certified training of a ReLU baseline through auto_LiRPA.

    Args:
        model: a registry ReLU net.
        example_input: ``(b, *input_shape)`` on the training device (to trace the graph).
        bound: ``ibp`` | ``crown-ibp``.
        data_range: pixel range of the data.
    """

    family = "relu"

    def __init__(self, model: nn.Module, example_input: torch.Tensor, bound: str = "ibp", data_range=(0.0, 1.0)):
        super().__init__()
        self.bounds = LirpaBounds(model, example_input, data_range)
        self.bound = bound
        # The model itself is not a submodule: its parameters are the BoundedModule's, and DDP
        # must see each parameter once.
        object.__setattr__(self, "model", model)

    def forward(self, x: torch.Tensor, y: torch.Tensor, state: ScheduleState):
        logits, lb = self.bounds(x, y, state.eps, self.bound, state.crown_factor)
        return self._finish(logits, y, lb, state)

    def sync_model(self) -> None:
        """Write the BoundedModule's batch-norm statistics back into the model (before eval / saving)."""
        self.bounds.sync_buffers_to(self.model)


def make_objective(config, model: nn.Module, data_range, example_input: torch.Tensor) -> nn.Module:
    """The objective of ``config.family`` for ``model``."""
    if config.family == "linf_dist":
        return LinfDistObjective(model, config.theta, config.eps)
    if config.family == "hybrid":
        return HybridObjective(model, config.feature_bounds, data_range)
    if config.family == "relu":
        return LirpaObjective(model, example_input, config.bound, data_range)
    raise ValueError(f"unknown family {config.family!r}")
