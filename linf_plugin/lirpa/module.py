"""``bounded_module``: a ``BoundedModule`` for any of our models, in one call."""
from __future__ import annotations

import warnings

import torch

from .compat import needs_legacy_fixes
from .op import register

__all__ = ["bounded_module", "default_bound_opts"]


def default_bound_opts() -> dict:
    """Bound options :func:`bounded_module` adds unless the caller sets them.

    On auto_LiRPA 0.3 ``sparse_spec_alpha`` is turned off: with it (0.3's
    default) alpha-CROWN fails on ReLU CNNs in patches mode (an assertion in
    ``BoundRelu._backward_relaxation``, with or without our layers; upstream
    0.7 is fine with its default, and fails without it).  A user building a
    ``BoundedModule`` by hand on 0.3 can pass ``bound_opts={"sparse_spec_alpha":
    False}`` for the same effect.
    """
    if needs_legacy_fixes():
        return {"sparse_spec_alpha": False}
    return {}


def bounded_module(model: torch.nn.Module, example_input: torch.Tensor, *, bound_opts: dict | None = None,
                   device=None, quiet: bool = True, **kwargs):
    """Wrap ``model`` in auto_LiRPA's ``BoundedModule`` with ``custom::LpDist`` registered.

    Equivalent to ``auto_LiRPA.BoundedModule(model, example_input, ...)`` after
    ``import linf_plugin`` (which registers the op); this helper also checks the
    input, picks the input's device, and keeps the tracer's warnings (ONNX shape
    inference of the custom op, Python-int conversions while tracing) out of the
    user's log.

    Args:
        model: any ``nn.Module`` built from our layers and stock PyTorch ops
            (ℓ∞-dist nets, hybrids, ReLU baselines).  Put it in ``eval()`` mode
            for certification: a mean-shift layer in training mode subtracts a
            batch statistic, which is traced as such.
        example_input: ``(B, ...)`` float tensor of the model's input shape.
        bound_opts: auto_LiRPA bound options; ``{"lp_dist": {"lower": ...}}``
            configures :class:`~linf_plugin.lirpa.bound.BoundLpDist`.  Merged
            over :func:`default_bound_opts`.
        device: defaults to ``example_input.device``.
        quiet: suppress tracing warnings while building.
        **kwargs: passed to ``BoundedModule``.

    Returns:
        ``auto_LiRPA.BoundedModule``.

    Raises:
        TypeError / ValueError: ``example_input`` is not a float tensor with a batch dim.
    """
    from auto_LiRPA import BoundedModule

    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if not example_input.is_floating_point():
        raise TypeError(f"example_input must be a float tensor, got {example_input.dtype}")
    if example_input.dim() < 2:
        raise ValueError(f"example_input must have a batch dimension, got shape {tuple(example_input.shape)}")
    register()
    opts = default_bound_opts()
    opts.update(bound_opts or {})
    device = example_input.device if device is None else device
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        return BoundedModule(model, example_input, bound_opts=opts, device=device, **kwargs)
