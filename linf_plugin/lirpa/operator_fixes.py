"""auto_LiRPA operator bugs that our graphs hit (0.3 ones, fixed upstream, and some in both).

Our layers subtract a constant buffer (the mean shift in eval mode) and our
nets normalise their input with ``x - mean``; auto_LiRPA 0.3 mishandles both
outside IBP.  Same conventions as :mod:`linf_plugin.lirpa.compat`: every fix is
feature-detected (applied only when the broken behaviour is present; the ones
marked "both versions" below on 0.7.x too, the others only on 0.3, per
:func:`~linf_plugin.lirpa.compat.needs_legacy_fixes`),
idempotent, and recorded (:func:`applied_operator_fixes`).  Each one turns a
crash into a bound; ``tests/lirpa/test_operator_fixes.py`` checks every one of
them by sampling, on shapes chosen to trip it.

5. ``BoundBuffers`` inherits ``from_input = True`` from ``BoundInput`` in 0.3,
   so a registered buffer (e.g. a mean-shift ``running_mean``) is given a batch
   dimension: CROWN sums its A matrix over the batch and then fails to reshape
   it (``shape '[S, B, -1]' is invalid``).  Upstream (0.7) buffers are
   constants (``from_input = False`` unless the deprecated ``has_batchdim``
   option is set).  Fix: buffers are created with ``from_input = False``.
6. ``BoundSub.bound_forward`` negates the linear weights of the subtrahend
   without checking for ``None`` (which constants have), so forward-mode
   LiRPA fails on every ``x - c``.  Upstream checks for ``None``.  Fix: the
   same check.
7. ``BoundMul.bound_forward`` raises ``NotImplementedError`` and
   ``BoundDiv.bound_forward`` asserts when one operand is a constant, so
   forward-mode LiRPA fails on every ``x * c`` and ``x / c`` (input
   normalisation).  Upstream handles constants (and rewrites ``x / c`` as
   ``x * (1 / c)``).  Fix: multiplication by a constant, sign-split.
8. ``get_sparse_C`` treats every ``Add``/``Sub`` node as a convolution-shaped
   ``Patches`` start node when ``conv_mode`` is ``"patches"`` (0.3's default),
   so CROWN fails (``output_shape[-3]``) as soon as the bounds of a flat
   ``Add``/``Sub`` output are needed -- e.g. a mean shift feeding the next
   l_p-dist layer.  Upstream requires a >= 4-d output.  Fix: such nodes with a
   flat output use matrix mode.
9. ``BoundBatchNormalization`` has no ``bound_forward`` in 0.3, so forward-mode
   LiRPA fails on the ``cnn_7layer_bn`` baseline.  Fix: in eval mode (running
   statistics) batch norm is the per-channel affine map ``a x + c``; its
   forward linear bounds are the sign-split product.  Training mode keeps the
   original behaviour.
10. ``BoundMul._multiply_by_const`` (used for ``x * c`` and, in 0.3, ``x / c``)
    asserts that a constant multiplying a ``Patches`` A matrix is 4-d, so
    CROWN fails on a CNN whose input normalisation divides by a scalar or a
    ``(C, 1, 1)`` std (both versions; 0.7 accepts ``(1, C, 1, 1)``, 0.3 only
    ``(batch, C, 1, 1)``).  Fix: a constant with one value, or one per input
    channel (shape ``(C, 1, 1)`` or ``(1, C, 1, 1)``), multiplies the
    patches' ``(in_c, kh, kw)`` dims directly; anything else -- e.g. a
    per-sample ``(B, 1, 1, 1)`` constant, even when ``B == C`` -- goes to the
    original, which handles it or raises.  Applied wherever the probe fails,
    on 0.7.x too (it rejects the scalar and the ``(C, 1, 1)`` cases).
11. ``Bound.broadcast_backward`` in 0.3 assumes that a constant operand
    without a batch dimension has fewer dims than the activation; a
    full-rank constant such as an input normalisation's ``(1, 1)`` or
    ``(1, C, 1, 1)`` mean (its leading 1 broadcasts over the batch) makes it
    index past the A matrix (``IndexError``) once buffers are constants (fix
    5).  Upstream treats the leading dim as the batch.  Fix: the same.
12. ``BoundRelu`` keeps alpha-CROWN's slopes per start node, created for the
    start nodes whose layer had unstable neurons in the initial CROWN pass;
    when a later pass meets a start node without one (a one-point batch whose
    ReLUs of a layer were all stable at first, then not), it indexes the
    missing key: ``KeyError`` (0.3 in ``_backward_relaxation``, 0.7.1 in
    ``select_alpha_by_idx``).  Fix: for such a start node the ReLU uses the
    CROWN relaxation (sound; it just is not optimised).  Both versions.
13. ``BoundTanh`` and ``BoundSigmoid`` precompute a table of tangent points
    (50,000 entries, found by bisection) in every node's constructor: 2.2 s
    of a 2.6 s ``BoundedModule`` build of the digits hybrid on 0.3, paid
    again by every certification call.  The table depends only on the
    function, its range, the device and the default dtype, so it is computed
    once per such key and the attributes it sets are shared (read-only) by
    later nodes.  Not a wrong bound, a cost; both versions (0.7 computes the
    same kind of table).
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch

__all__ = ["apply_operator_fixes", "applied_operator_fixes"]

_APPLIED: list[str] = []
_DONE = False


def _fix_buffers_from_input() -> None:
    from auto_LiRPA.operators import BoundBuffers

    if getattr(BoundBuffers.__init__, "_linf_plugin_fix", False):
        return
    params = inspect.signature(BoundBuffers.__init__).parameters
    if "options" in params:  # upstream signature: already a constant
        return
    probe = BoundBuffers("probe", torch.zeros(1))
    if not probe.from_input:
        return
    original = BoundBuffers.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.from_input = False

    __init__._linf_plugin_fix = True
    BoundBuffers.__init__ = __init__
    _APPLIED.append("BoundBuffers are constants (from_input=False)")


def _sub_forward_is_broken(BoundSub, LinearBound) -> bool:
    node = BoundSub({}, [], 0, {})
    z = torch.zeros(1, 1)
    x = LinearBound(torch.zeros(1, 1, 1), z, torch.zeros(1, 1, 1), z)
    c = LinearBound(None, torch.zeros(1), None, torch.zeros(1))
    try:
        node.bound_forward(1, x, c)
    except TypeError:
        return True
    return False


def _fix_sub_bound_forward() -> None:
    from auto_LiRPA.operators import BoundSub

    try:
        from auto_LiRPA.linear_bound import LinearBound
    except ImportError:  # pragma: no cover
        return
    if getattr(BoundSub.bound_forward, "_linf_plugin_fix", False):
        return
    if not _sub_forward_is_broken(BoundSub, LinearBound):
        return

    def bound_forward(self, dim_in, x, y):
        def add_w(x_w, y_w, x_b, y_b):
            if x_w is None and y_w is None:
                return None
            if x_w is not None and y_w is not None:
                return x_w + y_w
            if y_w is None:
                return x_w + torch.zeros_like(y_b)
            return y_w + torch.zeros_like(x_b)

        lw = add_w(x.lw, None if y.uw is None else -y.uw, x.lb, y.lb)
        uw = add_w(x.uw, None if y.lw is None else -y.lw, x.ub, y.ub)
        return LinearBound(lw, x.lb - y.ub, uw, x.ub - y.lb)

    bound_forward._linf_plugin_fix = True
    bound_forward.__doc__ = BoundSub.bound_forward.__doc__
    BoundSub.bound_forward = bound_forward
    _APPLIED.append("BoundSub.bound_forward accepts constant operands")


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):  # pragma: no cover - source unavailable
        return ""


def _by_constant(x, c):
    """Forward linear bounds of ``x * c`` for a constant tensor ``c``."""
    from auto_LiRPA.linear_bound import LinearBound

    c_pos, c_neg = c.clamp(min=0), c.clamp(max=0)
    lb = c_pos * x.lb + c_neg * x.ub
    ub = c_pos * x.ub + c_neg * x.lb
    if x.lw is None:
        return LinearBound(None, lb, None, ub)
    # Weights are (B, dim_in, *shape): a constant with the batch dimension
    # (as many dims as lb) needs the dim_in axis inserted.
    if c.dim() == x.lb.dim():
        c_pos, c_neg = c_pos.unsqueeze(1), c_neg.unsqueeze(1)
    lw = c_pos * x.lw + c_neg * x.uw
    uw = c_pos * x.uw + c_neg * x.lw
    return LinearBound(lw, lb, uw, ub)


def _constant_of(v):
    """The value of a constant operand's ``LinearBound`` (None if it is perturbed)."""
    if v.lw is None and v.uw is None:
        return v.lb
    return None


def _fix_mul_div_constant_forward() -> None:
    from auto_LiRPA.operators import BoundDiv, BoundMul

    mul_broken = "raise NotImplementedError" in _source(BoundMul.bound_forward) and \
        not getattr(BoundMul.bound_forward, "_linf_plugin_fix", False)
    div_broken = "assert not self.is_constant_op" in _source(BoundDiv.bound_forward) and \
        not getattr(BoundDiv.bound_forward, "_linf_plugin_fix", False)
    if mul_broken:
        mul_original = BoundMul.bound_forward

        def mul_bound_forward(self, dim_in, x, y):
            if getattr(self, "is_constant_op", False):
                cy, cx = _constant_of(y), _constant_of(x)
                if cy is not None:
                    return _by_constant(x, cy)
                if cx is not None:
                    return _by_constant(y, cx)
            return mul_original(self, dim_in, x, y)

        mul_bound_forward._linf_plugin_fix = True
        BoundMul.bound_forward = mul_bound_forward
        _APPLIED.append("BoundMul.bound_forward handles a constant operand")
    if div_broken:
        div_original = BoundDiv.bound_forward

        def div_bound_forward(self, dim_in, x, y):
            if getattr(self, "is_constant_op", False):
                cy = _constant_of(y)
                if cy is not None:
                    return _by_constant(x, 1.0 / cy)
            return div_original(self, dim_in, x, y)

        div_bound_forward._linf_plugin_fix = True
        BoundDiv.bound_forward = div_bound_forward
        _APPLIED.append("BoundDiv.bound_forward handles a constant divisor")


def _fix_flat_add_sub_patches() -> None:
    from auto_LiRPA import backward_bound
    from auto_LiRPA.bound_general import BoundedModule
    from auto_LiRPA.operators import BoundAdd, BoundSub

    original = BoundedModule.get_sparse_C
    if getattr(original, "_linf_plugin_fix", False):
        return
    src = _source(backward_bound.get_sparse_C)
    if "(BoundAdd, BoundSub)) and node.mode == \"patches\"" not in src or "len(node.output_shape) >= 4" in src:
        return

    @functools.wraps(original)
    def get_sparse_C(self, node, *args, **kwargs):
        if (isinstance(node, (BoundAdd, BoundSub)) and getattr(node, "mode", None) == "patches"
                and node.output_shape is not None and len(node.output_shape) < 4):
            node.mode = "matrix"
        return original(self, node, *args, **kwargs)

    get_sparse_C._linf_plugin_fix = True
    BoundedModule.get_sparse_C = get_sparse_C
    _APPLIED.append("get_sparse_C: flat Add/Sub outputs use matrix mode")


def _fix_batchnorm_forward() -> None:
    from auto_LiRPA.operators import BoundBatchNormalization

    if "bound_forward" in BoundBatchNormalization.__dict__:
        return
    from auto_LiRPA.linear_bound import LinearBound

    def bound_forward(self, dim_in, x, *params):
        if getattr(self, "training", False):
            return type(self).__mro__[1].bound_forward(self, dim_in, x, *params)
        nodes = self.inputs
        if any(getattr(n, "perturbed", False) for n in nodes[1:]):
            raise NotImplementedError("weight perturbation is not supported for BoundBatchNormalization")
        weight, bias = nodes[1].param, nodes[2].param
        mean, var = nodes[3].value, nodes[4].value
        if not self.use_mean:
            mean = torch.zeros_like(mean)
        if not self.use_var:
            var = torch.ones_like(var)
        if not self.use_affine:
            weight, bias = torch.ones_like(weight), torch.zeros_like(bias)
        a = weight / torch.sqrt(var + self.eps)
        c = bias - mean * a
        shape = (-1,) + (1,) * (x.lb.dim() - 2)
        a, c = a.view(shape), c.view(shape)
        out = _by_constant(x, a)
        return LinearBound(out.lw, out.lb + c, out.uw, out.ub + c)

    bound_forward._linf_plugin_fix = True
    BoundBatchNormalization.bound_forward = bound_forward
    _APPLIED.append("BoundBatchNormalization.bound_forward (eval mode)")


def _patches_const_is_broken(BoundMul, Patches) -> bool:
    patches = Patches(patches=torch.ones(1, 1, 1, 1, 2, 3, 3), stride=1, padding=1, shape=(1, 1, 1, 1, 2, 3, 3))
    try:
        BoundMul._multiply_by_const(patches, torch.tensor(2.0))
        BoundMul._multiply_by_const(patches, torch.full((2, 1, 1), 2.0))
    except (AssertionError, RuntimeError):
        return True
    return False


def _is_per_channel(const: torch.Tensor, in_c: int) -> bool:
    """Whether ``x * const`` scales each channel of an NCHW ``x`` by one value.

    Only ``(C, 1, 1)`` and ``(1, C, 1, 1)`` qualify.  A ``(B, 1, 1, 1)``
    constant scales each *sample* -- it must not be read as per-channel when
    ``B`` happens to equal ``C`` (that made CROWN's bounds unsound)."""
    shape = tuple(const.shape)
    return shape in ((in_c, 1, 1), (1, in_c, 1, 1))


def _fix_patches_times_constant() -> None:
    from auto_LiRPA.operators import BoundMul
    from auto_LiRPA.patches import Patches

    original = BoundMul.__dict__["_multiply_by_const"]
    original_fn = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(original_fn, "_linf_plugin_fix", False) or not _patches_const_is_broken(BoundMul, Patches):
        return

    def _multiply_by_const(x, const):
        if isinstance(x, Patches) and isinstance(const, torch.Tensor):
            if const.numel() == 1:
                return x.create_similar(x.patches * const.reshape(()))
            if _is_per_channel(const, x.patches.size(-3)):
                return x.create_similar(x.patches * const.reshape(-1, 1, 1))
        return original_fn(x, const)

    _multiply_by_const._linf_plugin_fix = True
    BoundMul._multiply_by_const = staticmethod(_multiply_by_const)
    _APPLIED.append("BoundMul._multiply_by_const: Patches times a scalar or per-channel constant")


class _ShapeView:
    """Stands in for a constant node with its leading (batch-broadcast) dim dropped."""

    batch_dim = -1

    def __init__(self, output_shape):
        self.output_shape = output_shape


def _broadcast_backward_is_broken(Bound) -> bool:
    node = Bound()
    node.batch_dim = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            node.broadcast_backward(torch.zeros(2, 3, 4), _ShapeView(torch.Size([1, 1])))
    except (IndexError, AssertionError):
        return True
    return False


def _fix_full_rank_constant_broadcast() -> None:
    from auto_LiRPA.operators import Bound

    original = Bound.broadcast_backward
    if getattr(original, "_linf_plugin_fix", False) or not _broadcast_backward_is_broken(Bound):
        return

    @functools.wraps(original)
    def broadcast_backward(self, A, x):
        shape = getattr(x, "output_shape", None)
        if (isinstance(A, torch.Tensor) and getattr(x, "batch_dim", None) == -1 and shape is not None
                and len(shape) == A.dim() - 1 and len(shape) > 0 and shape[0] == 1):
            return original(self, A, _ShapeView(torch.Size(shape[1:])))
        return original(self, A, x)

    broadcast_backward._linf_plugin_fix = True
    Bound.broadcast_backward = broadcast_backward
    _APPLIED.append("Bound.broadcast_backward: full-rank constants broadcast over the batch")


def _relu_alpha_key_unchecked(BoundRelu) -> bool:
    src = "".join(_source(getattr(BoundRelu, name)) for name in ("bound_backward", "_backward_relaxation",
                                                                  "select_alpha_by_idx") if hasattr(BoundRelu, name))
    indexes = "self.alpha[start_node.name]" in src or "self.alpha_lookup_idx[start_node.name]" in src
    return indexes and "start_node.name not in self.alpha" not in src


def _fix_relu_alpha_missing_start_node() -> None:
    from auto_LiRPA.operators import BoundRelu

    original = BoundRelu.bound_backward
    if getattr(original, "_linf_plugin_fix", False) or not _relu_alpha_key_unchecked(BoundRelu):
        return

    @functools.wraps(original)
    def bound_backward(self, *args, **kwargs):
        start = kwargs.get("start_node")
        if (start is not None and getattr(self, "opt_stage", None) in ("opt", "reuse")
                and start.name not in (getattr(self, "alpha", None) or {})):
            stage, self.opt_stage = self.opt_stage, None
            try:
                return original(self, *args, **kwargs)
            finally:
                self.opt_stage = stage
        return original(self, *args, **kwargs)

    bound_backward._linf_plugin_fix = True
    BoundRelu.bound_backward = bound_backward
    _APPLIED.append("BoundRelu.bound_backward: CROWN relaxation for a start node without alpha")


def _table_key(node, args, kwargs):
    def name(v):
        return getattr(v, "__name__", None) if callable(v) else v

    named = tuple(name(v) for v in args) + tuple(sorted((k, name(v)) for k, v in kwargs.items()))
    if not all(isinstance(v, (str, int, float, type(None))) or isinstance(v, tuple) for v in named):
        return None
    return (type(node).__name__, named, str(getattr(node, "device", None)), torch.get_default_dtype())


def _fix_s_shaped_table_cache() -> None:
    from auto_LiRPA import operators

    cache: dict = {}
    for cls_name in ("BoundTanh", "BoundSigmoid"):
        cls = getattr(operators, cls_name, None)
        owner = next((c for c in getattr(cls, "__mro__", ()) if "precompute_relaxation" in c.__dict__), None)
        if owner is None or getattr(owner.__dict__["precompute_relaxation"], "_linf_plugin_fix", False):
            continue
        original = owner.__dict__["precompute_relaxation"]

        @functools.wraps(original)
        def precompute_relaxation(self, *args, _original=original, **kwargs):
            key = _table_key(self, args, kwargs)
            if key is not None and key in cache:
                self.__dict__.update(cache[key])
                return None
            before = dict(self.__dict__)
            result = _original(self, *args, **kwargs)
            if key is not None:
                cache[key] = {k: v for k, v in self.__dict__.items() if k not in before or before[k] is not v}
            return result

        precompute_relaxation._linf_plugin_fix = True
        owner.precompute_relaxation = precompute_relaxation
        _APPLIED.append(f"{owner.__name__}.precompute_relaxation: the tangent table computed once per function")


def apply_operator_fixes() -> list[str]:
    """Apply the operator fixes that this auto_LiRPA needs (idempotent).

    Returns:
        The fixes applied in this process (on upstream 0.7.x fixes 10, 12 and 13).
    """
    global _DONE
    from .compat import needs_legacy_fixes

    if not _DONE:
        if needs_legacy_fixes():
            _fix_buffers_from_input()
            _fix_sub_bound_forward()
            _fix_mul_div_constant_forward()
            _fix_flat_add_sub_patches()
            _fix_batchnorm_forward()
        _fix_patches_times_constant()  # probe-gated: 0.7.x needs it as well
        _fix_relu_alpha_missing_start_node()  # source-gated: 0.7.1 too
        _fix_s_shaped_table_cache()  # both versions
        if needs_legacy_fixes():
            _fix_full_rank_constant_broadcast()
        _DONE = True
    return list(_APPLIED)


def applied_operator_fixes() -> list[str]:
    """The operator fixes applied in this process, in order."""
    return list(_APPLIED)
