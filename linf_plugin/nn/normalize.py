"""Input normalisation that lives inside the model, so ε is always in pixel units."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InputNormalize"]


def _as_floats(name: str, value) -> tuple:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().flatten().tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {value!r}") from None
    if not out:
        raise ValueError(f"{name} is empty")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _view_shape(values: tuple, input_shape: Optional[tuple], name: str) -> tuple:
    """Broadcast shape ``(1, C or 1, 1, ...)`` for a per-channel statistic (channel = dim 0 of one input).

    The statistic keeps the full rank of a batch (e.g. ``(1, 3, 1, 1)`` for
    images) even when it is one number: auto_LiRPA's convolution ("patches")
    mode only bounds a product or quotient by a constant of full rank.
    """
    if input_shape is None:
        if len(values) > 1:
            raise ValueError(f"a per-channel {name} of length {len(values)} needs input_shape")
        return ()
    if len(values) not in (1, input_shape[0]):
        raise ValueError(f"{name} has {len(values)} entries but inputs of shape {tuple(input_shape)} have "
                         f"{input_shape[0]} channels (dim 0)")
    return (1, len(values)) + (1,) * (len(input_shape) - 1)


class InputNormalize(nn.Module):
    """``(x - mean) / std`` with a per-channel mean and (for ℓ∞ nets) ONE scalar std.

    A scalar std scales every coordinate alike, so an ℓ∞ ball of radius ε in
    pixel units becomes a ball of radius ε/std: the map is exactly
    (1/std)-Lipschitz in ℓ∞.  A per-channel std would make the constant
    1/min(std) and distort the ball into a box, which the ℓ∞-dist nets refuse.

    Args:
        mean: a number or one value per channel (dim 0 of an input; for
            vector inputs ``(d,)`` one value per coordinate).
        std: a positive number, or one per channel when ``scalar_std=False``.
        input_shape: shape of one input; needed for per-channel statistics.
        scalar_std: refuse a per-channel std (``ValueError``).  A sequence
            whose entries are all equal counts as a scalar.
        as_conv: compute ``x * (1/std) + (−mean/std)`` as a 1×1 convolution
            (image inputs only).  auto_LiRPA cannot bound a subtraction /
            division by a constant that sits before a strided or padded
            convolution in its "patches" mode, but it bounds a 1×1
            convolution; the ReLU CNNs use this form.  Differs from the
            default form by rounding only.

    Shapes:
        input ``(B, *input_shape)``; output the same.
    """

    def __init__(self, mean=0.0, std=1.0, input_shape: Optional[Sequence[int]] = None, *, scalar_std: bool = True,
                 as_conv: bool = False):
        super().__init__()
        input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        mean_t = _as_floats("mean", mean)
        std_t = _as_floats("std", std)
        if any(s <= 0 for s in std_t):
            raise ValueError(f"std must be positive, got {std_t}")
        if len(set(std_t)) == 1:
            std_t = std_t[:1]
        if scalar_std and len(std_t) > 1:
            raise ValueError(f"ℓ∞-dist nets need ONE scalar std for all channels (the ℓ∞ Lipschitz constant is "
                             f"then 1/std and ε stays a ball); got the per-channel std {std_t}. Pass a single "
                             f"number, e.g. linf_plugin.data.dataset_info(name).std")
        self.input_shape = input_shape
        self.mean_values = mean_t if len(set(mean_t)) > 1 else mean_t[:1]
        self.std_values = std_t
        self.register_buffer("mean", torch.tensor(self.mean_values).reshape(_view_shape(self.mean_values,
                                                                                         input_shape, "mean")))
        self.register_buffer("std", torch.tensor(self.std_values).reshape(_view_shape(self.std_values,
                                                                                       input_shape, "std")))
        self.as_conv = bool(as_conv)
        if self.as_conv:
            if input_shape is None or len(input_shape) != 3:
                raise ValueError(f"as_conv needs image inputs (C, H, W), got input_shape {input_shape}")
            c = input_shape[0]
            mean_c = torch.tensor(self.mean_values).expand(c) if len(self.mean_values) == 1 else torch.tensor(
                self.mean_values)
            std_c = torch.tensor(self.std_values).expand(c) if len(self.std_values) == 1 else torch.tensor(
                self.std_values)
            self.register_buffer("conv_weight", torch.diag(1.0 / std_c).reshape(c, c, 1, 1))
            self.register_buffer("conv_bias", -mean_c / std_c)

    @property
    def scalar_std(self) -> Optional[float]:
        """The std as one float, or None when it is per channel."""
        return self.std_values[0] if len(self.std_values) == 1 else None

    @property
    def lipschitz_linf(self) -> float:
        """ℓ∞ → ℓ∞ Lipschitz constant of this map: ``1 / min(std)``.

        Read from the ``std`` buffer the forward pass really divides by (e.g.
        0.3081 rounded to float32), not from the requested value: the two
        differ by up to 6e-8 relative, and a certificate must use the former.
        """
        if self.as_conv:
            return float(self.conv_weight.abs().amax())
        return 1.0 / float(self.std.min())

    @property
    def is_identity(self) -> bool:
        return all(m == 0.0 for m in self.mean_values) and all(s == 1.0 for s in self.std_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.as_conv:
            return F.conv2d(x, self.conv_weight, self.conv_bias)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = self.mean_values[0] if len(self.mean_values) == 1 else list(self.mean_values)
        std = self.std_values[0] if len(self.std_values) == 1 else list(self.std_values)
        return f"mean={mean}, std={std}" + (", as_conv=True" if self.as_conv else "")
