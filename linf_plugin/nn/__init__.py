"""torch.nn modules built on the ℓp-distance op.

``LpDistLinear`` (a layer of ℓp-distance neurons), ``MeanShiftNorm``
(batch norm that only subtracts a mean), ``InputNormalize`` (normalisation
inside the model, scalar std for ℓ∞ nets) and ``set_p`` (one call sets p on
every layer, for the ℓp-relaxation schedule).
"""
from .lp_dist_linear import DEFAULT_IDENTITY_VALUE, LpDistLinear, get_p, lp_dist_layers, set_p
from .mean_shift import MeanShiftNorm
from .normalize import InputNormalize

__all__ = ["LpDistLinear", "MeanShiftNorm", "InputNormalize", "set_p", "get_p", "lp_dist_layers",
           "DEFAULT_IDENTITY_VALUE"]
