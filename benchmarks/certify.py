"""Certification speed per method: the paper's CIFAR-shaped l_inf-dist net and digits models.

For each model and method, certifies ``n`` inputs at one eps and reports the
wall time, the time per 10,000 inputs (measured time scaled linearly when
fewer were run; the row says how many were run) and the ratio to the margin
certificate's time.  Bound propagation on the 6x5120 net is slow on a CPU:
there CROWN runs on 2 inputs, alpha-CROWN is skipped, and every row stops
growing its input count past ``--budget`` seconds; each row says how many
inputs it ran.

Goal (GPU): margin certification of 10,000 CIFAR inputs in under 1 s, with
IBP, CROWN and alpha-CROWN beside it as ratios.

    python benchmarks/certify.py                 # CPU defaults
    python benchmarks/certify.py --device cuda   # GPU: 10,000 CIFAR inputs

``--nproc N`` measures something else: the speed-up of ``certify`` sharded
over N ``torchrun`` processes against one process, for CROWN on the digits
CNN (``cnn_7layer``, width 16, as the digits suite trains it), each process
with ``--threads`` threads (default 1), plus one process with N threads as
the machine's other way of using N cores.  Every run is a fresh process;
the table gives the ``certify`` call's wall time (inside the processes,
gathering included), the whole command's (start-up and imports included),
each rank's compute time, a matmul rate measured in each run, and the
load average before and after (other jobs on the machine slow every run).

    python benchmarks/certify.py --nproc 2       # writes benchmarks/results/certify_sharded-cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import linf_plugin
from linf_plugin.certification import applicable_methods, certify
from linf_plugin.data import dataset_info, load_dataset
from linf_plugin.io import atomic_write_json
from linf_plugin.models import create_model


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cifar_net(device):
    info = dataset_info("cifar10")
    net = create_model("linf_dist_mlp_6x5120", input_shape=(3, 32, 32), num_classes=10, mean=info.mean,
                       std=info.std).to(device)
    net.train()
    with torch.no_grad():
        net(torch.rand(256, 3, 32, 32, device=device))  # non-trivial running means
    return net.eval()


def _digits_models(device):
    """Untrained digits models: timing does not depend on the weights' values."""
    info = dataset_info("digits")
    out = {}
    for name, kw in (("linf_dist_mlp_5x128", {}), ("linf_dist_hybrid_4x128", {}), ("mlp_3layer", {}),
                     ("cnn_4layer", {})):
        m = create_model(name, input_shape=(1, 8, 8), num_classes=10, mean=info.mean, std=info.std, **kw)
        m.to(device).train()
        with torch.no_grad():
            m(torch.rand(64, 1, 8, 8, device=device))
        out[name] = m.eval()
    return out


def _time_row(model, data, eps, method, n, budget, alpha_iterations):
    x, y = data
    if method not in ("crown", "alpha-crown"):
        # untimed: torch.compile specialises on the batch shape, and its compile time is not the method's cost
        w = min(n, 256)
        certify(model, (x[:w], y[:w]), eps, method, alpha_iterations=alpha_iterations)
    # A short probe sizes the run so one row stays inside the budget.
    probe_n = min(n, 8 if method in ("crown", "alpha-crown") else 64)
    t0 = time.perf_counter()
    certify(model, (x[:probe_n], y[:probe_n]), eps, method, alpha_iterations=alpha_iterations)
    probe = time.perf_counter() - t0
    per_input = probe / probe_n
    run_n = n if per_input * n <= budget else max(probe_n, int(budget / max(per_input, 1e-9)))
    run_n = min(run_n, n)
    if run_n > probe_n:
        t0 = time.perf_counter()
        res = certify(model, (x[:run_n], y[:run_n]), eps, method, alpha_iterations=alpha_iterations)
        wall = time.perf_counter() - t0
        cert = res.certified_accuracy
    else:
        wall, cert = probe, None
    return {"method": method, "n_run": run_n, "wall_s": wall, "s_per_10k": wall / run_n * 10000,
            "certified_accuracy": cert}


def _matmul_gflops(device, seconds: float = 0.5) -> float:
    """This process's float32 matmul rate (1024², its current thread count): the machine's own yardstick."""
    a = torch.rand(1024, 1024, device=device)
    b = torch.rand(1024, 1024, device=device)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e9


def _sharded_worker(args) -> None:
    """One process of a ``--nproc`` run (alone, or one torchrun rank): CROWN on the digits CNN, timed."""
    from linf_plugin import distributed as pg

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if pg.launched():
        pg.join_group(args.device)
        if dev.type == "cuda":
            dev = torch.device(f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}")
    info = dataset_info("digits")
    torch.manual_seed(0)  # the same weights in every process (certify checks the ranks' models agree)
    model = create_model("cnn_7layer", input_shape=(1, 8, 8), num_classes=10, width=16, linear_size=128,
                         mean=info.mean, std=info.std).to(dev).eval()
    te = load_dataset("digits", "test")
    data = (te.x[:args.points], te.y[:args.points])
    gflops = _matmul_gflops(dev)
    certify(model, (data[0][:2], data[1][:2]), args.eps, "crown", batch_size=2, distributed=False)  # warm-up
    t0 = time.perf_counter()
    res = certify(model, data, args.eps, "crown", batch_size=args.batch_size)
    wall = time.perf_counter() - t0
    chunks = res.extra.get("chunks", {})
    if pg.is_main():
        atomic_write_json(args.worker_out, {"wall_s": wall, "rank_time_s": chunks.get("rank_time", [wall]),
                                            "world_size": pg.world_size(), "matmul_gflops_rank0": gflops,
                                            "certified": int(torch.as_tensor(res.certified).sum()),
                                            "certified_flags": torch.as_tensor(res.certified).tolist()})


def _sharded_speedup(args) -> None:
    """Time CROWN on the digits CNN in 1 process, in ``--nproc`` torchrun processes, and in 1 process with
    ``--nproc`` times the threads; print the table and write the JSON."""
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--device", args.device, "--points",
          str(args.points), "--batch-size", str(args.batch_size), "--eps", str(args.eps)]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH")))))
    runs = [("1 process", 1, args.threads), (f"{args.nproc} processes (torchrun)", args.nproc, args.threads),
            (f"1 process, {args.nproc * args.threads} threads", 1, args.nproc * args.threads)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, nproc, threads in runs:
            out = Path(tmp) / f"run{len(rows)}.json"
            cmd = me + ["--threads", str(threads), "--worker-out", str(out)]
            if nproc > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(nproc), *cmd[1:]]
            load_before = os.getloadavg()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
            total = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
            rec = json.loads(out.read_text())
            rows.append({"run": label, "processes": nproc, "threads_per_process": threads, "command_s": total,
                         "load_before": load_before, "load_after": os.getloadavg(), **rec})
    base = rows[0]
    if any(r["certified_flags"] != base["certified_flags"] for r in rows):
        raise SystemExit("the runs certified different points: sharding changed a result")
    for r in rows:
        r["speedup_certify"] = base["wall_s"] / r["wall_s"]
        r["speedup_command"] = base["command_s"] / r["command_s"]
        r.pop("certified_flags")
    print(f"CROWN on the digits CNN (cnn_7layer width 16), {args.points} points, batch {args.batch_size}, "
          f"eps {args.eps:g}, {_cpu_name() if args.device == 'cpu' else args.device}, {os.cpu_count()} cores")
    print(f"{'run':32s} {'certify s':>10s} {'x 1 proc':>9s} {'command s':>10s} {'x 1 proc':>9s} {'rank s':>16s} "
          f"{'GFLOP/s':>8s} {'load before/after':>18s}")
    for r in rows:
        ranks = "/".join(f"{t:.1f}" for t in r["rank_time_s"])
        print(f"{r['run']:32s} {r['wall_s']:10.2f} {r['speedup_certify']:9.2f} {r['command_s']:10.2f} "
              f"{r['speedup_command']:9.2f} {ranks:>16s} {r['matmul_gflops_rank0']:8.1f} "
              f"{r['load_before'][0]:8.2f}/{r['load_after'][0]:<8.2f}")
    print(f"all runs certified the same {base['certified']} of {args.points} points")
    out = Path(args.out or f"benchmarks/results/certify_sharded-{torch.device(args.device).type}.json")
    atomic_write_json(out, {"benchmark": "certify --nproc", "model": "cnn_7layer(width=16, linear_size=128)",
                            "method": "crown", "points": args.points, "batch_size": args.batch_size, "eps": args.eps,
                            "device": args.device, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                            "machine": platform.node(), "torch": torch.__version__,
                            "linf_plugin": linf_plugin.__version__,
                            "timestamp": datetime.now(timezone.utc).isoformat(), "rows": rows})
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-cifar", type=int, default=None, help="inputs for the CIFAR net (GPU 10000, CPU 64)")
    parser.add_argument("--n-digits", type=int, default=10000)
    parser.add_argument("--budget", type=float, default=60.0, help="max seconds per row (larger n is scaled)")
    parser.add_argument("--alpha-iterations", type=int, default=20)
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--nproc", type=int, default=None,
                        help="instead: the speed-up of certify over N torchrun processes (CROWN, digits CNN)")
    parser.add_argument("--threads", type=int, default=1, help="--nproc: threads per process")
    parser.add_argument("--points", type=int, default=128, help="--nproc: points certified")
    parser.add_argument("--batch-size", type=int, default=16, help="--nproc: the batch (one chunk each)")
    parser.add_argument("--eps", type=float, default=0.05, help="--nproc: eps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _sharded_worker(args)
    if args.nproc is not None:
        if args.nproc < 1:
            parser.error("--nproc must be >= 1")
        return _sharded_speedup(args)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    device_name = torch.cuda.get_device_name(dev) if gpu else _cpu_name()
    rows = []

    if not args.skip_cifar:
        n = args.n_cifar or (10000 if gpu else 64)
        net = _cifar_net(dev)
        x = torch.rand(n, 3, 32, 32, device=dev)
        with torch.no_grad():
            y = torch.cat([net(x[i:i + 256]).argmax(1) for i in range(0, n, 256)])
        for method in applicable_methods(net):
            run_n = n
            if not gpu and method == "alpha-crown":
                # No ReLU to optimise: on auto_LiRPA 0.3 certify runs one CROWN pass (the crown row), on 0.7.x
                # (which counts the input normalisation's 1/std as optimisable) every iteration is a full
                # CROWN pass (~25 s per input here).
                rows.append({"model": "linf_dist_mlp_6x5120", "method": method,
                             "skipped": f"too slow on CPU (up to {args.alpha_iterations} CROWN passes per input)"})
                continue
            if not gpu and method == "crown":
                run_n = min(n, 2)  # full CROWN bounds every 5120-wide layer: ~15-25 s per input on CPU
            r = _time_row(net, (x, y), 8 / 255, method, run_n, args.budget, args.alpha_iterations)
            rows.append({"model": "linf_dist_mlp_6x5120", "eps": 8 / 255, **r})

    te = load_dataset("digits", "test")
    reps = math.ceil(args.n_digits / len(te))
    x = te.x.repeat(reps, 1, 1, 1)[:args.n_digits].to(dev)
    y = te.y.repeat(reps)[:args.n_digits].to(dev)
    for name, model in _digits_models(dev).items():
        for method in applicable_methods(model):
            r = _time_row(model, (x, y), 0.1, method, args.n_digits, args.budget, args.alpha_iterations)
            rows.append({"model": name, "eps": 0.1, **r})

    for model in {r["model"] for r in rows}:
        base = next((r["s_per_10k"] for r in rows if r["model"] == model and r.get("method") == "margin"), None)
        for r in rows:
            if r["model"] == model and "s_per_10k" in r:
                r["ratio_to_margin"] = r["s_per_10k"] / base if base else None

    print(f"certification speed on {device_name} ({dev.type}), torch {torch.__version__}")
    print(f"{'model':26s} {'method':12s} {'n run':>7s} {'wall s':>9s} {'s/10k':>10s} {'x margin':>9s} {'cert acc':>9s}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:26s} {r['method']:12s}  skipped: {r['skipped']}")
            continue
        ratio = f"{r['ratio_to_margin']:.1f}" if r.get("ratio_to_margin") else "-"
        cert = f"{100 * r['certified_accuracy']:.1f}%" if r["certified_accuracy"] is not None else "-"
        print(f"{r['model']:26s} {r['method']:12s} {r['n_run']:7d} {r['wall_s']:9.3f} {r['s_per_10k']:10.2f} "
              f"{ratio:>9s} {cert:>9s}")
    goal = next((r for r in rows if r["model"] == "linf_dist_mlp_6x5120" and r.get("method") == "margin"), None)
    if goal is not None:
        verdict = "met" if gpu and goal["s_per_10k"] < 1.0 else ("not met" if gpu else "GPU goal, not measurable here")
        print(f"goal: margin certification of 10,000 CIFAR inputs < 1 s on a GPU: {goal['s_per_10k']:.2f} s "
              f"per 10k ({'measured on ' + str(goal['n_run']) + ' inputs'}) -> {verdict}")
    out = Path(args.out or f"benchmarks/results/certify-{dev.type}.json")
    atomic_write_json(out, {"benchmark": "certify", "device": device_name, "device_type": dev.type,
                            "machine": platform.node(), "cpu": _cpu_name(), "torch": torch.__version__,
                            "linf_plugin": linf_plugin.__version__, "timestamp": datetime.now(timezone.utc).isoformat(),
                            "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
