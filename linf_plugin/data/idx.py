"""A small reader for IDX files (the format of MNIST and Fashion-MNIST), gzip-compressed or not.

An IDX file is a 4-byte magic number ``0, 0, type, ndim``, then ``ndim``
big-endian uint32 dimensions, then the values in C order (big-endian for
multi-byte types).  :func:`read_idx` checks every part of that and the
expected shape the caller passes, so a truncated download, a file cut by a
full disk, a file of the wrong kind (labels where images belong) or a
corrupt gzip stream raises :class:`IDXFormatError` naming the file and the
problem, instead of surfacing later as a reshape error or silently wrong data.

Whether a file is gzip-compressed is decided by its first two bytes, not its
name, so ``.gz`` files that were unpacked in place (or the reverse) still read.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["read_idx", "IDXFormatError", "IDX_TYPES"]

#: The IDX type byte -> numpy dtype (big-endian where it matters).
IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """A file that is not a complete, well-formed IDX file of the expected kind; the message names it."""


def _payload(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    if head != _GZIP_MAGIC:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except EOFError:
        raise IDXFormatError(f"{path}: the gzip stream ends early (truncated download or copy); "
                             "get the file again") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise IDXFormatError(f"{path}: corrupt gzip data ({exc}); get the file again") from None


def read_idx(path: Union[str, Path], *, ndim: Optional[int] = None, shape: Optional[Sequence[Optional[int]]] = None,
             dtype: Optional[np.dtype] = None) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a numpy array.

    Args:
        path: the file.
        ndim: the number of dimensions the file must have (None: any).
        shape: the dimensions it must have; ``None`` entries are free (e.g.
            ``(None, 28, 28)`` for any number of 28×28 images).
        dtype: the value type it must hold (e.g. ``np.uint8``; None: any).

    Returns:
        An array of the file's shape and type (native byte order).

    Raises:
        FileNotFoundError: no such file.
        IDXFormatError: bad magic number, unknown type, wrong number of
            dimensions, wrong shape or type, or a file shorter or longer than
            its header says (the message names the file and the problem).
    """
    path = Path(path)
    data = _payload(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: {len(data)} bytes, too short for an IDX header (4-byte magic number)")
    zero, type_code, nd = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or type_code not in IDX_TYPES or nd == 0:
        raise IDXFormatError(f"{path}: not an IDX file (magic number {data[:4].hex()}; IDX files start with "
                             f"00 00, a type byte in {sorted(f'{t:02x}' for t in IDX_TYPES)} and the number of "
                             f"dimensions)")
    if ndim is not None and nd != ndim:
        raise IDXFormatError(f"{path}: holds a {nd}-dimensional array, expected {ndim} dimensions "
                             f"(is it the right file?)")
    header = 4 + 4 * nd
    if len(data) < header:
        raise IDXFormatError(f"{path}: truncated inside its header ({len(data)} of {header} bytes)")
    dims = struct.unpack(f">{nd}I", data[4:header])
    if shape is not None:
        if len(shape) != nd or any(s is not None and s != d for s, d in zip(shape, dims)):
            want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
            raise IDXFormatError(f"{path}: holds an array of shape {tuple(dims)}, expected {want}")
    dt = IDX_TYPES[type_code]
    if dtype is not None and dt.newbyteorder("=") != np.dtype(dtype).newbyteorder("="):
        raise IDXFormatError(f"{path}: holds {dt.name} values, expected {np.dtype(dtype).name}")
    expected = header + int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise IDXFormatError(f"{path}: {what}: {len(data)} bytes for an array of shape {tuple(dims)} "
                             f"({expected} bytes expected); get the file again")
    arr = np.frombuffer(data, dtype=dt, offset=header).reshape(dims)
    return arr.astype(dt.newbyteorder("="), copy=True)
