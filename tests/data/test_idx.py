"""The IDX reader on small generated files: both encodings, every kind of damage, and the MNIST loader on top."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from linf_plugin.data import IDXFormatError, load_dataset, read_idx

from .idx_files import IDX_NAMES, idx_bytes, write_idx_set


@pytest.mark.parametrize("type_code, dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16),
                                              (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)])
@pytest.mark.parametrize("compress", [False, True])
def test_reads_every_type_raw_and_gzip(tmp_path, type_code, dtype, compress):
    rng = np.random.default_rng(type_code)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    payload = idx_bytes(arr, type_code)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable  # torch.from_numpy needs it


def test_gzip_is_detected_by_content_not_name(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "looks-raw").write_bytes(gzip.compress(idx_bytes(arr)))
    (tmp_path / "looks.gz").write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(tmp_path / "looks-raw"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "looks.gz"), arr)


def test_checks_shape_ndim_and_dtype(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 27), np.uint8)))
    assert read_idx(path, ndim=3, shape=(None, 28, 27)).shape == (2, 28, 27)
    with pytest.raises(IDXFormatError, match=r"x: holds an array of shape \(2, 28, 27\), expected \(n, 28, 28\)"):
        read_idx(path, shape=(None, 28, 28))
    with pytest.raises(IDXFormatError, match="3-dimensional array, expected 1 dimensions"):
        read_idx(path, ndim=1)
    with pytest.raises(IDXFormatError, match="holds uint8 values, expected int32"):
        read_idx(path, dtype=np.int32)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_and_overlong_files_name_the_file(tmp_path, compress):
    payload = idx_bytes(np.ones((5, 28, 28), np.uint8))
    cases = {"cut": payload[:-100], "header": payload[:9], "tiny": payload[:2], "long": payload + b"\x00"}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(IDXFormatError, match=r"cut: truncated: 3836 bytes .* \(3936 bytes expected\)"):
        read_idx(tmp_path / "cut")
    with pytest.raises(IDXFormatError, match=r"header: truncated inside its header \(9 of 16 bytes\)"):
        read_idx(tmp_path / "header")
    with pytest.raises(IDXFormatError, match="tiny: 2 bytes, too short"):
        read_idx(tmp_path / "tiny")
    with pytest.raises(IDXFormatError, match="long: longer than its header says"):
        read_idx(tmp_path / "long")


def test_cut_or_corrupt_gzip_stream(tmp_path):
    gz = gzip.compress(idx_bytes(np.arange(4000, dtype=np.int32)))
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(IDXFormatError, match="cut.gz: the gzip stream ends early"):
        read_idx(tmp_path / "cut.gz")
    bad = bytearray(gz)
    bad[20:40] = bytes(20)  # inside the deflate data
    (tmp_path / "bad.gz").write_bytes(bytes(bad))
    with pytest.raises(IDXFormatError, match="bad.gz: (corrupt gzip data|the gzip stream ends early)"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize("head", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00", b"PK\x03\x04"])
def test_wrong_magic_number(tmp_path, head):
    (tmp_path / "m").write_bytes(head + bytes(64))
    with pytest.raises(IDXFormatError, match=f"m: not an IDX file \\(magic number {head.hex()}"):
        read_idx(tmp_path / "m")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_gz_and_raw(tmp_path, compress):
    files = write_idx_set(tmp_path / "MNIST" / "raw", 12, 7, compress=compress)
    tr = load_dataset("mnist", "train", root=str(tmp_path))
    te = load_dataset("mnist", "test", root=str(tmp_path))
    assert tr.x.shape == (12, 1, 28, 28) and te.x.shape == (7, 1, 28, 28)
    assert torch.equal(tr.x[:, 0] * 255, torch.from_numpy(files["train"][0]).float())
    assert te.y.tolist() == files["test"][1].tolist() and te.y.dtype == torch.int64


def test_loader_rejects_wrong_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx_set(raw, 6, 5)
    img, lab = IDX_NAMES["test"]
    # labels out of range
    (raw / lab).write_bytes(idx_bytes(np.array([0, 1, 2, 10, 3], np.uint8)))
    with pytest.raises(IDXFormatError, match=f"{lab}: label 10 out of range \\[0, 10\\)"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path))
    # as many labels as images
    (raw / lab).write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(IDXFormatError, match="holds 5 images but .* 4 labels"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path))
    # labels where the images belong: wrong number of dimensions
    (raw / img).write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(IDXFormatError, match=f"{img}: holds a 1-dimensional array, expected 3"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path))
    # images of another size
    (raw / img).write_bytes(idx_bytes(np.zeros((4, 32, 32), np.uint8)))
    with pytest.raises(IDXFormatError, match=r"shape \(4, 32, 32\), expected \(n, 28, 28\)"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path))
