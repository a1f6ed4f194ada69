"""Data sets: the embedded digits, MNIST (our IDX reader) / CIFAR-10 (torchvision) from
tiny files in the real formats, r-separated sets, and bad input."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from linf_plugin.data import (DATA_ROOT_ENV, DataNotFoundError, DatasetSplit, IDXFormatError, dataset_info,
                              linf_separation, list_datasets, load_dataset, three_point_set)
from linf_plugin.data.digits import TEST_SIZE, TRAIN_SIZE


def test_digits_split_is_fixed_stratified_and_scaled():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(tr), len(te)) == (TRAIN_SIZE, TEST_SIZE) == (1437, 360)
    assert tr.input_shape == te.input_shape == (1, 8, 8)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert tr.x.min() >= 0 and tr.x.max() <= 1 and tr.x.max() == 1
    # Stratified: every class keeps (almost exactly) its share in the test split.
    counts = torch.bincount(te.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37
    # Disjoint and together the whole set.
    all_ = load_dataset("digits", "all")
    assert len(all_) == 1797
    keys = {tuple(r.tolist()) + (int(l),) for r, l in zip(all_.x.flatten(1), all_.y)}
    tr_keys = {tuple(r.tolist()) + (int(l),) for r, l in zip(tr.x.flatten(1), tr.y)}
    te_keys = {tuple(r.tolist()) + (int(l),) for r, l in zip(te.x.flatten(1), te.y)}
    assert tr_keys | te_keys <= keys
    # Deterministic.
    again = load_dataset("digits", "test")
    assert torch.equal(again.x, te.x) and torch.equal(again.y, te.y)


def test_digits_normalisation_constants_match_the_data():
    tr = load_dataset("digits", "train")
    info = dataset_info("digits")
    assert tr.x.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert tr.x.std(unbiased=False).item() == pytest.approx(info.std, abs=1e-3)


def test_digits_separation_is_documented_value():
    all_ = load_dataset("digits", "all")
    assert linf_separation(all_.x, all_.y) == 0.21875
    assert linf_separation(*load_dataset("digits", "train").tensors()) == 0.21875
    assert linf_separation(*load_dataset("digits", "test").tensors()) == 0.25


def test_mnist_reads_idx_files(mnist_root):
    root, files = mnist_root
    tr = load_dataset("mnist", "train", root=str(root))
    te = load_dataset("mnist", "test", root=str(root))
    images, labels = files["train"]
    assert tr.x.shape == (20, 1, 28, 28) and te.x.shape == (10, 1, 28, 28)
    assert torch.allclose(tr.x[:, 0] * 255, torch.from_numpy(images).float())
    assert tr.y.tolist() == labels.tolist()
    assert tr.std == 0.3081


def test_mnist_root_from_env(mnist_root, monkeypatch):
    root, _ = mnist_root
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    assert len(load_dataset("mnist", "test")) == 10


def test_cifar10_reads_pickles(cifar_root):
    root, files = cifar_root
    tr = load_dataset("cifar10", "train", root=str(root))
    te = load_dataset("cifar10", "test", root=str(root))
    assert tr.x.shape == (20, 3, 32, 32) and te.x.shape == (6, 3, 32, 32)
    data, labels = files["test_batch"]
    expect = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255
    assert torch.allclose(te.x, expect)
    assert te.y.tolist() == labels
    assert tr.std == pytest.approx(0.2009)


def test_cifar10_verify_rejects_non_genuine_files(cifar_root):
    root, _ = cifar_root
    with pytest.raises(ValueError, match="verification"):
        load_dataset("cifar10", "test", root=str(root), verify=True)


def test_missing_root_names_expected_files(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(DataNotFoundError, match=DATA_ROOT_ENV):
        load_dataset("mnist", "train")
    with pytest.raises(DataNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", "test", root=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="data_batch_1.*test_batch"):
        load_dataset("cifar10", "train", root=str(tmp_path))


def test_incomplete_or_corrupt_files(mnist_root, cifar_root):
    root, _ = mnist_root
    (root / "MNIST" / "raw" / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", "train", root=str(root))
    (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    # (not just "corrupt": the test's own tmp folder name contains that word)
    with pytest.raises(IDXFormatError, match=r"t10k-images-idx3-ubyte: truncated inside its header \(11 of 16"):
        load_dataset("mnist", "test", root=str(root))
    croot, _ = cifar_root
    (croot / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="corrupt"):
        load_dataset("cifar10", "test", root=str(croot))
    with open(croot / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ValueError):
        load_dataset("cifar10", "test", root=str(croot))


def test_unknown_names_list_choices():
    assert list_datasets() == ["cifar10", "digits", "fashion-mnist", "mnist"]
    with pytest.raises(ValueError, match=r"choose from \[.cifar10., .digits., .fashion-mnist., .mnist.\]"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="choose from"):
        load_dataset("digits", "validation")


def test_dataset_split_validates_input():
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        DatasetSplit(x, torch.zeros(3, dtype=torch.long), num_classes=10)
    with pytest.raises(TypeError, match="floating"):
        DatasetSplit(torch.zeros(4, 1, 8, 8, dtype=torch.int64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        DatasetSplit(x, torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        DatasetSplit(x, torch.tensor([0, 1, 2, 10]), num_classes=10)
    with pytest.raises(ValueError, match="NaN"):
        DatasetSplit(torch.full((4, 3), math.nan), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="data range"):
        DatasetSplit(x + 2, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        DatasetSplit(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="std"):
        DatasetSplit(x, torch.zeros(4, dtype=torch.long), std=(0.2, 0.3))


def test_dataset_split_helpers():
    te = load_dataset("digits", "test")
    sub = te.subset(10)
    assert len(sub) == 10 and torch.equal(sub.x, te.x[:10])
    xb, yb = next(iter(te.loader(batch_size=32)))
    assert xb.shape == (32, 1, 8, 8) and yb.shape == (32,)
    assert te.to(dtype=torch.float64).x.dtype == torch.float64


@pytest.mark.parametrize("dim", [1, 5])
def test_three_point_set(dim):
    touching = three_point_set(r=0.5, dim=dim)
    assert touching.x.shape == (3, dim) and touching.x.dtype == torch.float64
    assert touching.y.tolist() == [0, 1, 0] and touching.num_classes == 2
    assert touching.x[:, 0].tolist() == [-1.0, 0.0, 1.0]
    assert linf_separation(touching.x, touching.y) == 0.5  # touching: exactly r
    strict = three_point_set(r=0.5, dim=dim, separation=1.25)
    assert linf_separation(strict.x, strict.y) == pytest.approx(0.625)
    assert strict.data_range == (-math.inf, math.inf)
    for bad in (dict(r=0), dict(r=-1), dict(dim=0), dict(separation=0.9), dict(r=math.nan)):
        with pytest.raises(ValueError):
            three_point_set(**bad)


def test_linf_separation_chunked_and_one_label():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 7, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    brute = min(float((x[i] - x[j]).abs().max()) for i in range(50) for j in range(50) if y[i] != y[j]) / 2
    assert linf_separation(x, y, chunk=7) == pytest.approx(brute)
    assert linf_separation(x, torch.zeros(50, dtype=torch.long)) == math.inf
