"""One auto_LiRPA ``BoundedModule`` per model and dtype: margin bounds by IBP, CROWN-IBP, CROWN and alpha-CROWN.

:class:`Bounder` runs the methods on one ``BoundedModule``;
:func:`bounder_for` reuses a ``Bounder`` across certification calls while
the model is unchanged (building one costs more than bounding a batch).

alpha-CROWN on graphs with l_p-dist layers (:meth:`Bounder.lower`) runs in
three steps, each a bound of alpha-CROWN's own:

1. CROWN, which is alpha-CROWN's first iteration (its parameters start at
   the CROWN relaxation); its intermediate bounds are kept.
2. The points worth optimising (every margin bound not yet positive; with
   ``rows``, only those rows) are optimised with the intermediate bounds of
   step 1 fixed, so each iteration is one backward pass from the margins
   instead of a CROWN pass per layer; a point stops being optimised as soon
   as every one of its margin bounds is positive, or when its smallest
   margin bound has stalled (:class:`StallStop`), and the optimisation ends
   when every point has stopped.
3. A point's bound is the better of steps 1 and 2 (both are sound).

Other graphs run auto_LiRPA's ``CROWN-Optimized`` as it is.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import math
import warnings
import weakref
from typing import Optional

import torch

from ..names import Method
from .float_safety import exact_float

__all__ = ["LIRPA_METHODS", "margin_spec", "Bounder", "bounder_for", "default_dtype", "quiet_identity",
           "all_margins_positive", "StallStop", "LP_DIST_PATIENCE", "LP_DIST_PROGRESS"]

# our name -> auto_LiRPA's method name
LIRPA_METHODS = {Method.IBP: "IBP", Method.CROWN_IBP: "CROWN-IBP", Method.CROWN: "CROWN",
                 Method.ALPHA_CROWN: "CROWN-Optimized"}

# optimisable node kinds whose parameters may be reused across dtypes: every value is sound after the
# node's own clipping (ReLU: clip_alpha to [0, 1]; S-shaped: tangent points clamped in bound_relax;
# l_p-dist: valid planes from any value)
_REUSABLE = {"BoundRelu", "BoundLpDist", "BoundTanh", "BoundSigmoid"}

# alpha-CROWN on graphs with l_p-dist layers stops optimising a point after this many iterations in which
# its smallest margin bound did not rise by LP_DIST_PROGRESS * (1 + |bound|)
LP_DIST_PATIENCE = 3
LP_DIST_PROGRESS = 1e-3


def margin_spec(y: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """auto_LiRPA's specification matrix of the margins ``z_y − z_j``, ``j ≠ y``.

    Args:
        y: ``(B,)`` int64 labels.
        num_classes: ``K``.

    Returns:
        ``C`` of shape ``(B, K−1, K)`` with rows ``e_y − e_j`` for every ``j ≠ y``
        in increasing order; ``C @ logits`` are the margins.
    """
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): row j = e_y - e_j
    keep = torch.arange(num_classes, device=y.device).unsqueeze(0) != y.unsqueeze(1)
    return c[keep].view(y.shape[0], num_classes - 1, num_classes)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """auto_LiRPA creates some constants with the default dtype; a float64 model
    needs float64 there too (both 0.3 and 0.7)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def quiet_identity():
    """auto_LiRPA warns "Creating an identity matrix ... poor performance" whenever CROWN starts
    from a layer in matrix mode, which is what CROWN does (and what matrix mode is chosen for)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Creating an identity matrix", category=UserWarning)
        yield


def no_prints():
    """auto_LiRPA's optimisation prints "all verified at ...th iter" to stdout when its stop criterion
    holds for every point; a library call keeps the user's stdout clean."""
    return contextlib.redirect_stdout(io.StringIO())


def all_margins_positive(lb: torch.Tensor) -> torch.Tensor:
    """alpha-CROWN's stop criterion: ``(B, 1)``, True where every margin bound is positive."""
    return lb.min(1, keepdim=True).values > 0


class StallStop:
    """A stop criterion for auto_LiRPA's optimisation: ``(B, 1)``, True for the points whose every margin
    bound is positive, or whose smallest margin bound has not risen by ``progress * (1 + |bound|)`` in
    ``patience`` iterations (auto_LiRPA stops optimising those points, and stops when all have)."""

    def __init__(self, patience: int = 3, progress: float = 1e-3):
        self.patience, self.progress = int(patience), float(progress)
        self.best = self.stalled = None

    def __call__(self, lb: torch.Tensor) -> torch.Tensor:
        m = lb.detach().min(1, keepdim=True).values
        if self.best is None or self.best.shape != m.shape:
            self.best, self.stalled = m.clone(), torch.zeros_like(m, dtype=torch.long)
        else:
            rose = m > self.best + self.progress * (1 + self.best.abs())
            self.stalled = torch.where(rose, torch.zeros_like(self.stalled), self.stalled + 1)
            self.best = torch.maximum(self.best, m)
        return (m > 0) | (self.stalled >= self.patience)


def _keyword(fn, *names) -> str:
    """The first of ``names`` that ``fn`` takes (auto_LiRPA renamed intermediate_layer_bounds to
    interm_bounds after 0.3); where ``fn`` hides its parameters (a wrapper taking ``**kwargs``), the
    installed version decides."""
    from ..lirpa.compat import needs_legacy_fixes

    params = inspect.signature(fn).parameters
    found = next((n for n in names if n in params), None)
    if found is not None:
        return found
    return "intermediate_layer_bounds" if needs_legacy_fixes() else "interm_bounds"


def _alpha_nodes(bounded) -> Optional[list]:
    """The optimisable nodes of ``bounded`` that hold alpha, or None when one is of a kind whose
    parameters are not known to be sound for every value (see ``_REUSABLE``)."""
    nodes = [n for n in bounded.optimizable_activations if getattr(n, "alpha", None)]
    if any(type(n).__name__ not in _REUSABLE for n in nodes):
        return None
    return nodes


def _batch_dim(node) -> int:
    return int(getattr(node, "alpha_batch_dim", None) or 2)


def _take(t: torch.Tensor, dim: int, idx) -> torch.Tensor:
    return t.index_select(dim, torch.as_tensor(idx, device=t.device).flatten())


class Bounder:
    """One ``BoundedModule`` of one model in one dtype.

    Attributes:
        alphas: after an alpha-CROWN call, ``{node: {start: (alpha, lookup)}}``
            of the optimised rows (or None).
        alpha_rows: the rows of that call's batch the alphas belong to
            (``None``: every row).
    """

    def __init__(self, model, example, opts):
        from ..lirpa import bounded_module
        from ..lirpa.interval_guard import lp_dist_graph

        self.example, self.dtype = example, example.dtype
        self.alphas, self.alpha_rows = None, None
        with default_dtype(self.dtype):
            self.bounded = bounded_module(model, example, bound_opts=opts)
        self.lp_dist = lp_dist_graph(self.bounded).has_lp_dist
        compute = type(self.bounded).compute_bounds
        self._fixed_kw = _keyword(compute, "interm_bounds", "intermediate_layer_bounds")
        self._init = getattr(self.bounded, "init_slope", None) or getattr(self.bounded, "init_alpha")
        self._init_kw = _keyword(self._init, "interm_bounds", "intermediate_layer_bounds")

    def _input(self, x, lower, upper):
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        return (BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=None, x_L=lower, x_U=upper)),)

    def _intermediate(self) -> dict:
        """The intermediate bounds of the last pass: ``{node: (lower, upper)}`` (inputs and constants excluded)."""
        out = {}
        for node in self.bounded._modules.values():
            lo, hi = getattr(node, "lower", None), getattr(node, "upper", None)
            if node.name == self.bounded.final_name or not (torch.is_tensor(lo) and torch.is_tensor(hi)):
                continue
            if type(node).__name__ in ("BoundInput", "BoundParams", "BoundBuffers", "BoundConstant") or \
                    not getattr(node, "perturbed", False):
                continue
            out[node.name] = (lo.detach(), hi.detach())
        return out

    def lower(self, x, y, lower, upper, method, num_classes, rows: Optional[torch.Tensor] = None):
        """Margin lower bounds ``(B, K-1)`` over ``[lower, upper]``.

        ``rows`` (alpha-CROWN, graphs with l_p-dist layers): a ``(B,)`` bool
        mask of the rows worth optimising (e.g. the correctly classified
        ones); the others keep their CROWN bound.
        """
        c = margin_spec(y, num_classes, x.dtype)
        self.alphas, self.alpha_rows = None, None
        if method == Method.ALPHA_CROWN and self.lp_dist:
            return self._alpha_lp(x, c, lower, upper, rows)
        name = LIRPA_METHODS[method]
        if method == Method.ALPHA_CROWN and not self.bounded.optimizable_activations:
            name = "CROWN"  # nothing to optimise: every iteration would recompute the CROWN bound
        # Only alpha-CROWN differentiates (through its own enable_grad); a
        # graph through the bounds of a wide net would cost gigabytes.
        grad = torch.enable_grad() if name == "CROWN-Optimized" else torch.no_grad()
        with default_dtype(self.dtype), grad, exact_float(), quiet_identity(), no_prints():
            lb, _ = self.bounded.compute_bounds(x=self._input(x, lower, upper), C=c, method=name, bound_upper=False)
        if method == Method.ALPHA_CROWN:
            self._keep_alphas(None)
        return lb.detach()

    def _keep_alphas(self, rows) -> None:
        nodes = _alpha_nodes(self.bounded)
        if nodes is None:
            return
        self.alphas = {n.name: {k: (v.detach().clone(), getattr(n, "alpha_lookup_idx", {}).get(k))
                                for k, v in n.alpha.items()} for n in nodes}
        self.alpha_rows = rows

    def _alpha_lp(self, x, c, lower, upper, rows):
        with default_dtype(self.dtype), exact_float(), quiet_identity():
            with torch.no_grad():
                lb, _ = self.bounded.compute_bounds(x=self._input(x, lower, upper), C=c, method="CROWN",
                                                    bound_upper=False)
            lb = lb.detach()
            todo = ~all_margins_positive(lb).squeeze(1)
            if rows is not None:
                todo &= rows
            todo = torch.nonzero(todo).flatten()
            if todo.numel() == 0 or not self.bounded.optimizable_activations:
                return lb
            fixed = {k: (lo[todo], hi[todo]) for k, (lo, hi) in self._intermediate().items()}
            inputs = self._input(x[todo], lower[todo], upper[todo])
            # auto_LiRPA's own initialisation would run a full CROWN pass and create parameters for
            # every intermediate start node; with the intermediate bounds given, only the margins are
            # a start node
            with torch.no_grad():
                self._init(inputs, method="backward", c=c[todo], bound_upper=False, **{self._init_kw: fixed})
            args = self.bounded.bound_opts["optimize_bound_args"]
            saved = dict(args)
            # parameters initialised above; the best bound is tracked from the first iteration
            args.update(init_alpha=False, start_save_best=0.0,
                        stop_criterion_func=StallStop(LP_DIST_PATIENCE, LP_DIST_PROGRESS))
            try:
                with torch.enable_grad(), no_prints():
                    opt, _ = self.bounded.compute_bounds(x=inputs, C=c[todo], method="CROWN-Optimized",
                                                         bound_upper=False, **{self._fixed_kw: fixed})
            finally:
                args.clear()
                args.update(saved)
        lb[todo] = torch.maximum(lb[todo], opt.detach())
        self._keep_alphas(todo)
        return lb

    def lower_given_alpha(self, x, y, lower, upper, num_classes, alphas, idx) -> Optional[torch.Tensor]:
        """CROWN lower bounds with alpha fixed to ``alphas`` (another bounder's optimised
        alphas, rows ``idx`` of its alpha batch): no optimisation.

        Sound for any alpha value (the node kinds of ``_REUSABLE`` clip or
        clamp every value into their valid domain).  Returns None (the
        caller optimises instead) when the alpha layout differs (other node
        names, sparse alpha over other neurons, shapes).
        """
        c = margin_spec(y, num_classes, x.dtype)
        bm = self.bounded
        inputs = self._input(x, lower, upper)
        with default_dtype(self.dtype), torch.no_grad(), exact_float(), quiet_identity():
            fixed = None
            if self.lp_dist:  # as in the optimisation: CROWN's intermediate bounds, the margins the only start node
                bm.compute_bounds(x=inputs, C=c, method="CROWN", bound_upper=False)
                fixed = self._intermediate()
                self._init(inputs, method="backward", c=c, bound_upper=False, **{self._init_kw: fixed})
            else:
                self._init(inputs, method="backward", c=c, bound_upper=False)
            nodes = _alpha_nodes(bm)
            if nodes is None or {n.name for n in nodes} != set(alphas):
                return None
            for n in nodes:
                src = alphas[n.name]
                lookup = getattr(n, "alpha_lookup_idx", {}) or {}
                # the start nodes depend on which layers have unstable neurons: a subset of the
                # batch (or the widened float64 box) may need alphas for fewer of them, never more
                if not set(n.alpha) <= set(src):
                    return None
                for k, dst in n.alpha.items():
                    a, src_lookup = src[k]
                    a = _take(a, _batch_dim(n), idx)
                    mine = lookup.get(k)
                    if a.shape != dst.shape or (mine is None) != (src_lookup is None) or (
                            mine is not None and not torch.equal(mine, src_lookup)):
                        return None
            for n in nodes:
                for k, dst in n.alpha.items():
                    dst.data.copy_(_take(alphas[n.name][k][0], _batch_dim(n), idx))
                (getattr(n, "clip_alpha_", None) or getattr(n, "clip_alpha"))()
                n.opt_reuse()
            try:
                kw = {self._fixed_kw: fixed} if fixed else {}
                lb, _ = bm.compute_bounds(x=inputs, C=c, method="CROWN", bound_upper=False, **kw)
            finally:
                for n in nodes:
                    n.opt_no_reuse()
        return lb.detach()


# ---------------------------------------------------------------------------------------------- the cache
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PER_MODEL = 4  # bounders kept per model (dtypes x option sets)


def _plain(v) -> bool:
    return isinstance(v, (bool, int, float, str, type(None)))


def _fingerprint(model: torch.nn.Module):
    """Everything a trace of ``model`` depends on that a user may change in place: each module's
    type, training flag and plain attributes (e.g. an l_p-dist layer's p), and every parameter's and
    buffer's identity, dtype, device and shape (values are compared separately: building a
    ``BoundedModule`` rewrites some parameters in place, with the same values).  None when the model has
    hooks (not cached)."""
    parts = []
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return None
        attrs = tuple(sorted((k, v) for k, v in vars(m).items() if _plain(v)))
        parts.append((name, type(m), attrs))
    tensors = [(n, id(t), t.dtype, t.device, tuple(t.shape))
               for n, t in list(model.named_parameters()) + list(model.named_buffers())]
    return tuple(parts), tuple(tensors)


def _snapshot(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _same_values(model, snapshot) -> bool:
    now = list(model.parameters()) + list(model.buffers())
    return len(now) == len(snapshot) and all(torch.equal(a.detach(), b) for a, b in zip(now, snapshot))


def bounder_for(owner: torch.nn.Module, example: torch.Tensor, opts: dict, build=None) -> Bounder:
    """A :class:`Bounder` of ``owner``, reused from an earlier call when nothing a trace depends on changed.

    Reuse requires the same example shape, dtype and device, the same
    options, and an unchanged model: the same module types, training flags
    and plain attributes (an l_p-dist layer's p included), the same
    parameter and buffer tensors, and equal values (compared in full, so an
    edit through ``.data`` is caught too).  Models with hooks are never
    reused.

    Args:
        owner: the model whose state decides reuse.
        example: ``(1, ...)`` input for tracing (its dtype is the bounder's).
        opts: bound options.
        build: makes the model to trace (default: ``owner`` itself; a float64
            re-check traces a float64 copy of it).
    """
    build = build or (lambda: owner)
    fp = _fingerprint(owner)
    if fp is None:
        return Bounder(build(), example, opts)
    key = (example.dtype, str(example.device), tuple(example.shape[1:]), repr(sorted(opts.items())))
    entries = _CACHE.setdefault(owner, {})
    hit = entries.get(key)
    if hit is not None and hit[0] == fp and _same_values(owner, hit[1]):
        return hit[2]
    bounder = Bounder(build(), example, opts)
    if len(entries) >= _PER_MODEL:
        entries.pop(next(iter(entries)))
    entries[key] = (fp, _snapshot(owner), bounder)
    return bounder
