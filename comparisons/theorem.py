"""``python -m comparisons theorem``: Theorem 3.2 and A.2 nets built on r-separated real data.

For each data set (digits: all 1797 points; MNIST: the first n training
points when ``--data-root`` holds it): r = half the smallest ℓ∞ distance
between differently labelled points (:func:`linf_plugin.data.linf_separation`),
the Theorem 3.2 net (``theorem32_net``, 2 layers, one hidden neuron per
point) and the Theorem A.2 net (``theoremA2_net``, L layers) built from the
points, margin-certified at ε = f·r for f in ``--fractions`` (default 0.5,
0.9, 0.999; ε = r itself is not claimed: the data is exactly r-separated,
so the closest pair has margin exactly 2r and certification needs
radius > ε), in one margin pass.  Beside them the IBP- and CROWN-IBP-trained
ReLU baselines of ``run`` (same presets, same checkpoint cache) are
certified on the same points at the same ε.

MNIST on a CPU: the separation, the net (one neuron per point) and its
forward pass all grow with n², so the default is the first 2000 training
points without CUDA and all 60000 with it (``--mnist-points``).  Its
baselines (cnn_7layer_bn, 100 epochs) are trained only on CUDA or when
already cached (``--train-baselines`` forces it).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from linf_plugin import distributed as pg
from linf_plugin.certification import certify
from linf_plugin.data import DataNotFoundError, linf_separation, load_dataset
from linf_plugin.io import atomic_write_json
from linf_plugin.models import theorem32_net, theoremA2_net

from .cache import CheckpointCache
from .common import (SCHEMA_VERSION, Timer, UsageError, count_params, environment, error_record, log, nan_to_none,
                     progress_enabled, resolve_device, shared_run_dir, torch_threads)
from .suites import build_config, get_suite, parse_overrides

__all__ = ["TheoremSettings", "run_theorem", "add_arguments", "settings_from_args"]

_SUITE_OF = {"digits": "digits", "mnist": "mnist-0.3"}


@dataclass
class TheoremSettings:
    """What ``python -m comparisons theorem`` takes (see ``--help``)."""

    datasets: List[str] = field(default_factory=lambda: ["digits", "mnist"])
    fractions: List[float] = field(default_factory=lambda: [0.5, 0.9, 0.999])
    a2_depth: int = 3
    digits_points: Optional[int] = None
    mnist_points: Optional[int] = None
    baselines: List[str] = field(default_factory=lambda: ["ibp", "crown-ibp"])
    baseline_methods: List[str] = field(default_factory=lambda: ["ibp", "crown-ibp", "crown"])
    train_baselines: Optional[bool] = None
    epochs: Optional[int] = None
    overrides: List[str] = field(default_factory=list)
    train_subset: Optional[int] = None
    seed: int = 0
    batch_size: int = 256
    cache_dir: str = "cache"
    use_cache: bool = True
    data_root: Optional[str] = None
    out: Optional[str] = None
    device: str = "auto"
    num_threads: Optional[int] = None
    progress: Optional[bool] = None


def _points(name: str, s: TheoremSettings, device: torch.device):
    if name == "digits":
        data = load_dataset("digits", "all")
        n = s.digits_points
    elif name == "mnist":
        data = load_dataset("mnist", "train", root=s.data_root)
        n = s.mnist_points or (None if device.type == "cuda" else 2000)
    else:
        raise UsageError(f"the theorem subcommand knows digits and mnist, got {name!r}")
    return data.subset(int(n)) if n else data


def _margin_record(net, data, r, fractions, device, batch_size) -> dict:
    warm = data.subset(min(len(data), batch_size))
    with Timer(device) as tw:  # one-time kernel compilation, reported apart
        certify(net, warm, 0.0, "margin", device=device, batch_size=batch_size)
    with Timer(device) as t:
        res = certify(net, data, 0.0, "margin", device=device, batch_size=batch_size)
    radius = res.radius
    results = [{"fraction": f, "eps": f * r,
                "certified_accuracy": float((res.correct & (radius > f * r)).double().mean()), "time": t.seconds}
               for f in fractions]
    return {"status": "ok", "time": t.seconds, "warmup_time": tw.seconds, "results": results,
            "min_radius_over_r": float(radius.min() / r), "clean_accuracy": res.clean_accuracy}


def _construct(kind: str, data, depth: int, device):
    if kind == "theorem32":
        return theorem32_net(data.x, data.y, num_classes=data.num_classes).to(device)
    return theoremA2_net(data.x, data.y, depth, num_classes=data.num_classes).to(device)


def _baseline(key: str, suite_name: str, s: TheoremSettings, cache: CheckpointCache, device, progress, may_train):
    suite = get_suite(suite_name)
    spec = suite.spec(key)
    cfg = build_config(spec, epochs=s.epochs, overrides=parse_overrides(s.overrides), device=str(device),
                       data_root=s.data_root, train_subset=s.train_subset, seed=s.seed, progress=progress,
                       num_threads=s.num_threads)
    hit = cache.lookup(cfg, device) if cache.enabled else None
    if hit is not None:
        return spec, cfg, hit
    if not may_train:
        raise LookupError(f"no cached checkpoint for preset {spec.preset} and training it needs a GPU "
                          f"(pass --train-baselines to train anyway, or run `python -m comparisons run --suite "
                          f"{suite_name}` on a GPU first)")
    log(f"training baseline {spec.preset} ...")
    return spec, cfg, cache.get_or_train(cfg, device=device)


def run_theorem(settings: TheoremSettings):
    """Run the experiment; write ``results.json`` and render it.  Returns ``(run_dir, results)``."""
    from tqdm.auto import tqdm

    from .report import render_report

    s = settings
    if not s.fractions or any(not (0 < f <= 1) for f in s.fractions):
        raise UsageError(f"fractions must lie in (0, 1], got {s.fractions}")
    if s.a2_depth < 3:
        raise UsageError(f"--a2-depth must be >= 3 (Theorem A.2 nets have L >= 3 layers), got {s.a2_depth}")
    fractions = sorted(float(f) for f in s.fractions)
    device = resolve_device(s.device)
    progress = progress_enabled(s.progress) and pg.is_main()
    run_dir = shared_run_dir("theorem", s.out)
    cache = CheckpointCache(s.cache_dir, enabled=s.use_cache, scratch=run_dir)
    results = {"schema": "comparisons.theorem", "schema_version": SCHEMA_VERSION, "command": "theorem",
               "environment": environment(device), "settings": {**asdict(s), "fractions": fractions},
               "datasets": [], "skipped": []}
    with torch_threads(s.num_threads), Timer(device) as total:
        for name in s.datasets:
            try:
                data = _points(name, s, device)
            except DataNotFoundError as exc:
                results["skipped"].append({"dataset": name, "reason": str(exc).splitlines()[0]})
                log(f"skipping {name}: {str(exc).splitlines()[0]}")
                continue
            with Timer() as tr:
                r = linf_separation(data.x, data.y)
            ds = {"dataset": name, "split": data.split, "n": len(data), "r": r, "separation_time": tr.seconds,
                  "status": "ok", "nets": [], "baselines": []}
            results["datasets"].append(ds)
            if not (r > 0 and math.isfinite(r)):
                ds["status"] = "not separated"
                log(f"{name}: r = {r}: two points with different labels coincide (or one label); nothing to build")
                continue
            bar = tqdm(total=2 + len(s.baselines), desc=f"{name} (n={len(data)}, r={r:.4g})", disable=not progress)
            for kind, label in (("theorem32", "Theorem 3.2 net"), ("theoremA2", f"Theorem A.2 net (L={s.a2_depth})")):
                rec = {"label": label, "kind": kind}
                try:
                    with Timer(device) as tb:
                        net = _construct(kind, data, s.a2_depth, device)
                    rec.update(status="ok", n_params=count_params(net), widths=[l.out_features for l in net.layers],
                               depth=len(net.layers), build_time=tb.seconds,
                               construction=nan_to_none(dict(getattr(net, "construction", {}))),
                               methods={"margin": _margin_record(net, data, r, fractions, device, s.batch_size)})
                    del net
                except Exception as exc:  # noqa: BLE001 - recorded
                    rec.update(error_record(exc))
                    log(f"  {label} failed: {rec['error']}")
                ds["nets"].append(rec)
                bar.update(1)
            may_train = s.train_baselines if s.train_baselines is not None else (name == "digits"
                                                                                 or device.type == "cuda")
            for key in s.baselines:
                rec = {"label": key, "kind": "baseline"}
                try:
                    spec, cfg, cm = _baseline(key, _SUITE_OF[name], s, cache, device, progress, may_train)
                    model = cm.model.to(device).eval()
                    rec.update(label=f"{spec.label}", preset=spec.preset, status="ok", n_params=count_params(model),
                               train_time=cm.train_time, cache=cm.info(), methods={})
                    for meth in s.baseline_methods:
                        try:
                            per = []
                            for f in fractions:
                                res = certify(model, data, f * r, meth, device=device, batch_size=s.batch_size)
                                per.append({"fraction": f, "eps": f * r, "certified_accuracy": res.certified_accuracy,
                                            "time": res.wall_time})
                            rec["methods"][meth] = {"status": "ok", "time": sum(p["time"] for p in per),
                                                    "results": per, "clean_accuracy": res.clean_accuracy}
                        except Exception as exc:  # noqa: BLE001 - recorded
                            rec["methods"][meth] = error_record(exc)
                            log(f"  {key} {meth} failed: {rec['methods'][meth]['error']}")
                except LookupError as exc:
                    rec.update(status="skipped", reason=str(exc))
                    log(f"  baseline {key}: {exc}")
                except Exception as exc:  # noqa: BLE001 - recorded
                    rec.update(error_record(exc))
                    log(f"  baseline {key} failed: {rec['error']}")
                ds["baselines"].append(rec)
                bar.update(1)
            bar.close()
    results["wall_time"] = total.seconds
    results = nan_to_none(results)
    if pg.is_main():  # under torchrun every rank computed the same results; one writes them
        atomic_write_json(Path(run_dir) / "results.json", results, indent=1)
        render_report(run_dir)
    return Path(run_dir), results


# ------------------------------------------------------------------------------------------------ report
# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TheoremSettings()
    csv = lambda t: [v.strip() for v in t.split(",") if v.strip()]  # noqa: E731
    p.add_argument("--datasets", type=csv, default=d.datasets, help="digits, mnist (mnist needs --data-root)")
    p.add_argument("--fractions", type=lambda t: [float(v) for v in csv(t)], default=d.fractions,
                   help="certify at eps = fraction * r (default 0.5,0.9,0.999)")
    p.add_argument("--a2-depth", type=int, default=d.a2_depth, help="layers L of the Theorem A.2 net (>= 3)")
    p.add_argument("--digits-points", type=int, default=None, help="use the first n digits points (default all 1797)")
    p.add_argument("--mnist-points", type=int, default=None,
                   help="use the first n MNIST training points (default 60000 on CUDA, 2000 on CPU)")
    p.add_argument("--baselines", type=csv, default=d.baselines, help="baseline model keys (ibp, crown-ibp)")
    p.add_argument("--baseline-methods", type=csv, default=d.baseline_methods,
                   help="methods for the baselines (default ibp,crown-ibp,crown)")
    p.add_argument("--train-baselines", action="store_true", default=None,
                   help="train missing baselines even without a GPU (MNIST: hours on a CPU)")
    p.add_argument("--epochs", type=int, default=None, help="as for run: squeeze the baselines' recipes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[MODEL.]FIELD=JSON",
                   help="as for run: override a baseline training config field")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)


def settings_from_args(args) -> TheoremSettings:
    kw = {k: v for k, v in vars(args).items() if k in TheoremSettings.__dataclass_fields__}
    return TheoremSettings(**kw)
