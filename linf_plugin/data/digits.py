"""scikit-learn's 8x8 handwritten digits: the embedded default data set.

1,797 real images (ten classes, 174-183 each) ship inside scikit-learn, so
nothing is downloaded.  Pixels (0..16) are scaled to [0, 1] and shaped
(1, 8, 8).  The split is fixed and stratified: 1,437 train / 360 test
(``train_test_split(test_size=360, stratify=y, random_state=0)``).
The l_inf separation r of the whole set, and of the train split, is
0.21875 (= 3.5/16); of the test split 0.25.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .base import DatasetInfo, DatasetSplit

__all__ = ["DIGITS", "load_digits"]

TRAIN_SIZE, TEST_SIZE = 1437, 360

# Mean and (single, all-pixel) std of the train split, recomputed by the tests.
DIGITS = DatasetInfo(
    name="digits", input_shape=(1, 8, 8), num_classes=10, mean=(0.3054,), std=0.3761,
    data_range=(0.0, 1.0), sizes={"train": TRAIN_SIZE, "test": TEST_SIZE, "all": TRAIN_SIZE + TEST_SIZE},
)


@lru_cache(maxsize=1)
def _arrays():
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=TEST_SIZE, stratify=y, random_state=0)
    return x, y, np.sort(tr), np.sort(te)


def load_digits(split: str = "train") -> DatasetSplit:
    """Load the digits split ``"train"``, ``"test"`` or ``"all"`` as tensors."""
    x, y, tr, te = _arrays()
    index = {"train": tr, "test": te, "all": np.arange(len(y))}.get(split)
    if index is None:
        raise ValueError(f"unknown split {split!r} for digits; choose from 'train', 'test', 'all'")
    return DatasetSplit(torch.from_numpy(x[index].copy()), torch.from_numpy(y[index].copy()),
                        name="digits", split=split, num_classes=10, data_range=DIGITS.data_range,
                        mean=DIGITS.mean, std=DIGITS.std)
