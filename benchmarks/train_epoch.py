"""Where one training epoch goes: ℓp-dist kernels, the rest of the model, loss, data, optimizer, evaluation.

Each row trains ONE epoch with the real trainer (:func:`linf_plugin.training.train`)
of a CPU preset, on digits or on Fashion-MNIST (the real files when they are
installed, else generated files of the same shape and size), and splits its
wall time by instrumenting the run from outside:

* ``lp_forward`` / ``lp_backward``: time inside the ℓp-dist backend's
  forward / backward (and interval forward / backward), through a timing
  wrapper installed with :func:`linf_plugin.ops.use_backend`;
* ``model_rest_forward`` / ``model_rest_backward``: the model's forward
  (forward hooks) and backward (from the gradient reaching the logits to the
  optimizer step; grad-norm clipping included) minus the ℓp-dist part;
* ``loss``: the training objective's forward minus the model's (loss and
  batch statistics) plus the backward from the loss to the logits; for the
  bound-based objectives (hybrids: interval bounds of the head; ReLU
  baselines: auto_LiRPA's IBP / CROWN-IBP) logits, bounds and loss come out
  of one computation, all of it counted as the model's;
* ``optimizer``: ``Optimizer.step`` (global step hooks);
* ``data``: the epoch's batching, augmentation and indexing, replayed with
  the trainer's own calls (the trainer's loop cannot be hooked there);
* ``evaluation``: the end-of-epoch evaluation (the trainer's ``eval_time``);
* ``loop_other``: the trainer loop's remaining time (schedules, setting p and
  the lr, the finiteness check, statistics, progress).

ℓ∞-dist and hybrid presets get one row per phase that costs differently:
``p8`` (the schedule's start), ``ramp`` (general p; the epoch ramps p from
8 towards 1000) and ``inf``.  Compiles (torch.compile frames) during the
epoch are counted: the ℓp schedule changes p every step and must not recompile.

Prints a table and writes ``benchmarks/results/train_epoch-<label>.json``
(with the load average before and after each row: the machine may be shared).
Usage: ``python benchmarks/train_epoch.py [--label before] [--data digits,fashion-mnist] [--presets a,b]
[--threads 2] [--train-subset N]``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import linf_plugin  # noqa: E402,F401
from linf_plugin.data import DataNotFoundError, load_dataset  # noqa: E402
from linf_plugin.io import atomic_write_json  # noqa: E402
from linf_plugin.models import create_model  # noqa: E402
from linf_plugin.ops import get_backend, resolve_backend, use_backend  # noqa: E402
from linf_plugin.training import TrainConfig, get_preset, train  # noqa: E402
from linf_plugin.training.augment import apply_augment  # noqa: E402
from linf_plugin.training.batches import EpochBatches  # noqa: E402

PHASES = ("lp_forward", "lp_backward", "model_rest_forward", "model_rest_backward", "loss", "data", "optimizer",
          "evaluation", "loop_other")
# the reference configuration measured when CPU training was found slow: 5x256 net, mnist-0.1's recipe
REFERENCE = {"model": "linf_dist_mlp", "model_kwargs": {"depth": 5, "width": 256}}


class TimedBackend:
    """Delegates to a real ℓp-dist backend and adds up the seconds spent in its forward and backward calls."""

    FORWARD = ("forward", "interval_forward", "interval", "linf_box_argmax")
    BACKWARD = ("backward", "interval_backward")

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.seconds = {"lp_forward": 0.0, "lp_backward": 0.0}
        self.active = True

    def __getattr__(self, attr):
        fn = getattr(self.inner, attr)
        bucket = "lp_forward" if attr in self.FORWARD else "lp_backward" if attr in self.BACKWARD else None
        if bucket is None or not callable(fn):
            return fn

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                if self.active:
                    self.seconds[bucket] += time.perf_counter() - t0
        return timed


class Probe:
    """Hooks that time the model's and the objective's forward, the backward and the optimizer step."""

    def __init__(self, model: torch.nn.Module, steps: int, timed: TimedBackend):
        from linf_plugin.training.objectives import HybridObjective, LinfDistObjective, LirpaObjective

        self.model, self.steps, self.timed = model, steps, timed
        self.done = 0  # optimizer steps so far: after the epoch's last one, the evaluation is not counted
        self.objective_types = (LinfDistObjective, HybridObjective, LirpaObjective)
        self.t = {"objective_forward": 0.0, "model_forward": 0.0, "backward_to_logits": 0.0,
                  "model_backward": 0.0, "optimizer": 0.0, "backward": 0.0}
        self._mark = {}
        self.handles = []

    def __enter__(self):
        from torch.nn.modules import module as module_mod
        from torch.optim import optimizer as optim_mod

        # module hooks go before the evaluation (the margin certificate refuses hooked models)
        self.module_handles = [
            self.model.register_forward_pre_hook(lambda m, a: self._start("model")),
            self.model.register_forward_hook(self._model_done),
            module_mod.register_module_forward_pre_hook(self._obj_pre),
            module_mod.register_module_forward_hook(self._obj_post),
        ]
        self.handles = [optim_mod.register_optimizer_step_pre_hook(self._opt_pre),
                        optim_mod.register_optimizer_step_post_hook(self._opt_post)]
        return self

    def _remove_module_hooks(self):
        for h in self.module_handles:
            h.remove()
        self.module_handles = []

    def __exit__(self, *exc):
        self._remove_module_hooks()
        for h in self.handles:
            h.remove()
        return False

    def _start(self, key):
        if self.done < self.steps:
            self._mark[key] = time.perf_counter()

    def _model_done(self, module, args, out):
        if "model" not in self._mark:
            return
        self.t["model_forward"] += time.perf_counter() - self._mark.pop("model")
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._logits_grad)

    def _obj_pre(self, module, args):
        if isinstance(module, self.objective_types):
            self._start("objective")

    def _obj_post(self, module, args, out):
        if isinstance(module, self.objective_types) and "objective" in self._mark:
            self.t["objective_forward"] += time.perf_counter() - self._mark.pop("objective")
            loss = out[0]
            if loss.requires_grad:
                loss.register_hook(self._loss_grad)

    def _loss_grad(self, grad):
        self._start("backward")
        return None

    def _logits_grad(self, grad):
        now = time.perf_counter()
        if "backward" in self._mark:
            self.t["backward_to_logits"] += now - self._mark["backward"]
        self._mark["logits"] = now
        return None

    def _opt_pre(self, opt, args, kw):
        now = time.perf_counter()
        if "backward" in self._mark:
            self.t["backward"] += now - self._mark.pop("backward")
        if "logits" in self._mark:
            self.t["model_backward"] += now - self._mark.pop("logits")
        self._start("optimizer")

    def _opt_post(self, opt, args, kw):
        if "optimizer" in self._mark:
            self.t["optimizer"] += time.perf_counter() - self._mark.pop("optimizer")
        self.done += 1
        if self.done >= self.steps:
            self.timed.active = False
            self._remove_module_hooks()


def _compiles() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return -1
    return int(counters["frames"]["total"]) if "frames" in counters else 0


def _data_time(cfg: TrainConfig, train_x: torch.Tensor, train_y: torch.Tensor) -> float:
    """The epoch's batching, augmentation and indexing, with the trainer's own calls."""
    batches = EpochBatches(len(train_x), cfg.batch_size, 1, 0, cfg.seed, cfg.crop_padding, cfg.hflip)
    t0 = time.perf_counter()
    for idx, aug in batches.epoch(0):
        x = apply_augment(train_x[idx], aug)
        y = train_y[idx]
        del x, y
    return time.perf_counter() - t0


def _phases(cfg: TrainConfig) -> dict:
    """One config per phase that costs differently (ℓp nets: p = 8, ramp, ∞), each one epoch long."""
    base = cfg.replace(epochs=1, eval_every=1, out_dir=None, resume=False, progress=False, lr_cosine_start=0,
                       eps_ramp_start=0, eps_ramp_epochs=0, lr_milestones=())
    if cfg.family == "relu" or cfg.p_start is None:
        return {"-": base}
    return {f"p{cfg.p_start:g}": base.replace(p_ramp_start=1, p_ramp_epochs=0),
            "ramp": base.replace(p_ramp_start=0, p_ramp_epochs=1),
            "inf": base.replace(p_start=None)}


def time_epoch(cfg: TrainConfig, train_x, train_y, backend: str = "auto") -> dict:
    """Train ``cfg`` for its one epoch with the CPU ℓp-dist ``backend`` and split the time (see the module
    docstring)."""
    from linf_plugin.nn import lp_dist_layers

    inner = get_backend(resolve_backend(None if backend == "auto" else backend, torch.zeros(1)))

    cfg = cfg.replace().validate()
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    kwargs = {"mean": data.mean, "std": data.std, **cfg.model_kwargs}
    model = create_model(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes, **kwargs)
    # warm-up: the same recipe on a few batches of the epoch's shapes (the last, partial one included), so
    # one-time compiles are not charged to the epoch; then the epoch, which must compile nothing
    n, b = len(train_x), cfg.batch_size
    warm_n = min(n, 2 * b + n % b)
    c0 = _compiles()
    tw = time.perf_counter()
    with use_backend(inner, "cpu"):
        train(cfg.replace(train_subset=warm_n if cfg.train_subset is None else min(warm_n, cfg.train_subset),
                          eval_subset=min(cfg.eval_subset or 10 ** 9, 2 * cfg.eval_batch_size)), model=model)
    warm = {"seconds": time.perf_counter() - tw, "compiles": _compiles() - c0, "samples": warm_n}
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes, **kwargs)
    timed = TimedBackend(inner)
    steps = math.ceil(len(train_x) / cfg.batch_size)
    load0 = os.getloadavg()
    c0 = _compiles()
    t0 = time.perf_counter()
    with use_backend(timed, "cpu"), Probe(model, steps, timed) as probe:
        res = train(cfg, model=model)
    wall = time.perf_counter() - t0
    compiles = _compiles() - c0
    rec = res.history[-1]
    epoch, evaluation = float(rec["time"]), float(rec.get("eval_time", 0.0))
    t = probe.t
    lp_f, lp_b = timed.seconds["lp_forward"], timed.seconds["lp_backward"]
    data_s = _data_time(cfg, train_x, train_y)
    # the ℓ∞-dist objective calls the model, then the loss; the bound-based ones (hybrid: interval bounds of the
    # head; ReLU: auto_LiRPA) compute logits, bounds and loss together, all counted as the model's
    has_model_hooks = cfg.family == "linf_dist" and t["model_forward"] > 0
    if has_model_hooks:
        rest_f = t["model_forward"] - lp_f
        loss = (t["objective_forward"] - t["model_forward"]) + t["backward_to_logits"]
    else:
        rest_f = t["objective_forward"] - lp_f
        loss = 0.0
    rest_b = (t["model_backward"] if has_model_hooks else t["backward"]) - lp_b
    parts = {"lp_forward": lp_f, "lp_backward": lp_b, "model_rest_forward": rest_f, "model_rest_backward": rest_b,
             "loss": loss, "data": data_s, "optimizer": t["optimizer"], "evaluation": evaluation}
    inside = t["objective_forward"] + t["backward"] + t["optimizer"] + data_s
    parts["loop_other"] = epoch - inside
    return {"backend": type(inner).__name__, "epoch_seconds": epoch, "wall_seconds": wall, "phases": parts,
            "compiles_during_run": compiles, "warmup": warm,
            "has_lp": any(True for _ in lp_dist_layers(model)), "samples": int(len(train_x)),
            "steps": steps, "load_before": load0, "load_after": os.getloadavg(),
            "train_acc": rec.get("train_acc"), "eval_method": rec.get("method")}


@contextlib.contextmanager
def fashion_root():
    """None when the real Fashion-MNIST files are found; else a temporary root holding generated ones."""
    try:
        load_dataset("fashion-mnist", "test")
        yield None, "real files"
        return
    except DataNotFoundError:
        pass
    import gzip
    import struct

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for prefix, n in (("train", 60000), ("t10k", 10000)):
            images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, size=n, dtype=np.uint8)
            (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
                gzip.compress(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes(), 1))
            (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
                gzip.compress(struct.pack(">II", 2049, n) + labels.tobytes(), 1))
        yield tmp, "generated (random pixels, real shape and size)"


def _configs(data: str, names) -> list:
    """``(row name, config)``: the data set's CPU presets (the comparison suites'), and the reference net."""
    from comparisons.suites import SUITES

    out = []
    suite = SUITES.get(data)
    presets = names or ([m.preset for m in suite.models] if suite else [])
    for name in presets:
        out.append((name, get_preset(name)))
    if data != "digits" and not names:
        ref = get_preset("mnist-0.1").replace(dataset=data, **REFERENCE)
        for b in (128, 512):
            out.append((f"reference 5x256 mnist-0.1 recipe, batch {b}", ref.replace(batch_size=b)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="before", help="result file suffix: train_epoch-<label>.json")
    ap.add_argument("--data", default="digits,fashion-mnist")
    ap.add_argument("--presets", default=None, help="comma list of presets (default: the suites' and a reference)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="auto",
                    help="comma list of CPU lp-dist backends to time in this run (e.g. torch,native: the old "
                         "baseline and the native kernels, back to back)")
    ap.add_argument("--train-subset", type=int, default=None, help="time an epoch of the first N samples only")
    ap.add_argument("--eval-subset", type=int, default=None, help="evaluate on the first N test points")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in (args.presets or "").split(",") if n]
    rows = []
    print(f"{'data':14} {'preset':36} {'backend':7} {'phase':6} {'epoch s':>8} "
          + " ".join(f"{p[:11]:>11}" for p in PHASES) + "  compiles  load")
    for data in [d for d in args.data.split(",") if d]:
        ctx = fashion_root() if data == "fashion-mnist" else contextlib.nullcontext((None, "embedded"))
        with ctx as (root, source):
            configs = _configs(data, [n for n in names if get_preset(n).dataset == data] if names else None)
            for name, cfg in configs:
                cfg = cfg.replace(num_threads=args.threads, data_root=root, train_subset=args.train_subset,
                                  eval_subset=args.eval_subset)
                train_set = load_dataset(data, "train", root=root)
                if args.train_subset:
                    train_set = train_set.subset(args.train_subset)
                runs = [(phase, pcfg, backend) for phase, pcfg in _phases(cfg).items()
                        for backend in args.backends.split(",") if backend]
                for phase, pcfg, backend in runs:
                    r = time_epoch(pcfg, train_set.x, train_set.y, backend)
                    r.update(data=data, data_source=source, preset=name, phase=phase, batch_size=cfg.batch_size,
                             model=cfg.model, model_kwargs=cfg.model_kwargs, family=cfg.family)
                    rows.append(r)
                    print(f"{data:14} {name[:36]:36} {r['backend'][:7]:7} {phase:6} {r['epoch_seconds']:8.2f} "
                          + " ".join(f"{r['phases'][p]:11.2f}" for p in PHASES)
                          + f"  {r['compiles_during_run']:8d}  {r['load_before'][0]:.2f}", flush=True)
    out = Path(args.out) / f"train_epoch-{args.label}.json"
    atomic_write_json(out, {
        "benchmark": "train_epoch", "label": args.label, "python": platform.python_version(),
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "threads": args.threads, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "phases": list(PHASES), "train_subset": args.train_subset, "argv": sys.argv[1:], "rows": rows,
        "note": "one epoch of the real trainer per row; load_before/load_after are the 1/5/15-minute load "
                "averages (other jobs sharing the cores slow every number)"}, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
