r"""Keep linear bounds of graphs with l_p-dist layers within their interval bounds.

Two behaviours of auto_LiRPA's CROWN that apply only to graphs holding a
``custom::LpDist`` node (:class:`~linf_plugin.lirpa.bound.BoundLpDist`); every
other graph is bounded exactly as auto_LiRPA bounds it.  Both are on by
default and switched off with ``bound_opts={"lp_dist": {...: False}}``
(derivations in ``docs/relaxations.md``).

``"intersect_interval"`` -- intermediate bounds
    Every intermediate bound that CROWN (backward or forward mode) computes
    for a node downstream of an l_p-dist layer is intersected with the
    interval bound of that node, propagated from the (already intersected)
    bounds of its inputs: ``[max(l_crown, l_ibp), min(u_crown, u_ibp)]``.
    Both bounds hold for every input in the perturbation set, so their
    intersection does too.  Through an l_p-dist layer the interval bound is
    the exact range of every neuron over its input box, which CROWN's
    back-substitution can exceed.  The final bound (the specification) is
    never intersected: it stays CROWN's own.  CROWN-IBP already takes its
    intermediate bounds from IBP, so nothing changes there.

``"interval_activations"`` -- S-shaped activations (tanh, sigmoid)
    For a monotone S-shaped ``f`` on a pre-activation box ``[l, u]``,
    auto_LiRPA's lines are tangents chosen for the interior of the box; on a
    wide box their minimum (maximum) over the box lies far below ``f(l)``
    (above ``f(u)``), so CROWN's bound through a tanh head of an IBP-trained
    hybrid ends up looser than IBP's.  Here the lower line passes through
    ``(l, f(l))`` with the steepest valid slope, ``min(f'(l), chord)``, and the
    upper line through ``(u, f(u))`` with slope ``min(f'(u), chord)`` (chord:
    ``(f(u) - f(l)) / (u - l)``).  Both are valid on ``[l, u]`` (the secant
    slope from ``l`` over an S-shaped function is smallest at one of the two
    ends) and their extremes over the box are exactly the interval bounds.
    With every relaxation of the graph exact at the box's extremes
    (the l_p-dist planes are, by construction) and CROWN-IBP's interval
    intermediate boxes, CROWN's bound on any linear specification is never
    below IBP's (``docs/relaxations.md``).  Under alpha-CROWN the S-shaped
    nodes keep these lines (their own parameters are not used).

Both work on auto_LiRPA 0.3 and 0.7.x: :func:`apply` wraps
``BoundedModule.compute_intermediate_bounds`` and the ``bound_relax`` of
``BoundTanh`` / ``BoundSigmoid`` (idempotent); a wrapper does nothing for
graphs without l_p-dist layers.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["apply", "OPTION_INTERSECT", "OPTION_ACTIVATIONS", "lp_dist_graph"]

OPTION_INTERSECT = "intersect_interval"
OPTION_ACTIVATIONS = "interval_activations"
_MARK = "_linf_plugin_interval_guard"
_INFO = "_linf_plugin_graph_info"


def _options(bounded) -> dict:
    return (getattr(bounded, "bound_opts", None) or {}).get("lp_dist", {}) or {}


def _nodes(bounded):
    return list(bounded._modules.values())


class _GraphInfo:
    """What the wrappers need to know about one ``BoundedModule`` (its graph does not change)."""

    def __init__(self, bounded):
        from .bound import BoundLpDist

        nodes = _nodes(bounded)
        by_name = {n.name: n for n in nodes}
        roots = [n for n in nodes if isinstance(n, BoundLpDist)]
        seen, stack = set(), [n.name for n in roots]
        while stack:  # every node whose value depends on an l_p-dist output
            name = stack.pop()
            for out in getattr(by_name[name], "output_name", []) or []:
                if out not in seen and out in by_name:
                    seen.add(out)
                    stack.append(out)
        self.has_lp_dist = bool(roots)
        self.downstream = frozenset(seen)
        self.s_shaped = [n for n in nodes if type(n).__name__ in ("BoundTanh", "BoundSigmoid")]


def lp_dist_graph(bounded) -> _GraphInfo:
    """The cached :class:`_GraphInfo` of ``bounded`` (computed on first use)."""
    info = bounded.__dict__.get(_INFO)
    if info is None:
        info = _GraphInfo(bounded)
        object.__setattr__(bounded, _INFO, info)
    return info


def _has_bounds(node) -> bool:
    current = getattr(node, "is_lower_bound_current", None)  # 0.7
    if callable(current):
        return bool(current()) and getattr(node, "upper", None) is not None
    return getattr(node, "lower", None) is not None and getattr(node, "upper", None) is not None


def _interval(bounded, node, memo: dict, target: bool = False):
    """``(lower, upper)`` of ``node`` by interval propagation from the nearest nodes with bounds.

    Nothing is stored on the nodes: the intervals of nodes without bounds live in ``memo``."""
    if node.name in memo:
        return memo[node.name]
    if not getattr(node, "perturbed", True):
        v = bounded.get_forward_value(node)
        out = (v, v)
    elif not target and _has_bounds(node):
        out = (node.lower, node.upper)
    else:
        out = node.interval_propagate(*[_interval(bounded, i, memo) for i in node.inputs])
        out = (out[0], out[1])
    memo[node.name] = out
    return out


def _intersect(bounded, node) -> None:
    lo, hi = _interval(bounded, node, {}, target=True)
    if not (torch.is_tensor(lo) and torch.is_tensor(hi)) or lo.shape != node.lower.shape or \
            hi.shape != node.upper.shape:
        return  # a shape-only node (e.g. a Shape op's value): nothing to intersect
    lower, upper = torch.maximum(node.lower, lo.to(node.lower)), torch.minimum(node.upper, hi.to(node.upper))
    node.lower, node.upper = lower, upper
    node.interval = (lower, upper)
    linear = getattr(node, "linear", None)  # forward mode keeps a copy (0.7)
    if linear is not None and hasattr(linear, "lower"):
        linear.lower, linear.upper = lower, upper


def _wrap_intermediate(original):
    @functools.wraps(original)
    def compute_intermediate_bounds(self, node, *args, **kwargs):
        had = _has_bounds(node)
        result = original(self, node, *args, **kwargs)
        if had or not _options(self).get(OPTION_INTERSECT, True):
            return result
        info = lp_dist_graph(self)
        if info.has_lp_dist and node.name in info.downstream and getattr(node, "perturbed", False) \
                and _has_bounds(node):
            _intersect(self, node)
        return result

    compute_intermediate_bounds.__dict__[_MARK] = True
    return compute_intermediate_bounds


def _wrap_compute_bounds(original):
    @functools.wraps(original)
    def compute_bounds(self, *args, **kwargs):
        info = lp_dist_graph(self)
        on = info.has_lp_dist and _options(self).get(OPTION_ACTIVATIONS, True)
        for node in info.s_shaped:
            node.__dict__[_MARK] = on
        return original(self, *args, **kwargs)

    compute_bounds.__dict__[_MARK] = True
    return compute_bounds


def _derivative(kind: str, fx: torch.Tensor) -> torch.Tensor:
    return 1 - fx * fx if kind == "BoundTanh" else fx * (1 - fx)


def interval_lines(kind: str, lower: torch.Tensor, upper: torch.Tensor):
    """The interval-exact lines of an S-shaped activation on ``[lower, upper]``.

    Args:
        kind: ``"BoundTanh"`` or ``"BoundSigmoid"``.
        lower, upper: pre-activation bounds (any shape).

    Returns:
        ``(kl, bl, ku, bu)``: lower line ``kl x + bl`` through ``(l, f(l))``
        and upper line ``ku x + bu`` through ``(u, f(u))``, each moved outward by
        a rounding slack; same shape as ``lower``.
    """
    f = torch.tanh if kind == "BoundTanh" else torch.sigmoid
    lo, hi = torch.minimum(lower, upper), torch.maximum(lower, upper)
    fl, fu = f(lo), f(hi)
    width = hi - lo
    eps = torch.finfo(lo.dtype).eps
    wide = width > 4 * eps * torch.maximum(lo.abs(), hi.abs())
    chord = torch.where(wide, (fu - fl) / torch.where(wide, width, torch.ones_like(width)), torch.zeros_like(width))
    # On a box a few ulps wide the flat lines f(l) below and f(u) above are used.
    kl = torch.where(wide, torch.minimum(_derivative(kind, fl), chord), torch.zeros_like(width)).clamp(min=0)
    ku = torch.where(wide, torch.minimum(_derivative(kind, fu), chord), torch.zeros_like(width)).clamp(min=0)
    # The slack covers the rounding of f, of the slopes (a relative error of a few ulps, times the
    # width) and of one evaluation of the line.
    mag_l = 1 + fl.abs() + kl * (lo.abs() + hi.abs())
    mag_u = 1 + fu.abs() + ku * (lo.abs() + hi.abs())
    bl = fl - kl * lo - 16 * eps * mag_l
    bu = fu - ku * hi + 16 * eps * mag_u
    return kl, bl, ku, bu


def _wrap_bound_relax(original):
    @functools.wraps(original)
    def bound_relax(self, x, *args, **kwargs):
        result = original(self, x, *args, **kwargs)
        if self.__dict__.get(_MARK, False):
            kl, bl, ku, bu = interval_lines(type(self).__name__, x.lower, x.upper)
            shape = self.lw.shape  # (2, spec, ...) while alpha-CROWN optimises, else x's shape
            self.lw, self.lb = kl.expand(shape).to(self.lw), bl.expand(shape).to(self.lw)
            self.uw, self.ub = ku.expand(shape).to(self.lw), bu.expand(shape).to(self.lw)
        return result

    bound_relax.__dict__[_MARK] = True
    return bound_relax


def apply() -> None:
    """Install both behaviours in auto_LiRPA (idempotent)."""
    from auto_LiRPA import BoundedModule
    from auto_LiRPA import operators

    for name, wrap in (("compute_intermediate_bounds", _wrap_intermediate), ("compute_bounds", _wrap_compute_bounds)):
        fn = getattr(BoundedModule, name)
        if not fn.__dict__.get(_MARK, False):
            setattr(BoundedModule, name, wrap(fn))
    for cls_name in ("BoundTanh", "BoundSigmoid"):
        cls = getattr(operators, cls_name, None)
        # the class that defines bound_relax (0.7: a shared S-shaped base; the wrapper acts on marked nodes only)
        owner = next((c for c in getattr(cls, "__mro__", ()) if "bound_relax" in c.__dict__), None)
        if owner is not None and not owner.__dict__["bound_relax"].__dict__.get(_MARK, False):
            owner.bound_relax = _wrap_bound_relax(owner.__dict__["bound_relax"])
