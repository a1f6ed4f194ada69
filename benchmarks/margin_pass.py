"""One margin pass over the digits test set against one IBP pass on the digits ReLU CNN.

The comparison harness times the margin certificate of the ℓ∞-dist net
(``certified_accuracy_curve(..., "margin")``: ONE pass certifies every ε)
against one ``certify(..., "ibp")`` call on the best baseline (BoundedModule
construction included).  This script times the same two calls on the same
architectures (digits-linf: 5 × 128 ℓ∞-dist layers; digits cnn_7layer width
16), untrained (the work does not depend on the weights), in one process,
interleaved, so a loaded machine slows both alike; it reports medians, the
ratio, and the margin pass's parts (the forward pass alone, ``margin_certify``
on one batch, the public call), with the fastest round beside each median
and the load average before and after (other jobs on a shared machine slow
everything; compare runs at a similar load).

Goals: the margin pass over the 360 test digits in <= 3 ms on 2 cores, and
>= 10x faster than the IBP pass.

    python benchmarks/margin_pass.py [--repeats 50] [--threads 2] [--out benchmarks/results/margin_pass-cpu.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import linf_plugin
from linf_plugin.certification import certified_accuracy_curve, certify
from linf_plugin.certification.margin import margin_certify
from linf_plugin.data import load_dataset
from linf_plugin.io import atomic_write_json
from linf_plugin.models import create_model


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/margin_pass-cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    test = load_dataset("digits", "test")
    linf = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=5, width=128).eval()
    cnn = create_model("cnn_7layer", input_shape=(1, 8, 8), num_classes=10, width=16, linear_size=128).eval()
    n, grid = len(test), [0.05, 0.1, 0.2]
    calls = {
        "forward (no grad)": lambda: torch.no_grad()(linf)(test.x),
        "margin_certify, one batch": lambda: margin_certify(linf, test.x, test.y, 0.1),
        "margin pass (harness call)": lambda: certified_accuracy_curve(linf, test, grid, "margin", batch_size=n),
        "IBP pass on the CNN (one eps)": lambda: certify(cnn, test, 0.1, "ibp"),
    }
    for fn in calls.values():  # warm-up: kernels compiled, BoundedModule code paths loaded
        fn(), fn()
    load_before = os.getloadavg()
    rows = {k: [] for k in calls}
    for _ in range(5):  # interleaved rounds: load changes hit every call alike
        for k, fn in calls.items():
            rows[k].append(_median_ms(fn, max(1, args.repeats // 5)))
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in rows.items()}
    best = {k: min(v) for k, v in rows.items()}
    ratio = med["IBP pass on the CNN (one eps)"] / med["margin pass (harness call)"]
    print(f"{n} digits test points, {args.threads} threads, median of {args.repeats} calls (ms; fastest of the "
          f"5 rounds' medians beside it); load average {load_before[0]:.2f} before, {load_after[0]:.2f} after:")
    for k, v in med.items():
        print(f"  {k:<32} {v:9.3f}  ({best[k]:.3f})")
    print(f"  IBP / margin                     {ratio:9.1f}x   (goal >= 10x; margin goal <= 3 ms)")
    record = {"benchmark": "margin_pass", "points": n, "threads": args.threads, "repeats": args.repeats,
              "median_ms": med, "best_round_ms": best, "ibp_over_margin": ratio,
              "load_average_1min": {"before": load_before[0], "after": load_after[0]}, "torch": torch.__version__,
              "linf_plugin": linf_plugin.__version__, "platform": platform.platform(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out), record, indent=1)
    return record


if __name__ == "__main__":
    main()
