"""Our CUDA kernels against the seed's (L_inf-dist-net-v2) on the same GPU, in the same process.

    python benchmarks/vs_seed.py --seed-repo /path/to/L_inf-dist-net-v2 [--out FILE.json] [--repeat 20]

Builds the seed's ``core/cuda`` extension at run time with
``torch.utils.cpp_extension.load`` (nvcc, for this GPU's architecture),
loads its ``core/norm_dist.py`` against it, checks that both agree (relative
max difference of y, grad_x, grad_w), then times with CUDA events (median of
``--repeat`` after one warm-up): forward (no grad) and forward+backward for
p in {8, 8.5, 100, inf} on 512x3072->5120 and 512x5120->5120, and one
training iteration (forward, cross-entropy, backward, Adam step) of the
6x5120 CIFAR net at batch 512, where both nets are the same stack of layers
and differ only in the distance op.  ratio = seed ms / our ms (> 1: we are
faster).  Writes JSON with the device name; needs a CUDA device and nvcc.
Exit status 3 when the two disagree beyond 1e-5 (values) / 1e-3 (gradients).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from linf_plugin.io import atomic_write_json  # noqa: E402
from linf_plugin.ops import lp_dist  # noqa: E402

__all__ = ["build_seed", "median_ms", "compare_op", "compare_training", "main"]

PS = (8.0, 8.5, 100.0, math.inf)
SIZES = ((512, 3072, 5120), (512, 5120, 5120))
SEED_SOURCES = ("norm_dist.cpp", "norm_dist_cuda.cu", "inf_dist_cuda.cu", "bound_inf_dist_cuda.cu")
AGREE = {"y": 1e-5, "grad_x": 1e-3, "grad_w": 1e-3}


def build_seed(seed_repo: Path, build_dir: Path | None = None):
    """The seed's ``norm_dist`` function (core/norm_dist.py) on its freshly built CUDA extension."""
    from torch.utils.cpp_extension import load  # noqa: PLC0415  (needs nvcc only here)

    cuda = seed_repo / "core" / "cuda"
    missing = [f for f in SEED_SOURCES if not (cuda / f).exists()] + \
        ([] if (seed_repo / "core" / "norm_dist.py").exists() else ["../norm_dist.py"])
    if missing:
        raise FileNotFoundError(f"{cuda} lacks {missing}: --seed-repo must be an L_inf-dist-net-v2 checkout")
    major, minor = torch.cuda.get_device_capability()
    build_dir = build_dir or Path(tempfile.mkdtemp(prefix="seed_ext_"))
    ext = load("norm_dist_cuda", sources=[str(cuda / f) for f in SEED_SOURCES], extra_include_paths=[str(cuda)],
               extra_cflags=["-O2"], extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},"
                                                               f"code=sm_{major}{minor}"],
               build_directory=str(build_dir), verbose=False)
    sys.modules["norm_dist_cuda"] = ext          # what core/norm_dist.py imports
    spec = importlib.util.spec_from_file_location("seed_norm_dist", seed_repo / "core" / "norm_dist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda x, w, p: module.norm_dist(x.unsqueeze(-1), w, p).squeeze(-1)


def median_ms(fn, repeat: int) -> float:
    """Median over ``repeat`` runs (after one warm-up) of ``fn``'s GPU time, by CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare_op(seed_fn, B, D, N, p, repeat) -> list:
    """Agreement and timing rows of one layer size at one p."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(B, D, device="cuda", generator=g)
    w0 = torch.randn(N, D, device="cuda", generator=g)
    gy = torch.randn(B, N, device="cuda", generator=g)
    grads = {}
    for name, fn in (("seed", seed_fn), ("ours", lambda x, w, q: lp_dist(x, w, q))):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, w, p)
        y.backward(gy)
        grads[name] = (y.detach(), x.grad, w.grad)
    diff = {k: _rel(a, b) for k, a, b in zip(("y", "grad_x", "grad_w"), grads["ours"], grads["seed"])}
    size = f"{B}x{D}->{N}"
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        ms = {}
        for name, fn in (("seed", seed_fn), ("ours", lambda x, w, q: lp_dist(x, w, q))):
            if mode == "fwd":
                def run(fn=fn):
                    with torch.no_grad():
                        fn(x0, w0, p)
            else:
                x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()

                def run(fn=fn, x=x, w=w):
                    x.grad = w.grad = None
                    fn(x, w, p).backward(gy)
            ms[name] = median_ms(run, repeat)
        rows.append({"size": size, "B": B, "D": D, "N": N, "p": "inf" if math.isinf(p) else p, "mode": mode,
                     "seed_ms": ms["seed"], "ours_ms": ms["ours"], "ratio": ms["seed"] / ms["ours"],
                     "max_rel_diff": diff, "agree": all(diff[k] <= AGREE[k] for k in AGREE)})
    return rows


class _DistLayer(torch.nn.Module):
    """One layer of the 6x5120 net with a given distance op: mean shift when hidden, bias when last."""

    def __init__(self, dist, n_in, n_out, p, last):
        super().__init__()
        self.dist, self.p = dist, p
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in))
        self.bias = torch.nn.Parameter(torch.zeros(n_out)) if last else None

    def forward(self, x):
        y = self.dist(x, self.weight, self.p)
        return y + self.bias if self.bias is not None else y - y.mean(0, keepdim=True)


def compare_training(seed_fn, p, repeat) -> dict:
    """One training iteration of the 6x5120 CIFAR net at batch 512, seed's op against ours."""
    dims = [3072] + [5120] * 5 + [10]
    x = torch.rand(512, 3, 32, 32, device="cuda")
    labels = torch.randint(0, 10, (512,), device="cuda")
    ms = {}
    for name, dist in (("seed", seed_fn), ("ours", lambda a, w, q: lp_dist(a, w, q))):
        torch.manual_seed(0)
        layers = [_DistLayer(dist, a, b, p, i == len(dims) - 2) for i, (a, b) in enumerate(zip(dims, dims[1:]))]
        model = torch.nn.Sequential(torch.nn.Flatten(), *layers).cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(-model(x), labels).backward()
            opt.step()

        ms[name] = median_ms(step, repeat)
        del model, opt
    return {"size": "6x5120 CIFAR net, batch 512", "p": "inf" if math.isinf(p) else p, "mode": "training iteration",
            "seed_ms": ms["seed"], "ours_ms": ms["ours"], "ratio": ms["seed"] / ms["ours"]}


def _print(row):
    diff = row.get("max_rel_diff")
    extra = f"  {diff['y']:.1e} / {diff['grad_x']:.1e} / {diff['grad_w']:.1e}" if diff and row["mode"] == "fwd" else ""
    print(f"{row['size']:>28} {str(row['p']):>5} {row['mode']:>18} {row['seed_ms']:9.2f} {row['ours_ms']:9.2f} "
          f"{row['ratio']:9.2f}{extra}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed-repo", type=Path, required=True, help="a checkout of L_inf-dist-net-v2")
    ap.add_argument("--out", type=Path, help="JSON path")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per measurement (median)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("vs_seed.py needs a CUDA device (and nvcc): torch.cuda.is_available() is False here; "
              "nothing was measured", file=sys.stderr)
        return 2
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    t0 = time.time()
    seed_fn = build_seed(args.seed_repo.resolve())
    print(f"seed extension built in {time.time() - t0:.1f} s", flush=True)
    print(f"{'size':>28} {'p':>5} {'mode':>18} {'seed ms':>9} {'ours ms':>9} {'seed/ours':>9}  max rel diff y / gx / gw")
    rows = []
    for B, D, N in SIZES:
        for p in PS:
            for row in compare_op(seed_fn, B, D, N, p, args.repeat):
                rows.append(row)
                _print(row)
    for p in PS:
        row = compare_training(seed_fn, p, args.repeat)
        rows.append(row)
        _print(row)
    result = {"benchmark": "vs_seed", "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "repeat": args.repeat, "seed_repo": str(args.seed_repo), "rows": rows,
              "agree": all(r.get("agree", True) for r in rows)}
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    if not result["agree"]:
        print("the seed and ours DISAGREE beyond the tolerances above", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
