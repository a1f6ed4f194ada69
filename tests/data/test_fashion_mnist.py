"""Fashion-MNIST: where the files are looked for, the errors, and the real files when they are installed."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import linf_plugin.data.mnist as mnist_module
from linf_plugin.data import DATA_ROOT_ENV, DataNotFoundError, dataset_info, list_datasets, load_dataset
from linf_plugin.data.mnist import FASHION_MNIST_SYSTEM_DIR

from .idx_files import IDX_NAMES, write_idx_set

REAL = FASHION_MNIST_SYSTEM_DIR
REAL_FILES = [REAL / (n + ".gz") for names in IDX_NAMES.values() for n in names]
real_files = pytest.mark.skipif(
    not all(p.is_file() for p in REAL_FILES),
    reason=f"the real Fashion-MNIST files are not installed in {REAL} (`make data` installs them)")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    return monkeypatch


def test_registered_with_its_own_normalisation():
    assert "fashion-mnist" in list_datasets()
    info = dataset_info("fashion-mnist")
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert info.sizes == {"train": 60000, "test": 10000}
    assert isinstance(info.std, float) and info.std != dataset_info("mnist").std


def test_lookup_order_root_then_env_then_system(tmp_path, no_env):
    root, env, system = tmp_path / "root", tmp_path / "env", tmp_path / "system"
    write_idx_set(root / "FashionMNIST" / "raw", 11, 3, seed=1)
    write_idx_set(env / "FashionMNIST" / "raw", 12, 4, seed=2, compress=True)
    write_idx_set(system, 13, 5, seed=3, compress=True)
    no_env.setattr(mnist_module, "FASHION_MNIST_SYSTEM_DIR", system)
    no_env.setenv(DATA_ROOT_ENV, str(env))
    assert len(load_dataset("fashion-mnist", "train", root=str(root))) == 11
    assert len(load_dataset("fashion-mnist", "train")) == 12
    no_env.delenv(DATA_ROOT_ENV)
    assert len(load_dataset("fashion-mnist", "test")) == 5
    # a root without the files is passed over (the next folder holds them)
    assert len(load_dataset("fashion-mnist", "test", root=str(tmp_path / "empty"))) == 5


def test_missing_everywhere_names_every_folder_and_the_install_command(tmp_path, no_env):
    no_env.setattr(mnist_module, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    no_env.setenv(DATA_ROOT_ENV, str(tmp_path / "envroot"))
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("fashion-mnist", "train", root=str(tmp_path / "given"))
    msg = str(exc.value)
    for folder in (tmp_path / "given" / "FashionMNIST" / "raw", tmp_path / "envroot" / "FashionMNIST" / "raw",
                   tmp_path / "not-installed"):
        assert str(folder) in msg
    assert msg.index("given") < msg.index("envroot") < msg.index("not-installed")
    assert "make data" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "t10k-images-idx3-ubyte" in msg


def test_a_half_copied_folder_is_an_error_not_skipped(tmp_path, no_env):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx_set(raw, 5, 5)
    (raw / IDX_NAMES["test"][1]).unlink()
    assert len(load_dataset("fashion-mnist", "train", root=str(tmp_path))) == 5
    with pytest.raises(DataNotFoundError, match=r"holds some of its files but not \['t10k-labels-idx1-ubyte'\]"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path))


def test_rejects_what_it_would_ignore(tmp_path):
    with pytest.raises(ValueError, match="digits is embedded.*drop root="):
        load_dataset("digits", "train", root=str(tmp_path))
    with pytest.raises(ValueError, match="verify=True checks CIFAR-10's MD5 sums only"):
        load_dataset("fashion-mnist", "train", verify=True)
    with pytest.raises(TypeError):
        load_dataset("fashion-mnist", "train", str(tmp_path), "extra")
    with pytest.raises(ValueError, match="unknown split 'all' for fashion-mnist"):
        load_dataset("fashion-mnist", "all")


def _independent(name: str) -> np.ndarray:
    """The file read without linf_plugin: gzip + numpy (header 16 bytes for images, 8 for labels)."""
    raw = gzip.open(REAL / (name + ".gz")).read()
    return np.frombuffer(raw, np.uint8, offset=16 if "images" in name else 8)


@real_files
def test_real_files(no_env):
    tr = load_dataset("fashion-mnist", "train")
    te = load_dataset("fashion-mnist", "test")
    assert tr.x.shape == (60000, 1, 28, 28) and te.x.shape == (10000, 1, 28, 28)
    assert tr.x.dtype == torch.float32 and tr.x.min() == 0 and tr.x.max() == 1
    # balanced classes, labels 0..9
    assert torch.bincount(tr.y).tolist() == [6000] * 10 and torch.bincount(te.y).tolist() == [1000] * 10
    for split, data in (("train", tr), ("test", te)):
        images, labels = (_independent(n) for n in IDX_NAMES[split])
        # per-image pixel sums in 0..255 units (x = k / 255 in float32, so the rounding is exact)
        sums = torch.round(data.x.flatten(1).sum(1, dtype=torch.float64) * 255).to(torch.int64)
        # known pixel sums (computed once from the files), checked against an independent reader too
        known = {"train": (76247, 16684, 3431114169), "test": (33456, 24390, 573469082)}[split]
        got = (int(sums[0]), int(sums[-1]), int(sums.sum()))
        ind = images.reshape(-1, 784).astype(np.int64)
        assert got == known == (int(ind[0].sum()), int(ind[-1].sum()), int(ind.sum()))
        assert data.y.tolist() == labels.tolist()
    # the normalisation constants are the training set's
    info = dataset_info("fashion-mnist")
    flat = tr.x.flatten()
    mean = flat.sum(dtype=torch.float64).item() / flat.numel()
    var = (flat * flat).sum(dtype=torch.float64).item() / flat.numel() - mean ** 2
    assert mean == pytest.approx(info.mean[0], abs=5e-5) and var ** 0.5 == pytest.approx(info.std, abs=5e-5)
    assert (tr.mean, tr.std) == (info.mean, info.std)
