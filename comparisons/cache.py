"""A checkpoint cache: train a model once per training configuration, reuse it afterwards.

An entry is keyed by a SHA-256 of everything that decides the weights: the
resolved :class:`~linf_plugin.training.TrainConfig` without its runtime fields
(model name and kwargs, data set, subsets, seed, every optimisation and
schedule field; not the device, progress or logging settings), plus a
format version.  Entries live in ``<cache_dir>/<preset>-<key[:16]>/``:

* the trainer's own files (``checkpoint.pt``, ``config.json``,
  ``log.jsonl``, ``final.json``), written by :func:`linf_plugin.training.train`
  with that folder as ``out_dir``;
* ``entry.json`` (written last, atomically): the key, the config, the
  training wall time.  An entry without it is unfinished: the next call
  resumes training from its ``checkpoint.pt`` (the trainer checks the config).

A hit loads the checkpoint (``models.load_checkpoint``, digest-checked) and
compares its stored training config with the requested one; a corrupt or
foreign entry is retrained, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from linf_plugin.io import atomic_write_json
from linf_plugin.models import CheckpointError, load_checkpoint
from linf_plugin.training import RUNTIME_FIELDS, TrainConfig, sanitize_name, train

__all__ = ["CheckpointCache", "CachedModel", "config_key", "CACHE_FORMAT"]

CACHE_FORMAT = 1
ENTRY_NAME = "entry.json"
CHECKPOINT_NAME = "checkpoint.pt"


def config_key(config: TrainConfig) -> str:
    """SHA-256 (hex) of the config fields that decide the trained weights."""
    d = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}
    blob = json.dumps({"format": CACHE_FORMAT, "config": d}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class CachedModel:
    """A trained model and where it came from.

    Attributes:
        model: eval mode, on the requested device.
        config: the training config (resolved).
        train_time: seconds the training took when it ran (from the entry for a hit).
        cache_hit: True when no training ran in this call.
        path: the checkpoint file.
        key: the cache key.
        history: the trainer's per-epoch records.
        final_metrics: the trainer's last evaluation.
    """

    model: torch.nn.Module
    config: TrainConfig
    train_time: float
    cache_hit: bool
    path: Path
    key: str
    history: list = field(default_factory=list)
    final_metrics: dict = field(default_factory=dict)

    def info(self) -> dict:
        return {"key": self.key, "hit": self.cache_hit, "checkpoint": str(self.path)}


class CheckpointCache:
    """Train-or-reuse for :class:`TrainConfig` s.

    Args:
        root: the cache folder (created on first use).
        enabled: False trains every model afresh and keeps nothing in ``root``:
            checkpoints go under ``scratch`` instead (e.g. the run folder).
        scratch: where to train when the cache is disabled.
    """

    def __init__(self, root="cache", enabled: bool = True, scratch: Optional[Path] = None):
        self.root = Path(root)
        self.enabled = enabled
        self.scratch = Path(scratch) if scratch is not None else None
        if not enabled and scratch is None:
            raise ValueError("a disabled cache needs a scratch folder for the checkpoints")

    def entry_dir(self, config: TrainConfig) -> Path:
        base = self.root if self.enabled else self.scratch / "checkpoints"
        return base / f"{sanitize_name(config.name)}-{config_key(config)[:16]}"

    def lookup(self, config: TrainConfig, device="cpu") -> Optional[CachedModel]:
        """The finished entry for ``config``, or None (missing, unfinished, corrupt or foreign)."""
        if not self.enabled:
            return None
        folder = self.entry_dir(config)
        entry_path = folder / ENTRY_NAME
        if not entry_path.exists():
            return None
        key = config_key(config)
        try:
            entry = json.loads(entry_path.read_text())
            if entry.get("key") != key or entry.get("format") != CACHE_FORMAT:
                return None
            ckpt = load_checkpoint(folder / CHECKPOINT_NAME, map_location=device)
        except (OSError, ValueError, CheckpointError):
            return None
        saved = (ckpt.extra or {}).get("train_config")
        if saved is None or TrainConfig.from_dict(saved).differences(config):
            return None
        return CachedModel(model=ckpt.model.eval(), config=config, train_time=float(entry.get("train_time", 0.0)),
                           cache_hit=True, path=folder / CHECKPOINT_NAME, key=key,
                           history=list((ckpt.extra or {}).get("history", [])),
                           final_metrics=dict(entry.get("final_metrics", {})))

    def get_or_train(self, config: TrainConfig, device="cpu", callbacks=()) -> CachedModel:
        """Reuse the entry for ``config`` or train it (resuming an unfinished entry).

        Args:
            config: a validated-or-not :class:`TrainConfig`; its ``out_dir`` and
                ``resume`` are set here.
            device: where the returned model lives.
            callbacks: trainer callbacks for a training that runs
                (:mod:`linf_plugin.training.callbacks`); unused on a hit.

        Returns:
            :class:`CachedModel`.

        Raises:
            whatever :func:`linf_plugin.training.train` raises (ConfigError,
            TrainingDivergedError, ...): a failed training leaves no entry.json.
        """
        config = config.replace().validate()
        hit = self.lookup(config, device)
        if hit is not None:
            return hit
        folder = self.entry_dir(config)
        entry_path = folder / ENTRY_NAME
        resume = (folder / CHECKPOINT_NAME).exists() and not entry_path.exists()
        if entry_path.exists():  # a finished but unusable entry (corrupt, foreign): start over
            shutil.rmtree(folder)
            resume = False
        prior_epochs = 0
        if resume:
            try:
                prior_epochs = int(load_checkpoint(folder / CHECKPOINT_NAME).epoch or 0)
            except CheckpointError:  # a torn checkpoint: train from scratch
                shutil.rmtree(folder)
                resume = False
        folder.mkdir(parents=True, exist_ok=True)
        run_cfg = config.replace(out_dir=str(folder), resume=resume)
        start = time.perf_counter()
        result = train(run_cfg, callbacks=callbacks)
        wall = time.perf_counter() - start
        # a resumed entry: add the epochs trained before the interruption (their times are in the history)
        prior = float(sum(float(r.get("time", 0.0)) for r in result.history[:prior_epochs]))
        key = config_key(config)
        train_time = wall + prior
        epochs_time = float(sum(float(r.get("time", 0.0)) for r in result.history))
        atomic_write_json(entry_path, {"format": CACHE_FORMAT, "key": key, "config": config.to_dict(),
                                       "train_time": train_time, "epochs_time": epochs_time,
                                       "resumed": resume, "final_metrics": result.final_metrics,
                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        ckpt = load_checkpoint(folder / CHECKPOINT_NAME, map_location=device)
        return CachedModel(model=ckpt.model.eval(), config=config, train_time=train_time, cache_hit=False,
                           path=folder / CHECKPOINT_NAME, key=key, history=list(result.history),
                           final_metrics=dict(result.final_metrics))
