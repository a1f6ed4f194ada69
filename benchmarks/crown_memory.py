"""Peak memory and wall time of full CROWN on the paper's 6x5120 CIFAR-shaped l_inf-dist net.

CROWN bounds every intermediate layer with a backward pass from an identity of
the layer's width, so its memory grows with ``batch x 5120^2``; ``certify``
caps the batch by a memory estimate under ``$LINF_BOUND_MEMORY_GB`` (see
:func:`linf_plugin.certification.bound_batch_limit`).  This script certifies
``--n`` inputs with ``method="crown"`` and reports the peak memory: resident
set size on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU.

    python benchmarks/crown_memory.py --n 32              # CPU: ~1 h on 2 cores
    python benchmarks/crown_memory.py --device cuda --n 10000
"""
from __future__ import annotations

import argparse
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import linf_plugin
from linf_plugin.certification import certify
from linf_plugin.certification.bound_prop import bound_batch_limit
from linf_plugin.io import atomic_write_json

from certify import _cifar_net, _cpu_name  # benchmarks/certify.py (this folder is on sys.path when run as a script)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is KiB on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=32, help="inputs to certify")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    net = _cifar_net(dev)
    x = torch.rand(args.n, 3, 32, 32, device=dev)
    with torch.no_grad():
        y = torch.cat([net(x[i:i + 256]).argmax(1) for i in range(0, args.n, 256)])
    batch = bound_batch_limit("crown", net, x[:1])
    rss_before = _peak_rss_gib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    res = certify(net, (x, y), args.eps, "crown", progress=True)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else _peak_rss_gib()
    row = {"model": "linf_dist_mlp_6x5120", "method": "crown", "eps": args.eps, "n": args.n,
           "batch_limit": batch, "batches": -(-args.n // batch), "wall_s": wall,
           "peak_gib": peak, "peak_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS",
           "peak_rss_before_certify_gib": rss_before, "certified": int(res.certified.sum()),
           "float_rigorous": bool(res.float_rigorous)}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    print(f"crown on linf_dist_mlp_6x5120 ({name}): {args.n} inputs in {row['batches']} batches of <= {batch}, "
          f"{wall:.0f} s, peak {peak:.2f} GiB ({row['peak_kind']}; {rss_before:.2f} GiB before certify), "
          f"{row['certified']} certified")
    out = Path(args.out or f"benchmarks/results/crown_memory-{dev.type}.json")
    atomic_write_json(out, {"benchmark": "crown_memory", "device": name, "device_type": dev.type,
                            "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "linf_plugin": linf_plugin.__version__,
                            "timestamp": datetime.now(timezone.utc).isoformat(), "rows": [row]})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
