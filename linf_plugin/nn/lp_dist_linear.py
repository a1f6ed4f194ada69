"""The ℓp-distance layer ``LpDistLinear`` and ``set_p`` for the ℓp-relaxation schedule."""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import nn

from ..ops import BACKENDS, lp_dist
from ..ops.checks import check_p
from .mean_shift import MeanShiftNorm

__all__ = ["LpDistLinear", "set_p", "get_p", "lp_dist_layers", "DEFAULT_IDENTITY_VALUE"]

# The authors' command lines use identity_val=10.0 for every published net.
DEFAULT_IDENTITY_VALUE = 10.0


class LpDistLinear(nn.Module):
    """A layer of ℓp-distance neurons: ``y[b, n] = ||x[b] - weight[n]||_p (- mean) (+ bias[n])``.

    The distance goes through :func:`linf_plugin.ops.lp_dist` (one
    ``custom::LpDist`` node for auto_LiRPA); the mean shift and the bias are
    plain torch ops, in that order, as in the authors' code.  At p = inf the
    layer is 1-Lipschitz from ℓ∞ to ℓ∞ in eval mode (the mean shift is then a
    constant translation).

    Args:
        in_features: ``D``.
        out_features: ``N``.
        p: the norm, a float in ``[1, inf]``; change it later with ``layer.p = ...``
            or :func:`set_p`.
        bias: add a learnable bias (zero init).  The paper uses it on the
            output layer only.
        mean_shift: subtract a batch / running mean (:class:`MeanShiftNorm`).
            The paper uses it on hidden layers only.
        identity_init: when ``in_features <= out_features``, set
            ``weight[i, i mod in_features] = -identity_value`` after the
            Gaussian init (the paper's identity-map init: neuron i then
            computes ``x[i mod D] + identity_value`` on a bounded domain).
        identity_value: the constant of the identity init (10 in the
            authors' runs).
        weight_std: std of the Gaussian weight init (1 in the authors' code).
        backend: ``lp_dist`` backend (``None``, ``"auto"``, ``"torch"``,
            ``"cupy"``, ``"reference"``), passed through on every call.
        momentum: the mean shift's EMA factor.

    Shapes:
        input ``(B, in_features)``; output ``(B, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, p: float = math.inf, bias: bool = True,
                 mean_shift: bool = False, identity_init: bool = True, *,
                 identity_value: float = DEFAULT_IDENTITY_VALUE, weight_std: float = 1.0,
                 backend: Optional[str] = None, momentum: float = 0.1, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown lp_dist backend {backend!r}; choose from {BACKENDS}")
        if not (math.isfinite(weight_std) and weight_std > 0):
            raise ValueError(f"weight_std must be positive and finite, got {weight_std!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.p = p
        self.backend = backend
        self.identity_init = bool(identity_init)
        self.identity_value = float(identity_value)
        self.weight_std = float(weight_std)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.mean_shift = MeanShiftNorm(out_features, momentum, **factory) if mean_shift else None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value) -> None:
        self._p = check_p(value)

    def reset_parameters(self) -> None:
        """Gaussian weights (std ``weight_std``), identity init if asked, zero bias, zero running mean."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.weight_std)
            if self.identity_init and self.in_features <= self.out_features:
                rows = torch.arange(self.out_features, device=self.weight.device)
                self.weight[rows, rows % self.in_features] = -self.identity_value
            if self.bias is not None:
                self.bias.zero_()
        if self.mean_shift is not None:
            self.mean_shift.reset_running_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.dim() != 2 or x.shape[1] != self.in_features):
            raise ValueError(f"LpDistLinear({self.in_features}, {self.out_features}) expects input of shape "
                             f"(B, {self.in_features}), got {tuple(x.shape)}")
        y = lp_dist(x, self.weight, self._p, backend=self.backend)
        if self.mean_shift is not None:
            y = self.mean_shift(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, p={self._p:g}, "
             f"bias={self.bias is not None}")
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


def lp_dist_layers(model: nn.Module) -> Iterator[LpDistLinear]:
    """Every :class:`LpDistLinear` inside ``model`` (including ``model`` itself), in module order."""
    return (m for m in model.modules() if isinstance(m, LpDistLinear))


def set_p(model: nn.Module, p: float) -> nn.Module:
    """Set ``p`` on every :class:`LpDistLinear` of ``model`` (the ℓp-relaxation schedule's one call).

    Args:
        model: any module.
        p: a float in ``[1, inf]``.

    Returns:
        ``model`` (for chaining).
    """
    p = check_p(p)
    for layer in lp_dist_layers(model):
        layer.p = p
    return model


def get_p(model: nn.Module) -> Optional[float]:
    """The common ``p`` of every :class:`LpDistLinear` in ``model``.

    Returns:
        The float p when all layers agree; ``None`` when the model has no
        such layer.

    Raises:
        ValueError: the layers disagree (name and p of each are listed).
    """
    ps = {name: m.p for name, m in model.named_modules() if isinstance(m, LpDistLinear)}
    if not ps:
        return None
    values = set(ps.values())
    if len(values) > 1:
        raise ValueError(f"the ℓp-dist layers use different p: {ps}")
    return values.pop()
