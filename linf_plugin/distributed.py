"""Process groups under ``torchrun``, shared by DDP training and sharded certification.

``torchrun --nproc-per-node N ...`` (or the same with ``--nnodes``,
``--node-rank`` and a rendezvous endpoint across machines) starts N
processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` and the rendezvous variables; :func:`init_distributed`
joins them into one process group and picks each process's device
(``cuda:LOCAL_RANK``, or the CPU).

Faults.  Every collective of a group joined here times out after
``$LINF_DIST_TIMEOUT`` seconds (default 1800): a rank that hangs stops the
others instead of blocking them for ever.  A rank that dies closes its
connections, and gloo fails the collectives of the others at once, but
with the peer's socket address, not its rank.  :func:`gather_objects` and
:func:`broadcast_object` therefore keep a heartbeat per rank in the
rendezvous store and, when a collective fails, name the ranks whose
heartbeat stopped (:class:`RankFailure`).  Under ``torchrun`` on one
machine the launcher also stops the other workers when one dies and
prints the failed rank; across machines the other machines' launchers
only learn of it through these errors.

Object collectives (results, status) run on a gloo group even when the
default group is NCCL: they carry small CPU objects, and gloo detects a
dead peer where NCCL waits for its timeout.
"""
from __future__ import annotations

import atexit
import datetime
import importlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "shutdown_distributed", "resolve_device", "launched",
           "is_initialized", "world_size", "rank", "is_main", "join_group", "gather_objects", "broadcast_object",
           "RankFailure", "collective_timeout", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S"]

TIMEOUT_ENV = "LINF_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
_HEARTBEAT_PERIOD_S = 0.5
_HEARTBEAT_GRACE_S = 3.0  # a rank whose heartbeat does not move for this long is taken for dead


class RankFailure(RuntimeError):
    """A collective failed because another rank died, hung or raised.

    Attributes:
        ranks: the ranks found at fault (empty when none could be named).
    """

    def __init__(self, message: str, ranks=()):
        super().__init__(message)
        self.ranks = tuple(ranks)


@dataclass
class DistContext:
    """Where this process runs.

    Attributes:
        world_size, rank, local_rank: the layout (1, 0, 0 in one process).
        device: this process's device.
        backend: the process-group backend, or None in one process.
        owns_group: this context initialised the process group (and tears it down).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(device: Optional[str], local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` → ``cuda:<local_rank>``.

    Raises:
        RuntimeError: CUDA asked for but not available.
    """
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but CUDA is not available; use device='cpu'")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def collective_timeout() -> datetime.timedelta:
    """The timeout of the collectives of groups joined here: ``$LINF_DIST_TIMEOUT`` seconds, default 1800.

    Raises:
        ValueError: the variable is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def launched() -> bool:
    """True when a launcher (``torchrun``) started this process as one of several (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    """A process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and shows progress."""
    return rank() == 0


def _default_backend(dev: torch.device) -> str:
    """nccl when every local rank has its own GPU; gloo on the CPU or when ranks share a GPU (NCCL refuses that)."""
    if dev.type != "cuda" or not dist.is_nccl_available():
        return "gloo"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return "nccl" if torch.cuda.device_count() >= local_world else "gloo"


def init_distributed(device: str = "auto", backend: Optional[str] = None) -> DistContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); else a one-process context.

    An existing group (the caller's) is used as it is and not torn down by
    :func:`shutdown_distributed`.

    Args:
        device: ``auto`` | ``cpu`` | ``cuda`` (each rank takes ``cuda:LOCAL_RANK``) | ``cuda:N``.
        backend: ``gloo`` | ``nccl`` | ``mpi``; None = nccl when each local
            rank has a GPU of its own, else gloo.

    Returns:
        A :class:`DistContext`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=dev)
    if dev.type == "cuda":
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            # more ranks than GPUs on this machine: they share them (gloo, see _default_backend)
            dev = torch.device(f"cuda:{dev.index % torch.cuda.device_count()}")
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        # torch._dynamo imported while a process group exists (DDP's constructor imports it) keeps
        # that group alive past destroy_process_group (seen with torch 2.14): its gloo threads then
        # run on into interpreter exit, where a rank now and then aborts ("terminate called without
        # an active exception") after its work is done.  Imported before the group, it holds nothing.
        importlib.import_module("torch._dynamo")  # a plain import would make "torch" local to this function

        dist.init_process_group(backend=backend or _default_backend(dev), timeout=collective_timeout())
        owns = True
    return DistContext(world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank, device=dev,
                       backend=dist.get_backend(), owns_group=owns)


def shutdown_distributed(ctx: DistContext) -> None:
    """Destroy the process group if ``ctx`` created it (and stop this process's heartbeat)."""
    if ctx.owns_group and dist.is_initialized():
        _Heartbeat.stop()
        _control.clear()
        dist.destroy_process_group()


def join_group(device: str = "auto") -> bool:
    """Make sure this process is in the group of its launch; True when that group has several ranks.

    Launched by ``torchrun`` without a group yet (a script that calls
    ``certify`` directly), the group is joined here and left at interpreter
    exit.  Not launched, or already in a group: nothing is created.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched():
        return False
    ctx = init_distributed(device)
    atexit.register(shutdown_distributed, ctx)
    return ctx.distributed


# ---------------------------------------------------------------------------------------------- collectives

_control: dict = {}  # {"world": the default group it was made for, "group": the gloo group}


def _control_group():
    """A gloo group over every rank (the default group when that is gloo); made on first use, collectively."""
    world = dist.group.WORLD
    if _control.get("world") is not world:
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo",
                                                                          timeout=collective_timeout())
        _control.update(world=world, group=group)
    return _control["group"]


class _Heartbeat:
    """A counter per rank in the rendezvous store, raised by a daemon thread every half second."""

    _thread: Optional[threading.Thread] = None
    _stop = threading.Event()
    _store = None

    @classmethod
    def store(cls):
        if cls._store is None:
            try:
                base = dist.distributed_c10d._get_default_store()
            except (AttributeError, RuntimeError, ValueError):
                return None
            cls._store = dist.PrefixStore("linf_plugin/heartbeat", base)
        return cls._store

    @classmethod
    def start(cls) -> None:
        if cls._thread is not None and cls._thread.is_alive():
            return
        store = cls.store()
        if store is None:
            return
        me = str(dist.get_rank())
        store.add(me, 1)
        cls._stop = threading.Event()

        def beat(stop=cls._stop):
            while not stop.wait(_HEARTBEAT_PERIOD_S):
                try:
                    store.add(me, 1)
                except Exception:  # the store's host is gone: nothing left to tell
                    return

        cls._thread = threading.Thread(target=beat, name="linf-heartbeat", daemon=True)
        cls._thread.start()

    @classmethod
    def stop(cls) -> None:
        cls._stop.set()
        if cls._thread is not None:
            cls._thread.join(timeout=2 * _HEARTBEAT_PERIOD_S)
        cls._thread, cls._store = None, None

    @classmethod
    def silent_ranks(cls, world: int) -> Optional[List[int]]:
        """Ranks whose counter does not move for the grace period; None when the store cannot be read."""
        store = cls.store()
        if store is None:
            return None
        try:
            before = [store.add(str(r), 0) for r in range(world)]
            time.sleep(_HEARTBEAT_GRACE_S)
            after = [store.add(str(r), 0) for r in range(world)]
        except Exception:
            return None
        return [r for r in range(world) if after[r] == before[r]]


def _failure(what: str, exc: BaseException) -> RankFailure:
    me, world = dist.get_rank(), dist.get_world_size()
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    silent = _Heartbeat.silent_ranks(world)
    if silent is None:
        return RankFailure(f"{what}: a collective failed on rank {me} and the rendezvous store is unreachable "
                           f"(its host, rank 0 or the torchrun agent, is gone): {first}", ranks=())
    silent = [r for r in silent if r != me]
    if silent:
        names = ", ".join(map(str, silent))
        return RankFailure(f"{what}: rank{'s' if len(silent) > 1 else ''} {names} stopped (no heartbeat for "
                           f"{_HEARTBEAT_GRACE_S:g} s: killed, crashed or out of host memory); rank {me} stops "
                           f"too. ({first})", ranks=silent)
    return RankFailure(f"{what}: a collective failed on rank {me} while every rank is alive: {first}. A rank that "
                       f"takes longer than the collective timeout ({collective_timeout().total_seconds():g} s, "
                       f"${TIMEOUT_ENV}) fails the others; raise it for long steps.", ranks=())


def gather_objects(obj: Any, what: str = "gather") -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process.

    Args:
        obj: this rank's contribution.
        what: the step, for error messages.

    Raises:
        RankFailure: another rank died or hung (named when its heartbeat stopped), or the timeout passed.
    """
    if not is_initialized():
        return [obj]
    _Heartbeat.start()
    out = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, obj, group=_control_group())
    except RuntimeError as exc:
        raise _failure(what, exc) from exc
    return out


def broadcast_object(obj: Any, src: int = 0, what: str = "broadcast") -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process); errors as :func:`gather_objects`."""
    if not is_initialized():
        return obj
    _Heartbeat.start()
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=src, group=_control_group())
    except RuntimeError as exc:
        raise _failure(what, exc) from exc
    return box[0]
