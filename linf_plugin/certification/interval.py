r"""Exact interval propagation through l_inf-dist nets, rounded outward.

This is how the authors certify: propagate the input box layer by layer with
the exact per-neuron range of each l_p-dist layer (:func:`lp_dist_interval`),
then certify when the lower bound of the true logit exceeds the upper bound
of every other logit.  It works for any p and is at least as strong as the
margin certificate in exact arithmetic (each logit's range lies within
``logit(x) +- L eps``).

Floating point: every computed bound is pushed outward by a bound on its own
rounding error, so the computed box contains the exact one at every layer
(the exact interval map is monotone in the input box, so containment
propagates).  With ``u`` the unit roundoff and ``gamma = 2u``:

* normalisation ``(x - mu) / s`` (monotone, s > 0): relative ``2 gamma``;
* p = inf layer (subtractions, exact abs/max): relative ``gamma``;
* finite p: the bounds are computed in float64 whatever the model's dtype,
  then pushed out by ``u64 (16 + 4 (D + 2))`` relative -- generous for a
  max-normalised power sum of D terms with pow/exp/log accurate to a few ulp;
* mean shift and bias (one rounding each): relative ``gamma``.

The promise is about the real-arithmetic network with the stored parameters
(the float model at perturbed inputs is covered by the margin certificate;
``certify(..., "interval+margin")`` asks for both, certified when either
certifies).  The exact interval map is monotone in eps, so a radius can be
bisected (:func:`~linf_plugin.certification.bisect_radius`).
"""
from __future__ import annotations

import math

import torch

from ..ops import lp_dist_interval
from .margin import MarginCertificateError, check_unmodified, unit_roundoff

__all__ = ["interval_bounds", "interval_certify"]


def _out(lo: torch.Tensor, hi: torch.Tensor, rel: float):
    return lo - rel * lo.abs(), hi + rel * hi.abs()


@torch.no_grad()
def interval_bounds(model, lower: torch.Tensor, upper: torch.Tensor):
    """Outward-rounded bounds on the logits of an l_inf-dist net over a box.

    Args:
        model: an l_inf-dist net (``normalize``, ``layers``, ``negate_output``)
            in eval mode; any p.
        lower, upper: ``(B, *input_shape)`` box corners.

    Returns:
        ``(lo, hi)``, each ``(B, K)``, containing every logit the exact
        network takes on the box.
    """
    try:
        normalize, layers, negate = model.normalize, list(model.layers), bool(model.negate_output)
    except AttributeError as exc:
        raise MarginCertificateError(f"'interval' needs an l_inf-dist net: {exc}") from None
    from ..models.linf_dist import LinfDistNet

    # the propagation below follows LinfDistNet.forward over the library's
    # parts; what model(x) computes must be exactly that
    check_unmodified(model, normalize, layers, "interval propagation")
    if isinstance(model, LinfDistNet) and type(model).forward is not LinfDistNet.forward:
        raise MarginCertificateError(
            f"{type(model).__name__} has a forward of its own, which interval propagation (it follows "
            "LinfDistNet.forward) does not see; use 'margin' or a bound-propagation method")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        # Checked before any forward: a mean shift in train mode would update its running mean.
        raise MarginCertificateError(f"interval bounds need every submodule in eval mode (a mean shift must be a constant); "
                         f"in train mode: {training[:5]}{' ...' if len(training) > 5 else ''} -- call model.eval()")
    u = unit_roundoff(lower.dtype)
    gamma = 2 * u
    lo, hi = _out(normalize(lower).flatten(1), normalize(upper).flatten(1), 2 * gamma)
    for layer in layers:
        p = layer.p
        if math.isinf(p):
            lo, hi = lp_dist_interval(lo, hi, layer.weight, p)
            lo, hi = _out(lo, hi, gamma)
        else:
            d = layer.weight.shape[1]
            lo64, hi64 = lp_dist_interval(lo.double(), hi.double(), layer.weight.double(), p)
            lo64, hi64 = _out(lo64, hi64, 2.0 ** -53 * (16 + 4 * (d + 2)))
            lo = lo64.to(lo.dtype)
            hi = hi64.to(hi.dtype)
            lo = torch.where(lo.double() > lo64, torch.nextafter(lo, torch.full_like(lo, -math.inf)), lo)
            hi = torch.where(hi.double() < hi64, torch.nextafter(hi, torch.full_like(hi, math.inf)), hi)
        lo = lo.clamp(min=0)  # a distance is >= 0 in exact arithmetic
        if layer.mean_shift is not None:
            lo, hi = _out(layer.mean_shift(lo), layer.mean_shift(hi), gamma)
        if layer.bias is not None:
            lo, hi = _out(lo + layer.bias, hi + layer.bias, gamma)
        lo, hi = _widest_where_nan(lo, hi)
    return (-hi, -lo) if negate else (lo, hi)


def _widest_where_nan(lo, hi):
    """Overflow (inf - inf) gives NaN; (-inf, inf) contains everything, so it stays sound and never certifies."""
    return (torch.nan_to_num(lo, nan=-math.inf, posinf=math.inf, neginf=-math.inf),
            torch.nan_to_num(hi, nan=math.inf, posinf=math.inf, neginf=-math.inf))


@torch.no_grad()
def interval_certify(model, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    """Certify a batch by interval propagation over ``[lower, upper]``.

    Returns:
        ``(correct, certified)``, bool ``(B,)`` each.
    """
    lo, hi = interval_bounds(model, lower, upper)  # first: it refuses a model with a submodule in train mode
    logits = model(x)
    correct = torch.isfinite(logits).all(dim=1) & (logits.argmax(dim=1) == y)
    true_lo = lo.gather(1, y[:, None]).squeeze(1).double()
    others = hi.double().scatter(1, y[:, None], -math.inf).amax(dim=1)
    finite = torch.isfinite(lo).all(dim=1) & torch.isfinite(hi).all(dim=1)
    return correct.cpu(), (correct & finite & (true_lo > others)).cpu()
