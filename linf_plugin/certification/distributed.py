"""Certification sharded over ``torchrun`` ranks, saved chunk by chunk, resumable, robust to signals and OOM.

:func:`run_chunks` is the engine; :func:`certify_sharded` runs
:func:`~linf_plugin.certification.certify` through it, and ``certify``
calls it by itself under ``torchrun`` or with ``chunk_dir``.

Chunks.  The points are cut into chunks of one batch each: chunk ``i``
holds points ``[i b, (i + 1) b)``, exactly the ``i``-th batch of a
one-process ``certify`` with the same ``batch_size`` (after the memory cap
of bound propagation).  Each point is therefore computed in the same batch
whatever the number of ranks, and the results are bit for bit those of one
process, also for methods whose numbers could depend on the batch
(alpha-CROWN optimises the whole batch's bounds at once).

Ranks.  The unfinished chunks are dealt round-robin; each round every
rank certifies one chunk, then one collective (gloo) brings the round's
results to rank 0, which saves them (:class:`~.chunks.ChunkStore`) and
moves the one progress bar.  A rank that raises makes every rank stop with
its message; a rank that dies or hangs is named (see
:mod:`linf_plugin.distributed`).  At the end every rank holds the whole
result, so code after ``certify`` runs the same on every rank; rank 0
writes the files.

Faults.  SIGTERM (a scheduler) and SIGINT (Ctrl-C) raise
:class:`Interrupted` after the finished chunks are saved; a batch that
runs out of memory is retried at half the batch size (sticky for the rest
of the rank's chunks) and recorded in the chunk's ``oom_retries``.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import distributed as pg
from .chunks import ChunkStore, describe_job

__all__ = ["run_chunks", "ChunkRun", "certify_sharded", "Interrupted", "stop_on_signals", "wants_shards",
           "is_out_of_memory", "effective_batch_size", "agree", "RankRaised", "shared_certifier",
           "reusing_certifiers"]

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a job.

    Attributes:
        signum: the signal.
        saved, total: chunks saved (in all sessions) and chunks of the job, when known.
        folder: the job's folder, when it has one.
    """

    def __init__(self, signum: int, saved: Optional[int] = None, total: Optional[int] = None, folder=None):
        self.signum, self.saved, self.total, self.folder = signum, saved, total, folder
        super().__init__(self.describe())

    def describe(self) -> str:
        name = signal.Signals(self.signum).name
        if self.folder is None:
            return f"stopped by {name}"
        return (f"stopped by {name}: {self.saved} of {self.total} chunks are saved in {self.folder}; "
                "run the same command again with resume to finish the rest")

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.signum)


class RankRaised(pg.RankFailure):
    """Another rank raised an exception in its chunk (every rank is alive and stops at the same step)."""


_held = {"depth": 0, "signum": None}  # a signal that arrived while a chunk was being saved


@contextlib.contextmanager
def stop_on_signals():
    """Inside the block SIGTERM and SIGINT raise :class:`Interrupted` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _held["depth"]:
            _held["signum"] = signum
            return
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _saving():
    """A chunk's file and its log line are written together: a signal meanwhile is raised right after."""
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if not _held["depth"] and _held["signum"] is not None:
            signum, _held["signum"] = _held["signum"], None
            raise Interrupted(signum)


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's failure."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(exc, oom):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


@dataclass
class ChunkRun:
    """What :func:`run_chunks` returns (the same on every rank).

    Attributes:
        values: per-point tensors, all chunks concatenated in point order.
        metas: one dict per chunk, in order (``rank``, ``time``, ``batch_size``, ``oom_retries``, ``session``
            and whatever ``compute`` returned).
        world_size: ranks in this call.
        rank_times: seconds each rank spent computing chunks in this call.
        wall_time: seconds of this call.
        resumed: chunks loaded from the store instead of computed.
    """

    values: Dict[str, torch.Tensor]
    metas: List[dict]
    world_size: int = 1
    rank_times: List[float] = field(default_factory=list)
    wall_time: float = 0.0
    resumed: int = 0

    @property
    def oom_retries(self) -> List[dict]:
        return [r for m in self.metas for r in m.get("oom_retries", [])]

    def summary(self) -> dict:
        """JSON-able facts about the run (for a result's ``extra``)."""
        return {"world_size": self.world_size, "chunks": len(self.metas), "resumed_chunks": self.resumed,
                "rank_time": [round(t, 6) for t in self.rank_times], "wall_time": self.wall_time,
                "compute_time": float(sum(m.get("time", 0.0) for m in self.metas)),
                "oom_retries": self.oom_retries}


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _compute(compute, i, start, stop, batch_size, me) -> Tuple[dict, dict, int]:
    """Chunk ``i`` at ``batch_size``, halving it after each out-of-memory error; returns the size that worked."""
    retries = []
    while True:
        t0 = time.perf_counter()
        try:
            values, meta = compute(start, stop, batch_size)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
            if batch_size <= 1:
                raise RuntimeError(f"out of memory on points [{start}, {stop}) even one point at a time: "
                                   f"{str(exc).splitlines()[0][:200]}") from exc
            retries.append({"batch_size": batch_size, "retry_batch_size": max(1, batch_size // 2),
                            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            log.warning("rank %d: out of memory on points [%d, %d) at batch size %d; retrying at %d", me, start,
                        stop, batch_size, max(1, batch_size // 2))
            del exc
            _free_memory()
            batch_size = max(1, batch_size // 2)
            continue
        for k, v in values.items():
            if not torch.is_tensor(v) or v.shape[:1] != (stop - start,):
                raise ValueError(f"compute returned {k!r} of shape {getattr(v, 'shape', None)} for "
                                 f"{stop - start} points")
        meta = {**meta, "chunk": i, "rank": me, "time": time.perf_counter() - t0, "batch_size": batch_size,
                "oom_retries": retries}
        return {k: v.detach().cpu() for k, v in values.items()}, meta, batch_size


def run_chunks(compute: Callable[[int, int, int], Tuple[Dict[str, torch.Tensor], dict]], n: int,
               chunk_points: int, *, store: Optional[ChunkStore] = None, progress: bool = False, desc: str = "",
               what: str = "certification") -> ChunkRun:
    """Compute per-point results for ``n`` points in chunks, shared out over the ranks, saved as they finish.

    Every rank of the group must call this with the same arguments (the
    store only matters on rank 0, which alone reads and writes it).

    Args:
        compute: ``compute(start, stop, batch_size) -> (values, meta)``:
            per-point tensors of ``stop - start`` rows and a JSON-able dict,
            for points ``[start, stop)`` in batches of ``batch_size``
            (``chunk_points`` unless out-of-memory errors halved it).
        n: number of points.
        chunk_points: points per chunk (also the first batch size).
        store: where finished chunks are saved and found again (rank 0), or None.
        progress: one tqdm bar on rank 0 for the whole job (points, points/s, ETA).
        desc: the bar's label.
        what: the job's name in error messages.

    Returns:
        :class:`ChunkRun`.

    Raises:
        Interrupted: SIGTERM or SIGINT (the finished chunks are saved).
        linf_plugin.distributed.RankFailure: another rank raised, died or hung.
        ResumeError: the store holds another job (see :class:`ChunkStore`).
    """
    if n < 1 or chunk_points < 1:
        raise ValueError(f"run_chunks needs n >= 1 and chunk_points >= 1, got {n} and {chunk_points}")
    job = _Job(compute, n, chunk_points, store, what)
    with stop_on_signals():
        try:
            job.open()
            if progress and job.me == 0:
                from tqdm.auto import tqdm

                job.bar = tqdm(total=n, initial=sum(job.size(i) for i in job.saved), unit="pt", desc=desc or what,
                               dynamic_ncols=True, leave=False, smoothing=0.1)
            for k in range(job.rounds):
                job.round(k)
        except (Interrupted, pg.RankFailure) as exc:
            if job.me == 0 and store is not None:
                _note_saved(exc, len(job.saved), job.count, store.folder)
            raise
        finally:
            if job.bar is not None:
                job.bar.close()
        return job.finish()


class _Job:
    """The state of one :func:`run_chunks` call on one rank."""

    def __init__(self, compute, n, chunk_points, store, what):
        self.compute, self.n, self.chunk_points, self.store, self.what = compute, n, chunk_points, store, what
        self.world, self.me = pg.world_size(), pg.rank()
        self.count = math.ceil(n / chunk_points)
        self.t_start = time.perf_counter()
        self.own: Dict[int, Tuple[dict, dict]] = {}  # rank 0: the chunks computed in this call
        self.saved: set = set()
        self.busy, self.bar, self.batch_size = 0.0, None, chunk_points
        self.mine: List[int] = []
        self.rounds = 0

    def bounds(self, i: int) -> Tuple[int, int]:
        return i * self.chunk_points, min(self.n, (i + 1) * self.chunk_points)

    def size(self, i: int) -> int:
        start, stop = self.bounds(i)
        return stop - start

    def open(self) -> None:
        """Rank 0 reads the store (or refuses it); every rank learns what is left and takes its share."""
        opened, error = None, None
        if self.me == 0:
            try:
                opened = ("ok", sorted(self.store.open()) if self.store is not None else [])
            except Exception as exc:  # noqa: BLE001 - every rank stops with it below
                if self.world == 1:
                    raise
                error, opened = exc, ("error", f"{type(exc).__name__}: {exc}")
        if self.world > 1:
            opened = pg.broadcast_object(opened, what=f"{self.what}: opening the job")
            if opened[0] == "error":
                if error is not None:
                    raise error
                raise pg.RankFailure(f"{self.what}: rank 0 cannot open the job: {opened[1]}", ranks=[0])
        self.saved = set(opened[1])
        todo = [i for i in range(self.count) if i not in self.saved]
        self.mine = todo[self.me::self.world]
        self.rounds = math.ceil(len(todo) / self.world)

    def _keep(self, i: int, values: dict, meta: dict) -> None:
        """Rank 0: save a finished chunk at once and count it."""
        with _saving():
            if self.store is not None:
                meta = {**meta, "session": self.store.session}
                self.store.save(i, values, meta)
            self.own[i] = (values, meta)
            self.saved.add(i)
        if self.bar is not None:
            self.bar.update(self.size(i))

    def round(self, k: int) -> None:
        """Certify this rank's k-th chunk; bring the round's chunks to rank 0 (which saves them)."""
        msg, error = None, None
        if k < len(self.mine):
            i = self.mine[k]
            start, stop = self.bounds(i)
            t0 = time.perf_counter()
            try:
                values, meta, self.batch_size = _compute(self.compute, i, start, stop, self.batch_size, self.me)
                msg = ("ok", i, values, meta)
            except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
                if self.world == 1:
                    raise
                error, msg = exc, ("error", i, f"{type(exc).__name__}: {str(exc).strip()[:500]}")
            self.busy += time.perf_counter() - t0
            if self.me == 0 and msg[0] == "ok":  # before waiting for the others: a stop meanwhile keeps it
                self._keep(i, values, meta)
        if self.world == 1:
            return
        msgs = pg.gather_objects(None if self.me == 0 and msg and msg[0] == "ok" else msg,
                                 what=f"{self.what}: round {k + 1} of {self.rounds}")
        failed = [(r, m) for r, m in enumerate(msgs) if m is not None and m[0] == "error"]
        if failed:
            if error is not None:
                raise error
            r, m = failed[0]
            start, stop = self.bounds(m[1])
            raise RankRaised(f"{self.what}: rank {r} failed on points [{start}, {stop}): {m[2]}",
                             ranks=[r for r, _ in failed])
        if self.me == 0:
            for m in msgs[1:]:
                if m is not None:
                    self._keep(m[1], m[2], m[3])

    def finish(self) -> ChunkRun:
        """Every rank gets all chunks' values and metas (rank 0 has them in memory or in the store)."""
        times = pg.gather_objects(self.busy, what=f"{self.what}: collecting times") if self.world > 1 else [self.busy]
        payload = None
        if self.me == 0:
            parts = [self.own[i] if i in self.own else self.store.load(i) for i in range(self.count)]
            values = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
            payload = (values, [p[1] for p in parts], self.count - len(self.own))
        if self.world > 1:
            payload = pg.broadcast_object(payload, what=f"{self.what}: sharing the results")
        values, metas, resumed = payload
        return ChunkRun(values=values, metas=metas, world_size=self.world, rank_times=[float(t) for t in times],
                        wall_time=time.perf_counter() - self.t_start, resumed=resumed)


def _note_saved(exc: BaseException, saved: int, total: int, folder) -> None:
    """Tell the user what survived: on :class:`Interrupted` as attributes, on a rank failure in the message."""
    if isinstance(exc, Interrupted):
        exc.saved, exc.total, exc.folder = saved, total, folder
        exc.args = (exc.describe(),)
    else:
        exc.args = (f"{exc.args[0]}; {saved} of {total} chunks are saved in {folder}: run the same command again "
                    "with resume to finish the rest",)


# ------------------------------------------------------------------------------------------- certify

_certifiers: List[Optional[dict]] = [None]  # inside reusing_certifiers(): {key: BoundPropCertifier}


@contextlib.contextmanager
def reusing_certifiers():
    """Inside the block, :func:`shared_certifier` hands out one certifier per model and setting.

    A job's chunks are separate ``certify`` calls; with this they share one
    traced ``BoundedModule`` (70 ms for the digits CNN, more than certifying
    a point with IBP), as the batches of one ``certify`` call do.  Only for
    a block in which the models do not change.
    """
    previous, _certifiers[0] = _certifiers[0], {}
    try:
        yield
    finally:
        _certifiers[0] = previous


def shared_certifier(model, example, num_classes, **kw):
    """A :class:`~.bound_prop.BoundPropCertifier` for ``model``; inside :func:`reusing_certifiers` the one
    built for the same model, example dtype and device, classes and settings, if any.

    Args:
        model, example, num_classes, kw: as for ``BoundPropCertifier``.
    """
    from .bound_prop import BoundPropCertifier

    cache = _certifiers[0]
    if cache is None:
        return BoundPropCertifier(model, example, num_classes, **kw)
    key = (id(model), example.dtype, example.device, tuple(example.shape[1:]), num_classes,
           tuple(sorted(kw.items())))
    if key not in cache:
        cache[key] = BoundPropCertifier(model, example, num_classes, **kw)
    return cache[key]


def wants_shards(distributed: Optional[bool], device=None) -> bool:
    """Whether ``certify(..., distributed=...)`` shards: True/False as asked, None when launched by torchrun.

    ``None`` (the default) joins the launch's process group if this process
    is one of several started by ``torchrun`` and has none yet.

    Raises:
        ValueError: ``distributed=True`` in a process that is not one of several.
    """
    if distributed is False:
        return False
    dev = torch.device(device) if device is not None else None
    joined = pg.join_group("cuda" if dev is not None and dev.type == "cuda" else "auto")
    if distributed and not joined:
        raise ValueError("certify(..., distributed=True) needs several processes: launch the script with "
                         "torchrun --nproc-per-node N (or join a torch.distributed process group first)")
    return joined


def _rank_device(model, device) -> torch.device:
    p = next(iter(model.parameters()), None)
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    if dev.type == "cuda" and pg.world_size() > 1 and (device is None or dev.index is None):
        local = int(os.environ.get("LOCAL_RANK", pg.rank()))
        dev = torch.device(f"cuda:{local % max(1, torch.cuda.device_count())}")
    return dev


def _merge_extra(extras: List[dict]) -> dict:
    """One ``extra`` for the whole job: values the chunks agree on; the largest of differing numbers (error
    bounds); the first non-empty reason."""
    out: dict = {}
    for e in extras:
        for k, v in e.items():
            if k not in out:
                out[k] = v
            elif out[k] != v:
                if isinstance(v, (int, float)) and isinstance(out[k], (int, float)) and not isinstance(v, bool):
                    out[k] = max(out[k], v)
                elif not out[k]:
                    out[k] = v
    return out


def effective_batch_size(method: str, model: torch.nn.Module, example: torch.Tensor, batch_size: int) -> int:
    """The batch ``certify`` really uses: ``batch_size`` capped by the bound-propagation memory estimate.

    Args:
        method: a certification method.
        model: on ``example``'s device.
        example: one input ``(1, *input_shape)`` in the model's dtype.
        batch_size: the batch asked for.
    """
    from .bound_prop import LIRPA_METHODS, bound_batch_limit

    if method not in LIRPA_METHODS:
        return int(batch_size)
    limit = bound_batch_limit(method, model, example)
    return int(batch_size) if limit is None else max(1, min(int(batch_size), limit))


def _settings(method, eps, data_range, batch_size, float_model, alpha_iterations, rigorous) -> dict:
    """The settings a method's per-point results depend on (only those it reads)."""
    out = {"method": method, "eps": float(eps), "data_range": [float(v) for v in data_range],
           "batch_size": int(batch_size)}
    if method == "margin":
        out["float_model"] = bool(float_model)
    if method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
        out["rigorous"] = bool(rigorous)
    if method == "alpha-crown":
        out["alpha_iterations"] = int(alpha_iterations)
    return out


def agree(job: dict, what: str) -> None:
    """Raise unless every rank describes the same job (a no-op in one process).

    Raises:
        ValueError: naming the first rank that differs from rank 0 and the fields.
    """
    if pg.world_size() > 1:
        _agree(job, what)


def _agree(job: dict, what: str) -> None:
    """Every rank must certify the same model on the same data with the same settings."""
    jobs = pg.gather_objects(job, what=f"{what}: comparing the ranks' jobs")
    for r, other in enumerate(jobs):
        diff = sorted(k for k in set(job) | set(other) if jobs[0].get(k) != other.get(k))
        if diff:
            raise ValueError(f"{what}: rank {r} was given another job than rank 0 (differs in {', '.join(diff)}); "
                             "under torchrun every rank must call certify with the same model, data and settings "
                             "(pass distributed=False to certify each rank's own data alone)")


def certify_sharded(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps, method: str, *, data_range,
                    batch_size: int = 256, device=None, float_model: bool = True, alpha_iterations: int = 20,
                    rigorous: bool = True, progress: bool = False, chunk_dir=None, resume: bool = False):
    """:func:`~linf_plugin.certification.certify` in chunks: over the ranks of the group, saved to ``chunk_dir``.

    ``certify`` calls this itself under ``torchrun`` or with ``chunk_dir``;
    the arguments are ``certify``'s, with the data already checked.

    Args:
        model, eps, method, data_range, batch_size, float_model,
        alpha_iterations, rigorous, progress: as for ``certify``.
        x: ``(n, *input_shape)`` inputs; y: ``(n,)`` labels (the same on every rank).
        device: where this rank runs; default the model's device, and with
            several ranks on CUDA each rank's ``cuda:LOCAL_RANK``.
        chunk_dir: folder for the per-chunk results (written by rank 0), or None.
        resume: continue the job saved in ``chunk_dir``.

    Returns:
        The :class:`~linf_plugin.certification.CertResult` of one process
        (same points, flags and radii), on every rank; ``extra["chunks"]``
        holds the ranks' times and any out-of-memory retries.

    Raises:
        whatever ``certify`` raises; :class:`Interrupted`; ResumeError;
        linf_plugin.distributed.RankFailure.
    """
    from .api import certify
    from .result import CertResult

    what = f"certify {method}"
    dev = _rank_device(model, device)
    p = next(iter(model.parameters()), None)
    home = p.device if p is not None else dev
    if home != dev:
        model.to(dev)
    try:
        dtype = p.dtype if p is not None else torch.float32
        # the cap certify itself applies: the same batches as one process
        b = effective_batch_size(method, model, x[:1].to(dev, dtype), batch_size)
        job = describe_job("certify", model, x, y, dev, **_settings(method, eps, data_range, b, float_model,
                                                                     alpha_iterations, rigorous))
        agree(job, what)
        store = None
        if chunk_dir is not None and pg.rank() == 0:
            store = ChunkStore(chunk_dir, job, x.shape[0], b, resume=resume)

        def compute(start, stop, bsz):
            res = certify(model, (x[start:stop], y[start:stop]), eps, method, data_range=data_range,
                          batch_size=bsz, device=dev, float_model=float_model, alpha_iterations=alpha_iterations,
                          rigorous=rigorous, distributed=False)
            values = {"correct": torch.as_tensor(res.correct), "certified": torch.as_tensor(res.certified)}
            if res.radius is not None:
                values["radius"] = torch.as_tensor(res.radius)
            return values, {"extra": res.extra, "float_rigorous": bool(res.float_rigorous),
                            "model_name": res.model_name}

        with reusing_certifiers():
            run = run_chunks(compute, x.shape[0], b, store=store, progress=progress,
                             desc=f"{method} eps={float(eps):g}", what=what)
    finally:
        if home != dev:
            model.to(home)
    extra = _merge_extra([m["extra"] for m in run.metas])
    extra["chunks"] = run.summary()
    return CertResult(method=method, eps=float(eps), model_name=run.metas[0]["model_name"],
                      correct=run.values["correct"], certified=run.values["certified"],
                      radius=run.values.get("radius"), wall_time=run.wall_time, extra=extra,
                      float_rigorous=all(m["float_rigorous"] for m in run.metas))
