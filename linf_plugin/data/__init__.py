"""Data sets: digits (embedded default), MNIST and CIFAR-10 (local root), r-separated sets.

Every loader returns a :class:`DatasetSplit`: tensors ``x`` (pixels in
``data_range``, shape ``(n, *input_shape)``) and ``y`` (int64 labels), with
the number of classes, the data range used to clip certification boxes, and
the suggested normalisation (per-channel mean, ONE scalar std).
"""
from __future__ import annotations

from typing import Optional

from .base import DatasetInfo, DatasetSplit
from .box import linf_box
from .digits import DIGITS, load_digits
from .r_separated import linf_separation, three_point_set
from .vision import CIFAR10, DATA_ROOT_ENV, MNIST, DataNotFoundError, load_cifar10, load_mnist

__all__ = ["load_dataset", "list_datasets", "dataset_info", "DatasetSplit", "DatasetInfo",
           "DataNotFoundError", "DATA_ROOT_ENV", "three_point_set", "linf_separation", "linf_box"]

_INFO = {"digits": DIGITS, "mnist": MNIST, "cifar10": CIFAR10}


def list_datasets() -> list:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    """Static facts (shape, classes, normalisation, sizes) without loading data."""
    try:
        return _INFO[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; choose from {list_datasets()}") from None


def load_dataset(name: str, split: str = "train", root: Optional[str] = None, **kwargs) -> DatasetSplit:
    """Load a named data set split as tensors.

    Args:
        name: ``"digits"`` (embedded, the default everywhere), ``"mnist"`` or
            ``"cifar10"``.
        split: ``"train"`` or ``"test"`` (digits also ``"all"``).
        root: local folder for MNIST / CIFAR-10 (else ``$LINF_DATA_ROOT``);
            ignored for digits.  Nothing is downloaded.
        **kwargs: passed to the loader (``verify=True`` checks CIFAR-10 MD5s).

    Returns:
        A :class:`DatasetSplit`.
    """
    dataset_info(name)
    if name == "digits":
        return load_digits(split)
    if name == "mnist":
        return load_mnist(split, root=root)
    return load_cifar10(split, root=root, **kwargs)
