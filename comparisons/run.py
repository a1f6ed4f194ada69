"""``python -m comparisons run``: train (or reuse) each model, certify it with every method that applies, attack it.

For each model of the suite (:mod:`comparisons.suites`):

1. train it with its preset, or reuse the cached checkpoint (:mod:`comparisons.cache`);
2. clean accuracy and PGD-100 accuracy at every ε of the grid
   (:func:`linf_plugin.attacks.pgd_attack`, batched here);
3. certified accuracy with every method of :func:`linf_plugin.certification.applicable_methods`
   (or the ``--methods`` asked for): ``margin`` in ONE pass for the whole grid
   (radius-based), the others one :func:`linf_plugin.certification.certify` call per ε
   (or a per-sample bisection with ``--bisect``).

Everything measured goes into one JSON-able dict (``results.json``); the
Markdown table, the CSV and the plots are rendered from that file by
:mod:`comparisons.report`.  A step that raises is recorded as an error in
the results (and listed in the summary); the run goes on with the rest.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from linf_plugin import distributed as pg
from linf_plugin.certification import applicable_methods, certified_accuracy_curve, certify
from linf_plugin.data import load_dataset
from linf_plugin.io import atomic_write_json
from linf_plugin.names import METHODS, Method

from .cache import CheckpointCache
from .common import (SCHEMA_VERSION, Timer, UsageError, count_params, environment, error_record, log, nan_to_none,
                     progress_enabled, resolve_device, shared_run_dir, torch_threads, usage_errors)
from .jobs import Saving, bisect_radii, certify_at, check_run_state, is_fatal, pgd_accuracy
from .suites import ModelSpec, build_config, eps_label_list, get_suite, parse_overrides, select_models, training_label

__all__ = ["RunSettings", "run_comparison", "evaluate_model", "speed_accuracy", "budgeted_points",
           "BASELINE_TRAININGS", "DENSE_POINTS"]

# settings that change how a run is carried out, not its results (free to differ when resuming)
_RUNTIME_SETTINGS = ("out", "device", "data_root", "cache_dir", "use_cache", "num_threads", "progress", "resume")

# Training methods that count as "baselines" for the speed/accuracy goal.
BASELINE_TRAININGS = ("IBP", "CROWN-IBP")
DENSE_POINTS = 121


@dataclass
class RunSettings:
    """Everything ``python -m comparisons run`` takes (see ``--help``).

    Attributes:
        suite: suite name (``digits``, ``fashion-mnist``, ``mnist-0.3``, ``cifar10-8/255``).
        models: model keys or training presets (None = the suite's).
        methods: certification methods (None = every one that applies).
        eps: ε grid in pixel units (None = the suite's).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        data_root: folder of MNIST / CIFAR-10.
        cache_dir, use_cache: checkpoint cache (``--no-cache`` retrains into the run folder).
        out: run folder (None = ``runs/run-<timestamp>``).
        epochs: squeeze every recipe to this many epochs (None = the presets').
        overrides: ``--set`` items (``[MODEL.]FIELD=JSON``).
        train_subset, test_subset: first n training / test samples.
        method_points: ``{method: n}``: certify that method on the first n test points only.
        budgets: ``{method: seconds}``: per model, certify that method on as many leading test points
            as fit in the budget (a probe on the first points sets the count; see :func:`budgeted_points`).
            The suite's budgets apply unless ``full``; the user's win.
        full: everything as in the first runs: the suite's full training presets, no time budgets.
        pgd_steps, pgd_restarts: the attack (100 steps = PGD-100).
        pgd_points: attack the first n test points (None = the suite's choice: all for digits, the first
            1,000 for fashion-mnist; ``full`` attacks all).
        bisect, bisect_steps: per-sample radius bisection for bound propagation.
        batch_size, alpha_iterations: certification settings.
        seed: training seed and attack generator seed.
        num_threads: CPU threads (None = torch's default).
        progress: progress bars (None = when stderr is a terminal; rank 0 only under torchrun).
        resume: continue the run saved in ``out`` (``--resume``): finished batches of certification, bisection
            and PGD are read back, not computed again (see :mod:`comparisons.jobs`).
        preset: deprecated alias of ``suite`` (warns; removed in the next release).
    """

    suite: str = "digits"
    models: Optional[List[str]] = None
    methods: Optional[List[str]] = None
    eps: Optional[List[float]] = None
    device: str = "auto"
    data_root: Optional[str] = None
    cache_dir: str = "cache"
    use_cache: bool = True
    out: Optional[str] = None
    epochs: Optional[int] = None
    overrides: List[str] = field(default_factory=list)
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    method_points: Dict[str, int] = field(default_factory=dict)
    budgets: Dict[str, float] = field(default_factory=dict)
    full: bool = False
    pgd_steps: int = 100
    pgd_restarts: int = 1
    pgd_points: Optional[int] = None
    bisect: bool = False
    bisect_steps: int = 12
    batch_size: int = 256
    alpha_iterations: int = 20
    seed: int = 0
    num_threads: Optional[int] = None
    progress: Optional[bool] = None
    resume: bool = False
    preset: Optional[str] = None

    def __post_init__(self):
        if self.preset is not None:
            warnings.warn("RunSettings(preset=...) is deprecated and will be removed in the next release: use "
                          "suite=... (training presets are chosen with models=...)", FutureWarning, stacklevel=3)
            if self.suite not in ("digits", self.preset):
                raise ValueError(f"suite={self.suite!r} and its deprecated alias preset={self.preset!r} disagree")
            self.suite, self.preset = self.preset, None


def _check_methods(methods: Optional[List[str]]) -> Optional[List[Method]]:
    if methods is None:
        return None
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown certification method(s) {bad}; choose from {[m.value for m in METHODS]}")
    return [Method(m) for m in dict.fromkeys(methods)]


def _pgd(model, x, y, eps_grid, steps, restarts, batch_size, data_range, seed, device, bar, saving: Saving) -> dict:
    out = []
    for k, eps in enumerate(eps_grid):
        broken, seconds, retries = pgd_accuracy(model, x, y, eps, saving=saving.sub(f"eps-{k}"), steps=steps,
                                                restarts=restarts, batch_size=batch_size, data_range=data_range,
                                                seed=seed, device=device)
        acc = float((~broken).sum().item()) / broken.numel()
        out.append({"eps": eps, "accuracy": acc, "time": seconds, **({"oom_retries": retries} if retries else {}),
                    "_broken": broken})
        bar.update(1)
    return {"status": "ok", "steps": steps, "restarts": restarts, "n": int(x.shape[0]), "results": out}


def _dense_curve(radius: torch.Tensor, eps_max: float, points: int = DENSE_POINTS) -> dict:
    grid = np.linspace(0.0, eps_max, points)
    radius = radius.numpy()
    return {"eps": [float(e) for e in grid], "certified_accuracy": [float(np.mean(radius > e)) for e in grid]}


def _certify_method(model, data, method, eps_grid, *, batch_size, device, alpha_iterations, bisect, bisect_steps,
                    bar, saving: Saving = Saving(), budget: Optional[float] = None) -> dict:
    """One method on one model over the whole grid; the record that goes into results.json.

    Models with ℓp-dist layers use kernels compiled on first use
    (``torch.compile`` on the CPU, NVRTC on the GPU), which would be charged
    to whichever method runs them first.  For them each method (α-CROWN
    excepted: it runs CROWN's kernels) first runs once, untimed, on the
    first ``batch_size`` points (margin: on the one batch its timed pass
    runs), so the same kernels and shapes are compiled; that time is
    recorded as ``warmup_time``.  ReLU nets need no warm-up.  Every rank warms
    up its own kernels (``distributed=False``).
    """
    from linf_plugin.nn import lp_dist_layers

    eps_max = max(eps_grid) * 1.25 if max(eps_grid) > 0 else 1.0
    warm = 0.0
    if method != Method.ALPHA_CROWN and any(True for _ in lp_dist_layers(model)):
        # margin's timed pass is one batch (_margin_batch), cheap: warm up on that same batch, so the first call
        # at its size (slower than the next ones, compiled or not) is not the one timed
        n_warm, warm_batch = ((min(len(data), _margin_batch(batch_size, len(data))),) * 2 if method == Method.MARGIN
                              else (min(len(data), batch_size), batch_size))
        with Timer(device) as tw:
            certify(model, data.subset(n_warm), 0.0 if method == Method.MARGIN else eps_grid[0],
                    method, batch_size=warm_batch, device=device, alpha_iterations=alpha_iterations,
                    distributed=False)
        warm = tw.seconds
    kw = dict(batch_size=batch_size, device=device, alpha_iterations=alpha_iterations, bisect=bisect,
              bisect_steps=bisect_steps, saving=saving)
    if budget is not None and method != Method.MARGIN:
        rec = _budgeted_method(model, data, method, eps_grid, eps_max, budget, **kw)
        bar.update(len(eps_grid))
    else:
        rec = _timed_method(model, data, method, eps_grid, eps_max, bar=bar, **kw)
    rec["warmup_time"] = warm
    return rec


def budgeted_points(probe_time: float, probe_n: int, total: int, budget: float) -> int:
    """How many leading points a method certifies within ``budget`` seconds (for the whole ε grid).

    The probe certified the first ``probe_n`` points at every ε in
    ``probe_time`` seconds (one ``BoundedModule`` build per ε included, so
    the per-point estimate errs high); the method then runs on the first
    ``n`` points with ``n = clamp(budget / (probe_time / probe_n), probe_n, total)``.
    """
    if probe_n >= total:
        return total
    per_point = probe_time / probe_n if probe_time > 0 else 0.0
    fit = total if per_point <= 0 else int(budget / per_point)
    return int(min(total, max(probe_n, fit)))


# Points certified first by a budgeted method, whatever the budget (α-CROWN on a digits ReLU CNN:
# several seconds a point for the ε grid).  A one-point α-CROWN batch used to raise a KeyError in
# auto_LiRPA's α code (operator fix 12 in linf_plugin.lirpa.operator_fixes).
BUDGET_PROBE = {Method.ALPHA_CROWN: 1}
DEFAULT_PROBE = 16
# a probe is 2 to PROBE_GROWTH times as large as the last, takes at most 1 / PROBE_GROWTH of the
# budget at the last one's rate a point, and all probes together at most PROBE_SHARE of it
PROBE_GROWTH = 4
PROBE_SHARE = 0.5


def next_probe(probe_time: float, probe_n: int, total: int, seconds: float, batch_size: int) -> int:
    """The size of the next, larger probe batch, or 0 when probing further does not pay.

    Bound propagation costs less a point in larger batches while a batch is
    small (α-CROWN on the digits hybrid at one ε: 0.05 s a point alone, 0.01 s in
    a batch of 360) and more once a batch outgrows the caches (CROWN on a digits
    CNN), so a one-batch probe's rate holds for its own batch size only.  The
    next probe is the largest that takes at most ``seconds`` at the last
    probe's rate (``probe_time / probe_n``), capped by ``PROBE_GROWTH`` times
    the last, ``total`` and ``batch_size``; 0 when that is less than twice the
    last (and not everything that is left).
    """
    cap = min(total, batch_size)
    if probe_n >= cap:
        return 0
    q = min(cap, PROBE_GROWTH * probe_n)
    if probe_time > 0:
        q = min(q, int(seconds / (probe_time / probe_n)))
    return q if q >= min(cap, 2 * probe_n) else 0


def _budgeted_method(model, data, method, eps_grid, eps_max, budget, *, batch_size, **kw) -> dict:
    """``_timed_method`` on the first points that fit in ``budget`` seconds.

    Probes on the first points, one batch each and growing (:func:`next_probe`),
    measure the method's rate a point; growth stops when a larger batch costs
    more a point.  The probe with the best rate sets the count
    (:func:`budgeted_points`) and, when more points fit than it had, the
    method runs again on the first ``n`` points in batches of its size (the
    record and times are that run's; the probes' sizes and times are kept under
    ``budget``).  A probe's time is the sum of its chunks' compute times, saved
    with them: a resumed run (or one under torchrun) makes the same choices.
    """
    size = min(len(data), batch_size, BUDGET_PROBE.get(method, DEFAULT_PROBE))
    probes, best = [], None
    while size:
        saving = kw["saving"].sub("probe" if not probes else f"probe-{len(probes)}")
        rec = _timed_method(model, data.subset(size), method, eps_grid, eps_max, batch_size=size, bar=None,
                            **{**kw, "saving": saving})
        probes.append([size, rec["time"]])
        if best is not None and rec["time"] / size > best[1]["time"] / best[0]:
            break  # a larger batch costs more a point: larger ones will not pay either
        best = (size, rec)
        allowance = min(budget / PROBE_GROWTH, PROBE_SHARE * budget - sum(t for _, t in probes))
        size = next_probe(rec["time"], size, len(data), allowance, batch_size) if allowance > 0 else 0
    probe_n, rec = best
    probe_time = rec["time"]
    n = budgeted_points(probe_time, probe_n, len(data), budget)
    if n > probe_n:
        rec = _timed_method(model, data.subset(n), method, eps_grid, eps_max, batch_size=probe_n, bar=None, **kw)
    rec["budget"] = {"seconds": float(budget), "probe_points": probe_n, "probe_time": probe_time,
                     "points": n, "of": len(data), "probes": probes}
    return rec


def _margin_batch(batch_size: int, n: int) -> int:
    """The margin pass's batch: the whole set up to 4096 points (one forward; batching only adds overhead)."""
    return max(batch_size, min(n, 4096))


def _timed_method(model, data, method, eps_grid, eps_max, *, batch_size, device, alpha_iterations, bisect,
                  bisect_steps, bar, saving: Saving = Saving()) -> dict:
    from tqdm.auto import tqdm

    bar = bar if bar is not None else tqdm(disable=True)
    if method == Method.MARGIN:
        margin_batch = _margin_batch(batch_size, len(data))
        with Timer(device) as t:
            curve = certified_accuracy_curve(model, data, eps_grid, Method.MARGIN, batch_size=margin_batch,
                                             device=device)
        # under torchrun the pass runs on one rank and the call also hashes and gathers: time the pass itself
        seconds = curve.extra["chunks"]["compute_time"] if "chunks" in curve.extra else t.seconds
        bar.update(len(eps_grid))
        results = [{"eps": e, "certified_accuracy": a, "time": seconds,
                    "_certified": curve.radius > e}
                   for e, a in zip(eps_grid, curve.certified_accuracy.tolist())]
        return {"status": "ok", "one_pass": True, "n": len(data), "time": seconds, "results": results,
                "curve": _dense_curve(curve.radius, eps_max), "extra": nan_to_none(dict(curve.extra))}
    if bisect:  # interval and bound propagation
        radius, extra, seconds = bisect_radii(model, data, method, eps_max, saving=saving.sub("bisect"),
                                              batch_size=batch_size, device=device,
                                              alpha_iterations=alpha_iterations, bisect_steps=bisect_steps)
        bar.update(len(eps_grid))
        results = [{"eps": e, "certified_accuracy": float((radius > e).double().mean()), "time": seconds,
                    "_certified": radius > e}
                   for e in eps_grid]
        return {"status": "ok", "one_pass": False, "bisect": True, "n": len(data), "time": seconds,
                "results": results, "curve": _dense_curve(radius, eps_max), "extra": nan_to_none(extra)}
    results, total = [], 0.0
    for k, e in enumerate(eps_grid):
        res, seconds = certify_at(model, data, e, method, saving=saving.sub(f"eps-{k}"), batch_size=batch_size,
                                  device=device, alpha_iterations=alpha_iterations)
        results.append({"eps": e, "certified_accuracy": res.certified_accuracy, "time": seconds,
                        "_certified": res.certified})
        if res.extra.get("chunks", {}).get("oom_retries"):  # batches retried at half the size (see jobs.py)
            results[-1]["oom_retries"] = res.extra["chunks"]["oom_retries"]
        total += seconds
        bar.update(1)
    return {"status": "ok", "one_pass": False, "n": len(data), "time": total, "results": results, "curve": None,
            "extra": {}}


def evaluate_model(model, data, eps_grid, methods, *, device, batch_size=256, alpha_iterations=20, bisect=False,
                   bisect_steps=12, pgd_steps=100, pgd_restarts=1, pgd_points=None, seed=0, method_points=None,
                   budgets=None, stage_bar=None, saving: Optional[Saving] = None) -> dict:
    """Clean, PGD and certified accuracy of one trained model (the ``evaluation`` part of a model record).

    Args:
        model: eval-mode model on ``device``.
        data: a :class:`~linf_plugin.data.DatasetSplit` (test points).
        eps_grid: sorted ε values (pixel units).
        methods: methods to try (None = all of ``METHODS``); those that do not
            apply are recorded as ``n/a``.
        pgd_points: attack the first n points only (None: all).
        method_points: ``{method: n}`` restricts a method to the first n points.
        budgets: ``{method: seconds}``: a method not in ``method_points`` runs on
            the leading points that fit in its budget (recorded under ``budget``).
        stage_bar: ``stage_bar(name, total)`` -> a tqdm bar for one stage (PGD, one
            method), ticked once per ε; None for no bars.
        saving: where PGD, bisection and certification save their chunks for a
            resume (:class:`comparisons.jobs.Saving`); None: nowhere.

    Returns:
        ``{"n", "clean_accuracy", "pgd", "methods": {method: record}, "pgd_vs_certified"}``: the last one
        counts, per method and ε, the points a method certified that PGD broke (on the points both saw);
        anything but 0 is a wrong certificate.

    Raises:
        ResumeError, RankFailure: a refused resume, a dead or hung rank (other
            errors of a step are recorded and the other steps run).
    """
    from tqdm.auto import tqdm

    stage_bar = stage_bar or (lambda name, total: tqdm(total=total, disable=True))
    saving = saving or Saving()
    methods = list(METHODS) if methods is None else list(methods)
    method_points, budgets = method_points or {}, budgets or {}
    x, y = data.x, data.y
    with torch.no_grad():
        correct = []
        for s in range(0, x.shape[0], batch_size):
            correct.append((model(x[s:s + batch_size].to(device)).argmax(1).cpu() == y[s:s + batch_size]))
    correct = torch.cat(correct)
    clean = float(correct.sum().item()) / correct.numel()
    out = {"n": len(data), "clean_accuracy": clean}
    n_pgd = len(data) if pgd_points is None else min(int(pgd_points), len(data))
    bar = stage_bar(f"PGD-{pgd_steps}" + (f" (first {n_pgd} points)" if n_pgd < len(data) else ""), len(eps_grid))
    try:
        out["pgd"] = _pgd(model, x[:n_pgd], y[:n_pgd], eps_grid, pgd_steps, pgd_restarts, batch_size,
                          tuple(data.data_range), seed, device, bar, saving.sub("pgd"))
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        if is_fatal(exc):
            raise
        out["pgd"] = error_record(exc)
        log(f"  PGD failed: {out['pgd']['error']}")
    finally:
        bar.close()
    ok = applicable_methods(model)
    records = {}
    for m in METHODS:
        if m not in methods:
            records[m] = {"status": "not run"}
            continue
        if m not in ok:
            records[m] = {"status": "n/a"}
            continue
        sub = data.subset(int(method_points[m])) if m in method_points else data
        budget = budgets.get(m) if m not in method_points else None
        bar = stage_bar(m + (f" (budget {budget:g} s)" if budget is not None else ""), len(eps_grid))
        try:
            records[m] = _certify_method(model, sub, m, eps_grid, batch_size=batch_size, device=device,
                                         alpha_iterations=alpha_iterations, bisect=bisect, bisect_steps=bisect_steps,
                                         bar=bar, budget=budget, saving=saving.sub(m))
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            if is_fatal(exc):
                raise
            records[m] = error_record(exc)
            log(f"  {m} failed on {getattr(model, 'model_name', type(model).__name__)}: {records[m]['error']}")
        finally:
            bar.close()
    out["pgd_vs_certified"] = pgd_breaks_certified(out["pgd"], records, model)
    for rec in [out["pgd"], *records.values()]:
        for r in rec.get("results", []):
            r.pop("_broken", None)
            r.pop("_certified", None)
    out["methods"] = records
    return out


def pgd_breaks_certified(pgd: dict, records: Dict[str, dict], model=None) -> dict:
    """Per method and ε: how many points the method certified that PGD broke (must be 0), on the points both saw.

    Args:
        pgd: the PGD record of :func:`evaluate_model` (with its per-point ``_broken`` masks).
        records: method name -> record (with per-point ``_certified`` masks in its results).

    Returns:
        ``{"checked": bool, "broken_certified": total, "methods": {method: [{"eps", "points", "broken"}]}}``.
    """
    out = {"checked": False, "broken_certified": 0, "methods": {}}
    if pgd.get("status") != "ok":
        return out
    for meth, rec in records.items():
        if rec.get("status") != "ok":
            continue
        rows = []
        for pr, mr in zip(pgd["results"], rec["results"]):
            broken, cert = pr.get("_broken"), mr.get("_certified")
            if broken is None or cert is None:
                continue
            k = min(len(broken), len(cert))
            bad = int(np.sum(np.asarray(cert[:k], dtype=bool) & np.asarray(broken[:k], dtype=bool)))
            rows.append({"eps": mr["eps"], "points": k, "broken": bad})
            out["broken_certified"] += bad
            if bad:
                log(f"  PGD broke {bad} point(s) that {meth} certified at eps={mr['eps']:g} on "
                    f"{getattr(model, 'model_name', 'the model')}: a wrong certificate")
        out["methods"][meth] = rows
        out["checked"] = out["checked"] or bool(rows)
    return out


def speed_accuracy(models: List[dict], eps_grid, goal_eps=()) -> dict:
    """The ℓ∞-dist net's margin certificate against the best IBP / CROWN-IBP baseline, per ε.

    At each ε: the baseline (a model trained with IBP or CROWN-IBP) and method
    (any bound-propagation method evaluated on the FULL test set) with the
    highest certified accuracy; compared with the ℓ∞-dist net's margin
    certified accuracy and the time of one margin pass (which certifies
    every ε at once) against that baseline's time for that method at that ε
    (one certify call, BoundedModule construction included).

    Returns:
        ``{"linf_model", "comparisons": [per ε], "goal": {...}}`` (empty
        comparisons when the suite has no ℓ∞-dist net with a margin result or
        no baseline).
    """
    linf = next((m for m in models if m.get("family") == "linf_dist" and m.get("status") == "ok"
                 and m["evaluation"]["methods"].get("margin", {}).get("status") == "ok"), None)
    baselines = [m for m in models if m.get("training") in BASELINE_TRAININGS and m.get("status") == "ok"]
    comps = []
    if linf is not None and baselines:
        margin = linf["evaluation"]["methods"]["margin"]
        for i, eps in enumerate(eps_grid):
            best = None
            for b in baselines:
                n_full = b["evaluation"]["n"]
                for meth, rec in b["evaluation"]["methods"].items():
                    if rec.get("status") != "ok" or rec.get("n") != n_full:
                        continue
                    r = rec["results"][i]
                    cand = (r["certified_accuracy"], -r["time"])
                    if best is None or cand > best[0]:
                        best = (cand, b, meth, r)
            if best is None:
                continue
            _, b, meth, r = best
            mr = margin["results"][i]
            speedup = r["time"] / mr["time"] if mr["time"] > 0 else math.inf
            comps.append({"eps": eps, "linf_certified": mr["certified_accuracy"], "linf_time": mr["time"],
                          "baseline_key": b["key"], "baseline_method": meth,
                          "baseline_certified": r["certified_accuracy"], "baseline_time": r["time"],
                          "accuracy_gap": mr["certified_accuracy"] - r["certified_accuracy"], "speedup": speedup,
                          "accuracy_met": mr["certified_accuracy"] >= r["certified_accuracy"],
                          "speed_met": speedup >= 10.0})
    goal = {"eps": list(goal_eps), "criterion": "at each goal eps: linf-dist margin certified accuracy >= the best "
            "IBP / CROWN-IBP baseline's (best method), and its certification >= 10x faster"}
    at = [c for c in comps if any(abs(c["eps"] - g) < 1e-12 for g in goal_eps)]
    if goal_eps:
        if len(at) < len(goal_eps):
            goal["met"] = None
            goal["note"] = "not every goal eps was evaluated (or a model is missing)"
        else:
            goal["met"] = all(c["accuracy_met"] and c["speed_met"] for c in at)
    return {"linf_model": linf["key"] if linf else None, "comparisons": comps, "goal": goal if goal_eps else None}


def _config(spec: ModelSpec, settings: RunSettings, overrides, device, progress):
    return build_config(spec, epochs=settings.epochs, overrides=overrides, device=str(device),
                        data_root=settings.data_root, train_subset=settings.train_subset, seed=settings.seed,
                        progress=progress, num_threads=settings.num_threads)


class _EpochTicker:
    """A trainer callback that ticks a tqdm bar once per epoch (epochs done before a resume included)."""

    def __init__(self, bar):
        self.bar = bar

    def on_train_start(self, result) -> None:
        self.bar.update(len(result.history))

    def on_epoch_end(self, result) -> None:
        self.bar.update(1)


def _train_or_load(cfg, spec: ModelSpec, cache: CheckpointCache, device, stage_bar):
    hit = cache.lookup(cfg, device) if cache.enabled else None
    # under torchrun every rank trains (DDP) or none does: rank 0's cache decides
    if pg.broadcast_object(hit is not None, what="looking up the checkpoint cache") != (hit is not None):
        raise RuntimeError(f"rank {pg.rank()} cannot read the cached {spec.key} checkpoint that rank 0 found in "
                           f"{cache.root}: put the cache on a file system every node shares (--cache-dir)")
    if hit is None:
        bar = stage_bar(f"{spec.key}: train ({spec.preset}, {cfg.epochs} epochs)", cfg.epochs)
        try:
            return cache.get_or_train(cfg.replace(progress=False), device=device, callbacks=[_EpochTicker(bar)])
        finally:
            bar.close()
    log(f"reusing cached {spec.key} ({hit.path})")
    return hit


def run_comparison(settings: RunSettings):
    """Run the comparison and write the run folder.

    Args:
        settings: :class:`RunSettings`.

    Returns:
        ``(run_dir, results)``: the folder (holding results.json/.md/.csv and
        the plots) and the results dict.
    """
    from tqdm.auto import tqdm

    from .report import render_report

    with usage_errors():  # the suite's checks of --suite, --models, --eps, --set
        suite = get_suite(settings.suite)
        specs = select_models(suite, settings.models, full=settings.full)
        eps_grid = eps_label_list(settings.eps if settings.eps else suite.eps)
        overrides = parse_overrides(settings.overrides)
    if settings.resume and settings.out is None:
        raise UsageError("--resume needs --out: the folder of the run to continue")
    methods = _check_methods(settings.methods)
    device = resolve_device(settings.device)
    if pg.join_group(str(device)) and device.type == "cuda" and device.index is None:
        device = pg.resolve_device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    progress = progress_enabled(settings.progress) and pg.is_main()
    for m, n in settings.method_points.items():
        if m not in METHODS or int(n) < 1:
            raise UsageError(f"--points {m}={n}: need a method of {[x.value for x in METHODS]} and n >= 1")
    for m, b in settings.budgets.items():
        if m not in METHODS or not (float(b) > 0 and math.isfinite(float(b))):
            raise UsageError(f"--budget {m}={b}: need a method of {[x.value for x in METHODS]} and seconds > 0")
    # the user's --points and --budget win over the suite's; a method has points or a budget, not both
    method_points = {**suite.points_for(settings.full), **settings.method_points}
    budgets = {m: float(b) for m, b in {**suite.budgets_for(settings.full), **settings.budgets}.items()
               if m not in settings.method_points}
    method_points = {m: n for m, n in method_points.items() if m not in settings.budgets}
    if settings.pgd_points is not None and int(settings.pgd_points) < 1:
        raise UsageError(f"--pgd-points {settings.pgd_points}: need n >= 1 (leave it out to use the suite's)")
    pgd_points = settings.pgd_points if settings.pgd_points is not None else suite.pgd_points_for(settings.full)

    def stage_bar(desc, total):
        return tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, leave=True)

    run_dir = shared_run_dir("run", settings.out)
    cache = CheckpointCache(settings.cache_dir, enabled=settings.use_cache, scratch=run_dir)
    with torch_threads(settings.num_threads):
        with usage_errors():  # an argument the data set cannot take, or a corrupt file: the user's to fix
            test = load_dataset(suite.dataset, "test", root=settings.data_root)
        if settings.test_subset:
            test = test.subset(int(settings.test_subset))
        recorded = nan_to_none({**asdict(settings), "method_points": method_points, "budgets": budgets,
                                "eps": eps_grid, "suite": suite.name, "pgd_points": pgd_points,
                                "dataset": suite.dataset,
                                "test_points": len(test), "methods": methods or list(METHODS)})
        check_run_state(run_dir / "chunks", {k: v for k, v in recorded.items() if k not in _RUNTIME_SETTINGS},
                        settings.resume)
        saving = Saving(run_dir / "chunks", resume=settings.resume, progress=progress)
        results = {"schema": "comparisons.run", "schema_version": SCHEMA_VERSION, "command": "run",
                   "environment": {**environment(device), "world_size": pg.world_size()},
                   "settings": recorded, "models": []}
        with Timer(device) as total:
            for spec in specs:
                rec = {"key": spec.key, "label": spec.label, "preset": spec.preset}
                try:
                    cfg = _config(spec, settings, overrides, device, progress)
                    rec.update(model_name=cfg.model, family=cfg.family, training=training_label(cfg))
                    cm = _train_or_load(cfg, spec, cache, device, stage_bar)
                except Exception as exc:  # noqa: BLE001 - recorded, the others still run
                    if is_fatal(exc):
                        raise
                    rec.update(error_record(exc), stage="training")
                    log(f"  training {spec.key} failed: {rec['error']}")
                    results["models"].append(rec)
                    continue
                model = cm.model.to(device).eval()
                rec.update(status="ok", model_name=cm.config.model, family=cm.config.family,
                           training=training_label(cm.config), n_params=count_params(model),
                           train={"time": cm.train_time, "epochs": cm.config.epochs, "cache": cm.info(),
                                  "final_metrics": nan_to_none(cm.final_metrics),
                                  "config": cm.config.to_dict()})
                with Timer(device) as t_eval:
                    rec["evaluation"] = evaluate_model(
                        model, test, eps_grid, methods, device=device, batch_size=settings.batch_size,
                        alpha_iterations=settings.alpha_iterations, bisect=settings.bisect,
                        bisect_steps=settings.bisect_steps, pgd_steps=settings.pgd_steps,
                        pgd_restarts=settings.pgd_restarts, pgd_points=pgd_points, seed=settings.seed,
                        method_points=method_points, budgets=budgets, saving=saving.sub(spec.key),
                        stage_bar=lambda desc, total, key=spec.key: stage_bar(f"{key}: {desc}", total))
                rec["evaluation"]["time"] = t_eval.seconds
                results["models"].append(nan_to_none(rec))
        results["speed_accuracy"] = speed_accuracy(results["models"], eps_grid, suite.goal_eps)
        results["wall_time"] = total.seconds
    if pg.is_main():
        atomic_write_json(Path(run_dir) / "results.json", nan_to_none(results), indent=1)
        render_report(run_dir)
    return Path(run_dir), results
