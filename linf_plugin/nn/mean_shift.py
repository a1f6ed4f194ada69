"""Mean-shift batch normalisation: batch norm that only subtracts a mean.

ℓ∞-dist nets cannot use ordinary batch norm: dividing by a batch std would
rescale the layer and break its 1-Lipschitz property.  Subtracting a mean is
harmless in eval mode, where it is a constant shift.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MeanShiftNorm"]


class MeanShiftNorm(nn.Module):
    """``y = x - mean``, with the batch mean in training and a running mean in eval.

    Training mode subtracts the mean of the current batch (over dim 0) and
    updates ``running_mean`` with an exponential moving average
    (``running = (1 - momentum) * running + momentum * batch_mean``), as
    ordinary batch norm does.  Eval mode subtracts the constant buffer
    ``running_mean``, so the map is a translation and every Lipschitz
    constant of the net is kept; bound propagation sees a plain subtraction
    of a constant.

    Args:
        num_features: ``N``, the size of the last dim of the input.
        momentum: EMA factor in ``(0, 1]``.

    Shapes:
        input ``(B, N)``; output ``(B, N)``.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, *, device=None, dtype=None):
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1], got {momentum!r}")
        self.num_features = num_features
        self.momentum = float(momentum)
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.dim() != 2 or x.shape[1] != self.num_features):
            raise ValueError(f"MeanShiftNorm({self.num_features}) expects input of shape (B, {self.num_features}), "
                             f"got {tuple(x.shape)}")
        if self.training:
            mean = x.mean(dim=0)
            with torch.no_grad():
                self.running_mean.mul_(1.0 - self.momentum).add_(mean.detach().to(self.running_mean.dtype),
                                                                 alpha=self.momentum)
            return x - mean
        return x - self.running_mean

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"
