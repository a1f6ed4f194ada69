"""CIFAR-10 read through torchvision from a local folder (the python pickles).

Nothing is ever downloaded: ``<root>/cifar-10-batches-py/`` must already hold
the files torchvision writes, with ``root`` from the argument, else the
environment variable ``LINF_DATA_ROOT`` (see :mod:`linf_plugin.data.files`).
A missing or incomplete folder raises :class:`DataNotFoundError`, naming the
files expected and how to get them.
"""
from __future__ import annotations

import pickle
from typing import Optional

import numpy as np
import torch

from .base import DatasetInfo, DatasetSplit
from .files import candidate_folders, find_files

__all__ = ["CIFAR10", "load_cifar10"]

# The authors normalise CIFAR-10 by one scalar std for all channels.
CIFAR10 = DatasetInfo(name="cifar10", input_shape=(3, 32, 32), num_classes=10,
                      mean=(0.4914, 0.4822, 0.4465), std=0.2009, sizes={"train": 50000, "test": 10000})

CIFAR10_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
_ALL = CIFAR10_FILES["train"] + CIFAR10_FILES["test"] + ["batches.meta"]
_GET = ("Get them once with torchvision.datasets.CIFAR10(root, download=True) on a machine with internet, or "
        "unpack cifar-10-python.tar.gz into the root; pass root=... (--data-root) or set LINF_DATA_ROOT=<root>.")


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
    paths = find_files("cifar10", CIFAR10_FILES[split] + ["batches.meta"], _ALL,
                       candidate_folders("cifar-10-batches-py", root), _GET)
    folder = paths["batches.meta"].parent
    root = folder.parent

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
