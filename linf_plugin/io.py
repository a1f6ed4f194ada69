"""Atomic file writes: a crash or a kill never leaves a half-written file, and
whatever was saved before stays intact until the new file is complete."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save"]


def _umask() -> int:
    """The process umask.  Linux reports it in /proc; elsewhere ``os.umask`` is the only way to read it,
    and it clears the mask for every thread until it is restored a moment later."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path, write: Callable[[Any], None], binary: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the result should get the mode open() would give it
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX when tmp and path share a file system
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename)."""
    return _atomic_write(path, lambda f: f.write(data), binary=True)


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return _atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_json(path, obj: Any, **kw) -> Path:
    """Serialise ``obj`` as JSON (indent 2, sorted keys unless told) and write it atomically."""
    kw.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **kw) + "\n")


def atomic_torch_save(obj: Any, path) -> Path:
    """``torch.save`` to memory, then write atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())
