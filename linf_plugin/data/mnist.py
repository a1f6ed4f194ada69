"""MNIST and Fashion-MNIST: 28×28 grayscale images in IDX files from a local folder.

Both data sets ship as the same four IDX files (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``), gzip-compressed (``.gz``) or not; both forms
are read by :func:`linf_plugin.data.idx.read_idx`.  The folders searched are
described in :mod:`linf_plugin.data.files`: torchvision's ``MNIST/raw`` and
``FashionMNIST/raw`` under ``root`` or ``$LINF_DATA_ROOT``, and for
Fashion-MNIST also the folder of Debian's ``dataset-fashion-mnist`` package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .base import DatasetInfo, DatasetSplit
from .files import DATA_ROOT_ENV, candidate_folders, find_files
from .idx import IDXFormatError, read_idx

__all__ = ["MNIST", "FASHION_MNIST", "FASHION_MNIST_SYSTEM_DIR", "IDX_FILES", "load_mnist", "load_fashion_mnist"]

MNIST = DatasetInfo(name="mnist", input_shape=(1, 28, 28), num_classes=10, mean=(0.1307,), std=0.3081,
                    sizes={"train": 60000, "test": 10000})

# Mean and ONE std over every pixel of the 60,000 training images, scaled to [0, 1]
# (numpy, float64: x.mean() = 0.28604, x.std() = 0.35302, population std); the tests
# recompute both from the real files when they are installed.  (The ℓ∞-dist authors'
# code uses 0.2860 and 0.3520.)
FASHION_MNIST = DatasetInfo(name="fashion-mnist", input_shape=(1, 28, 28), num_classes=10, mean=(0.2860,),
                            std=0.3530, sizes={"train": 60000, "test": 10000})

#: Where Debian's ``dataset-fashion-mnist`` package installs the four ``.gz`` files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL = IDX_FILES["train"] + IDX_FILES["test"]
_SUFFIXES = ("", ".gz")

_GET_MNIST = (f"Put the four MNIST IDX files (.gz or unpacked) in <root>/MNIST/raw/ and pass root=... "
              f"(--data-root) or set {DATA_ROOT_ENV}=<root>; torchvision.datasets.MNIST(root, download=True) "
              "run once on a machine with internet writes that layout.")
_GET_FASHION = ("Install it with `make data` (Debian: `sudo apt-get install dataset-fashion-mnist`, which puts "
                f"the files in {FASHION_MNIST_SYSTEM_DIR}), or put the four IDX files (.gz or unpacked) in "
                f"<root>/FashionMNIST/raw/ and pass root=... (--data-root) or set {DATA_ROOT_ENV}=<root>.")


def _read_split(dataset: str, paths: dict, split: str, info: DatasetInfo) -> DatasetSplit:
    img_name, lab_name = IDX_FILES[split]
    images = read_idx(paths[img_name], ndim=3, shape=(None,) + tuple(info.input_shape[1:]), dtype=np.uint8)
    labels = read_idx(paths[lab_name], ndim=1, dtype=np.uint8)
    if labels.shape[0] != images.shape[0]:
        raise IDXFormatError(f"{dataset} {split}: {paths[img_name]} holds {images.shape[0]} images but "
                             f"{paths[lab_name]} {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= info.num_classes:
        raise IDXFormatError(f"{paths[lab_name]}: label {int(labels.max())} out of range [0, {info.num_classes}) "
                             "(is it a labels file of this data set?)")
    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return DatasetSplit(x, y, name=info.name, split=split, num_classes=info.num_classes, data_range=info.data_range,
                        mean=info.mean, std=info.std)


def _check_split(split: str, name: str) -> None:
    if split not in IDX_FILES:
        raise ValueError(f"unknown split {split!r} for {name}; choose from 'train', 'test'")


def load_mnist(split: str = "train", root: Optional[str] = None) -> DatasetSplit:
    """MNIST from ``<root>/MNIST/raw/`` (else ``$LINF_DATA_ROOT/MNIST/raw/``).

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: the data root (torchvision's layout).

    Returns:
        A :class:`DatasetSplit`: ``x`` ``(n, 1, 28, 28)`` float32 in [0, 1], ``y`` ``(n,)`` int64.

    Raises:
        DataNotFoundError: no folder holds the files (the folders searched are named).
        IDXFormatError: a truncated, corrupt or wrong file (named in the message).
        ValueError: an unknown split.
    """
    _check_split(split, "mnist")
    paths = find_files("mnist", IDX_FILES[split], _ALL, candidate_folders("MNIST/raw", root), _GET_MNIST, _SUFFIXES)
    return _read_split("mnist", paths, split, MNIST)


def load_fashion_mnist(split: str = "train", root: Optional[str] = None) -> DatasetSplit:
    """Fashion-MNIST (Xiao et al. 2017): ten classes of clothing, 28×28 grayscale.

    Searched in ``<root>/FashionMNIST/raw/``, ``$LINF_DATA_ROOT/FashionMNIST/raw/``,
    then :data:`FASHION_MNIST_SYSTEM_DIR` (``make data`` installs it there).

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: the data root (torchvision's layout).

    Returns:
        A :class:`DatasetSplit`: ``x`` ``(n, 1, 28, 28)`` float32 in [0, 1], ``y`` ``(n,)`` int64,
        normalisation :data:`FASHION_MNIST`'s.

    Raises:
        DataNotFoundError: no folder holds the files (every folder searched and the install command are named).
        IDXFormatError: a truncated, corrupt or wrong file (named in the message).
        ValueError: an unknown split.
    """
    _check_split(split, "fashion-mnist")
    cands = candidate_folders("FashionMNIST/raw", root, system=FASHION_MNIST_SYSTEM_DIR)
    paths = find_files("fashion-mnist", IDX_FILES[split], _ALL, cands, _GET_FASHION, _SUFFIXES)
    return _read_split("fashion-mnist", paths, split, FASHION_MNIST)
