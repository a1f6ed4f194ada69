r"""``BoundLpDist``: auto_LiRPA's view of the ``custom::LpDist`` node.

The node computes ``y[b, n] = ||x[b] - w[n]||_p`` from two inputs: ``x``
(``(B, D)``, perturbed) and the weight ``w`` (``(N, D)``, a ``BoundParams``
or constant node, never perturbed).  ``p`` comes from the ONNX attribute
``p`` (``inf`` allowed).  Bias, mean shift and the logits' negation are
separate nodes that auto_LiRPA bounds with its own operators.

* ``forward``: the ``linf_plugin.ops`` backends (``lp_dist``).
* ``interval_propagate``: the exact per-neuron range over the input box
  (``lp_dist_interval``), for every p.
* ``bound_backward`` (CROWN) and ``bound_forward`` (forward-mode LiRPA): the
  linear relaxations of :mod:`linf_plugin.lirpa.relaxation` (derivation and
  soundness argument there): a supporting hyperplane below, the chord of the
  dominant coordinate above.  For a coefficient ``lambda`` of the node's
  output, the lower bound uses the lower plane where ``lambda >= 0`` and the
  upper plane where ``lambda < 0``, and conversely for the upper bound.
  The weight input receives no linear coefficients (``(None, None)``): it is a
  constant of the relaxation.

Options (``BoundedModule(..., bound_opts={"lp_dist": {...}})``):

* ``"lower"``: the lower plane's touching point, one of
  :data:`~linf_plugin.lirpa.relaxation.LOWER_POINTS` (default
  ``"projection"``, which reproduces the exact IBP lower bound).

alpha-CROWN (``method="CROWN-Optimized"``): the node is one of auto_LiRPA's
optimisable activations (it subclasses the version's
``BoundOptimizableActivation``).  For ``p = inf`` every start node whose
bounds go backward through the node gets parameters of the planes of
:mod:`linf_plugin.lirpa.alpha_planes` (shape ``(2, spec, batch, N, 2 K + 5)``,
initialised to the default planes; with intermediate bounds passed in,
only the final specification is a start node).  Every parameter value gives
sound planes.  Finite p keeps its fixed planes.  Option
``"alpha_coordinates"``: ``K`` (default 3).

Both auto_LiRPA 0.3 (PyPI, through :mod:`linf_plugin.lirpa.compat`) and
upstream 0.7.x are supported: 0.7 passes keyword arguments to
``bound_backward`` (``start_node``, ``unstable_idx``, ...) which are accepted
and not needed; both versions read ``requires_input_bounds`` to compute the
box of ``x`` before calling us.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from ..ops import linf_box_argmax, lp_dist, lp_dist_interval
from .alpha_planes import DEFAULT_COORDINATES, clip_params, default_params, plane_support, planes_from_params
from .relaxation import LOWER_POINTS, Plane, lower_plane, sanitize_box, upper_plane

try:  # 0.3 and 0.7.x both export it from auto_LiRPA.operators
    from auto_LiRPA.operators import BoundOptimizableActivation as _OptimizableBase
except ImportError:  # pragma: no cover
    from auto_LiRPA.operators.activation_base import BoundOptimizableActivation as _OptimizableBase

try:  # identity spec objects used by some auto_LiRPA versions
    from auto_LiRPA.utils import eyeC
except ImportError:  # pragma: no cover
    eyeC = ()
try:
    from auto_LiRPA.patches import Patches
except ImportError:  # pragma: no cover
    Patches = ()

try:
    from auto_LiRPA.linear_bound import LinearBound
except ImportError:  # pragma: no cover
    from auto_LiRPA.bound_ops import LinearBound

__all__ = ["BoundLpDist", "OPTION_KEY"]

OPTION_KEY = "lp_dist"


def _node_value(node) -> torch.Tensor:
    """The (unperturbed) value of an input node."""
    for name in ("forward_value", "value", "lower"):
        v = getattr(node, name, None)
        if isinstance(v, torch.Tensor):
            return v
    param = getattr(node, "param", None)
    if isinstance(param, torch.Tensor):
        return param
    raise RuntimeError(f"auto_LiRPA node {node} has no value yet")


def _dense_spec(last_A, n_out: int, dtype):
    """``last_A`` as a dense ``(spec, batch, N)`` tensor of ``dtype`` (or None).

    auto_LiRPA 0.3 builds its default identity spec in float32 whatever the
    model's dtype, hence the cast."""
    if last_A is None:
        return None
    if isinstance(last_A, torch.Tensor):
        return last_A.to(dtype)
    if eyeC and isinstance(last_A, eyeC):
        spec, batch = last_A.shape[0], last_A.shape[1]
        eye = torch.eye(n_out, device=last_A.device, dtype=dtype)
        return eye.unsqueeze(1).expand(spec, batch, n_out)
    if Patches and isinstance(last_A, Patches):
        raise NotImplementedError("BoundLpDist got a Patches A matrix; the l_p-dist node takes flat (B, D) inputs, "
                                  "so the node after it must not be a convolution")
    raise NotImplementedError(f"BoundLpDist cannot propagate an A matrix of type {type(last_A).__name__}")


class BoundLpDist(_OptimizableBase):
    """Bounds for ``custom::LpDist`` (see the module docstring)."""

    def __init__(self, attr=None, inputs=None, output_index=0, options=None):
        super().__init__(attr, inputs, output_index, options if options is not None else {})
        attr = attr or {}
        if "p" not in attr:
            raise ValueError("custom::LpDist node without the attribute 'p'")
        self.p = float(attr["p"])
        if math.isnan(self.p) or self.p < 1:
            raise ValueError(f"custom::LpDist node has p={self.p}; p must be in [1, inf]")
        # After super().__init__: 0.7's base class resets it to [].
        self.requires_input_bounds = [0]
        opts = (options or {}).get(OPTION_KEY, {}) or {}
        self.lower_point = opts.get("lower", "projection")
        if self.lower_point not in LOWER_POINTS:
            raise ValueError(f"bound_opts['{OPTION_KEY}']['lower'] = {self.lower_point!r}; "
                             f"choose from {LOWER_POINTS}")
        self.coordinates = int(opts.get("alpha_coordinates", DEFAULT_COORDINATES))
        if self.coordinates < 1:
            raise ValueError(f"bound_opts['{OPTION_KEY}']['alpha_coordinates'] = {self.coordinates}; must be >= 1")
        # Only the first input is ever perturbed; 0.7 uses this flag.
        self.ibp_intermediate = False
        self.alpha_batch_dim = 2  # 0.3 reads it; 0.7 assumes 2
        self.alpha = OrderedDict()
        self._relaxation_cache = None
        self._support_cache = None

    # ------------------------------------------------------------------ forward
    def forward(self, x, w):
        """Clean forward: ``(B, D), (N, D) -> (B, N)``."""
        return lp_dist(x, w, self.p)

    def _check_weight(self):
        if len(self.inputs) > 1 and getattr(self.inputs[1], "perturbed", False):
            raise NotImplementedError("perturbing the weights of an l_p-dist layer is not supported; "
                                      "only its input may be perturbed")

    # ------------------------------------------------------------------ IBP
    def interval_propagate(self, *v):
        """Exact range of every neuron over the box ``v[0]``; ``v[1]`` is the weight."""
        self._check_weight()
        (lo, hi), (w, _) = v[0], v[1]
        lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
        return lp_dist_interval(lo, hi, w, self.p)

    # ------------------------------------------------------------------ relaxation
    def _box_and_weight(self, x_node=None, w_node=None):
        x_node = x_node if x_node is not None else self.inputs[0]
        w_node = w_node if w_node is not None else self.inputs[1]
        lower, upper = getattr(x_node, "lower", None), getattr(x_node, "upper", None)
        if lower is None or upper is None:
            raise RuntimeError(f"BoundLpDist {self.name}: the input bounds were not computed "
                               "(requires_input_bounds was not honoured)")
        return lower, upper, _node_value(w_node)

    def relaxation(self, lower, upper, w):
        """``(lower_plane, upper_plane)`` for the box; see :mod:`.relaxation`."""
        idx = None
        if math.isinf(self.p):
            lower, upper = sanitize_box(lower, upper)
            idx = linf_box_argmax(lower, upper, w)  # shared by both planes
        return (lower_plane(lower, upper, w, self.p, self.lower_point, indices=idx),
                upper_plane(lower, upper, w, self.p, indices=idx))

    def _planes(self, lower, upper, w):
        """:meth:`relaxation`, computed once per input box.

        CROWN visits this node once per later node whose bounds it computes
        (every later layer, then the output), always with the same box
        tensors; the planes are reused while ``lower``, ``upper`` and ``w`` are
        the same, unmodified tensor objects (and p, the options and grad mode
        are unchanged)."""
        key = (tuple((id(t), t._version) for t in (lower, upper, w)), self.p, self.lower_point,
               torch.is_grad_enabled())
        cache = self._relaxation_cache
        if cache is not None and cache[0] == key and all(a is b for a, b in zip(cache[1], (lower, upper, w))):
            return cache[2]
        planes = self.relaxation(lower, upper, w)
        self._relaxation_cache = (key, (lower, upper, w), planes)
        return planes

    def clear(self):
        # auto_LiRPA clears every node before each pass; the support cache outlives passes (its key
        # checks the storage)
        self._relaxation_cache = None

    # ------------------------------------------------------------------ alpha-CROWN
    def _support(self, lower, upper, w):
        """:func:`~.alpha_planes.plane_support` of the box (no gradient), reused while the box is the same.

        auto_LiRPA hands the node a new tensor object for the same fixed
        intermediate bounds in every alpha-CROWN iteration, so the key is the
        storage (pointer, offset, strides, shape, version) of ``lower``,
        ``upper`` and ``w``; the cache keeps those tensors alive, so a key
        cannot be reused by other data.  The optimisation treats the box as
        a constant."""
        key = tuple(_storage_key(t) for t in (lower, upper, w)) + (self.coordinates,)
        cache = self._support_cache
        if cache is not None and cache[0] == key:
            return cache[2]
        with torch.no_grad():
            projection = linf_box_argmax(*sanitize_box(lower, upper), w)[0]
            support = plane_support(lower, upper, w, projection, self.coordinates)
        self._support_cache = (key, (lower, upper, w), support)
        return support

    def init_opt_parameters(self, start_nodes):
        """Create the parameters (the default planes) for each start node (``(name, size, ...)`` tuples)."""
        self.alpha = OrderedDict()
        if not math.isinf(self.p):
            return
        lower, upper, w = self._box_and_weight()
        base = default_params(self._support(lower, upper, w)).detach()
        for entry in start_nodes:
            name, size = entry[0], entry[1]
            if name == "_forward":  # forward-mode LiRPA keeps the fixed planes
                continue
            size = int(math.prod(size)) if isinstance(size, (torch.Size, tuple, list)) else int(size)
            self.alpha[name] = base.expand(2, size, *base.shape).clone()

    def clip_alpha(self):
        """Project every parameter onto its domain (0.7's name)."""
        for v in self.alpha.values():
            clip_params(v.data, (v.shape[-1] - 3) // 2)

    def clip_alpha_(self):
        """0.3's name for :meth:`clip_alpha`."""
        self.clip_alpha()

    def dump_optimized_params(self):
        return self.alpha

    def restore_optimized_params(self, alpha):
        self.alpha = alpha

    def _optimised_params(self, start_node, unstable_idx, spec: int):
        """This start node's parameters ``(2, spec, B, N, 2 K + 5)``, or None (default planes)."""
        if self.opt_stage not in ("opt", "reuse") or start_node is None or not math.isinf(self.p):
            return None
        params = self.alpha.get(start_node.name)
        if params is None:
            return None
        if isinstance(unstable_idx, torch.Tensor) and unstable_idx.dim() == 1:
            params = params[:, unstable_idx]
        elif unstable_idx is not None:
            return None
        return params if params.shape[1] == spec else None

    # ------------------------------------------------------------------ CROWN
    def bound_backward(self, last_lA, last_uA, *x, start_node=None, unstable_idx=None, **kwargs):
        """Backward (CROWN) step.

        Args:
            last_lA, last_uA: ``(spec, B, N)`` coefficients of this node's output
                (or None when that side is not needed; an identity ``eyeC`` is
                expanded).
            x: the input nodes ``(x_node, w_node)``; ``x_node.lower/upper``
                are ``(B, D)``.

        Returns:
            ``([(lA_x, uA_x), (None, None)], lbias, ubias)`` with ``lA_x``,
            ``uA_x`` ``(spec, B, D)`` and the biases ``(spec, B)`` (or 0).
        """
        self._check_weight()
        lower, upper, w = self._box_and_weight(*x[:2])
        last_lA = _dense_spec(last_lA, w.shape[0], w.dtype)
        last_uA = _dense_spec(last_uA, w.shape[0], w.dtype)
        some = last_lA if last_lA is not None else last_uA
        params = None if some is None else self._optimised_params(start_node, unstable_idx, some.shape[0])
        if params is not None:
            support = self._support(lower, upper, w)
            lA, lbias = _optimised_side(last_lA, support, params[0], lower_side=True, dim=lower.shape[-1])
            uA, ubias = _optimised_side(last_uA, support, params[1], lower_side=False, dim=lower.shape[-1])
            return [(lA, uA), (None, None)], lbias, ubias
        low, up = self._planes(lower, upper, w)
        lA, lbias = _backward_side(last_lA, low, up, lower.shape[-1])
        uA, ubias = _backward_side(last_uA, up, low, lower.shape[-1])
        return [(lA, uA), (None, None)], lbias, ubias

    # ------------------------------------------------------------------ forward mode
    def bound_forward(self, dim_in, *x):
        """Forward-mode LiRPA step.

        Args:
            dim_in: number of perturbed input dimensions.
            x: ``LinearBound`` of each input: for ``x``, ``lw``/``uw``
                ``(B, dim_in, D)`` and ``lb``/``ub`` ``(B, D)``.

        Returns:
            ``LinearBound`` with ``lw``/``uw`` ``(B, dim_in, N)`` and
            ``lb``/``ub`` ``(B, N)``.
        """
        self._check_weight()
        lower, upper, w = self._box_and_weight()
        low, up = self._planes(lower, upper, w)
        xl = x[0]
        lw, lb = _forward_side(low, xl.lw, xl.uw, xl.lb, xl.ub)
        # The upper plane is bounded above with the roles of the input's bounds swapped.
        uw, ub = _forward_side(up, xl.uw, xl.lw, xl.ub, xl.lb)
        return LinearBound(lw, lb, uw, ub)


def _storage_key(t: torch.Tensor):
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version, t.dtype, t.device)


def _backward_side(last_A, plane_pos: Plane, plane_neg: Plane, dim: int):
    """Push ``last_A`` (``(S, B, N)``) through the node: ``plane_pos`` where the
    coefficient is >= 0, ``plane_neg`` where it is < 0."""
    if last_A is None:
        return None, 0
    S, B, N = last_A.shape
    a_pos, a_neg = last_A.clamp(min=0), last_A.clamp(max=0)
    out = last_A.new_zeros(S, B, dim)
    bias = 0
    for coef_A, plane in ((a_pos, plane_pos), (a_neg, plane_neg)):
        if plane.sparse:
            out = out.scatter_add(2, plane.index.unsqueeze(0).expand(S, B, N), coef_A * plane.coef.unsqueeze(0))
        else:
            out = out + torch.einsum("sbn,bnd->sbd", coef_A, plane.coef)
        bias = bias + torch.einsum("sbn,bn->sb", coef_A, plane.bias)
    return out, bias


def _optimised_side(last_A, support, params, lower_side: bool, dim: int):
    """Push ``last_A`` (``(S, B, N)``) through the planes of ``params`` (``(S, B, N, 2 K + 5)``): for a
    lower bound (``lower_side``) the lower plane where the coefficient is >= 0 and the upper plane where
    it is < 0, for an upper bound the converse."""
    if last_A is None:
        return None, 0
    lcoef, lbias, ucoef, ubias = planes_from_params(support, params)
    a_pos, a_neg = last_A.clamp(min=0).unsqueeze(-1), last_A.clamp(max=0).unsqueeze(-1)
    if not lower_side:
        lcoef, lbias, ucoef, ubias = ucoef, ubias, lcoef, lbias
    coef = a_pos * lcoef + a_neg * ucoef
    bias = (a_pos.squeeze(-1) * lbias + a_neg.squeeze(-1) * ubias).sum(-1)
    S, B, N, slots = coef.shape
    index = support.index.reshape(1, B, N * slots).expand(S, -1, -1)
    out = last_A.new_zeros(S, B, dim).scatter_add(2, index, coef.reshape(S, B, N * slots))
    return out, bias


def _forward_side(plane: Plane, w_pos, w_neg, b_pos, b_neg):
    """Compose ``plane`` (in x) with x's forward linear bounds: coefficients of
    the plane >= 0 take ``(w_pos, b_pos)``, < 0 take ``(w_neg, b_neg)``.

    ``w_*``: ``(B, dim_in, D)`` or None; ``b_*``: ``(B, D)``.
    Returns ``(weights (B, dim_in, N) or None, bias (B, N))``.
    """
    c_pos, c_neg = plane.coef.clamp(min=0), plane.coef.clamp(max=0)
    if plane.sparse:
        idx = plane.index
        bias = c_pos * torch.gather(b_pos, 1, idx) + c_neg * torch.gather(b_neg, 1, idx) + plane.bias
        if w_pos is None:
            return None, bias
        gidx = idx.unsqueeze(1).expand(-1, w_pos.shape[1], -1)
        weights = (c_pos.unsqueeze(1) * torch.gather(w_pos, 2, gidx)
                   + c_neg.unsqueeze(1) * torch.gather(w_neg, 2, gidx))
        return weights, bias
    bias = torch.einsum("bnd,bd->bn", c_pos, b_pos) + torch.einsum("bnd,bd->bn", c_neg, b_neg) + plane.bias
    if w_pos is None:
        return None, bias
    weights = torch.einsum("bnd,bed->ben", c_pos, w_pos) + torch.einsum("bnd,bed->ben", c_neg, w_neg)
    return weights, bias
