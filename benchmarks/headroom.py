"""How many points any sound verifier could still certify on the models ``make run`` trains.

For each ε, every method that applies certifies ALL test points of the digits
suite's models (``python -m comparisons run``'s presets, taken from its
checkpoint cache or trained into it), and an attack ensemble much stronger than
the harness's PGD-100 (PGD-``--steps`` with ``--restarts`` random starts, on the
cross-entropy and on the margin loss, over ``--seeds`` seeds) tries to break
every point.  A point that an attack breaks cannot be certified by any sound
method, so

    headroom = (points no attack broke) − (points the best method certified)

bounds what a tighter relaxation, more α-CROWN iterations or even a complete
verifier could add, and ``IBP + k points`` is attainable only where
``unbroken − IBP-certified ≥ k``.  Every certified point is checked against
every attack (a broken certified point would be a wrong certificate: the script
fails), and each method is compared point by point with the cheapest bound of
the model (interval propagation where it applies, else IBP): ``missed`` counts
the points that bound certifies and the method does not.

Prints a table per model and writes JSON (``--out``).

    python benchmarks/headroom.py                       # the digits models, make run's cache
    python benchmarks/headroom.py --models hybrid --eps 0.2
"""
from __future__ import annotations

import argparse
import platform
import time
import warnings
from datetime import datetime, timezone

import torch

import linf_plugin
from comparisons.cache import CheckpointCache
from comparisons.suites import build_config, get_suite, select_models
from linf_plugin.attacks import pgd_attack
from linf_plugin.certification import applicable_methods, certify
from linf_plugin.data import load_dataset
from linf_plugin.io import atomic_write_json
from linf_plugin.lirpa import compat


def strong_attack(model, x, y, eps, steps, restarts, seeds):
    """``(B,)`` bool: broken (or misclassified) by any PGD run of the ensemble; and the runs made."""
    broken = torch.zeros(len(y), dtype=torch.bool)
    runs = 0
    for loss in ("ce", "margin"):
        for seed in range(seeds):
            res = pgd_attack(model, x, y, eps, steps=steps, restarts=restarts, loss=loss,
                             generator=torch.Generator().manual_seed(seed))
            broken |= res.success | ~res.correct
            runs += 1
    return broken, runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="linf,hybrid", help="digits suite keys (linf, hybrid, ibp, crown-ibp)")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--methods", default="margin,interval,ibp,crown-ibp,crown,alpha-crown",
                    help="methods to run where they apply (α-CROWN on a ReLU CNN costs seconds a point)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--cache-dir", default="cache", help="the checkpoint cache (make run's: ./cache)")
    ap.add_argument("--out", default="benchmarks/results/headroom-digits.json")
    args = ap.parse_args(argv)
    for name in ("steps", "restarts", "seeds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    suite = get_suite("digits")
    specs = select_models(suite, args.models.split(","))
    wanted = [m.strip() for m in args.methods.split(",")]
    test = load_dataset("digits", "test")
    x, y = test.x, test.y
    cache = CheckpointCache(args.cache_dir)
    results = dict(benchmark="headroom", suite="digits", auto_lirpa=compat.auto_lirpa_version(),
                   linf_plugin=linf_plugin.__version__, torch=torch.__version__, machine=platform.node(),
                   threads=torch.get_num_threads(), timestamp=datetime.now(timezone.utc).isoformat(),
                   n=len(y), eps=args.eps,
                   attack=dict(steps=args.steps, restarts=args.restarts, seeds=args.seeds, losses=["ce", "margin"]),
                   models={})
    for spec in specs:
        cached = cache.get_or_train(build_config(spec, progress=False))
        model = cached.model.eval()
        methods = [str(m.value) for m in applicable_methods(model) if m in wanted]
        rows = []
        print(f"\n{spec.label} ({spec.preset}, checkpoint {cached.path}):")
        print(f"{'eps':>6} {'PGD-100':>8} {'unbroken':>8} " + " ".join(f"{m:>11}" for m in methods)
              + f" {'headroom':>8} {'over IBP':>8}")
        for eps in args.eps:
            t0 = time.perf_counter()
            broken, runs = strong_attack(model, x, y, eps, args.steps, args.restarts, args.seeds)
            attack_s = time.perf_counter() - t0
            pgd100 = pgd_attack(model, x, y, eps, steps=100, generator=torch.Generator().manual_seed(0))
            certified, seconds, flags = {}, {}, {}
            for method in methods:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = certify(model, test, eps, method)
                if (res.certified & broken).any():
                    raise SystemExit(f"WRONG CERTIFICATE: {method} certified a point an attack broke "
                                     f"({spec.key}, eps {eps})")
                certified[method] = int(res.certified.sum())
                seconds[method] = float(res.wall_time)
                flags[method] = res.certified
            reference = "interval" if "interval" in flags else "ibp"
            missed = {m: int((flags[reference] & ~f).sum()) for m, f in flags.items()} if reference in flags else {}
            unbroken = int((~broken).sum())
            best = max(certified.values())
            row = dict(eps=eps, pgd100_unbroken=int((~(pgd100.success | ~pgd100.correct)).sum()),
                       unbroken=unbroken, attack_runs=runs, attack_seconds=attack_s, certified=certified,
                       seconds=seconds, reference=reference, missed=missed, headroom=unbroken - best,
                       over_ibp_max=(unbroken - certified["ibp"]) if "ibp" in certified else None)
            rows.append(row)
            print(f"{eps:6.3f} {row['pgd100_unbroken']:8d} {unbroken:8d} "
                  + " ".join(f"{certified[m]:11d}" for m in methods)
                  + f" {row['headroom']:8d} {'' if row['over_ibp_max'] is None else row['over_ibp_max']:>8}")
            worse = {m: k for m, k in missed.items() if k}
            if worse:
                print(f"       points {reference} certifies and these methods do not: {worse}")
        results["models"][spec.key] = dict(preset=spec.preset, label=spec.label, checkpoint_key=cached.key,
                                           rows=rows)
        atomic_write_json(args.out, results)  # after every model: a run cut short keeps what it measured
    print(f"\n(points of {len(y)}; headroom = unbroken − best certified: what any sound verifier could add; "
          "over IBP = the most any method could certify beyond IBP)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
