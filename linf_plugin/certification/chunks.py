"""Per-chunk results of a long certification job: saved atomically as each chunk finishes, resumed after a stop.

A job's folder holds

* ``job.json``: everything that decides the results (the kind of job and
  its settings, the SHA-256 of the model and of the data, the library
  versions, the device type and the chunk layout), written when the job
  starts;
* ``chunk-000012.pt``: the per-point results of chunk 12 (points
  ``[12 c, 13 c)`` for ``c`` points a chunk) and how they were computed
  (rank, seconds, batch size, out-of-memory retries), written atomically
  (:func:`linf_plugin.io.atomic_torch_save`): a file that exists is whole;
* ``log.jsonl``: one line per chunk saved (chunk, rank, session, seconds),
  which tells how often each chunk was computed.

Resuming compares the new job with ``job.json`` and refuses any difference,
naming the fields: a chunk certified for another model, data set, method,
eps or setting must not be mixed into the new results.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Dict, List, Set, Tuple

import torch

from ..io import atomic_torch_save, atomic_write_json

__all__ = ["ChunkStore", "ResumeError", "model_fingerprint", "data_fingerprint", "job_differences",
           "library_versions", "describe_job", "CHUNK_FORMAT"]

CHUNK_FORMAT = 1
JOB_NAME = "job.json"
LOG_NAME = "log.jsonl"


class ResumeError(ValueError):
    """A job folder cannot be resumed (another job's results) or would be overwritten without ``resume``."""


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        # bytes of the values as stored, whatever the device; a view's strides do not matter
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of the model's structure (``repr``: classes, sizes, each layer's p) and of its state's tensors."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 (hex) of the tensors' dtypes, shapes and values."""
    h = hashlib.sha256()
    for t in tensors:
        _hash_tensor(h, t)
    return h.hexdigest()


def library_versions() -> dict:
    """The versions a result depends on: torch, auto_LiRPA, linf_plugin."""
    from .. import __version__
    from ..lirpa.compat import auto_lirpa_version

    return {"torch": torch.__version__, "auto_LiRPA": auto_lirpa_version(), "linf_plugin": __version__}


def describe_job(kind: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 **settings) -> dict:
    """What decides a job's per-point results, as a flat JSON-able dict (see :class:`ChunkStore`).

    Args:
        kind: the computation (``certify``, ``bisect``, ``pgd``, ...).
        model: hashed with :func:`model_fingerprint`; its parameters' dtype is recorded.
        x, y: the points, hashed with :func:`data_fingerprint`.
        device: its type is recorded (CPU and CUDA round differently).
        settings: every other setting the results depend on (JSON values).
    """
    p = next(iter(model.parameters()), None)
    return {"kind": kind, "model": getattr(model, "model_name", type(model).__name__),
            "model_sha256": model_fingerprint(model), "data_sha256": data_fingerprint(x, y),
            "dtype": str(p.dtype) if p is not None else "none", "device_type": torch.device(device).type,
            **settings, **library_versions()}


def _show(v) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "..."  # a hash
    return repr(v)


def job_differences(saved: dict, new: dict) -> List[str]:
    """``["eps (saved 0.1, now 0.2)", ...]``: every field where the two job descriptions differ."""
    out = []
    for k in sorted(set(saved) | set(new)):
        a, b = saved.get(k, "<absent>"), new.get(k, "<absent>")
        if a != b:
            out.append(f"{k} (saved {_show(a)}, now {_show(b)})")
    return out


class ChunkStore:
    """The folder of one job: its description, one file per finished chunk, and a log.

    Only one process (rank 0) writes a store; chunk ``i`` holds points
    ``[i * chunk_points, min(n, (i + 1) * chunk_points))``.

    Args:
        folder: the job's folder (created).
        job: JSON-able dict of everything that decides the results.
        n: number of points.
        chunk_points: points per chunk.
        resume: continue a job found in ``folder`` (it must be the same job);
            without it, a folder that already holds a job is refused.

    Raises:
        ResumeError: ``folder`` holds another job (the differing fields are
            named), or holds a job and ``resume`` is False.
    """

    def __init__(self, folder, job: dict, n: int, chunk_points: int, resume: bool = False):
        if n < 1 or chunk_points < 1:
            raise ValueError(f"a job needs n >= 1 points and chunk_points >= 1, got {n} and {chunk_points}")
        self.folder = Path(folder)
        self.n, self.chunk_points = int(n), int(chunk_points)
        self.count = math.ceil(self.n / self.chunk_points)
        self.job = {**job, "points": self.n, "chunk_points": self.chunk_points, "format": CHUNK_FORMAT}
        self.session = uuid.uuid4().hex[:12]
        self.resume = resume

    def bounds(self, i: int) -> Tuple[int, int]:
        """``(start, stop)`` of chunk ``i``."""
        return i * self.chunk_points, min(self.n, (i + 1) * self.chunk_points)

    def _path(self, i: int) -> Path:
        return self.folder / f"chunk-{i:06d}.pt"

    def open(self) -> Set[int]:
        """Check or write ``job.json``; returns the chunks already finished."""
        job_path = self.folder / JOB_NAME
        if job_path.exists():
            try:
                saved = json.loads(job_path.read_text())
            except (OSError, ValueError) as exc:
                raise ResumeError(f"{job_path} cannot be read ({exc}); remove {self.folder} to start over") from None
            done = self._finished()
            if not self.resume:
                raise ResumeError(f"{self.folder} holds an earlier certification job ({len(done)} of "
                                  f"{self.count} chunks finished): resume it (--resume, "
                                  "resume=True), or remove the folder or choose another to start over")
            diff = job_differences(saved, self.job)
            if diff:
                raise ResumeError(f"cannot resume the job in {self.folder}: it was run with another "
                                  + "; ".join(diff) + ". Rerun with the saved settings, or remove the folder "
                                  "(or choose another) to start over")
            return done
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(job_path, self.job)
        return set()

    def _finished(self) -> Set[int]:
        done = set()
        for i in range(self.count):
            if self._path(i).exists():
                done.add(i)
        return done

    def save(self, i: int, values: Dict[str, torch.Tensor], meta: dict) -> None:
        """Write chunk ``i`` (per-point CPU tensors of ``stop - start`` rows and a JSON-able ``meta``) and log it."""
        start, stop = self.bounds(i)
        for k, v in values.items():
            if v.shape[:1] != (stop - start,):
                raise ValueError(f"chunk {i} value {k!r} has shape {tuple(v.shape)}, expected {stop - start} rows")
        atomic_torch_save({"format": CHUNK_FORMAT, "chunk": i, "start": start, "stop": stop,
                           "values": {k: v.detach().cpu() for k, v in values.items()}, "meta": meta}, self._path(i))
        line = json.dumps({"chunk": i, "rank": meta.get("rank", 0), "session": self.session,
                           "time": meta.get("time"), "points": stop - start}) + "\n"
        with open(self.folder / LOG_NAME, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def load(self, i: int) -> Tuple[Dict[str, torch.Tensor], dict]:
        """``(values, meta)`` of a saved chunk.

        Raises:
            ResumeError: the file is not chunk ``i`` of this layout.
        """
        path = self._path(i)
        payload = torch.load(path, map_location="cpu", weights_only=True)
        start, stop = self.bounds(i)
        if payload.get("chunk") != i or (payload.get("start"), payload.get("stop")) != (start, stop):
            raise ResumeError(f"{path} does not hold points [{start}, {stop}); remove {self.folder} to start over")
        return payload["values"], payload["meta"]

    def log(self) -> List[dict]:
        """The log's records (a line torn by a crash is skipped)."""
        path = self.folder / LOG_NAME
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

