"""Safe checkpoints: weights + the full config, rebuilt through the registry.

A checkpoint is one ``torch.save`` file holding only tensors and plain
Python containers, so it loads with ``torch.load(weights_only=True)`` (no
code runs at load).  It carries a format tag, the model's ``model_config``
(so :func:`load_checkpoint` rebuilds it with ``create_model``), the weights,
the p of every ℓp-dist layer, optional optimizer / scheduler state, the
epoch, the RNG states (torch CPU and CUDA, numpy's global state, Python's
``random``), an ``extra`` dict (data set, preset, train config) and a
SHA-256 digest of everything else, so a flipped byte is caught instead of
silently loaded.  Writes are atomic (temp file + rename): a crash leaves
the previous file untouched.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..io import atomic_torch_save
from ..nn import LpDistLinear
from .registry import UnknownModelError, create_model, list_models

__all__ = ["save_checkpoint", "load_checkpoint", "Checkpoint", "CheckpointError", "capture_rng_state",
           "restore_rng_state", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "linf_plugin.checkpoint"
CHECKPOINT_VERSION = 1
_PRIMITIVES = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, truncated/corrupt, foreign, unknown model, wrong shapes."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: rebuilt with ``create_model(**config)``, weights and layer p
            restored, moved to ``map_location``, in eval mode.
        config: the model's ``model_config``.
        epoch: as saved (None if not given).
        optimizer_state, scheduler_state: ``state_dict()``s to hand to
            ``optimizer.load_state_dict`` / ``scheduler.load_state_dict``.
        rng_state: for :func:`restore_rng_state` (None if not saved).
        extra: the caller's dict (data set, preset, train config, ...).
        meta: format version, torch / linf_plugin versions, creation time.
    """

    model: nn.Module
    config: dict
    epoch: Optional[int] = None
    optimizer_state: Optional[dict] = None
    scheduler_state: Optional[dict] = None
    rng_state: Optional[dict] = None
    extra: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def restore_rng(self) -> None:
        """Restore the saved RNG states (no-op if none were saved)."""
        if self.rng_state is not None:
            restore_rng_state(self.rng_state)


# ------------------------------------------------------------------------------------------------ RNG states
def capture_rng_state() -> dict:
    """The global RNG states as weights_only-loadable values.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device] (only when CUDA
        is initialised), "numpy": {...}, "python": [...]}``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA only where it was saved and is available)."""
    try:
        if "torch" in state:
            torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
        if "numpy" in state:
            s = state["numpy"]
            np.random.set_state((s["kind"], s["keys"].cpu().numpy().astype(np.uint32), int(s["pos"]),
                                 int(s["has_gauss"]), float(s["cached_gaussian"])))
        if "python" in state:
            s = state["python"]
            random.setstate((int(s["version"]), tuple(int(v) for v in s["internal"]), s["gauss_next"]))
        if state.get("cuda") and torch.cuda.is_available():
            cuda_states = [t.to("cpu", torch.uint8) for t in state["cuda"]]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the saved RNG state is malformed: {e}") from None


# ------------------------------------------------------------------------------------------------ helpers
def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def _check_safe(obj: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` would refuse, naming where they sit."""
    # exact types: a str / int subclass (e.g. torch.__version__) is pickled as its class, which
    # weights_only loading refuses
    if isinstance(obj, torch.Tensor) or type(obj) in _PRIMITIVES:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if type(k) not in _PRIMITIVES:
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str/int keys")
            _check_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_safe(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, numbers, strings, "
                    f"None, lists and dicts (so they load with weights_only=True) — convert it first")


def _digest(obj: Any) -> str:
    """SHA-256 over a payload: tensor bytes, dtypes and shapes, and the repr of everything else."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(f"D{len(o)}".encode())
            for k in sorted(o, key=lambda k: (type(k).__name__, str(k))):
                h.update(f"K{k!r}".encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)}".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"V{o!r}".encode())

    walk(obj)
    return h.hexdigest()


def _layer_p(model: nn.Module) -> dict:
    return {name: float(m.p) for name, m in model.named_modules() if isinstance(m, LpDistLinear)}


def save_checkpoint(model: nn.Module, f, *, optimizer=None, scheduler=None, epoch: Optional[int] = None,
                    extra: Optional[dict] = None, rng_state: bool | dict = True) -> Path:
    """Write a checkpoint atomically; arguments in ``torch.save(obj, f)``'s order.

    Args:
        model: a model built by :func:`create_model` (DDP / DataParallel /
            ``torch.compile`` wrappers are unwrapped).
        f: file to write (str or ``os.PathLike``; its folder is created).
        optimizer, scheduler: saved as their ``state_dict()``.
        epoch: the number of completed epochs (or any int).
        extra: a dict of tensors / numbers / strings / lists / dicts
            (data set, preset, train config, metrics, ...).
        rng_state: True captures the global RNG states now; a dict from
            :func:`capture_rng_state` saves that; False saves none.

    Returns:
        The path written.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (a swapped call
            ``save_checkpoint(path, model)`` is named as such), ``f`` is not a
            path, or ``extra`` holds a value that weights_only loading refuses.
        ValueError: the model was not built by ``create_model`` (no config).
    """
    if isinstance(model, (str, os.PathLike)) and isinstance(f, nn.Module):
        raise TypeError("save_checkpoint(model, f) takes the model first and the file second, as "
                        f"torch.save(obj, f) does; got the path {str(model)!r} first and a "
                        f"{type(f).__name__} second")
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_checkpoint: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(f, (str, os.PathLike)):
        raise TypeError(f"save_checkpoint: f must be a file path (str or os.PathLike), got {type(f).__name__}")
    model = _unwrap(model)
    config = getattr(model, "model_config", None)
    if not config:
        raise ValueError(f"{type(model).__name__} has no model_config; build it with "
                         f"linf_plugin.models.create_model so a checkpoint can rebuild it")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise TypeError(f"epoch must be an int or None, got {epoch!r}")
    extra = dict(extra or {})
    _check_safe(extra, "extra")
    if rng_state is True:
        rng = capture_rng_state()
    elif isinstance(rng_state, dict):
        rng = rng_state
    else:
        rng = None
    body = {
        "model_config": config,
        "state_dict": dict(model.state_dict()),
        "layer_p": _layer_p(model),
        "construction": dict(getattr(model, "construction", None) or {}),
        "epoch": epoch,
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "rng_state": rng,
        "extra": extra,
        "meta": {"torch_version": str(torch.__version__), "linf_plugin_version": _package_version(),
                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    _check_safe(body, "the checkpoint")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "sha256": _digest(body), **body}
    return atomic_torch_save(payload, f)


def _package_version() -> str:
    from .. import __version__

    return __version__


# ------------------------------------------------------------------------------------------------ loading
def _read(path: Path, map_location) -> dict:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a truncated or corrupt checkpoint")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == b"PK\x03\x04"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unpickler error" in ln or "Unsupported" in ln]
        raise CheckpointError(f"{path} is not a linf_plugin checkpoint: it holds objects that "
                              f"torch.load(weights_only=True) refuses to load ({lines[0] if lines else e})") from None
    except Exception as e:  # torch raises many types for a damaged archive
        if is_zip:
            raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes): "
                                  f"{str(e).splitlines()[0]}") from None
        raise CheckpointError(f"{path} is not a linf_plugin checkpoint (not a torch.save archive; "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _check_payload(payload, path: Path) -> None:
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        what = type(payload).__name__
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            what = "a plain state_dict"
        raise CheckpointError(f"{path} is not a linf_plugin checkpoint (it holds {what}, with no "
                              f"'format': {CHECKPOINT_FORMAT!r} tag); save models with save_checkpoint")
    version = payload.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this linf_plugin reads "
                              f"versions <= {CHECKPOINT_VERSION} (upgrade linf_plugin)")
    body = {k: v for k, v in payload.items() if k not in ("format", "version", "sha256")}
    if payload.get("sha256") != _digest(body):
        raise CheckpointError(f"{path} is corrupt: its contents do not match the SHA-256 digest stored at save "
                              f"time")


def _check_state(model: nn.Module, state: dict, path: Path, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path}: the weights do not fit model {name!r} (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise CheckpointError(f"{path}: shape mismatch for {k!r}: the checkpoint has "
                                  f"{tuple(state[k].shape)}, model {name!r} built from its config expects "
                                  f"{tuple(v.shape)}")


def _device_of(map_location):
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    return None


def load_checkpoint(path, map_location="cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` and rebuild its model.

    Args:
        path: the file.
        map_location: passed to ``torch.load``; a device (string or
            ``torch.device``) also receives the model.

    Returns:
        A :class:`Checkpoint` (model in eval mode, with its saved dtype and
        per-layer p).

    Raises:
        CheckpointError: missing file, truncated or corrupt file, not our
            format, unknown model name (the choices are listed), or weights
            that do not fit the rebuilt model (parameter and both shapes named).
    """
    path = Path(os.fspath(path))
    payload = _read(path, map_location)
    _check_payload(payload, path)
    config = payload["model_config"]
    if not isinstance(config, dict) or "name" not in config:
        raise CheckpointError(f"{path} has no usable model_config")
    if isinstance(config.get("kwargs"), dict):  # files written before 0.2 nest the model's keyword arguments
        config = {**{k: v for k, v in config.items() if k != "kwargs"}, **config["kwargs"]}
    name = config["name"]
    try:
        model = create_model(**config)
    except UnknownModelError:
        raise CheckpointError(f"{path} was saved from model {name!r}, which is not registered; registered "
                              f"models: {list_models()} (register it before loading)") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model {name!r} cannot be rebuilt from the saved config: {e}") from None
    state = payload["state_dict"]
    _check_state(model, state, path, name)
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        model = model.to(float_dtypes.pop())
    device = _device_of(map_location)
    if device is not None:
        model = model.to(device)
    model.load_state_dict(state)
    modules = dict(model.named_modules())
    for lname, p in (payload.get("layer_p") or {}).items():
        if isinstance(modules.get(lname), LpDistLinear):
            modules[lname].p = p
    if payload.get("construction"):
        model.construction = dict(payload["construction"])
    model.eval()
    return Checkpoint(model=model, config=config, epoch=payload.get("epoch"),
                      optimizer_state=payload.get("optimizer_state"),
                      scheduler_state=payload.get("scheduler_state"), rng_state=payload.get("rng_state"),
                      extra=payload.get("extra") or {}, meta=payload.get("meta") or {})
