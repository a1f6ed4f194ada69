"""Writing small data sets in the real IDX format (raw or gzip), for the readers and the end-to-end runs."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """``array`` as an IDX file: magic ``0 0 type ndim``, big-endian uint32 dims, the values."""
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    head = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + np.ascontiguousarray(array, dtype=dt).tobytes()


def write_idx_set(folder: Path, n_train: int = 20, n_test: int = 10, seed: int = 0, compress: bool = False,
                  learnable: bool = False) -> dict:
    """Four IDX files of 28×28 uint8 images and labels in ``folder``; returns ``{split: (images, labels)}``.

    ``learnable`` draws images whose class shows in which band of rows is bright, so a net can learn them.
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        if learnable:
            images //= 4
            for i, c in enumerate(labels):
                images[i, 2 * c + 4: 2 * c + 7] = 255
        for name, arr in zip(IDX_NAMES[split], (images, labels)):
            payload = idx_bytes(arr)
            if compress:
                (folder / (name + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
        out[split] = (images, labels)
    return out
