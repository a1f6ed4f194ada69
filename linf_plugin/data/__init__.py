"""Data sets: digits (embedded default), Fashion-MNIST, MNIST and CIFAR-10 (local files), r-separated sets.

Every loader returns a :class:`DatasetSplit`: tensors ``x`` (pixels in
``data_range``, shape ``(n, *input_shape)``) and ``y`` (int64 labels), with
the number of classes, the data range used to clip certification boxes, and
the suggested normalisation (per-channel mean, ONE scalar std).
"""
from __future__ import annotations

from typing import Optional

from .base import DatasetInfo, DatasetSplit
from .box import linf_box
from .cifar10 import CIFAR10, load_cifar10
from .digits import DIGITS, load_digits
from .files import DATA_ROOT_ENV, DataNotFoundError
from .idx import IDXFormatError, read_idx
from .mnist import FASHION_MNIST, MNIST, load_fashion_mnist, load_mnist
from .r_separated import linf_separation, three_point_set

__all__ = ["load_dataset", "list_datasets", "dataset_info", "DatasetSplit", "DatasetInfo",
           "DataNotFoundError", "IDXFormatError", "read_idx", "DATA_ROOT_ENV", "three_point_set",
           "linf_separation", "linf_box"]

_INFO = {"digits": DIGITS, "fashion-mnist": FASHION_MNIST, "mnist": MNIST, "cifar10": CIFAR10}


def list_datasets() -> list:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    """Static facts (shape, classes, normalisation, sizes) without loading data."""
    try:
        return _INFO[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; choose from {list_datasets()}") from None


def load_dataset(name: str, split: str = "train", root: Optional[str] = None, *,
                 verify: bool = False) -> DatasetSplit:
    """Load a named data set split as tensors.  Nothing is ever downloaded.

    Args:
        name: ``"digits"`` (embedded, the default everywhere), ``"fashion-mnist"``,
            ``"mnist"`` or ``"cifar10"``.
        split: ``"train"`` or ``"test"`` (digits also ``"all"``).
        root: data root holding torchvision's layout (``FashionMNIST/raw/``,
            ``MNIST/raw/``, ``cifar-10-batches-py/``); else ``$LINF_DATA_ROOT``;
            Fashion-MNIST is also found where Debian's package installs it
            (see :mod:`linf_plugin.data.files`).  Not accepted for digits.
        verify: CIFAR-10 only: also check torchvision's MD5 sums.

    Returns:
        A :class:`DatasetSplit`: ``x`` ``(n, *input_shape)`` float32 in the
        data range, ``y`` ``(n,)`` int64.

    Raises:
        ValueError: an unknown name or split, or an argument the data set does not use.
        DataNotFoundError: the files are in none of the folders searched (all named).
        IDXFormatError: a truncated, corrupt or wrong IDX file.
    """
    dataset_info(name)
    if name == "digits":
        if root is not None:
            raise ValueError("digits is embedded (scikit-learn) and reads no files: drop root= (--data-root), "
                             "or name a data set that is read from files: fashion-mnist, mnist, cifar10")
    if verify and name != "cifar10":
        raise ValueError(f"verify=True checks CIFAR-10's MD5 sums only; {name!r} does not take it")
    if name == "digits":
        return load_digits(split)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root=root)
    if name == "mnist":
        return load_mnist(split, root=root)
    return load_cifar10(split, root=root, verify=verify)
