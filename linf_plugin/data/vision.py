"""MNIST and CIFAR-10 read through torchvision from a local root.

Nothing is ever downloaded: the root must already hold the files torchvision
writes.  The root comes from the ``root`` argument, else the environment
variable ``LINF_DATA_ROOT``.  A missing or incomplete root raises
:class:`DataNotFoundError`, naming the files expected and how to get them.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .base import DatasetInfo, DatasetSplit

__all__ = ["MNIST", "CIFAR10", "DataNotFoundError", "load_mnist", "load_cifar10", "resolve_root",
           "DATA_ROOT_ENV"]

DATA_ROOT_ENV = "LINF_DATA_ROOT"

MNIST = DatasetInfo(name="mnist", input_shape=(1, 28, 28), num_classes=10, mean=(0.1307,), std=0.3081,
                    sizes={"train": 60000, "test": 10000})
# The authors normalise CIFAR-10 by one scalar std for all channels.
CIFAR10 = DatasetInfo(name="cifar10", input_shape=(3, 32, 32), num_classes=10,
                      mean=(0.4914, 0.4822, 0.4465), std=0.2009, sizes={"train": 50000, "test": 10000})

MNIST_FILES = {
    "train": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
    "test": ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
}
CIFAR10_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing from the local root."""


def resolve_root(root: Optional[str]) -> Path:
    root = root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        raise DataNotFoundError(
            f"no data root given: pass root=... (--data-root on the command line) or set {DATA_ROOT_ENV}; "
            "linf_plugin never downloads data")
    return Path(root).expanduser()


def _missing(folder: Path, names) -> list:
    return [str(folder / n) for n in names if not (folder / n).is_file()]


def load_mnist(split: str = "train", root: Optional[str] = None) -> DatasetSplit:
    """MNIST from ``<root>/MNIST/raw/`` (the uncompressed IDX files).

    Raises:
        DataNotFoundError: a file is missing; the message lists all four.
        ValueError: unknown split, or a file that is not a valid IDX file.
    """
    import torchvision

    if split not in MNIST_FILES:
        raise ValueError(f"unknown split {split!r} for mnist; choose from 'train', 'test'")
    root = resolve_root(root)
    raw = root / "MNIST" / "raw"
    missing = _missing(raw, MNIST_FILES[split])
    if missing:
        expected = ", ".join(n for s in MNIST_FILES.values() for n in s)
        raise DataNotFoundError(
            f"MNIST {split} files missing: {missing}. Expected in {raw}: {expected} (uncompressed IDX). "
            "Get them once with torchvision.datasets.MNIST(root, download=True) on a machine with internet, "
            "or gunzip the files from the MNIST distribution into that folder.")
    try:
        ds = torchvision.datasets.MNIST(str(root), train=(split == "train"), download=False)
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        raise ValueError(f"MNIST files in {raw} are corrupt or not IDX files: {exc}") from exc
    data, targets = ds.data, ds.targets
    if data.dim() != 3 or data.shape[1:] != (28, 28) or data.shape[0] != targets.shape[0]:
        raise ValueError(f"MNIST files in {raw} have unexpected shapes: images {tuple(data.shape)}, "
                         f"labels {tuple(targets.shape)}; expected (n, 28, 28) and (n,)")
    x = data.to(torch.float32).div_(255.0).unsqueeze(1)
    return DatasetSplit(x, targets.long(), name="mnist", split=split, num_classes=10,
                        mean=MNIST.mean, std=MNIST.std)


def load_cifar10(split: str = "train", root: Optional[str] = None, verify: bool = False) -> DatasetSplit:
    """CIFAR-10 from ``<root>/cifar-10-batches-py/`` (the python pickles).

    Args:
        verify: also check torchvision's MD5 sums (only the real files pass).

    Raises:
        DataNotFoundError: a batch file is missing; the message lists them.
        ValueError: unknown split, or a batch that is not a CIFAR-10 pickle.
    """
    import torchvision

    if split not in CIFAR10_FILES:
        raise ValueError(f"unknown split {split!r} for cifar10; choose from 'train', 'test'")
    root = resolve_root(root)
    folder = root / "cifar-10-batches-py"
    missing = _missing(folder, CIFAR10_FILES[split] + ["batches.meta"])
    if missing:
        expected = ", ".join(CIFAR10_FILES["train"] + CIFAR10_FILES["test"] + ["batches.meta"])
        raise DataNotFoundError(
            f"CIFAR-10 {split} files missing: {missing}. Expected in {folder}: {expected}. Get them once with "
            "torchvision.datasets.CIFAR10(root, download=True) on a machine with internet, or unpack "
            "cifar-10-python.tar.gz into the root.")

    base = torchvision.datasets.CIFAR10

    class _LocalCIFAR10(base):
        # torchvision checks MD5 sums before loading and only the real files
        # pass; an MD5 of None makes it check existence only, so verification
        # is opt-in (existence was checked above with a better message).
        if not verify:
            train_list = [[name, None] for name, _ in base.train_list]
            test_list = [[name, None] for name, _ in base.test_list]
            meta = {**base.meta, "md5": None}

    try:
        ds = _LocalCIFAR10(str(root), train=(split == "train"), download=False)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"CIFAR-10 files in {folder} are corrupt or not CIFAR-10 pickles: {exc!r}") from exc
    except RuntimeError as exc:
        raise ValueError(f"CIFAR-10 files in {folder} failed verification: {exc}") from exc
    data = np.asarray(ds.data)
    if data.ndim != 4 or data.shape[1:] != (32, 32, 3) or len(ds.targets) != data.shape[0]:
        raise ValueError(f"CIFAR-10 files in {folder} have unexpected shape {data.shape}; expected (n, 32, 32, 3)")
    x = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return DatasetSplit(x, y, name="cifar10", split=split, num_classes=10, mean=CIFAR10.mean, std=CIFAR10.std)
