"""The in-memory data set type every loader returns, with its validation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DatasetSplit", "DatasetInfo"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a named data set (no data is loaded).

    Attributes:
        name: registry name (``digits``, ``fashion-mnist``, ``mnist``, ``cifar10``).
        input_shape: shape of one input, e.g. ``(1, 8, 8)``.
        num_classes: number of labels.
        mean: per-channel mean used for input normalisation.
        std: ONE scalar std for all channels; l_inf-dist nets need a scalar so
            that normalisation scales every coordinate alike (Lipschitz
            constant 1/std in pixel units).
        data_range: the valid pixel range; certification boxes are clipped
            to it.
        sizes: number of samples per split.
    """

    name: str
    input_shape: tuple
    num_classes: int
    mean: tuple
    std: float
    data_range: tuple = (0.0, 1.0)
    sizes: dict = field(default_factory=dict)


@dataclass
class DatasetSplit:
    """One split of a data set, held as tensors.

    Attributes:
        x: float tensor ``(n, *input_shape)``, values inside ``data_range``.
        y: int64 tensor ``(n,)`` with labels in ``[0, num_classes)``.
        name, split: where it came from (``"digits"``, ``"train"``).
        num_classes: number of labels the models must output.
        data_range: ``(low, high)``; may be infinite (synthetic sets).
        mean, std: suggested input normalisation (per-channel mean, scalar std).
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str = "custom"
    split: str = "all"
    num_classes: int = 0
    data_range: tuple = (0.0, 1.0)
    mean: tuple = (0.0,)
    std: float = 1.0

    def __post_init__(self):
        self.x, self.y = _check_xy(self.x, self.y, self.num_classes, self.data_range)
        if self.num_classes == 0:
            self.num_classes = int(self.y.max().item()) + 1
        if not (isinstance(self.std, (int, float)) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"std must be one positive finite scalar, got {self.std!r}")

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device=None, dtype=None) -> "DatasetSplit":
        """A copy with ``x`` (and ``y``) moved; ``dtype`` applies to ``x`` only."""
        return replace(self, x=self.x.to(device=device, dtype=dtype), y=self.y.to(device=device))

    def subset(self, index) -> "DatasetSplit":
        """The samples at ``index`` (an int ``n`` means the first ``n``)."""
        if isinstance(index, int):
            index = slice(0, index)
        return replace(self, x=self.x[index], y=self.y[index])

    def tensors(self) -> tuple:
        return self.x, self.y

    def loader(self, batch_size: int = 256, shuffle: bool = False, drop_last: bool = False,
               generator: Optional[torch.Generator] = None, **kw) -> DataLoader:
        """A ``DataLoader`` over ``(x, y)`` pairs."""
        return DataLoader(TensorDataset(self.x, self.y), batch_size=batch_size, shuffle=shuffle,
                          drop_last=drop_last, generator=generator, **kw)


def _check_xy(x, y, num_classes: int, data_range: Sequence[float]):
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (n, *input_shape), got {tuple(x.shape)}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"y must be an integer label tensor, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, got {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("the data set is empty")
    if torch.isnan(x).any():
        raise ValueError("x contains NaN")
    y = y.long()
    if y.min() < 0 or (num_classes and y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes or 'num_classes'}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    lo, hi = data_range
    if x.min() < lo or x.max() > hi:
        raise ValueError(f"x values [{float(x.min()):.4g}, {float(x.max()):.4g}] leave the data range [{lo}, {hi}]")
    return x, y
