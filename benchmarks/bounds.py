"""Bound quality and speed of every auto_LiRPA method on our three model families.

Trains three small digits models inline for a few seconds each (an l_inf-dist
MLP with the l_p-relaxation, an l_inf-dist + MLP hybrid, and the ReLU
``mlp_3layer`` baseline), then, for each radius and method, certifies the
first ``--n`` test points with a margin spec (certified = correct and every
margin lower bound > 0) and measures:

* certified accuracy and wall time per method;
* tightness: the mean gap between the bound on the smallest margin and the
  smallest margin PGD finds (an upper bound of the true minimum), over the
  correctly classified points.

For the l_inf-dist net the Lipschitz margin certificate (``margin / (2 L) >
eps``) is reported too.  Prints a table and writes JSON (``--out``).

    python benchmarks/bounds.py --n 100 --eps 0.02 0.05 0.1 --train-seconds 15
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import linf_plugin
from linf_plugin.data import load_dataset
from linf_plugin.io import atomic_write_json
from linf_plugin.lirpa import applied_operator_fixes, bounded_module, compat
from linf_plugin.models import create_model
from linf_plugin.nn import set_p

METHODS = ("IBP", "CROWN-IBP", "CROWN", "forward", "alpha-CROWN")


def _train(model, data, seconds, loss_fn, p_schedule=None, batch=256, lr=0.02):
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-10)
    model.train()
    start, steps = time.time(), 0
    while time.time() - start < seconds:
        if p_schedule is not None:
            set_p(model, p_schedule((time.time() - start) / seconds))
        idx = torch.randint(0, len(data.x), (batch,))
        loss = loss_fn(model(data.x[idx]), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    if p_schedule is not None:
        set_p(model, math.inf)
    return model.eval(), steps


def _hinge_ce(theta):
    def loss(logits, y):
        true = logits.gather(1, y[:, None])
        other = logits.scatter(1, y[:, None], -1e9).max(1, keepdim=True).values
        hinge = torch.clamp(theta - (true - other), min=0).mean()
        return hinge + 0.1 * torch.nn.functional.cross_entropy(3 * logits, y)
    return loss


def _p_ramp(frac):
    """p = 8 for the first 40 %, then geometric 8 -> 1000, then inf for the last 10 %."""
    if frac < 0.4:
        return 8.0
    if frac > 0.9:
        return math.inf
    return 8.0 * (1000.0 / 8.0) ** ((frac - 0.4) / 0.5)


def _margin_spec(y, k):
    C = torch.zeros(len(y), k - 1, k)
    for b, yb in enumerate(y.tolist()):
        others = [j for j in range(k) if j != yb]
        for r, j in enumerate(others):
            C[b, r, yb], C[b, r, j] = 1.0, -1.0
    return C


def _pgd_min_margin(model, x, y, eps, steps=50):
    """Smallest margin (true logit minus the best other) PGD finds in the clipped box."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    best = None
    for start in range(2):
        z = (lo + torch.rand_like(x) * (hi - lo)) if start else x.clone()
        for i in range(steps + 1):
            z.requires_grad_(True)
            logits = model(z)
            margin = logits.gather(1, y[:, None]).squeeze(1) - logits.scatter(1, y[:, None], -1e9).max(1).values
            best = margin.detach() if best is None else torch.minimum(best, margin.detach())
            if i == steps:
                break
            (g,) = torch.autograd.grad(margin.sum(), z)
            with torch.no_grad():
                z = torch.minimum(torch.maximum(z - (hi - lo) * 0.25 * (1 - i / steps) * g.sign(), lo), hi)
    return best


def evaluate(name, model, data, n, eps_grid, device):
    x, y = data.x[:n].to(device), data.y[:n].to(device)
    model = model.to(device)
    with torch.no_grad():
        pred = model(x).argmax(1)
    correct = pred == y
    C = _margin_spec(y.cpu(), data.num_classes).to(device)
    bm = bounded_module(model, x)
    rows = []
    for eps in eps_grid:
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        xb = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps, x_L=lo, x_U=hi))
        pgd = _pgd_min_margin(model, x, y, eps)
        if getattr(model, "lipschitz_linf", None):
            with torch.no_grad():
                logits = model(x)
                margin = logits.gather(1, y[:, None]).squeeze(1) - logits.scatter(1, y[:, None], -1e9).max(1).values
            cert = correct & (margin / (2 * model.lipschitz_linf) > eps)
            rows.append(dict(model=name, eps=eps, method="margin", certified=cert.float().mean().item(),
                             seconds=0.0, gap_to_pgd=None))
        for method in METHODS:
            t = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lb, _ = bm.compute_bounds(x=(xb,), C=C, method=method, bound_upper=False)
            seconds = time.time() - t
            lb = lb.detach()
            cert = correct & (lb.min(1).values > 0)
            gap = (pgd - lb.min(1).values)[correct].mean().item() if correct.any() else float("nan")
            rows.append(dict(model=name, eps=eps, method=method, certified=cert.float().mean().item(),
                             seconds=seconds, gap_to_pgd=gap))
        rows.append(dict(model=name, eps=eps, method="PGD (upper bound)", certified=(correct & (pgd > 0)).float()
                         .mean().item(), seconds=0.0, gap_to_pgd=0.0))
    return correct.float().mean().item(), rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="test points to certify")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    ap.add_argument("--train-seconds", type=float, default=15.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bounds.json")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    common = dict(input_shape=train.input_shape, num_classes=train.num_classes, mean=train.mean, std=train.std)
    specs = [
        ("linf_dist_mlp 3x64", create_model("linf_dist_mlp", depth=3, width=64, **common),
         _hinge_ce(2 * 0.1 / train.std), _p_ramp),
        ("linf_dist_hybrid 2x64 tanh", create_model("linf_dist_hybrid", depth=2, width=64, head_hidden=64, **common),
         torch.nn.functional.cross_entropy, None),
        ("mlp_3layer (ReLU)", create_model("mlp_3layer", **common), torch.nn.functional.cross_entropy, None),
    ]
    results = dict(auto_lirpa=compat.auto_lirpa_version(), compat_fixes=compat.applied_fixes(),
                   operator_fixes=applied_operator_fixes(), linf_plugin=linf_plugin.__version__,
                   n=args.n, eps=args.eps, device=args.device, train_seconds=args.train_seconds, models={}, rows=[])
    for name, model, loss, sched in specs:
        model, steps = _train(model, train, args.train_seconds, loss, sched)
        clean, rows = evaluate(name, model, test, args.n, args.eps, args.device)
        results["models"][name] = dict(train_steps=steps, clean_accuracy=clean)
        results["rows"] += rows
        print(f"\n{name}: {steps} training steps, clean accuracy {clean:.3f}")
        print(f"{'eps':>6} {'method':>18} {'certified':>9} {'seconds':>8} {'gap to PGD':>10}")
        for r in rows:
            gap = "" if r["gap_to_pgd"] is None else f"{r['gap_to_pgd']:.4f}"
            print(f"{r['eps']:6.3f} {r['method']:>18} {r['certified']:9.3f} {r['seconds']:8.3f} {gap:>10}")
    atomic_write_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
