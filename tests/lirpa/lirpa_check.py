"""Helpers of the lirpa tests: random registry nets, input boxes, and the soundness checker.

The checker compares bounds from auto_LiRPA with the function's values at
1000 points of the box (half uniform, half random vertices) and at points
where PGD pushes each spec output to its minimum and its maximum.  It returns
every violation it finds; the fuzz tests require none, and the self-check
tests require that a deliberately wrong relaxation is reported.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
from auto_LiRPA import BoundedTensor, PerturbationLpNorm

from linf_plugin.lirpa import bounded_module
from linf_plugin.models import create_model

METHODS = ("IBP", "CROWN-IBP", "CROWN", "forward", "forward+backward", "alpha-CROWN")
# Few alpha iterations: the fuzz checks soundness, not tightness.
FAST_OPTS = {"optimize_bound_args": {"iteration": 3}}


@dataclass
class Case:
    """A random net with a batch of box centres."""

    model: torch.nn.Module
    x: torch.Tensor  # (B, d) box centres
    p: float
    family: str
    description: str


@contextlib.contextmanager
def default_dtype(dtype):
    """auto_LiRPA builds its default identity spec and forward-mode seeds in torch's default
    dtype, so float64 nets are bounded with the default dtype set to float64."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _randint(gen, lo, hi):
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _uniform(gen, lo, hi):
    return float(lo + (hi - lo) * torch.rand(1, generator=gen))


def random_case(seed: int, family: str, dtype=torch.float32, p=None, activation: str = "relu") -> Case:
    """A random ``linf_dist_mlp`` or ``linf_dist_hybrid`` with random depth, width, p, input
    dim, class count, normalisation, running means and biases, and first-layer weights
    placed to create ties at the box centre (see ``make_ties``).  Hybrids use ``activation``
    (tanh is slow to build on auto_LiRPA 0.3: its relaxation table is precomputed per node)."""
    gen = torch.Generator().manual_seed(seed)
    d = _randint(gen, 3, 7)
    k = _randint(gen, 3, 5)
    width = _randint(gen, 3, 8)
    if p is None:
        p = math.inf if _randint(gen, 0, 1) else 8.0
    common = dict(input_shape=(d,), num_classes=k, width=width, p=p, mean=_uniform(gen, 0.0, 0.5),
                  std=_uniform(gen, 0.3, 1.0), identity_init=bool(_randint(gen, 0, 1)))
    if family == "linf_dist":
        depth = _randint(gen, 1, 3)
        model = create_model("linf_dist_mlp", depth=depth, **common)
    else:
        depth = _randint(gen, 1, 2)
        model = create_model("linf_dist_hybrid", depth=depth, head_hidden=_randint(gen, 3, 6), activation=activation,
                             **common)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen, dtype=dtype))
        for name, prm in model.named_parameters():
            if name.endswith("bias"):
                prm.copy_(0.5 * torch.randn(prm.shape, generator=gen, dtype=dtype))
    batch = _randint(gen, 1, 3)
    x = torch.rand(batch, d, generator=gen, dtype=dtype)
    desc = f"{family}{'/' + activation if family == 'hybrid' else ''} seed={seed} depth={depth} width={width} d={d} K={k} p={p} B={batch} {dtype}"
    return Case(model, x, p, family, desc)


def first_lp_layer(model):
    layers = getattr(model, "layers", None) or getattr(model, "features")
    return layers[0]


def make_ties(case: Case, radius: float) -> None:
    """Place first-layer weight rows at the (normalised) centre of box 0: one row with every
    coordinate at the same distance (all-coordinate ties), one exactly at the centre (w inside
    the box: zero lower plane), one on a box face in coordinate 0."""
    layer = first_lp_layer(case.model)
    norm = case.model.normalize
    z = norm(case.x[:1]).flatten(1)[0]
    r = radius / float(norm.std.flatten()[0])
    n = layer.weight.shape[0]
    with torch.no_grad():
        signs = torch.where(torch.arange(z.numel()) % 2 == 0, 1.0, -1.0).to(z)
        if n >= 1:
            layer.weight[0] = z + 0.5 * r * signs
        if n >= 2:
            layer.weight[1] = z
        if n >= 3:
            w = z.clone()
            w[0] = z[0] + r
            layer.weight[2] = w


def box(x: torch.Tensor, radius: float, kind: str, seed: int = 0):
    """``(lower, upper)`` around ``x``: ``"sym"`` (x +- radius), ``"clip"`` (clipped to [0, 1]),
    or ``"degenerate"`` (radius 0 in every other coordinate)."""
    lo, hi = x - radius, x + radius
    if kind == "clip":
        lo, hi = lo.clamp(0, 1), hi.clamp(0, 1)
    elif kind == "degenerate":
        fixed = torch.arange(x.shape[1], device=x.device) % 2 == 1
        lo = torch.where(fixed, x, lo)
        hi = torch.where(fixed, x, hi)
    elif kind != "sym":
        raise ValueError(kind)
    return lo, hi


def bounded_input(x, lo, hi):
    return BoundedTensor(x, PerturbationLpNorm(norm=math.inf, x_L=lo, x_U=hi))


def margin_spec(model, x):
    """``(B, K-1, K)`` margin spec of the predicted class at ``x``."""
    with torch.no_grad():
        y = model(x).argmax(1)
    k = model.num_classes
    C = torch.zeros(x.shape[0], k - 1, k, dtype=x.dtype)
    for b in range(x.shape[0]):
        others = [j for j in range(k) if j != int(y[b])]
        for r, j in enumerate(others):
            C[b, r, y[b]] = 1.0
            C[b, r, j] = -1.0
    return C


def random_spec(x, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape[0], 2, k, generator=gen, dtype=x.dtype)


def spec_values(model, C, xs: torch.Tensor) -> torch.Tensor:
    """``C f(x)`` for points ``xs`` of shape ``(R, B, d)`` -> ``(R, B, S)``."""
    R, B = xs.shape[:2]
    out = model(xs.reshape(R * B, *xs.shape[2:])).reshape(R, B, -1)
    return out if C is None else torch.einsum("bsk,rbk->rbs", C, out)


def sample_points(lo, hi, n: int, gen) -> torch.Tensor:
    """``(n, B, d)``: half uniform in the box, half random vertices."""
    half = n // 2
    u = torch.rand(half, *lo.shape, generator=gen, dtype=lo.dtype, device=lo.device)
    v = (torch.rand(n - half, *lo.shape, generator=gen, device=lo.device) < 0.5).to(lo.dtype)
    return torch.cat([lo + u * (hi - lo), lo + v * (hi - lo)])


def sampled_values(model, lower, upper, n: int = 400, C=None, seed: int = 7) -> torch.Tensor:
    """``C f(x)`` (``f(x)`` without ``C``) at ``n`` points of the box: half uniform, half random vertices.

    The one sampling check of the tests' bounds (with :func:`assert_contains`).
    Evaluated one batch of the ``B`` box centres at a time, as the bounds were
    computed (a model may add a constant that depends on the batch position).

    Returns:
        ``(n, B, S)``.
    """
    gen = torch.Generator(device=lower.device).manual_seed(seed)
    with torch.no_grad():
        out = torch.stack([model(p) for p in sample_points(lower, upper, n, gen)])
    return out if C is None else torch.einsum("bsk,rbk->rbs", C.to(out.dtype), out)


def assert_contains(lb, ub, values, label: str = "") -> None:
    """Finite bounds ``lb``, ``ub`` (``(B, S)``) that contain every sampled value ``(n, B, S)`` up to rounding."""
    assert lb.shape == ub.shape == values.shape[1:], (label, lb.shape, values.shape)
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all(), f"{label}: non-finite bounds"
    found = violations(lb, ub, values.min(0).values, values.max(0).values, label)
    assert not found, found


def pgd_extremes(model, C, lo, hi, gen, steps: int = 25):
    """Min and max of every spec output over the box found by sign-gradient PGD.

    Returns ``(fmin, fmax)``, each ``(B, S)``.  Starts: a random point and a
    random vertex per (output, direction)."""
    with torch.no_grad():
        S = spec_values(model, C, lo.unsqueeze(0)).shape[-1]
    best_min = best_max = None
    for start in ("uniform", "vertex"):
        shape = (2, S, *lo.shape)
        if start == "uniform":
            t = torch.rand(shape, generator=gen, dtype=lo.dtype)
        else:
            t = (torch.rand(shape, generator=gen) < 0.5).to(lo.dtype)
        x = (lo + t * (hi - lo)).detach()
        sign = torch.tensor([1.0, -1.0], dtype=lo.dtype).view(2, 1, 1)
        eye = torch.eye(S, dtype=torch.bool)
        for i in range(steps + 1):
            x.requires_grad_(True)
            vals = spec_values(model, C, x.reshape(2 * S, *lo.shape)).reshape(2, S, lo.shape[0], S)
            own = vals.permute(0, 2, 1, 3)[:, :, eye]  # (2, B, S): output s of copy s
            with torch.no_grad():
                mx, mn = own[0].detach(), own[1].detach()
                best_max = mx if best_max is None else torch.maximum(best_max, mx)
                best_min = mn if best_min is None else torch.minimum(best_min, mn)
            if i == steps:
                break
            (grad,) = torch.autograd.grad((own * sign).sum(), x)
            step = (hi - lo) * 0.5 * (1 - i / steps) + 1e-12
            with torch.no_grad():
                x = torch.minimum(torch.maximum(x + step * grad.sign(), lo), hi)
    return best_min, best_max


def extremes(model, C, lo, hi, seed: int = 0, n_points: int = 1000, pgd_steps: int = 25):
    """``(fmin, fmax)`` (each ``(B, S)``) over samples and PGD points."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vals = spec_values(model, C, sample_points(lo, hi, n_points, gen))
    fmin, fmax = vals.min(0).values, vals.max(0).values
    pmin, pmax = pgd_extremes(model, C, lo, hi, gen, steps=pgd_steps)
    return torch.minimum(fmin, pmin), torch.maximum(fmax, pmax)


def tolerance(dtype, values):
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    return rtol * (1.0 + values.abs())


def violations(lb, ub, fmin, fmax, label: str):
    """Messages for every bound that the observed extremes cross (beyond rounding)."""
    out = []
    if lb is not None:
        lb = lb.detach()
        gap = lb - fmin
        bad = gap > tolerance(fmin.dtype, fmin)
        if bad.any():
            out.append(f"{label}: lower bound above f by {gap[bad].max().item():.3g} at {bad.sum().item()} entries")
    if ub is not None:
        ub = ub.detach()
        gap = fmax - ub
        bad = gap > tolerance(fmax.dtype, fmax)
        if bad.any():
            out.append(f"{label}: upper bound below f by {gap[bad].max().item():.3g} at {bad.sum().item()} entries")
    return out


def build(model, x, **kw):
    opts = dict(FAST_OPTS)
    opts.update(kw.pop("bound_opts", {}) or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bounded_module(model, x, bound_opts=opts, **kw)


def compute(bm, x, lo, hi, C, method, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bm.compute_bounds(x=(bounded_input(x, lo, hi),), C=C, method=method, **kw)


def check_case(case: Case, radii=(0.004, 0.05, 0.3), kinds=("sym", "clip", "degenerate"), methods=METHODS,
               specs=("logits", "margin", "random"), ties=True, seed=0, alpha_specs=("margin",)):
    """Run every method on every (radius, box kind, spec) of ``case`` (alpha-CROWN, the slow one,
    only on ``alpha_specs``); return all violations as messages ``"<case> ... <method>: ..."``."""
    with default_dtype(case.x.dtype):
        return _check_case(case, radii, kinds, methods, specs, ties, seed, alpha_specs)


def violating_methods(messages):
    """The set of methods named in ``check_case`` messages."""
    return {m.split(":")[0].rsplit(" ", 1)[1] for m in messages}


def _check_case(case, radii, kinds, methods, specs, ties, seed, alpha_specs):
    found = []
    model, x = case.model, case.x
    if ties:
        make_ties(case, sorted(radii)[len(radii) // 2])
    bm = build(model, x)
    for i, radius in enumerate(radii):
        kind = kinds[i % len(kinds)]
        lo, hi = box(x, radius, kind)
        for spec in specs:
            C = None if spec == "logits" else margin_spec(model, x) if spec == "margin" else \
                random_spec(x, model.num_classes, seed)
            fmin, fmax = extremes(model, C, lo, hi, seed=seed + i)
            for method in methods:
                if method == "alpha-CROWN" and spec not in alpha_specs:
                    continue
                lb, ub = compute(bm, x, lo, hi, C, method)
                found += violations(lb, ub, fmin, fmax, f"{case.description} r={radius} {kind} {spec} {method}")
    return found
