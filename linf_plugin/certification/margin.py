r"""The Lipschitz-margin certificate of l_inf-dist nets, safe under floating point.

An l_inf-dist net at p = inf in eval mode is L-Lipschitz from l_inf (pixels)
to l_inf (logits) with L = 1/std: normalisation scales by 1/std, every
l_inf-dist layer is 1-Lipschitz, mean shift and bias are translations.  So
for every x' with ||x' - x||_inf <= eps, each logit moves by at most L*eps and
the margin (top logit minus runner-up) by at most 2*L*eps: the prediction is
constant on the ball when ``margin(x) > 2 L eps``.

Floating point
--------------
The logits are *computed* in float32 (or float64), so the computed margin
``m^`` can exceed the exact margin ``m`` of the real-arithmetic network with
the same stored parameters.  We bound the difference rigorously and certify
only when ``(m^ - delta) / (2 L) > eps``.

Model of arithmetic: IEEE-754 with round-to-nearest; every basic operation
``a o b`` returns ``(a o b)(1 + d)`` with ``|d| <= u`` (u = 2^-24 in float32,
2^-53 in float64); ``|.|``, ``max`` and negation are exact.  Write
``gamma = 2u`` (a factor 2 of slack covers second-order terms such as
``u / (1 - u)`` and one extra rounding per step from an implementation that
multiplies by a rounded reciprocal).  All bounds use *computed* magnitudes,
taken per sample as the max over neurons.

1. Normalisation ``z0 = (x - mu) / s``: at most a subtraction, a division (or
   a rounded reciprocal and a product) and the float representation of the
   stored std; with the exact network defined by the stored buffers,
   ``e0 <= 2 gamma * max|z0^|``.
2. An l_inf-dist layer ``y_n = max_i |z_i - w_ni|``: the computed ``y^_n``
   is ``max_i |z^_i - w_ni| (1 + d_i)``.  Since each ``|z_i - w_ni|`` moves by
   at most ``e_{l-1}`` when z moves to z^ (1-Lipschitz), and the rounding is
   relative, ``|y^ - y| <= e_{l-1} + gamma * D_l`` with ``D_l`` the layer's
   largest distance value, bounded by ``max|out| + max|running_mean| +
   max|bias|`` from the layer's computed output.
3. Mean shift ``y - m`` and bias ``+ b``: one rounding each, at most
   ``gamma * max|out - b|`` and ``gamma * max|out|``.

So ``e_l = e_{l-1} + gamma (D_l + 2 max|out_l| + max|b_l|)`` and the per-logit
error is ``E = e_L`` (negation is exact).  The top logit can be E too high
and the runner-up E too low: the exact margin is at least ``m^ - 2E``.  The
subtraction giving ``m^`` is done in float64 and adds ``2^-52 |m^|``.

The float model at the perturbed input
--------------------------------------
The promise above is about the real-arithmetic network.  By default
(``float_model=True``) we also keep the promise for the float network *as
run* on every perturbed input x': its computed logits differ from the exact
ones at x' by at most ``E'``, obtained with the same recursion using
magnitudes inflated by ``L*eps + 2 e_l`` (activations at x' differ from the
exact ones at x by at most L*eps, which differ from the computed ones by
e_l).  The condition becomes ``m^ - 2E - 2E'(eps) > 2 L eps``; ``E'`` is
affine in eps, so the certified radius has a closed form.

Overhead: for trained nets E is ~1e-6 of the activations -- invisible in
accuracy, but it refuses the adversarial cases naive float checks accept
(see tests/certification/test_margin_float.py).

The fast pass
-------------
For a plain, unhooked :class:`~linf_plugin.models.LinfDistNet` (see
:func:`_plain_parts`) :func:`linf_trace` runs the layers' torch ops itself,
in the modules' order (distance, ``- running_mean``, ``+ bias``), without
the per-call checks.  On the torch backend ONE graph compiled for the
stack's weight shapes (``linf_stack_fixed``) computes every layer, each
layer's per-sample ``max|out|``, ``max|z0|``, and the range of every weight,
running mean, bias and normalisation buffer: the same ops in the same
order, so the same values bit for bit (tested against the module path),
compiled without unsafe-math optimisations or FMA contraction whatever the
environment asks.  Nothing above depends on which IEEE round-to-nearest
implementation computes these ops, and the bounds still use magnitudes
*computed in this pass, per sample*: nothing derived from the weights or
the inputs is cached (a cache keyed on ``Tensor._version`` would miss
writes through ``.data``), so every call bounds the current weights at the
given inputs, whatever their range.  The constants ``max|running_mean|``,
``max|bias|`` and the weights' finiteness come from those ranges (one
min/max reduction per tensor where the graph does not run); NaN or inf
inputs give non-finite logits or bounds and are never certified (nor
counted correct).  TF32 and autocast touch none of these ops
(no matmul or convolution), and ``u`` comes from the dtypes the pass really
produced (:func:`computation_unit_roundoff`).
"""
from __future__ import annotations

import math

import torch

from .float_safety import value_ranges

__all__ = ["margin_certify", "lipschitz_constant", "linf_trace", "MarginCertificateError", "unit_roundoff",
           "computation_unit_roundoff", "check_unmodified"]


class MarginCertificateError(ValueError):
    """The model does not admit the Lipschitz-margin certificate."""


def unit_roundoff(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 2.0 ** -24
    if dtype == torch.float64:
        return 2.0 ** -53
    raise MarginCertificateError(f"margin certification supports float32 and float64 models, got {dtype}")


def lipschitz_constant(model) -> float:
    """The l_inf Lipschitz constant used for certification (conservative).

    ``model.lipschitz_linf`` must be a float (pure l_inf-dist net, every layer
    at p = inf, eval mode).  The normalisation's std is held in a buffer of the
    model's dtype; the exact network divides by that buffer, so we take the
    larger of ``model.lipschitz_linf`` and ``1 / min(std buffer)``.
    """
    lip = getattr(model, "lipschitz_linf", None)
    if lip is None:
        raise MarginCertificateError(
            f"{getattr(model, 'model_name', type(model).__name__)} exposes no l_inf Lipschitz constant: the margin "
            "certificate needs a pure l_inf-dist net with every layer at p = inf, in eval mode "
            "(use 'interval' or a bound-propagation method instead)")
    std = getattr(getattr(model, "normalize", None), "std", None)
    if isinstance(std, torch.Tensor):
        lip = max(float(lip), 1.0 / std.detach().double().min().item())
    return float(lip)


def _plain_parts(model):
    """``(normalize, layers)`` when ``model(x)`` is exactly :meth:`LinfDistNet.forward` over plain parts, else None.

    Plain: the model's forward is ``LinfDistNet.forward``; the normalisation,
    every layer and every mean shift are exactly
    :class:`~linf_plugin.nn.InputNormalize`, :class:`~linf_plugin.nn.LpDistLinear`
    and :class:`~linf_plugin.nn.MeanShiftNorm` with their own ``forward``,
    in eval mode.  Only then may :func:`linf_trace` run the layers' arithmetic
    itself (the same torch ops in the same order as the modules, without
    their per-call checks) and still be bounding the function ``model(x)``
    computes.  Hooks are not looked at here: :func:`check_unmodified`, which
    :func:`_trace` calls first, refuses any.
    """
    from ..models.linf_dist import LinfDistNet
    from ..nn import InputNormalize, LpDistLinear, MeanShiftNorm

    if type(model).forward is not LinfDistNet.forward:
        return None
    normalize, layers = model.normalize, list(model.layers)
    if type(normalize) is not InputNormalize or any(type(layer) is not LpDistLinear for layer in layers):
        return None
    shifts = [layer.mean_shift for layer in layers if layer.mean_shift is not None]
    if any(type(m) is not MeanShiftNorm for m in shifts):
        return None
    for m in (model, normalize, *layers, *shifts):
        if m.training or "forward" in m.__dict__:
            return None
    return normalize, layers


def _plain_layer(layer, z: torch.Tensor):
    """One eval-mode :class:`LpDistLinear` at p = inf: ``lp_dist``, ``- running_mean``, ``+ bias``, as its forward,
    without its per-call checks (NaN inputs give NaN outputs, which never certify, rather than an error).

    Returns None (the caller then calls the module) where the module's own
    checks could raise otherwise: a shape, dtype or device that does not
    match, or an empty batch.
    """
    w = layer.weight
    if z.dim() != 2 or z.shape[1] != w.shape[1] or z.shape[0] == 0 or z.dtype != w.dtype or \
            z.device != w.device:
        return None
    from ..ops.lp_dist import get_backend, resolve_backend

    impl = get_backend(resolve_backend(layer.backend, z))
    y = impl.forward(z.contiguous(), w.detach().contiguous(), layer.p, need_aux=False)[0]
    if layer.mean_shift is not None:
        y = y - layer.mean_shift.running_mean
    if layer.bias is not None:
        y = y + layer.bias.detach()
    return y


def _plain_stack(layers, z0: torch.Tensor, named):
    """Every eval-mode :class:`LpDistLinear` at p = inf, ``lp_dist``, ``- running_mean``, ``+ bias``, as their
    forwards compute them, in the torch backend's one graph for the stack (see ``linf_stack_fixed``).

    ``named``: :func:`_named_tensors`, whose layer entries are exactly the
    graph's ``(w, sub, add)`` in order.  Returns ``(outs, row_max, ranges)``,
    or None (the caller then calls the modules) where another backend serves
    the layers, the graph does not run, or an input could make a module's own
    checks raise: a shape, dtype or device that does not match, or an empty
    batch.
    """
    if z0.dim() != 2 or z0.shape[0] == 0 or not all(math.isinf(layer.p) and layer.weight.numel() for layer in layers):
        return None
    from ..ops.lp_dist import get_backend, resolve_backend

    backends = {resolve_backend(layer.backend, z0) for layer in layers}
    impl = get_backend(backends.pop()) if len(backends) == 1 else None
    stack = getattr(impl, "linf_stack_fixed", None)
    if stack is None:
        return None
    spec = [(layer.weight.detach().contiguous(),
             None if layer.mean_shift is None else layer.mean_shift.running_mean,
             None if layer.bias is None else layer.bias.detach()) for layer in layers]
    # what the modules would refuse (mixed dtypes or devices, shapes that do not chain) stays theirs to refuse:
    # the graph would promote, or fail and switch the backend's compiled path off
    width = z0.shape[1]
    for w, sub, add in spec:
        shapes = [(w, (w.shape[0], width))] + [(t, (w.shape[0],)) for t in (sub, add) if t is not None]
        if any(t.shape != shape or t.dtype != z0.dtype or t.device != z0.device for t, shape in shapes):
            return None
        width = w.shape[0]
    extra = [t for k, _, t in named if k is None]
    return stack(z0.contiguous(), spec, extra)


def linf_trace(model, x: torch.Tensor):
    """Run an l_inf-dist net once, keeping what the error bound needs.

    For a :class:`~linf_plugin.models.LinfDistNet` (whose ``forward`` is
    known: normalise, flatten, every layer, negate) the parts are called in
    that order directly, so the values bounded are the logits returned; when
    every part is plain and nothing is hooked (see :func:`_plain_parts`),
    each layer's arithmetic runs without the module's per-call checks (the
    input is checked once here; the parameters' finiteness by the caller).
    Any other model (a subclass with its own ``forward``) runs one
    ``model(x)`` call with forward hooks on the normalisation and every
    layer, and its logits must equal the last layer's output.

    Returns:
        ``(logits, z0, outputs)``: the logits ``(B, K)``, the normalised
        flattened input ``(B, D)`` and each layer's output ``(B, N_l)``.
    """
    return _trace(model, x)[:3]


def _forward_hook_owner(model):
    """The name of a module of ``model`` that carries a forward hook or pre-hook (``"global"`` for a
    module-wide one registered with ``torch.nn.modules.module.register_module_forward_hook``), else None."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return "global"
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return name or "the model"
    return None


def _foreign_part(normalize, layers):
    """A description of the first part whose ``forward`` is not the library's own, else None.

    The Lipschitz constant (:func:`lipschitz_constant`) holds for
    :class:`~linf_plugin.nn.InputNormalize`, :class:`~linf_plugin.nn.LpDistLinear`
    at p = inf and :class:`~linf_plugin.nn.MeanShiftNorm` as the library
    defines them; a subclass or a per-instance ``forward`` may compute
    anything (subclasses that keep the forward are fine, and so is a library
    subclass whose class body sets ``eval_forward_is_parents = True``: its
    eval-mode forward is the parent's, e.g. the DDP ``SyncMeanShiftNorm``).
    """
    from ..nn import InputNormalize, LpDistLinear, MeanShiftNorm

    parts = [("the normalisation", normalize, InputNormalize)]
    for k, layer in enumerate(layers):
        parts.append((f"layer {k}", layer, LpDistLinear))
        shift = getattr(layer, "mean_shift", None)
        if shift is not None:
            parts.append((f"layer {k}'s mean shift", shift, MeanShiftNorm))
    for what, m, cls in parts:
        if not isinstance(m, cls):
            return f"{what} is a {type(m).__name__}, not a {cls.__name__}"
        owner = next(c for c in type(m).__mro__ if "forward" in c.__dict__)
        if "forward" in m.__dict__ or not (owner is cls or owner.__dict__.get("eval_forward_is_parents", False)):
            return f"{what} ({type(m).__name__}) has a forward of its own"
    return None


def check_unmodified(model, normalize, layers, what: str) -> None:
    """Raise :class:`MarginCertificateError` unless ``model``'s parts compute what the library's do.

    ``what`` names the certificate for the message.  Refused: any forward hook
    or pre-hook (on a module of ``model`` or module-wide) and any part whose
    forward is not the library's (:func:`_foreign_part`).  A hook may return a
    new output (scaled, clipped, anything) and so change the function
    ``model(x)`` computes at the perturbed inputs, where nobody watches it;
    equal outputs at the clean input would prove nothing about the rest of
    the ball.  Bound propagation traces hooks into its graph and stays sound.
    """
    owner = _forward_hook_owner(model)
    if owner is not None:
        where = "every module (a global hook)" if owner == "global" else repr(owner)
        raise MarginCertificateError(
            f"a forward hook or pre-hook is registered on {where}: it can change what the model computes, "
            f"which {what} does not cover; remove it (handle.remove()) or certify with a bound-propagation "
            "method ('ibp', 'crown-ibp', 'crown')")
    foreign = _foreign_part(normalize, layers)
    if foreign is not None:
        raise MarginCertificateError(
            f"{foreign}: {what} holds for the library's l_inf-dist parts only; certify this model with a "
            "bound-propagation method ('ibp', 'crown-ibp', 'crown')")


def _trace(model, x: torch.Tensor):
    """:func:`linf_trace` plus, where the plain path ran the stack's graph, its ``(row_max, ranges)`` and the
    :func:`_named_tensors` they belong to (see :func:`_plain_stack`; else None)."""
    from ..models.linf_dist import LinfDistNet
    from ..models.base import check_input

    try:
        normalize, layers, negate = model.normalize, list(model.layers), bool(model.negate_output)
    except AttributeError as exc:
        raise MarginCertificateError(f"not an l_inf-dist net (needs normalize, layers, negate_output): {exc}") from None
    check_unmodified(model, normalize, layers, "the margin certificate")
    plain = _plain_parts(model)
    if plain is not None or type(model).forward is LinfDistNet.forward:   # hooks: refused above
        check_input(x, model.input_shape, type(model).__name__)
        z0 = normalize(x).flatten(1)
        named = _named_tensors(layers, normalize) if plain is not None and layers else None
        got = None if named is None else _plain_stack(layers, z0, named)
        if got is not None:
            outs, row_max, ranges = got
            return (-outs[-1] if negate else outs[-1]), z0, outs, (row_max, ranges, named)
        outs, z = [], z0
        for layer in layers:
            got = _plain_layer(layer, z) if plain is not None else None
            z = layer(z) if got is None else got
            outs.append(z)
        return (-z if negate else z), z0, outs, None
    seen, fed = {}, {}
    hooks = [normalize.register_forward_hook(lambda _m, _i, out: seen.__setitem__("z0", out))]
    hooks += [layer.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, out))
              for k, layer in enumerate(layers)]
    hooks += [layer.register_forward_pre_hook(lambda _m, inp, k=k: fed.__setitem__(k, inp[0]))
              for k, layer in enumerate(layers)]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    if "z0" not in seen or any(k not in seen for k in range(len(layers))):
        raise MarginCertificateError("the model's forward pass does not run its normalisation and every "
                                     "l_inf-dist layer; the margin certificate cannot vouch for it")
    outs = [seen[k] for k in range(len(layers))]
    # a forward of its own may also do something between the layers (scale,
    # add, mix): each layer must be fed exactly its predecessor's output
    for k in range(len(layers)):
        before = seen["z0"].flatten(1) if k == 0 else outs[k - 1]
        if not torch.equal(fed[k], before):
            raise MarginCertificateError(
                f"l_inf-dist layer {k} is not fed {'the normalised input' if k == 0 else f'layer {k - 1}'}'s "
                "output in the model's forward pass; the margin certificate cannot vouch for what runs between them")
    if not torch.equal(logits, -outs[-1] if negate else outs[-1]):
        raise MarginCertificateError("the logits are not the last l_inf-dist layer's output; the margin "
                                     "certificate cannot vouch for this model's forward pass")
    return logits, seen["z0"].flatten(1), outs, None


def computation_unit_roundoff(model, tensors=(), operands=None) -> float:
    """The unit roundoff of the least precise floating dtype the certified computation touches.

    Every rounding of the forward pass happens in the dtype of one of its
    operands other than the input (a parameter or buffer: ``operands``, by
    default every one of ``model``) or of a computed activation (a result,
    listed in ``tensors``); the input itself is exact.  Taking the largest
    ``u`` over all of them is never smaller than the ``u`` of any rounding
    step.  So a float32 input to a float64 model is computed in float64
    (u = 2^-53); a float64 input to a float32 model is refused by
    :func:`margin_certify` before this point.

    Raises:
        MarginCertificateError: a floating dtype other than float32 / float64.
    """
    if operands is None:
        operands = (*model.parameters(), *model.buffers())
    # integer tensors never round; a complex or half one is refused by unit_roundoff
    dtypes = {t.dtype for t in (*tensors, *operands) if t.is_floating_point() or t.is_complex()}
    return max(unit_roundoff(d) for d in dtypes)


def _named_tensors(layers, normalize):
    """``[(layer index or None, name, tensor)]``: each layer's weight, running mean and bias (where present),
    then the normalisation's floating buffers ``mean`` and ``std``: the tensors whose finiteness and
    magnitudes the error bound needs, in the order :func:`_plain_stack`'s graph takes them."""
    named = []
    for k, layer in enumerate(layers):
        shift = None if layer.mean_shift is None else layer.mean_shift.running_mean
        for name, t in (("weight", layer.weight), ("mean_shift.running_mean", shift), ("bias", layer.bias)):
            if t is not None and t.numel():
                named.append((k, name, t))
    for name in ("mean", "std"):
        t = getattr(normalize, name, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            named.append((None, f"normalize.{name}", t))
    return named


def _layer_consts(named, n_layers: int, device, ranges=None) -> torch.Tensor:
    """``(L, 2)`` float64: per layer ``max|running_mean|`` and ``max|bias|`` (0 where absent).

    ``named``: :func:`_named_tensors`; ``ranges``: their ``(min, max)``
    rows (float64, NaN where a tensor holds NaN) when the pass computed them
    already, else one reduction per tensor and one transfer for all of them
    (:func:`value_ranges`).  Float32 and float64 extremes are exact in
    float64.

    Raises:
        MarginCertificateError: a weight, running mean, bias or normalisation
        buffer holds NaN or inf (no certificate can hold; the distance
        kernels are not relied on to propagate NaN).
    """
    ends = value_ranges([t for _, _, t in named]) if ranges is None else ranges.tolist()
    rows = [[0.0, 0.0] for _ in range(n_layers)]
    for (k, name, _), (lo, hi) in zip(named, ends):
        v = max(-lo, hi) if lo == lo and hi == hi else math.nan  # max|t| = max(-min t, max t), exact
        if not math.isfinite(v):
            raise MarginCertificateError(f"{name if k is None else f'layers.{k}.{name}'} contains NaN or inf; "
                                         "no certificate can hold")
        if k is not None and name != "weight":
            rows[k][name == "bias"] = v
    return torch.tensor(rows, dtype=torch.float64, device=device).reshape(n_layers, 2)


def _error_bounds(z0_mag: torch.Tensor, mags: torch.Tensor, consts: torch.Tensor, gamma: float, lip: float):
    """Closed forms of the recursion of the module docstring, all samples and layers at once.

    Args:
        z0_mag: ``(B,)`` ``max|z0^|``; mags: ``(L, B)`` ``max|out_l^|``;
        consts: ``(L, 2)`` ``max|running_mean|``, ``max|bias|``.

    With ``grow_l = inflate + 2 base_l`` the recursion
    ``e_l = e_{l-1} + gamma (mag_l + grow_l + m_l + b_l + 2 (mag_l + grow_l) + b_l)``,
    ``e_0 = 2 gamma (z0 + inflate)``, sums to
    ``e_L = 2 gamma (z0 + inflate) + gamma sum_l (3 mag_l + m_l + 2 b_l + 3 grow_l)``:

    * ``E`` (inflate 0, base 0): the per-logit error at x; ``errs`` its partial sums;
    * ``A = E'(0)`` (inflate 0, base = errs): ``E + 6 gamma sum_l errs_l``;
    * ``E'(r) = A + coef r`` with ``coef = gamma lip (2 + 3 L)`` (inflate ``lip r``).

    Every sum here has at most L + 2 float64 terms, so its relative rounding
    error is below ``(L + 2) 2^-53``; the bounds are inflated by ``1 + 2^-30``
    to stay upper bounds after that rounding.

    Returns:
        ``(E, A, coef)``: ``(B,)``, ``(B,)`` and a float.
    """
    n_layers = mags.shape[0]
    per_layer = 3 * mags + (consts[:, 0] + 2 * consts[:, 1]).unsqueeze(1)
    errs = 2 * gamma * z0_mag + gamma * per_layer.cumsum(0)
    safe = 1 + 2.0 ** -30
    err = errs[-1] * safe
    a = (errs[-1] + 6 * gamma * errs.sum(0)) * safe
    coef = gamma * lip * (2 + 3 * n_layers) * safe
    return err, a, coef


@torch.no_grad()
def margin_certify(model, x: torch.Tensor, y: torch.Tensor, eps: float, float_model: bool = True):
    """Certify a batch with the float-safe Lipschitz margin.

    Args:
        model: a pure l_inf-dist net in eval mode with every layer at p = inf.
        x: ``(B, *input_shape)`` inputs, float32 or float64, no more precise
            than the model's parameters.
        y: ``(B,)`` labels.
        eps: radius in pixel units (only used for the returned flags).
        float_model: also guarantee the float network as run at every x' in
            the ball (see the module docstring).

    Returns:
        ``(correct, certified, radius, info)``: bool ``(B,)``, bool ``(B,)``,
        float64 ``(B,)`` certified radius (0 where misclassified; certified at
        eps iff ``eps < radius``), and a dict with the error bounds used.

    Raises:
        MarginCertificateError: no Lipschitz constant, or ``x`` more precise
        than the model (its rounding to the model's dtype would move the
        centre of the ball).
    """
    lip = lipschitz_constant(model)
    p = next(iter(model.parameters()), None)
    if p is not None and p.is_floating_point() and x.dtype.is_floating_point and \
            unit_roundoff(x.dtype) < unit_roundoff(p.dtype):
        raise MarginCertificateError(
            f"x is {x.dtype} but the model computes in {p.dtype}: rounding x would move the centre of the "
            f"ball; pass x as {p.dtype} (rounded by you, so the certificate is about the rounded point) or "
            f"convert the model with .to({x.dtype})")
    logits, z0, outs, fused = _trace(model, x)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise MarginCertificateError(
            f"{getattr(model, 'model_name', type(model).__name__)} returns logits of shape {tuple(logits.shape)}; "
            "certifying a prediction needs at least 2 classes")
    layers, norm = list(model.layers), model.normalize
    if fused is None:
        named, ranges, operands = _named_tensors(layers, norm), None, None
        row_max = torch.stack([t.abs().amax(dim=1) for t in (z0, *outs)])
    else:  # the stack's graph touched the normalisation's tensors and the named ones, no other
        row_max, ranges, named = fused
        operands = [t for _, _, t in named] + [*norm.parameters(), *norm.buffers()]
    u = computation_unit_roundoff(model, (z0, logits, *outs), operands)
    gamma = 2 * u
    consts = _layer_consts(named, len(layers), logits.device, ranges)
    row_max = row_max.double()
    err, a, coef = _error_bounds(row_max[0], row_max[1:], consts, gamma, lip)

    lg = logits.detach().double()
    top2 = lg.topk(2, dim=1)
    pred = top2.indices[:, 0]
    margin = top2.values[:, 0] - top2.values[:, 1]
    margin = margin - margin.abs() * 2.0 ** -52
    # A prediction from non-finite logits is no prediction (the verdict of every other method).
    correct = (pred == y) & torch.isfinite(lg).all(dim=1)

    slack = margin - 2 * err
    if float_model:
        # E'(r) = A + coef r, so the condition m - 2E - 2E'(r) > 2 L r has this closed form.
        radius = (slack - 2 * a) / (2 * lip + 2 * coef)
    else:
        radius = slack / (2 * lip)
    # The float64 arithmetic of the last lines rounds too; shrink by far more than it can add.
    radius = radius * (1 - 2.0 ** -40)
    radius = torch.where(correct & (radius > 0), radius, torch.zeros_like(radius))
    certified = correct & (radius > eps)
    info = {"lipschitz": lip, "unit_roundoff": u, "max_logit_error": float(err.max()) if err.numel() else 0.0,
            "float_model": float_model, "num_classes": int(logits.shape[1])}
    return correct.cpu(), certified.cpu(), radius.cpu(), info
