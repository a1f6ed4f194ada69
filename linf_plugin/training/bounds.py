"""Differentiable lower bounds on the margins ``z_y − z_j`` over an ℓ∞ ball, for training.

* Hybrids (ℓ∞-dist features → MLP head), as in Zhang et al. (2021): the
  feature box comes from the ℓ∞-dist part, then interval arithmetic runs
  through the head and the last linear layer is merged with the margin
  specification (exact for a box: ``lb_j = (w_y − w_j)·c − |w_y − w_j|·r``).
  Feature boxes:

  - ``lipschitz`` (the 2021 paper and its code): ``features ± ε/std``.
    At p = ∞ this is sound because every ℓ∞-dist layer is 1-Lipschitz in
    ℓ∞ (the training-mode mean shift is treated as a constant computed from
    the clean batch); at p < ∞ it is the paper's relaxation, not a bound.
  - ``interval``: exact interval propagation through every ℓp-dist layer
    (``linf_plugin.ops.lp_dist_interval``) from the input box clipped to the
    data range; sound at any p, and at p = ∞ never looser than ``lipschitz``
    (it only gains from the clipping of the box and of distances at 0).

* ReLU baselines: auto_LiRPA's ``BoundedModule`` with IBP, or CROWN-IBP
  mixed with IBP by a factor that goes from 1 (CROWN-IBP) to 0 (IBP), as in
  auto_LiRPA's ``examples/vision/simple_training.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..data.box import linf_box
from ..nn import LpDistLinear
from ..ops import lp_dist_interval
from .losses import margin_spec

__all__ = ["HybridBounds", "LirpaBounds", "elided_margin_lower"]

_MONOTONE = (nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Identity, nn.LeakyReLU)


def elided_margin_lower(lower: torch.Tensor, upper: torch.Tensor, linear: nn.Linear, y: torch.Tensor
                        ) -> torch.Tensor:
    """Lower bounds of ``z_y − z_j`` for ``z = linear(h)``, ``h`` in the box ``[lower, upper]``.

    Args:
        lower, upper: ``(B, H)``.
        linear: the last layer, ``H → K``.
        y: ``(B,)`` labels.

    Returns:
        ``(B, K−1)``, exact for the box (the spec is merged into the layer first).
    """
    c = margin_spec(y, linear.out_features, dtype=lower.dtype)  # (B, K-1, K)
    w = torch.matmul(c, linear.weight)  # (B, K-1, H)
    centre = ((upper + lower) / 2).unsqueeze(-1)
    radius = ((upper - lower) / 2).unsqueeze(-1)
    lb = torch.matmul(w, centre).squeeze(-1) - torch.matmul(w.abs(), radius).squeeze(-1)
    if linear.bias is not None:
        lb = lb + torch.matmul(c, linear.bias)
    return lb


class HybridBounds:
    """Clean logits and margin lower bounds of a ``LinfDistHybrid`` (``normalize``, ``features``, ``head``).

    Args:
        model: the hybrid.
        mode: ``lipschitz`` or ``interval`` (see the module docstring).
        data_range: pixel range the input box is clipped to.
    """

    def __init__(self, model: nn.Module, mode: str = "lipschitz", data_range=(0.0, 1.0)):
        for attr in ("normalize", "features", "head"):
            if not hasattr(model, attr):
                raise TypeError(f"hybrid bounds need a model with .normalize, .features and .head "
                                f"(LinfDistHybrid); {type(model).__name__} has no .{attr}")
        std = getattr(model.normalize, "scalar_std", None)
        if std is None:
            raise ValueError("hybrid bounds need ONE scalar input std (the ℓ∞ ball must stay a ball)")
        if mode not in ("lipschitz", "interval"):
            raise ValueError(f"unknown feature bound mode {mode!r}; choose from ['lipschitz', 'interval']")
        layers = list(model.head.children())
        if not layers or not isinstance(layers[-1], nn.Linear):
            raise TypeError("the hybrid head must end with nn.Linear")
        for m in layers[:-1]:
            if not isinstance(m, (nn.Linear,) + _MONOTONE):
                raise TypeError(f"interval bounds through the head support Linear and monotone activations "
                                f"{[c.__name__ for c in _MONOTONE]}, got {type(m).__name__}")
        self.model = model
        self.mode = mode
        self.std = float(std)
        self.data_range = tuple(float(v) for v in data_range)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, eps: float
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns ``(logits (B, K), margin lower bounds (B, K−1) or None when ε = 0)``."""
        model = self.model
        z = model.normalize(x).flatten(1)
        shifts = []
        for layer in model.features:
            z = self._layer(layer, z, shifts)
        logits = model.head(z)
        if eps <= 0:
            return logits, None
        if self.mode == "lipschitz":
            lower, upper = z - eps / self.std, z + eps / self.std
        else:
            lo, hi = linf_box(x, eps, self.data_range, outward=True)
            lower, upper = model.normalize(lo).flatten(1), model.normalize(hi).flatten(1)
            for layer, shift in zip(model.features, shifts):
                lower, upper = lp_dist_interval(lower, upper, layer.weight, layer.p, backend=layer.backend)
                if shift is not None:
                    lower, upper = lower - shift, upper - shift
                if layer.bias is not None:
                    lower, upper = lower + layer.bias, upper + layer.bias
        layers = list(model.head.children())
        for m in layers[:-1]:
            if isinstance(m, nn.Linear):
                centre, radius = (upper + lower) / 2, (upper - lower) / 2
                centre = nn.functional.linear(centre, m.weight, m.bias)
                radius = nn.functional.linear(radius, m.weight.abs())
                lower, upper = centre - radius, centre + radius
            else:
                lower, upper = m(lower), m(upper)
        return logits, elided_margin_lower(lower, upper, layers[-1], y)

    @staticmethod
    def _layer(layer: LpDistLinear, z: torch.Tensor, shifts: list) -> torch.Tensor:
        """Run one ℓp-dist layer and record the constant its mean shift subtracted."""
        if layer.mean_shift is None:
            shifts.append(None)
            return layer(z)
        captured = {}

        def hook(module, inputs, output):
            captured["shift"] = (inputs[0] - output)[0]

        handle = layer.mean_shift.register_forward_hook(hook)
        try:
            out = layer(z)
        finally:
            handle.remove()
        shifts.append(captured["shift"])
        return out


class LirpaBounds(nn.Module):
    """IBP / CROWN-IBP margin bounds of a ReLU baseline through auto_LiRPA's ``BoundedModule``.

    The ``BoundedModule`` shares the model's parameters; its batch-norm
    buffers are its own copies, which :meth:`sync_buffers_to` writes back.

    Args:
        model: a registry model (the clean forward and the bounds use the same weights).
        example_input: ``(b, *input_shape)`` tensor on the training device.
        data_range: pixel range the input box is clipped to.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, data_range=(0.0, 1.0)):
        super().__init__()
        from auto_LiRPA import BoundedModule

        self.bounded = BoundedModule(model, example_input, device=example_input.device)
        self.num_classes = int(model.num_classes)
        self.data_range = tuple(float(v) for v in data_range)

    def forward(self, x: torch.Tensor, y: torch.Tensor, eps: float, bound: str = "ibp",
                crown_factor: float = 0.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns ``(logits, margin lower bounds (B, K−1) or None when ε = 0)``.

        ``bound='crown-ibp'`` mixes ``crown_factor · CROWN-IBP + (1 − crown_factor) · IBP``.
        """
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        if eps <= 0:
            return self.bounded(x), None
        lo, hi = linf_box(x, eps, self.data_range, outward=True)
        bx = BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=lo, x_U=hi))
        logits = self.bounded(bx)
        c = margin_spec(y, self.num_classes, dtype=x.dtype)
        if bound == "ibp" or crown_factor <= 1e-5:
            lb, _ = self.bounded.compute_bounds(C=c, method="IBP")
            return logits, lb
        if bound != "crown-ibp":
            raise ValueError(f"unknown bound {bound!r}; choose from ['ibp', 'crown-ibp']")
        crown_lb, _ = self.bounded.compute_bounds(C=c, method="CROWN-IBP", bound_upper=False)
        ibp_lb = getattr(self.bounded, "ibp_lower", None)
        if ibp_lb is None or ibp_lb.shape != crown_lb.shape:
            ibp_lb, _ = self.bounded.compute_bounds(C=c, method="IBP")
        return logits, crown_factor * crown_lb + (1.0 - crown_factor) * ibp_lb

    @torch.no_grad()
    def load_from(self, model: nn.Module) -> None:
        """Copy ``model``'s parameters and buffers into the ``BoundedModule`` (after a resume loaded them).

        auto_LiRPA 0.3's ``BoundedModule.load_state_dict`` takes the model's
        names; 0.7's is torch's and wants its node names (``/5.param``).  Both
        name their members by the model's names in ``named_parameters`` and
        ``named_buffers``, so the copy goes through those.

        Raises:
            RuntimeError: a parameter of ``model`` that the ``BoundedModule`` lacks, or of another shape.
        """
        params = dict(self.bounded.named_parameters())
        for name, p in model.named_parameters():
            if name not in params or params[name].shape != p.shape:
                raise RuntimeError(f"the BoundedModule has no parameter {name!r} of shape {tuple(p.shape)}; "
                                   f"it has {sorted(params)}")
            params[name].copy_(p)
        buffers = dict(self.bounded.named_buffers())
        for name, b in model.named_buffers():
            if name in buffers and buffers[name].shape == b.shape:  # num_batches_tracked has no node
                buffers[name].copy_(b)

    @torch.no_grad()
    def sync_buffers_to(self, model: nn.Module) -> None:
        """Copy the ``BoundedModule``'s buffers (batch-norm running statistics) into ``model``."""
        own = dict(model.named_buffers())
        for name, buf in self.bounded.named_buffers():
            if name in own and own[name].shape == buf.shape:
                own[name].copy_(buf)
