"""``train(config)``: one loop for every family, with checkpoints, resume, progress, logs and DDP.

Files in ``config.out_dir`` (written by rank 0 only; nothing is written when
``out_dir`` is None):

* ``config.json`` — the resolved config;
* ``log.jsonl`` — one JSON record per epoch (loss, accuracies, p, λ, ε, lr, time, evaluation);
* ``checkpoint.pt`` — model, optimizer, the objective's own parameters,
  history and RNG states, rewritten atomically after every epoch;
* ``final.json`` — the final metrics.

Resuming (``config.resume``) loads ``checkpoint.pt`` and continues with the
next epoch.  ``train(config, callbacks=[...])`` calls the callbacks'
``on_train_start`` / ``on_epoch_end`` / ``on_train_end`` hooks
(:mod:`linf_plugin.training.callbacks`).  Every schedule, the sample order and the augmentation are pure
functions of (seed, epoch, step), so on CPU a resumed run ends with exactly
the weights of the uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..distributed import DistContext, init_distributed, shutdown_distributed
from ..io import atomic_write_json, atomic_write_text
from ..nn import lp_dist_layers
from .augment import apply_augment
from .batches import EpochBatches
from .callbacks import call_hook, check_callbacks
from .config import ConfigError, TrainConfig
from .ddp import all_reduce_sum, convert_sync_mean_shift, sync_bound_batchnorm
from .evaluate import evaluate
from .objectives import STAT_NAMES, LirpaObjective, make_objective, summarize_stats
from .schedules import Schedule

__all__ = ["train", "TrainResult", "TrainingDivergedError", "CHECKPOINT_NAME", "LOG_NAME"]

log = logging.getLogger("linf_plugin.training")

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"
FINAL_NAME = "final.json"
_CHECKPOINT_KIND = "linf_plugin.train/1"
# Steps between the checks for a non-finite loss (one host read each, one all-reduce under DDP).
FINITE_CHECK_STEPS = 32


class TrainingDivergedError(RuntimeError):
    """The loss (or a parameter) became NaN or infinite; the message says where and what."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (eval mode; for ℓ∞-dist nets p is whatever
            the schedule ended at, ∞ for the paper's schedule).
        config: the resolved config.
        history: one dict per epoch (the ``log.jsonl`` records).
        checkpoint_path: the last checkpoint, or None when nothing was written.
        final_metrics: the last evaluation (clean_acc, cert_acc, method, eps, ...).
        out_dir: where files were written (None if nowhere).
        wall_time: seconds spent in this call.
    """

    model: nn.Module
    config: TrainConfig
    history: list = field(default_factory=list)
    checkpoint_path: Optional[Path] = None
    final_metrics: dict = field(default_factory=dict)
    out_dir: Optional[Path] = None
    wall_time: float = 0.0

    def to_dict(self) -> dict:
        """JSON-able summary (no model)."""
        return {"config": self.config.to_dict(), "history": self.history, "final_metrics": self.final_metrics,
                "checkpoint_path": str(self.checkpoint_path) if self.checkpoint_path else None,
                "out_dir": str(self.out_dir) if self.out_dir else None, "wall_time": self.wall_time}


def train(config: TrainConfig, *, model: Optional[nn.Module] = None, callbacks: Sequence = ()) -> TrainResult:
    """Train a registry model with its family's recipe.

    Launched by ``torchrun`` (``WORLD_SIZE > 1``), every rank calls this and
    they train one model with DDP; rank 0 writes the files.

    Args:
        config: a :class:`TrainConfig` (e.g. ``get_preset("digits-linf")``).
        model: an already built registry model to train instead of
            ``create_model(config.model, ...)`` (its name must match ``config.model``).
        callbacks: objects with ``on_train_start`` / ``on_epoch_end`` /
            ``on_train_end`` hooks, each called with the :class:`TrainResult`
            so far (see :mod:`linf_plugin.training.callbacks`).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: bad config (unknown model / data set / field values).
        TrainingDivergedError: a non-finite loss or parameter; the last good
            checkpoint stays on disk untouched.
        TypeError: a callback that defines no hook.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig, got {type(config).__name__}")
    config = config.replace().validate()
    callbacks = check_callbacks(callbacks)
    if model is not None and getattr(model, "model_name", None) not in (None, config.model):
        raise ConfigError(f"the model passed is {model.model_name!r} but config.model is {config.model!r}")
    if config.stop_after_epoch is not None:
        if config.out_dir is None:
            raise ConfigError("stop_after_epoch needs out_dir (it stops right after writing a checkpoint)")
        warnings.warn("TrainConfig.stop_after_epoch (--stop-after-epoch) is deprecated and will be removed in the "
                      "next release; pass train(config, callbacks=[...]) an on_epoch_end hook instead",
                      DeprecationWarning, stacklevel=2)
        callbacks = callbacks + (_KillAfterEpoch(config.stop_after_epoch),)
    ctx = init_distributed(config.device, config.ddp_backend)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    try:
        return _Run(config, ctx, model, callbacks).run()
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
        shutdown_distributed(ctx)


class _KillAfterEpoch:
    """The deprecated ``stop_after_epoch``: SIGKILL this process after that epoch's checkpoint."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, result) -> None:
        if result.history and result.history[-1]["epoch"] == self.epoch:
            log.warning("stop_after_epoch=%d: killing this process (SIGKILL) after its checkpoint", self.epoch)
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class _Run:
    """One call of :func:`train` (state shared by the loop's helpers)."""

    def __init__(self, config: TrainConfig, ctx: DistContext, model: Optional[nn.Module], callbacks=()):
        from ..data import load_dataset
        from ..models import create_model

        self.config, self.ctx, self.callbacks = config, ctx, tuple(callbacks)
        self.device = ctx.device
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.write = self.out_dir is not None and ctx.is_main

        train_set = load_dataset(config.dataset, "train", root=config.data_root)
        test_set = load_dataset(config.dataset, "test", root=config.data_root)
        if config.train_subset:
            train_set = train_set.subset(config.train_subset)
        if config.test_subset:
            test_set = test_set.subset(config.test_subset)
        self.data_range = tuple(train_set.data_range)
        self.train_x, self.train_y = train_set.x.to(self.device), train_set.y.to(self.device)
        n_eval = config.eval_subset or len(test_set)
        self.test_x, self.test_y = test_set.x[:n_eval].to(self.device), test_set.y[:n_eval].to(self.device)

        _seed_everything(config.seed)
        if model is None:
            kwargs = {"mean": train_set.mean, "std": train_set.std, **config.model_kwargs}
            model = create_model(config.model, input_shape=train_set.input_shape,
                                 num_classes=train_set.num_classes, **kwargs)
        self.model = model.to(self.device)
        self.has_lp = any(True for _ in lp_dist_layers(self.model))
        if ctx.distributed:
            convert_sync_mean_shift(self.model)
        self.objective = make_objective(config, self.model, self.data_range, self.train_x[:2]).to(self.device)
        if ctx.distributed and isinstance(self.objective, LirpaObjective):
            sync_bound_batchnorm(self.objective.bounds.bounded)
        self.optimizer = self._optimizer()
        self.step_module = self.objective
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.step_module = DistributedDataParallel(
                self.objective, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.batches = EpochBatches(len(self.train_x), config.batch_size, ctx.world_size, ctx.rank, config.seed,
                                    config.crop_padding, config.hflip)
        self.schedule = Schedule(config, len(self.batches))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.history: list = []
        self.start_epoch = 0
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME if self.out_dir else None
        self.last_saved_epoch: Optional[int] = None

    # ------------------------------------------------------------------ setup
    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        special = {}
        for name, params in self.objective.extra_param_groups():
            for p in params:
                special[id(p)] = (name, c.scale_lr_factor)
        if c.family == "hybrid" and c.head_lr_scale and hasattr(self.model, "head_lr_scale"):
            named = dict(self.model.named_parameters())
            for pname, factor in self.model.head_lr_scale().items():
                if pname in named:
                    special[id(named[pname])] = (pname, float(factor))
        groups = {"main": {"params": [], "lr_factor": 1.0, "name": "main"}}
        seen = set()
        for p in self.objective.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name, factor = special.get(id(p), ("main", 1.0))
            groups.setdefault(name, {"params": [], "lr_factor": factor, "name": name})["params"].append(p)
        groups = [g for g in groups.values() if g["params"]]
        for g in groups:
            g["lr"] = c.lr * g["lr_factor"]
        # the fused kernel does each tensor's update in one pass (2.5x faster than the per-op loop on a
        # 5x256 net's CPU step); torch has it for float tensors on CPU and CUDA
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.Adam(groups, lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps,
                                weight_decay=c.weight_decay, fused=fused or None)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, epoch: int) -> None:
        from ..models import save_checkpoint

        self._sync_model()
        self._check_params(epoch)
        extra = {"kind": _CHECKPOINT_KIND, "train_config": self.config.to_dict(), "history": self.history,
                 "objective_state": _objective_extra_state(self.objective)}
        save_checkpoint(self.model, self.checkpoint_path, optimizer=self.optimizer, epoch=epoch, extra=extra)
        self.last_saved_epoch = epoch

    def _resume(self) -> None:
        from ..models import load_checkpoint

        path = self.checkpoint_path
        if path is None or not path.exists():
            if self.ctx.is_main:
                log.info("resume: no checkpoint at %s, starting from scratch", path)
            return
        ckpt = load_checkpoint(path, map_location=self.device)
        extra = ckpt.extra or {}
        if extra.get("kind") != _CHECKPOINT_KIND:
            raise ConfigError(f"{path} is not a checkpoint written by linf_plugin.training; cannot resume from it")
        saved = TrainConfig.from_dict(extra["train_config"])
        diff = saved.differences(self.config)
        if diff:
            raise ConfigError(f"cannot resume from {path}: the config differs in "
                              + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in sorted(diff.items()))
                              + "; start a new run (another out_dir) or use the saved values")
        self.model.load_state_dict(ckpt.model.state_dict())
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        _load_objective_extra_state(self.objective, extra.get("objective_state", {}))
        if isinstance(self.objective, LirpaObjective):
            self.objective.bounds.load_from(self.model)
        self.history = list(extra.get("history", []))
        self.start_epoch = int(ckpt.epoch)
        self.last_saved_epoch = self.start_epoch
        ckpt.restore_rng()
        if self.write:  # the log is rewritten from the checkpoint: records after it never happened
            atomic_write_text(self.out_dir / LOG_NAME, "".join(json.dumps(r) + "\n" for r in self.history))
        if self.ctx.is_main:
            log.info("resumed from %s after epoch %d", path, self.start_epoch)

    # ------------------------------------------------------------------ helpers
    def _sync_model(self) -> None:
        if isinstance(self.objective, LirpaObjective):
            self.objective.sync_model()

    def _check_params(self, epoch: int) -> None:
        bad = [n for n, p in self.objective.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch}: parameters became NaN/inf ({', '.join(bad[:5])}"
                f"{'...' if len(bad) > 5 else ''}); {self._last_good()}")

    def _last_good(self) -> str:
        if self.last_saved_epoch is None:
            return "no checkpoint was written"
        return f"the last good checkpoint ({self.checkpoint_path}, epoch {self.last_saved_epoch}) is untouched"

    def _check_finite(self, window: torch.Tensor, filled: int, epoch: int, first_k: int) -> None:
        """Raise :class:`TrainingDivergedError` if a loss of the last ``filled`` steps was not finite.

        ``window[i]`` holds the stats of step ``first_k + i`` of ``epoch`` (their loss sum is NaN or inf
        exactly when the loss was).  Called every :data:`FINITE_CHECK_STEPS` steps and at the end of the
        epoch, before any checkpoint is written, so one host read (and, under DDP, one all-reduce) covers
        many steps and a diverged run never overwrites the last good checkpoint.
        """
        bad_rows = ~torch.isfinite(window[:filled, 1])
        bad = bad_rows.any().to(torch.float64).reshape(1)
        if self.ctx.distributed:
            all_reduce_sum(bad)
        if bad.item() == 0:
            return
        here = bool(bad_rows.any())
        i = int(bad_rows.nonzero()[0, 0]) if here else filled - 1
        k = first_k + i
        stats = window[i]
        state = self.schedule.at(epoch * len(self.batches) + k)
        parts = summarize_stats(stats, self.config.family)
        what = ", ".join(f"{k_}={v:.4g}" for k_, v in parts.items() if isinstance(v, float) and k_ != "loss")
        loss = float(stats[1] / stats[0]) if here else "not finite"
        raise TrainingDivergedError(
            f"training diverged at epoch {epoch + 1}, step {k + 1}/{len(self.batches)} (global step {state.step}"
            f"{'' if here else ' or earlier, on another rank'}): the loss is {loss} "
            f"({what}; p={state.p}, lr={state.lr:.3g}, eps={state.eps:.4g}, lambda={state.lam:.3g}). "
            f"Training stopped; {self._last_good()}. Lower the lr or check the data.")

    def _progress(self):
        c = self.config
        show = c.progress if c.progress is not None else sys.stderr.isatty()
        return show and self.ctx.is_main

    def _evaluate(self, epoch: int) -> dict:
        self._sync_model()
        if self.ctx.is_main:
            metrics = evaluate(self.model, self.config.family, self.test_x, self.test_y, self.config.eps,
                               data_range=self.data_range, batch_size=self.config.eval_batch_size)
        else:
            metrics = {}
        self.ctx.barrier()
        return metrics

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        c, t_start = self.config, time.perf_counter()
        if c.p_start is not None and self.has_lp and c.p_ramp_start + c.p_ramp_epochs > c.epochs \
                and self.ctx.is_main:
            log.warning("the p schedule (p_ramp_start %d + p_ramp_epochs %d) is longer than epochs=%d: training "
                        "ends before p reaches infinity", c.p_ramp_start, c.p_ramp_epochs, c.epochs)
        if c.resume:
            self._resume()
        if self.write:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out_dir / CONFIG_NAME, c.to_dict())
            if not c.resume or self.start_epoch == 0:
                atomic_write_text(self.out_dir / LOG_NAME, "")
        steps = len(self.batches)
        metrics: dict = {}
        call_hook(self.callbacks, "on_train_start", self._result(metrics, t_start))
        show = self._progress()
        lp_layers = list(lp_dist_layers(self.model))
        for epoch in range(self.start_epoch, c.epochs):
            self.objective.train()
            self.model.train()
            sums = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=self.device)
            # each step's stats land in a window on the device; every FINITE_CHECK_STEPS steps (and at the end
            # of the epoch) one read checks the losses for NaN / inf and the window is added to the sums
            window = torch.zeros(FINITE_CHECK_STEPS, len(STAT_NAMES), dtype=torch.float64, device=self.device)
            filled, p_now = 0, None
            t0 = time.perf_counter()
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{c.epochs}", leave=False, dynamic_ncols=True,
                       disable=not show)
            for k, (idx, aug) in enumerate(self.batches.epoch(epoch)):
                state = self.schedule.at(epoch * steps + k)
                if lp_layers and state.p != p_now:
                    for layer in lp_layers:
                        layer.p = state.p
                    p_now = state.p
                for g in self.optimizer.param_groups:
                    g["lr"] = state.lr * g["lr_factor"]
                idx = idx.to(self.device)
                x = apply_augment(self.train_x[idx], aug)
                y = self.train_y[idx]
                try:
                    loss, stats = self.step_module(x, y, state)
                except Exception:
                    # a NaN loss of an earlier step, not yet checked, can make this forward raise (NaN weights):
                    # report the divergence where it began
                    self._check_finite(window, filled, epoch, k - filled)
                    raise
                window[filled].copy_(stats)
                filled += 1
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
                self.optimizer.step()
                if filled == FINITE_CHECK_STEPS or k == steps - 1:
                    self._check_finite(window, filled, epoch, k + 1 - filled)
                    sums += window[:filled].sum(0)
                    filled = 0
                if show:
                    bar.update(1)
                    if k % c.log_every == 0 or k == steps - 1:
                        s = summarize_stats(sums + window[:filled].sum(0), c.family)
                        post = {"loss": f"{s['loss']:.4f}", "acc": f"{s['acc']:.3f}"}
                        if self.has_lp:
                            post["p"] = "inf" if math.isinf(state.p) else f"{state.p:.1f}"
                        if c.family == "linf_dist":
                            post["lam"] = f"{state.lam:.2g}"
                        else:
                            post["eps"] = f"{state.eps:.3g}"
                            if s["cert"] is not None:
                                post["cert"] = f"{s['cert']:.3f}"
                        bar.set_postfix(post, refresh=False)
            bar.close()
            all_reduce_sum(sums)
            record = {"epoch": epoch + 1, **summarize_stats(sums, c.family),
                      **self.schedule.at((epoch + 1) * steps - 1).as_log(c.family), "time": time.perf_counter() - t0}
            record = {("train_" + k if k in ("loss", "acc", "cert") else k): v for k, v in record.items()}
            if c.family == "linf_dist":
                record["scale"] = float(self.objective.loss.scale.detach())
            last = epoch + 1 == c.epochs
            if last or (c.eval_every and (epoch + 1) % c.eval_every == 0):
                metrics = self._evaluate(epoch + 1)
                record.update({"test_" + k if k in ("clean_acc", "cert_acc") else k: v for k, v in metrics.items()})
                record["eval_eps"] = c.eps
            self.history.append(record)
            if self.ctx.is_main:
                log.info("epoch %d/%d %s", epoch + 1, c.epochs, _fmt(record))
            if self.write:
                with open(self.out_dir / LOG_NAME, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                self._save(epoch + 1)
            elif last:
                self._check_params(epoch + 1)
            self.ctx.barrier()
            call_hook(self.callbacks, "on_epoch_end", self._result(metrics, t_start))
        self._sync_model()
        self.model.eval()
        result = self._result(metrics, t_start)
        if self.write:
            atomic_write_json(self.out_dir / FINAL_NAME, result.to_dict())
        call_hook(self.callbacks, "on_train_end", result)
        return result

    def _result(self, metrics: dict, t_start: float) -> TrainResult:
        """The :class:`TrainResult` so far (what the callbacks see, and at the end what ``train`` returns)."""
        c = self.config
        final = {"eps": c.eps, **{k: v for k, v in metrics.items()}} if metrics else {}
        if not final and self.history:
            final = {k: v for k, v in self.history[-1].items() if k.startswith("test_") or k == "method"}
        return TrainResult(model=self.model, config=c, history=list(self.history),
                           checkpoint_path=self.checkpoint_path if self.last_saved_epoch else None,
                           final_metrics=final, out_dir=self.out_dir if self.write else None,
                           wall_time=time.perf_counter() - t_start)


def _fmt(record: dict) -> str:
    parts = []
    for k, v in record.items():
        if k == "epoch":
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _objective_extra_state(objective: nn.Module) -> dict:
    """State of the objective's own parameters (not the model's), e.g. the temperature."""
    model_ids = {id(p) for p in objective.model.parameters()}
    return {n: p.detach().cpu().clone() for n, p in objective.named_parameters() if id(p) not in model_ids}


def _load_objective_extra_state(objective: nn.Module, state: dict) -> None:
    params = dict(objective.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name not in params:
                raise ConfigError(f"checkpoint has objective parameter {name!r} that this objective lacks")
            params[name].copy_(value)

