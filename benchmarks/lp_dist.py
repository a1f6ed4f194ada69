"""Benchmark of the l_p-distance op: against torch.cdist and the naive broadcast, or against the machine's floor.

Prints a table and writes JSON (machine, CPU model, torch version, device
name, timestamp, load averages, every row, and the goals as measured ratios).

    python benchmarks/lp_dist.py                    # CPU rows (and GPU rows when CUDA is present)
    python benchmarks/lp_dist.py --device cpu --sizes cpu --repeat 5
    python benchmarks/lp_dist.py --threads 1 --out benchmarks/results/lp_dist-cpu-1thread.json
    python benchmarks/lp_dist.py --suite floor      # CPU backends against the matmul FMA rate

``--suite floor`` (CPU only) times the
CPU backends side by side (``--backends torch,native``) at 512x1024 -> 1024,
per thread count (``--thread-counts 1,2``), dtype and p in {inf, 8, 8.5},
forward and forward+backward, in triples per second, against the matmul
FMA rate of the same dtype and thread count measured in the same run, and
checks the ratios against the goals (p = inf: forward >= 0.25, fwd+bwd >=
0.08; p = 8: 0.15 / 0.06; general p: 0.03 / 0.012).

The default suite ("compare"):

Rows: forward and forward+backward, p = inf and p = 8, for our op
(``lp_dist`` with the default backend: the compiled torch path on CPU, the
CuPy kernels on CUDA), ``torch.cdist`` and the naive broadcast
``(x[:, None] - w[None]).abs()...`` (skipped where its (B, N, D) tensor
would not fit the memory limit).  Sizes: the paper's CIFAR layers (batch
512; 3072 -> 5120 and 5120 -> 5120) and a CPU-sized layer (512; 784 -> 1024).
On a GPU it also times one training iteration (forward, loss, backward,
Adam step) of the 6x5120 CIFAR net at batch 512, against the paper code's
published 0.0796 s (p = inf) and 0.1133 s (p = 8) on an RTX 3090.

Times are medians (and minima) of ``--repeat`` runs after one warm-up; goals use medians; the first call of
our op is reported separately (it includes torch.compile on CPU, NVRTC on
GPU).  On a shared machine the absolute numbers move with the load; the
ratios are measured in the same process, one right after the other.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from linf_plugin.io import atomic_write_json  # noqa: E402
from linf_plugin.ops import lp_dist  # noqa: E402

PAPER_SECONDS = {math.inf: 0.0796, 8.0: 0.1133}     # RTX 3090, one CIFAR iteration, batch 512
SIZES = {
    "cpu": [("mnist-like 512x784->1024", 512, 784, 1024)],
    "paper": [("cifar L1 512x3072->5120", 512, 3072, 5120), ("cifar Lk 512x5120->5120", 512, 5120, 5120)],
}
FP32_LANES = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128,
              (10, 0): 128, (12, 0): 128}


# -- machine -------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg():
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def gpu_info(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    info = {"name": props.name, "sms": props.multi_processor_count, "cc": [props.major, props.minor]}
    clock_khz = getattr(props, "clock_rate", None)
    if not clock_khz:
        try:
            import cupy
            clock_khz = cupy.cuda.runtime.getDeviceProperties(device.index or 0)["clockRate"]
        except Exception:  # noqa: BLE001
            clock_khz = None
    info["clock_ghz"] = clock_khz / 1e6 if clock_khz else None
    info["fp32_lanes_per_sm"] = FP32_LANES.get((props.major, props.minor), 128)
    return info


# -- timing --------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int, slow_after: float = 5.0):
    """(first_call_seconds, median, min) over ``repeat`` warm runs (one when a run takes over ``slow_after``)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        if times and times[0] > slow_after:
            break
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), min(times)


def _naive(x, w, p):
    d = (x[:, None, :] - w[None, :, :]).abs()
    return d.amax(-1) if math.isinf(p) else (d ** p).sum(-1) ** (1.0 / p)


def _methods(p):
    return {
        "ours": lambda x, w: lp_dist(x, w, p),
        "torch.cdist": lambda x, w: torch.cdist(x, w, p=p),
        "naive broadcast": lambda x, w: _naive(x, w, p),
    }


def bench_op(device, sizes, ps, repeat, mem_limit, log):
    rows = []
    for label, B, D, N in sizes:
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(B, D, generator=g).to(device)
        w0 = torch.randn(N, D, generator=g).to(device)
        gy = torch.randn(B, N, generator=g).to(device)
        triples = B * N * D
        for p in ps:
            for mode in ("forward", "forward+backward"):
                for name, fn in _methods(p).items():
                    row = dict(size=label, B=B, D=D, N=N, p=p, mode=mode, method=name, device=str(device))
                    if name == "naive broadcast" and triples * 4 * (3 if mode == "forward" else 6) > mem_limit:
                        row["skipped"] = f"(B, N, D) tensor over the {mem_limit / 2**30:.0f} GiB limit"
                        rows.append(row)
                        log(row)
                        continue
                    if mode == "forward":
                        def run(fn=fn):
                            with torch.no_grad():
                                fn(x0, w0)
                    else:
                        x = x0.clone().requires_grad_()
                        w = w0.clone().requires_grad_()

                        def run(fn=fn, x=x, w=w):
                            x.grad = w.grad = None
                            fn(x, w).backward(gy)
                    try:
                        first, t, t_min = timed(run, device, repeat)
                    except RuntimeError as exc:    # out of memory and the like
                        row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                        rows.append(row)
                        log(row)
                        continue
                    row.update(seconds=t, seconds_min=t_min, first_call_seconds=first, gtriples_per_s=triples / t / 1e9)
                    rows.append(row)
                    log(row)
    for row in rows:   # ratios against cdist, same size/p/mode
        if "seconds" not in row:
            continue
        base = next((r for r in rows if r["method"] == "torch.cdist" and "seconds" in r and
                     all(r[k] == row[k] for k in ("size", "p", "mode", "device"))), None)
        if base is not None:
            row["speedup_vs_cdist"] = base["seconds"] / row["seconds"]
            row["speedup_vs_cdist_min"] = base["seconds_min"] / row["seconds_min"]
    return rows


def _mlp(p, device):
    """The 6x5120 CIFAR net: 5 hidden l_p-dist layers of 5120 (mean shift, no bias), a 10-way last layer."""
    try:
        models = importlib.import_module("linf_plugin.models")
        model = models.create_model("linf_dist_mlp_6x5120", input_shape=(3, 32, 32), num_classes=10)
        from linf_plugin.nn import set_p
        set_p(model, p)
        return model.to(device), "linf_plugin.models.create_model('linf_dist_mlp_6x5120')"
    except (ImportError, AttributeError, KeyError, ValueError):
        pass

    class Layer(torch.nn.Module):
        def __init__(self, n_in, n_out, last):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(n_out, n_in))
            self.bias = torch.nn.Parameter(torch.zeros(n_out)) if last else None

        def forward(self, x):
            y = lp_dist(x, self.weight, p)
            return y + self.bias if self.bias is not None else y - y.mean(0, keepdim=True)

    dims = [3072] + [5120] * 5 + [10]
    layers = [Layer(a, b, i == len(dims) - 2) for i, (a, b) in enumerate(zip(dims, dims[1:]))]
    return torch.nn.Sequential(torch.nn.Flatten(), *layers).to(device), "inline stack of lp_dist layers"


def bench_training(device, ps, repeat, log):
    rows = []
    for p in ps:
        model, source = _mlp(p, device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.rand(512, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (512,), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(-model(x), y)
            loss.backward()
            opt.step()

        first, t, t_min = timed(step, device, repeat)
        row = dict(size="6x5120 CIFAR net, batch 512", p=p, mode="training iteration", method="ours",
                   device=str(device), model=source, seconds=t, seconds_min=t_min, first_call_seconds=first,
                   paper_rtx3090_seconds=PAPER_SECONDS[p], speedup_vs_paper=PAPER_SECONDS[p] / t)
        rows.append(row)
        log(row)
        del model, opt
    return rows


# -- goals -----------------------------------------------------------------------
def _find(rows, **kw):
    return next((r for r in rows if "seconds" in r and all(r.get(k) == v for k, v in kw.items())), None)


def goals(rows, gpu):
    out = []

    def add(text, value, target, unit="x"):
        out.append(dict(goal=text, measured=value, target=target, met=None if value is None else value >= target,
                        unit=unit))

    cpu_size = SIZES["cpu"][0][0]
    for p, mode, target in ((math.inf, "forward", 5.0), (math.inf, "forward+backward", 3.0),
                            (8.0, "forward+backward", 3.0)):
        r = _find(rows, size=cpu_size, p=p, mode=mode, method="ours", device="cpu")
        add(f"CPU p={p} {mode} vs torch.cdist", r and r.get("speedup_vs_cdist"), target)
    if gpu is not None:
        for label, B, D, N in SIZES["paper"]:
            r = _find(rows, size=label, p=math.inf, mode="forward", method="ours")
            frac = None
            if r and gpu.get("clock_ghz"):
                rate = gpu["sms"] * gpu["fp32_lanes_per_sm"] * gpu["clock_ghz"] * 1e9   # FP32 instr/s
                frac = (2 * B * N * D / rate) / r["seconds"]
            add(f"GPU {label} p=inf forward, fraction of the FP32 issue-rate floor", frac, 0.40, "fraction")
            add(f"GPU {label} p=inf forward vs torch.cdist", r and r.get("speedup_vs_cdist"), 10.0)
        for p in (math.inf, 8.0):
            r = _find(rows, mode="training iteration", p=p)
            add(f"GPU training iteration p={p} vs the paper's RTX 3090 time (>1 = faster)",
                r and r["speedup_vs_paper"], 1.0)
    return out


# -- the floor suite: CPU backends against the matmul FMA rate -----------------------
FLOOR_GOALS = {"inf": (0.25, 0.08), "8": (0.15, 0.06), "general": (0.03, 0.012)}   # (forward, fwd+bwd)


def _p_key(p: float) -> str:
    return "inf" if math.isinf(p) else ("8" if p == 8.0 else "general")


def _timed_cpu(fn, repeat: int):
    """(first call, median wall, min wall, median process CPU time) over ``repeat`` warm runs.

    The CPU time counts every thread of the process; divided by the matmul's CPU time
    for the same work it gives a ratio that other processes' load hardly moves.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return first, statistics.median(wall), min(wall), statistics.median(cpu)


def bench_floor(backends, thread_counts, dtypes, ps, shape, repeat, log):
    B, D, N = shape
    triples = B * N * D
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            x0 = torch.rand(B, D, generator=g, dtype=dtype)
            w0 = torch.rand(N, D, generator=g, dtype=dtype)
            gy = torch.randn(B, N, generator=g, dtype=dtype)
            _, mm, mm_min, mm_cpu = _timed_cpu(lambda: x0 @ w0.T, max(repeat, 5))
            fma, fma_cpu = triples / mm, triples / mm_cpu
            base = dict(threads=threads, dtype=str(dtype).replace("torch.", ""), B=B, D=D, N=N,
                        matmul_fma_per_s=fma, matmul_seconds=mm, load_average=_loadavg())
            log(dict(base, kind="matmul"))
            for p in ps:
                for mode in ("forward", "forward+backward"):
                    target = FLOOR_GOALS[_p_key(p)][mode != "forward"]
                    for backend in backends:
                        if mode == "forward":
                            def run(backend=backend):
                                with torch.no_grad():
                                    lp_dist(x0, w0, p, backend=backend)
                        else:
                            x = x0.clone().requires_grad_()
                            w = w0.clone().requires_grad_()

                            def run(backend=backend, x=x, w=w):
                                x.grad = w.grad = None
                                lp_dist(x, w, p, backend=backend).backward(gy)
                        row = dict(base, kind="lp_dist", p=p, mode=mode, backend=backend, target=target)
                        try:
                            first, t, t_min, t_cpu = _timed_cpu(run, repeat)
                        except (RuntimeError, ValueError) as exc:   # a backend that is missing or does not build here
                            row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                            rows.append(row)
                            log(row)
                            continue
                        rate = triples / t
                        row.update(seconds=t, seconds_min=t_min, cpu_seconds=t_cpu, first_call_seconds=first,
                                   gtriples_per_s=rate / 1e9, ratio=rate / fma, ratio_cpu=(triples / t_cpu) / fma_cpu,
                                   met=rate / fma >= target)
                        rows.append(row)
                        log(row)
    for row in rows:   # speed-up over the torch backend in the same run
        peer = next((r for r in rows if r.get("backend") == "torch" and "seconds" in r and "seconds" in row and
                     all(r.get(k) == row.get(k) for k in ("threads", "dtype", "p", "mode"))), None)
        if peer is not None and row.get("backend") != "torch":
            row["speedup_vs_torch"] = peer["seconds"] / row["seconds"]
    return rows


def _fmt_floor(r):
    if r["kind"] == "matmul":
        return (f"# {r['threads']} thread(s) {r['dtype']}: matmul {r['matmul_fma_per_s'] / 1e9:.1f} G FMA/s  "
                f"(load average {r['load_average']})")
    p = "inf" if math.isinf(r["p"]) else f"{r['p']:g}"
    head = f"  p={p:<4} {r['mode']:<17} {r['backend']:<7}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    extra = f"  {r['speedup_vs_torch']:5.2f}x torch" if "speedup_vs_torch" in r else ""
    return (f"{head} {r['seconds'] * 1e3:9.1f} ms {r['gtriples_per_s']:7.2f} G triples/s  ratio {r['ratio']:.4f} "
            f"(cpu-time {r['ratio_cpu']:.4f}) goal {r['target']:g} {'met' if r['met'] else 'NOT met'}{extra}")


def run_floor(args):
    shape = tuple(int(v) for v in args.shape.split(","))
    ps = [math.inf if v.strip() == "inf" else float(v) for v in args.ps.split(",")]
    dtypes = [getattr(torch, v.strip()) for v in args.dtypes.split(",")]
    backends = [v.strip() for v in args.backends.split(",")]
    threads = [int(v) for v in args.thread_counts.split(",")]
    load_before = _loadavg()
    print(f"# lp_dist floor benchmark  torch {torch.__version__}  CPU {cpu_model()} ({os.cpu_count()} cores)  "
          f"B, D, N = {shape}  backends {backends}")
    rows = bench_floor(backends, threads, dtypes, ps, shape, args.repeat, lambda r: print(_fmt_floor(r), flush=True))
    result = dict(
        benchmark="lp_dist floor", timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        machine=platform.node(), platform=platform.platform(), cpu=cpu_model(), cpu_count=os.cpu_count(),
        load_average_before=load_before, load_average_after=_loadavg(), torch=torch.__version__,
        python=platform.python_version(), note=args.note, goals={k: dict(forward=f, forward_backward=b)
                                                                 for k, (f, b) in FLOOR_GOALS.items()},
        rows=[{**r, "p": "inf" if math.isinf(r["p"]) else r["p"]} if "p" in r else r for r in rows])
    out = args.out or ROOT / "benchmarks" / "results" / "lp_dist-floor-cpu.json"
    atomic_write_json(out, result)
    print(f"# wrote {out}")
    return result


# -- output ------------------------------------------------------------------------
def _fmt_row(r):
    p = "inf" if math.isinf(r["p"]) else f"{r['p']:g}"
    head = f"{r['size']:<28} {p:>4} {r['mode']:<18} {r['method']:<16}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    extra = ""
    if "speedup_vs_cdist" in r:
        extra = f" {r['speedup_vs_cdist']:7.2f}x cdist"
    if "speedup_vs_paper" in r:
        extra = f" {r['speedup_vs_paper']:7.2f}x paper ({r['paper_rtx3090_seconds']} s)"
    rate = f"{r['gtriples_per_s']:8.2f} G/s" if "gtriples_per_s" in r else " " * 12
    return f"{head} {r['seconds'] * 1e3:10.2f} ms {rate}{extra}   first call {r['first_call_seconds']:.2f} s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("compare", "floor"), default="compare",
                    help="compare: against cdist and the naive broadcast; floor: CPU backends against the FMA rate")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CPU rows, plus GPU rows when CUDA is available")
    ap.add_argument("--sizes", choices=("default", "cpu", "paper", "all"), default="default",
                    help="default: cpu sizes on CPU, paper and cpu sizes on GPU")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mem-limit-gib", type=float, default=6.0, help="skip the naive broadcast above this")
    ap.add_argument("--no-training", action="store_true", help="skip the GPU training-iteration rows")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/lp_dist-<device>.json)")
    floor_args = ap.add_argument_group("--suite floor")
    floor_args.add_argument("--backends", default="torch,native", help="comma-separated CPU backends")
    floor_args.add_argument("--thread-counts", default="1,2", help="comma-separated torch thread counts")
    floor_args.add_argument("--dtypes", default="float32,float64")
    floor_args.add_argument("--ps", default="inf,8,8.5")
    floor_args.add_argument("--shape", default="512,1024,1024", help="B,D,N")
    args = ap.parse_args(argv)
    if args.suite == "floor":
        return run_floor(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = _loadavg()

    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            ap.error("--device cuda needs CUDA")
        devices.append(torch.device("cuda", torch.cuda.current_device()))

    print(f"# lp_dist benchmark  torch {torch.__version__}  CPU {cpu_model()} ({os.cpu_count()} cores)  "
          f"threads {torch.get_num_threads()}")
    rows, gpu = [], None
    for device in devices:
        if device.type == "cuda":
            gpu = gpu_info(device)
            print(f"# GPU {gpu['name']}  {gpu['sms']} SMs  clock {gpu['clock_ghz']} GHz")
        names = (["cpu"] if device.type == "cpu" else ["paper", "cpu"]) if args.sizes == "default" else (
            ["cpu", "paper"] if args.sizes == "all" else [args.sizes])
        sizes = [s for n in names for s in SIZES[n]]
        rows += bench_op(device, sizes, (math.inf, 8.0), args.repeat, args.mem_limit_gib * 2**30,
                         lambda r: print(_fmt_row(r), flush=True))
        if device.type == "cuda" and not args.no_training:
            rows += bench_training(device, (math.inf, 8.0), args.repeat, lambda r: print(_fmt_row(r), flush=True))
    if gpu is None:
        print("# no CUDA device: GPU rows (kernels, issue-rate floor, training iteration) skipped")

    result = dict(
        benchmark="lp_dist", timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        machine=platform.node(), platform=platform.platform(), cpu=cpu_model(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), load_average_before=load_before, load_average_after=_loadavg(),
        torch=torch.__version__, python=platform.python_version(),
        device=gpu["name"] if gpu else "cpu", gpu=gpu, note=args.note,
        rows=[{**r, "p": "inf" if math.isinf(r["p"]) else r["p"]} for r in rows],   # strict JSON has no Infinity
        goals=goals(rows, gpu))
    print("\n# goals (measured)")
    for g in result["goals"]:
        value = "n/a" if g["measured"] is None else f"{g['measured']:.3g}"
        status = "n/a" if g["met"] is None else ("met" if g["met"] else "NOT met")
        print(f"  {g['goal']:<78} {value:>8} (target >= {g['target']:g})  {status}")
    out = args.out or ROOT / "benchmarks" / "results" / (
        "lp_dist-" + ("".join(c if c.isalnum() else "-" for c in gpu["name"]).strip("-").lower() if gpu else "cpu")
        + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"# wrote {out}")
    return result


if __name__ == "__main__":
    main()
