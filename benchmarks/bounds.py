"""Bound quality and speed of every certification method on our three model families (digits).

Trains one model per family with its digits preset, compressed to ``--epochs``
(``linf_plugin.training``: the ℓ∞-dist net with the paper's loss and p schedule,
the hybrid with IBP-bound training, the ReLU CNN with IBP), then for each ε
certifies the first ``--n`` test points with every method that applies
(``linf_plugin.certification.certify``: margin, interval, IBP, CROWN-IBP, CROWN,
α-CROWN) and reports

* certified accuracy and wall time per method (``certify``'s own timing, the
  auto_LiRPA ``BoundedModule`` build included); every method runs on the same
  points, except α-CROWN on the ReLU CNN: the first ``--alpha-n`` points only
  (it costs seconds per point there);
* tightness: the mean gap between each bound-propagation method's lower bound
  on the smallest margin and the smallest margin PGD finds (an upper bound of
  the true minimum), over the correctly classified points.

Prints a table per model and writes JSON (``--out``).

    python benchmarks/bounds.py --n 200 --eps 0.1 0.2 --epochs 20 --alpha-n 10
"""
from __future__ import annotations

import argparse
import math
import platform
import time
import warnings
from datetime import datetime, timezone

import torch

import linf_plugin
from linf_plugin.attacks import pgd_attack
from linf_plugin.certification import applicable_methods, certify
from linf_plugin.certification.bound_prop import LIRPA_METHODS, BoundPropCertifier
from linf_plugin.data.box import linf_box
from linf_plugin.data import load_dataset
from linf_plugin.io import atomic_write_json
from linf_plugin.nn import lp_dist_layers
from linf_plugin.lirpa import applied_operator_fixes, compat
from linf_plugin.training import get_preset, scale_epochs, train

PRESETS = ("digits-linf", "digits-hybrid", "digits-ibp")
def _pgd_min_margin(model, x, y, eps):
    """Smallest margin PGD-50 finds in the clipped box (an upper bound of the true minimum)."""
    res = pgd_attack(model, x, y, eps, steps=50, restarts=2, loss="margin", data_range=(0.0, 1.0))
    with torch.no_grad():
        logits = model(res.x_adv)
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], -math.inf).max(1).values
    return true - other


def _gap_to_pgd(model, x, y, correct, eps, method, pgd):
    """Mean of (PGD's smallest margin − the method's lower bound on it) over the correct points."""
    lower, upper = linf_box(x, eps, (0.0, 1.0), outward=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cert = BoundPropCertifier(model, x[:1], int(model.num_classes))
        lb = cert.lower_margins(x, y, lower, upper, method)
    gap = (pgd - lb.min(1).values)[correct]
    return float(gap.mean()) if len(gap) else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="test points to certify")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--alpha-n", type=int, default=10,
                    help="α-CROWN on the ReLU CNN on the first n of those points only (~15 s per point, 2 cores)")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs per model (presets compressed)")
    ap.add_argument("--out", default="benchmarks/results/bounds-cpu.json")
    args = ap.parse_args(argv)
    test = load_dataset("digits", split="test").subset(args.n)
    x, y = test.x, test.y
    results = dict(benchmark="bounds", auto_lirpa=compat.auto_lirpa_version(), compat_fixes=compat.applied_fixes(),
                   operator_fixes=applied_operator_fixes(), linf_plugin=linf_plugin.__version__,
                   torch=torch.__version__, machine=platform.node(), threads=torch.get_num_threads(),
                   timestamp=datetime.now(timezone.utc).isoformat(), n=len(y), eps=args.eps, epochs=args.epochs,
                   models={}, rows=[])
    for preset in PRESETS:
        cfg = scale_epochs(get_preset(preset), args.epochs).replace(eval_every=0, progress=False, out_dir=None)
        t0 = time.perf_counter()
        model = train(cfg).model.eval()
        train_s = time.perf_counter() - t0
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        name = f"{cfg.model} ({preset})"
        results["models"][name] = dict(preset=preset, train_seconds=train_s, clean_accuracy=float(correct.float().mean()))
        print(f"\n{name}: trained {args.epochs} epochs in {train_s:.1f} s, clean accuracy {correct.float().mean():.3f}")
        print(f"{'eps':>6} {'method':>12} {'certified':>9} {'seconds':>8} {'gap to PGD':>10}")
        for eps in args.eps:
            pgd = _pgd_min_margin(model, x, y, eps)
            lp_dist = any(True for _ in lp_dist_layers(model))
            for method in applicable_methods(model):
                n = min(args.alpha_n, len(y)) if method == "alpha-crown" and not lp_dist else len(y)
                # one untimed call first: torch.compile / kernel warm-up is not the method's cost
                if method != "alpha-crown":
                    certify(model, test.subset(8), eps, method)
                res = certify(model, test.subset(n), eps, method)
                gap = (_gap_to_pgd(model, x[:n], y[:n], correct[:n], eps, method, pgd[:n])
                       if method in LIRPA_METHODS else None)
                row = dict(model=name, eps=eps, method=method, n=n, certified=float(res.certified_accuracy),
                           seconds=float(res.wall_time), gap_to_pgd=gap)
                results["rows"].append(row)
                print(f"{eps:6.3f} {method:>12} {row['certified']:9.3f} {row['seconds']:8.3f} "
                      f"{'' if gap is None else f'{gap:.4f}':>10}" + (f"  (first {n} points)" if n < len(y) else ""))
            pgd_acc = float((correct & (pgd > 0)).float().mean())
            results["rows"].append(dict(model=name, eps=eps, method="PGD (upper bound)", certified=pgd_acc,
                                        seconds=None, gap_to_pgd=0.0))
            print(f"{eps:6.3f} {'PGD (upper)':>12} {pgd_acc:9.3f}")
        atomic_write_json(args.out, results)  # after every model: a long run cut short keeps what it measured
    atomic_write_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
