"""What every model of the registry exposes: family, config, Lipschitz constant, certificates."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from ..names import BOUND_PROPAGATION_METHODS, METHODS, Family, Method

__all__ = ["CertifiableModel", "BOUND_PROPAGATION_METHODS", "check_input"]


def __getattr__(name: str):
    if name == "CERTIFICATES":
        warnings.warn("linf_plugin.models.CERTIFICATES is deprecated and will be removed in the next release; use "
                      "linf_plugin.names.METHODS (or linf_plugin.certification.METHODS)", DeprecationWarning,
                      stacklevel=2)
        return METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_input(x: torch.Tensor, input_shape: tuple, who: str) -> None:
    """Refuse an input whose per-sample shape is not ``input_shape`` (skipped while tracing)."""
    if torch.jit.is_tracing():
        return
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{who} expects inputs of shape (B, {', '.join(map(str, input_shape))}), "
                         f"got {tuple(x.shape)}")


class CertifiableModel(nn.Module):
    """Base class of the registry's models.

    Attributes set by :func:`linf_plugin.models.create_model`:
        model_name, model_config (JSON-able; ``create_model(**model_config)``
        rebuilds the architecture), input_shape, num_classes.

    Properties:
        family: a :class:`~linf_plugin.names.Family` (``"linf_dist"``, ``"hybrid"`` or ``"relu"``).
        lipschitz_linf: ℓ∞ → ℓ∞ Lipschitz constant of the logits in pixel
            units, or None when the model has none right now.
        certificates: the :class:`~linf_plugin.names.Method` s that apply now.
    """

    family: str = ""
    model_name: Optional[str] = None
    model_config: Optional[dict] = None

    def __init__(self, input_shape: tuple, num_classes: int):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)

    @property
    def lipschitz_linf(self) -> Optional[float]:
        return None

    @property
    def certificates(self) -> tuple:
        out = []
        if self.lipschitz_linf is not None:
            out.append(Method.MARGIN)
        if self.family == Family.LINF_DIST:
            out.append(Method.INTERVAL)
        return tuple(out) + BOUND_PROPAGATION_METHODS

    def any_training(self) -> bool:
        """True when this module or any submodule is in training mode."""
        return any(m.training for m in self.modules())

    @staticmethod
    def _flat_dim(input_shape: tuple) -> int:
        return int(math.prod(input_shape))
