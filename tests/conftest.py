"""Shared fixtures.  GPU tests carry the ``gpu`` marker and skip without CUDA."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import linf_plugin  # noqa: F401  (applies the auto_LiRPA compat layer first)

# The suite works on small tensors, where one intra-op thread is as fast as two
# and immune to OpenMP spin-waits when the machine is busy (max(dim) on a
# 60x4x4 tensor took 16 ms with two threads on a loaded 2-core box, 6 us with
# one).  LINF_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("LINF_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_mnist_idx(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0, compress: bool = False):
    """Write tiny MNIST files in the real IDX format under ``root/MNIST/raw``."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        img_bytes = struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        lab_bytes = struct.pack(">II", 2049, n) + labels.tobytes()
        for name, payload in ((f"{prefix}-images-idx3-ubyte", img_bytes), (f"{prefix}-labels-idx1-ubyte", lab_bytes)):
            if compress:
                (raw / (name + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (raw / name).write_bytes(payload)
        out[prefix] = (images, labels)
    return out


def write_cifar10_pickles(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0):
    """Write tiny CIFAR-10 python pickles under ``root/cifar-10-batches-py``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"{i}.png" for i in range(n)]}, f)
        out[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                     "horse", "ship", "truck"], "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f)
    return out


@pytest.fixture
def mnist_root(tmp_path):
    files = write_mnist_idx(tmp_path)
    return tmp_path, files


@pytest.fixture
def cifar_root(tmp_path):
    files = write_cifar10_pickles(tmp_path)
    return tmp_path, files
