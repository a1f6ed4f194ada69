"""Training speed: seconds per iteration and per epoch for each family.

Rows:
* digits (CPU): every digits preset, one row per phase that costs differently
  (ℓ∞-dist / hybrid at p = 8 and p = ∞; IBP and CROWN-IBP at full ε),
  timed on real optimisation steps of the preset's model, batch and loss;
  seconds per epoch = seconds per iteration × steps per epoch (1437 samples).
* the paper's CIFAR-10 net (``linf_dist_mlp_6x5120``, batch 512, the
  mixture loss, Adam) at p = 8 and p = ∞ on CUDA when a GPU is present,
  compared with the authors' published 0.1133 s (p = 8) and 0.0796 s
  (p = ∞) per iteration on an RTX 3090.

Prints a table and writes ``benchmarks/results/train-<device>.json``.
Usage: ``python benchmarks/train.py [--steps 20] [--warmup 3] [--no-gpu] [--no-cpu]``.
"""
from __future__ import annotations

import argparse
import math
import platform
import socket
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import linf_plugin  # noqa: E402,F401
from linf_plugin.data import dataset_info, load_dataset  # noqa: E402
from linf_plugin.io import atomic_write_json  # noqa: E402
from linf_plugin.models import create_model  # noqa: E402
from linf_plugin.nn import set_p  # noqa: E402
from linf_plugin.training import get_preset  # noqa: E402
from linf_plugin.training.objectives import make_objective  # noqa: E402
from linf_plugin.training.schedules import ScheduleState  # noqa: E402

PAPER_3090 = {8.0: 0.1133, math.inf: 0.0796}  # s / iteration, CIFAR-10 net, batch 512 (authors' README)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(cfg, x, y, device, p, eps, steps, warmup):
    """Mean seconds of one optimisation step (forward, loss, backward, Adam) of ``cfg``'s recipe."""
    cfg = cfg.replace().validate()
    info = dataset_info(cfg.dataset)
    torch.manual_seed(0)
    kwargs = {"mean": info.mean, "std": info.std, **cfg.model_kwargs}
    model = create_model(cfg.model, input_shape=info.input_shape, num_classes=info.num_classes, **kwargs).to(device)
    objective = make_objective(cfg, model, info.data_range, x[:2]).to(device)
    objective.train()
    set_p(model, p)
    opt = torch.optim.Adam(objective.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    state = ScheduleState(step=0, epoch=0, p=p, lam=cfg.lam0, eps=eps, lr=cfg.lr,
                          natural_weight=cfg.natural_weight_start, crown_factor=0.5 if cfg.bound == "crown-ibp"
                          else 0.0)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        loss, _ = objective(x, y, state)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], sum(times) / len(times)


def digits_rows(steps, warmup):
    device = torch.device("cpu")
    data = load_dataset("digits", "train")
    rows = []
    for name, phases in (("digits-linf", [("p=8", 8.0, 0.0), ("p=inf", math.inf, 0.0)]),
                         ("digits-hybrid", [("p=8", 8.0, None), ("p=inf", math.inf, None)]),
                         ("digits-ibp", [("eps=max", math.inf, None)]),
                         ("digits-crown-ibp", [("eps=max, crown_factor=0.5", math.inf, None)])):
        cfg = get_preset(name)
        b = cfg.batch_size
        x, y = data.x[:b].to(device), data.y[:b].to(device)
        steps_per_epoch = math.ceil(len(data) / b)
        for label, p, eps in phases:
            eps = cfg.eps_train if eps is None else eps
            med, mean = time_steps(cfg, x, y, device, p, eps, steps, warmup)
            rows.append({"preset": name, "family": cfg.family, "model": cfg.model, "phase": label, "device": "cpu",
                         "batch": b, "s_per_iter": med, "s_per_iter_mean": mean,
                         "s_per_epoch": med * steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                         "threads": torch.get_num_threads()})
    return rows


def cifar_rows(steps, warmup):
    device = torch.device("cuda")
    cfg = get_preset("cifar10-8/255")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (cfg.batch_size,), generator=g).to(device)
    rows = []
    for label, p in (("p=8", 8.0), ("p=inf", math.inf)):
        med, mean = time_steps(cfg, x, y, device, p, 0.0, steps, warmup)
        rows.append({"preset": "cifar10-8/255", "family": "linf_dist", "model": cfg.model, "phase": label,
                     "device": torch.cuda.get_device_name(device), "batch": cfg.batch_size, "s_per_iter": med,
                     "s_per_iter_mean": mean, "s_per_epoch": med * math.ceil(50000 / cfg.batch_size),
                     "steps_per_epoch": math.ceil(50000 / cfg.batch_size), "paper_rtx3090_s_per_iter": PAPER_3090[p],
                     "ratio_to_paper": med / PAPER_3090[p]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    rows = []
    if not args.no_cpu:
        rows += digits_rows(args.steps, args.warmup)
    gpu = torch.cuda.is_available() and not args.no_gpu
    if gpu:
        rows += cifar_rows(args.steps, args.warmup)
    print(f"{'preset':<18} {'phase':<28} {'device':<24} {'batch':>5} {'s/iter':>9} {'s/epoch':>9}  paper(3090)")
    for r in rows:
        paper = f"{r['paper_rtx3090_s_per_iter']:.4f} (x{r['ratio_to_paper']:.2f})" if "ratio_to_paper" in r else ""
        print(f"{r['preset']:<18} {r['phase']:<28} {r['device'][:24]:<24} {r['batch']:>5} {r['s_per_iter']:>9.4f} "
              f"{r['s_per_epoch']:>9.2f}  {paper}")
    if not gpu:
        print("no GPU: the paper's CIFAR-10 net rows (vs 0.1133 s at p=8 and 0.0796 s at p=inf on an RTX 3090) "
              "were not run")
    dev = torch.cuda.get_device_name(0) if gpu else "cpu"
    result = {"benchmark": "train", "host": socket.gethostname(), "machine": platform.machine(),
              "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
              "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "device": dev,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": args.steps, "warmup": args.warmup,
              "paper_rtx3090_s_per_iter": {"p=8": PAPER_3090[8.0], "p=inf": PAPER_3090[math.inf]}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in dev.lower())
    path = out / f"train-{tag}.json"
    atomic_write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
