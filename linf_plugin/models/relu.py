"""ReLU baselines: the architectures of auto_LiRPA's certified-training examples.

``mlp_3layer``, ``cnn_4layer``, ``cnn_7layer`` and ``cnn_7layer_bn`` as in
auto_LiRPA's ``examples/vision/models/feedforward.py``, with the flatten size
computed from the input shape (so digits 1×8×8, MNIST 1×28×28 and CIFAR
3×32×32 all work; the MLP also takes vectors ``(d,)``), ``num_classes``
logits instead of a fixed 10, and the input normalisation inside the model
(a per-channel std is allowed here; for images it is computed as a 1×1
convolution, a form auto_LiRPA's CROWN can bound in front of strided convs).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn import InputNormalize
from .base import CertifiableModel, check_input
from .registry import register_model

__all__ = ["ReluNet", "mlp_3layer", "cnn_4layer", "cnn_7layer", "cnn_7layer_bn"]


class ReluNet(CertifiableModel):
    """``InputNormalize`` followed by a plain ``nn.Sequential`` body (``self.body``).

    Args:
        input_shape, num_classes: as everywhere.
        body: the layers after normalisation; must map ``(B, *input_shape)``
            to ``(B, num_classes)``.
        mean, std: normalisation (per-channel std allowed).
    """

    family = "relu"

    def __init__(self, input_shape: Sequence[int], num_classes: int, body: nn.Sequential, *, mean=0.0, std=1.0):
        super().__init__(input_shape, num_classes)
        # 1x1-conv form for images: auto_LiRPA's CROWN cannot bound a constant division before a
        # strided / padded convolution in its patches mode, but it bounds a 1x1 convolution
        self.normalize = InputNormalize(mean, std, self.input_shape, scalar_std=False,
                                        as_conv=len(self.input_shape) == 3)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_shape, f"{self.model_name or type(self).__name__}")
        return self.body(self.normalize(x))


def _image_shape(input_shape, name: str) -> tuple:
    if len(input_shape) != 3:
        raise ValueError(f"{name} is a CNN and needs image inputs (C, H, W), got input_shape {tuple(input_shape)}; "
                         f"use mlp_3layer or an ℓ∞-dist net for vectors")
    return tuple(input_shape)


def _flat_size(convs: nn.Sequential, input_shape: tuple) -> int:
    """Number of features after the convolutional part (computed, so any H, W work)."""
    with torch.no_grad():
        was = convs.training
        convs.eval()
        n = convs(torch.zeros(1, *input_shape)).numel()
        convs.train(was)
    return n


@register_model(family="relu")
def mlp_3layer(input_shape, num_classes, width: int = 1, mean=0.0, std=1.0):
    """Flatten → 256w → ReLU → 128w → ReLU → K."""
    d = CertifiableModel._flat_dim(input_shape)
    body = nn.Sequential(nn.Flatten(), nn.Linear(d, 256 * width), nn.ReLU(), nn.Linear(256 * width, 128 * width),
                         nn.ReLU(), nn.Linear(128 * width, num_classes))
    return ReluNet(input_shape, num_classes, body, mean=mean, std=std)


@register_model(family="relu")
def cnn_4layer(input_shape, num_classes, width: int = 2, linear_size: int = 256, mean=0.0, std=1.0):
    """Conv(4w, 4, s2) → Conv(8w, 4, s2) → FC(linear_size) → K, ReLU between."""
    c = _image_shape(input_shape, "cnn_4layer")[0]
    convs = nn.Sequential(nn.Conv2d(c, 4 * width, 4, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(4 * width, 8 * width, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten())
    flat = _flat_size(convs, tuple(input_shape))
    body = nn.Sequential(*convs, nn.Linear(flat, linear_size), nn.ReLU(), nn.Linear(linear_size, num_classes))
    return ReluNet(input_shape, num_classes, body, mean=mean, std=std)


def _cnn_7layer(input_shape, num_classes, width: int, linear_size: int, bn: bool, mean, std, name: str):
    c = _image_shape(input_shape, name)[0]
    spec = [(c, width, 1), (width, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1),
            (2 * width, 2 * width, 1)]
    layers = []
    for cin, cout, stride in spec:
        layers.append(nn.Conv2d(cin, cout, 3, stride=stride, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
    convs = nn.Sequential(*layers, nn.Flatten())
    flat = _flat_size(convs, tuple(input_shape))
    body = nn.Sequential(*convs, nn.Linear(flat, linear_size), nn.ReLU(), nn.Linear(linear_size, num_classes))
    return ReluNet(input_shape, num_classes, body, mean=mean, std=std)


@register_model(family="relu")
def cnn_7layer(input_shape, num_classes, width: int = 64, linear_size: int = 512, mean=0.0, std=1.0):
    """5 × Conv3x3 (w, w, 2w s2, 2w, 2w) → FC(linear_size) → K, ReLU between."""
    return _cnn_7layer(input_shape, num_classes, width, linear_size, False, mean, std, "cnn_7layer")


@register_model(family="relu")
def cnn_7layer_bn(input_shape, num_classes, width: int = 64, linear_size: int = 512, mean=0.0, std=1.0):
    """``cnn_7layer`` with BatchNorm2d after every convolution."""
    return _cnn_7layer(input_shape, num_classes, width, linear_size, True, mean, std, "cnn_7layer_bn")
