"""ℓ∞-dist nets (the paper's MLP) and ℓ∞-dist + MLP hybrids (Zhang et al. 2021), with their registry entries.

Facts followed from the paper and the authors' code: hidden layers have a
mean shift and no bias, the output layer a bias and no mean shift; weights
are Gaussian with identity init (constant 10); logits are the NEGATED output
of the last ℓ∞-dist layer; the learnable temperature of the loss is not part
of the model, so certificates always see unscaled logits.  Inputs are
normalised inside the model by a per-channel mean and ONE scalar std, so ε
is in pixel units and the net is (1/std)-Lipschitz in ℓ∞.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn import DEFAULT_IDENTITY_VALUE, InputNormalize, LpDistLinear, lp_dist_layers
from .base import CertifiableModel, check_input
from .registry import register_model

__all__ = ["LinfDistNet", "LinfDistHybrid", "HEAD_ACTIVATIONS"]

HEAD_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _widths(name: str, hidden: Sequence[int]) -> list:
    out = [int(h) for h in hidden]
    if any(h < 1 for h in out):
        raise ValueError(f"{name} must be positive ints, got {list(hidden)}")
    return out


class LinfDistNet(CertifiableModel):
    """A pure ℓp-dist MLP: ``InputNormalize`` → flatten → ``LpDistLinear`` × depth → (negate).

    Args:
        input_shape: shape of one input, ``(C, H, W)`` or ``(d,)``.
        num_classes: ``K``, the width of the last layer.
        hidden: widths of the hidden layers (depth = ``len(hidden) + 1``).
        mean, std: input normalisation; ``std`` must be ONE scalar.
        p: norm of every layer (``math.inf`` for certification; see ``set_p``).
        mean_shift: mean shift on hidden layers (paper: yes).
        hidden_bias: bias on hidden layers (paper: no; Theorem A.2 nets: yes).
        output_bias: bias on the last layer (paper: yes).
        identity_init, identity_value, weight_std: weight init (see ``LpDistLinear``).
        negate_output: logits = −(last layer) as in the paper (True) or the
            last layer itself (False; the constructive nets of Theorem 3.2 and
            A.2 output ``−min_i ||x − x_i||∞`` directly, which an ℓ∞-dist
            neuron can only produce with this sign).
        backend: ``lp_dist`` backend of every layer.
        momentum: mean-shift EMA factor.

    Shapes:
        input ``(B, *input_shape)``; output ``(B, K)`` logits.
    """

    family = "linf_dist"

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int], *, mean=0.0,
                 std=1.0, p: float = math.inf, mean_shift: bool = True, hidden_bias: bool = False,
                 output_bias: bool = True, identity_init: bool = True,
                 identity_value: float = DEFAULT_IDENTITY_VALUE, weight_std: float = 1.0,
                 negate_output: bool = True, backend: Optional[str] = None, momentum: float = 0.1):
        super().__init__(input_shape, num_classes)
        hidden = _widths("hidden widths", hidden)
        self.normalize = InputNormalize(mean, std, self.input_shape, scalar_std=True)
        dims = [self._flat_dim(self.input_shape), *hidden, self.num_classes]
        common = dict(p=p, identity_init=identity_init, identity_value=identity_value, weight_std=weight_std,
                      backend=backend, momentum=momentum)
        layers = [LpDistLinear(dims[i], dims[i + 1], bias=hidden_bias, mean_shift=mean_shift, **common)
                  for i in range(len(hidden))]
        layers.append(LpDistLinear(dims[-2], dims[-1], bias=output_bias, mean_shift=False, **common))
        self.layers = nn.ModuleList(layers)
        self.negate_output = bool(negate_output)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_shape, type(self).__name__)
        z = self.normalize(x).flatten(1)
        for layer in self.layers:
            z = layer(z)
        return -z if self.negate_output else z

    @property
    def lipschitz_linf(self) -> Optional[float]:
        """``1/std`` when every layer is at p = inf and nothing is in training mode, else None.

        Each ℓ∞-dist layer is 1-Lipschitz in ℓ∞, the eval-mode mean shift and
        the bias are translations, negation keeps norms, and the input
        normalisation is (1/std)-Lipschitz.
        """
        if self.any_training() or not all(math.isinf(m.p) for m in lp_dist_layers(self)):
            return None
        return self.normalize.lipschitz_linf


class LinfDistHybrid(CertifiableModel):
    """ℓ∞-dist feature layers followed by an MLP head (Zhang et al. 2021, "ℓ∞-dist Net+MLP").

    ``InputNormalize`` → flatten → ``LpDistLinear`` × ``len(hidden)`` (mean
    shift, no bias) → ``Linear(width, head_hidden)`` → tanh or ReLU →
    ``Linear(head_hidden, K)``.  The head is not Lipschitz-bounded, so the
    model has no ``lipschitz_linf``; bound propagation certifies it.

    The head's weights start as N(0, 1/fan_in) with zero bias, the
    distribution the authors' code starts from.  (The authors store N(0, 1)
    weights and multiply by 1/sqrt(fan_in) in forward, which under Adam acts
    like a per-layer learning rate of ``lr / sqrt(fan_in)``; ``head_lr_scale``
    gives that factor for a trainer that wants to match it.)

    Args:
        input_shape, num_classes, mean, std, p, mean_shift, identity_init,
        identity_value, weight_std, backend, momentum: as for :class:`LinfDistNet`.
        hidden: widths of the ℓ∞-dist feature layers.
        head_hidden: width of the head's hidden layer (512 in the paper).
        activation: ``"tanh"`` (the authors') or ``"relu"``.
    """

    family = "hybrid"

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int], *,
                 head_hidden: int = 512, activation: str = "tanh", mean=0.0, std=1.0, p: float = math.inf,
                 mean_shift: bool = True, identity_init: bool = True,
                 identity_value: float = DEFAULT_IDENTITY_VALUE, weight_std: float = 1.0,
                 backend: Optional[str] = None, momentum: float = 0.1):
        super().__init__(input_shape, num_classes)
        hidden = _widths("hidden widths", hidden)
        if not hidden:
            raise ValueError("a hybrid needs at least one ℓ∞-dist feature layer")
        if activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"unknown head activation {activation!r}; choose from {sorted(HEAD_ACTIVATIONS)}")
        head_hidden = _widths("head_hidden", [head_hidden])[0]
        self.normalize = InputNormalize(mean, std, self.input_shape, scalar_std=True)
        dims = [self._flat_dim(self.input_shape), *hidden]
        self.features = nn.ModuleList(
            LpDistLinear(dims[i], dims[i + 1], p=p, bias=False, mean_shift=mean_shift, identity_init=identity_init,
                         identity_value=identity_value, weight_std=weight_std, backend=backend, momentum=momentum)
            for i in range(len(hidden)))
        self.head = nn.Sequential(nn.Linear(hidden[-1], head_hidden), HEAD_ACTIVATIONS[activation](),
                                  nn.Linear(head_hidden, self.num_classes))
        self.activation = activation
        with torch.no_grad():
            for lin in (self.head[0], self.head[2]):
                lin.weight.normal_(0.0, 1.0 / math.sqrt(lin.in_features))
                lin.bias.zero_()

    def head_lr_scale(self) -> dict:
        """``{parameter name: 1/sqrt(fan_in)}`` for the head weights (see the class docstring)."""
        return {f"head.{i}.weight": 1.0 / math.sqrt(self.head[i].in_features) for i in (0, 2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_shape, type(self).__name__)
        z = self.normalize(x).flatten(1)
        for layer in self.features:
            z = layer(z)
        return self.head(z)


# ----------------------------------------------------------------------------------------- registry entries
def _mlp(input_shape, num_classes, depth: int, width: int, **kwargs) -> LinfDistNet:
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1 (the number of ℓ∞-dist layers), got {depth}")
    return LinfDistNet(input_shape, num_classes, [int(width)] * (int(depth) - 1), **kwargs)


def _hybrid(input_shape, num_classes, depth: int, width: int, **kwargs) -> LinfDistHybrid:
    return LinfDistHybrid(input_shape, num_classes, [int(width)] * int(depth), **kwargs)


@register_model(family="linf_dist")
def linf_dist_mlp(input_shape, num_classes, depth: int = 5, width: int = 128, **kwargs):
    """ℓ∞-dist MLP with ``depth`` ℓ∞-dist layers (``depth − 1`` hidden of ``width``)."""
    return _mlp(input_shape, num_classes, depth, width, **kwargs)


@register_model(family="linf_dist", input_shape=(1, 28, 28), num_classes=10)
def linf_dist_mlp_5x5120(input_shape, num_classes, **kwargs):
    """The paper's MNIST net: 5 ℓ∞-dist layers, hidden width 5120."""
    return _mlp(input_shape, num_classes, 5, 5120, **kwargs)


@register_model(family="linf_dist", input_shape=(3, 32, 32), num_classes=10)
def linf_dist_mlp_6x5120(input_shape, num_classes, **kwargs):
    """The paper's CIFAR-10 net: 6 ℓ∞-dist layers, hidden width 5120."""
    return _mlp(input_shape, num_classes, 6, 5120, **kwargs)


@register_model(family="linf_dist", input_shape=(1, 8, 8), num_classes=10)
def linf_dist_mlp_5x128(input_shape, num_classes, **kwargs):
    """A digits-sized ℓ∞-dist net: 5 layers, hidden width 128."""
    return _mlp(input_shape, num_classes, 5, 128, **kwargs)


@register_model(family="hybrid")
def linf_dist_hybrid(input_shape, num_classes, depth: int = 4, width: int = 128, head_hidden: int = 128,
                     **kwargs):
    """``depth`` ℓ∞-dist feature layers of ``width``, then Linear → tanh → Linear."""
    return _hybrid(input_shape, num_classes, depth, width, head_hidden=head_hidden, **kwargs)


@register_model(family="hybrid", input_shape=(3, 32, 32), num_classes=10)
def linf_dist_hybrid_5x5120(input_shape, num_classes, **kwargs):
    """ℓ∞-dist Net+MLP (Zhang et al. 2021): 5 ℓ∞-dist layers of 5120, head with 512 tanh units (CIFAR-10)."""
    return _hybrid(input_shape, num_classes, 5, 5120, head_hidden=512, **kwargs)


@register_model(family="hybrid", input_shape=(1, 8, 8), num_classes=10)
def linf_dist_hybrid_4x128(input_shape, num_classes, **kwargs):
    """A digits-sized hybrid: 4 ℓ∞-dist layers of 128, head with 128 tanh units."""
    return _hybrid(input_shape, num_classes, 4, 128, head_hidden=128, **kwargs)
