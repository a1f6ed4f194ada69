"""auto_LiRPA integration.

Importing this package (``import linf_plugin`` does) first applies the compat
layer (:mod:`.compat`, makes auto_LiRPA 0.3 importable on torch 2.x / numpy 2;
a no-op on upstream 0.7.x), then registers ``custom::LpDist`` ->
:class:`BoundLpDist` with auto_LiRPA (idempotent), so a user's own
``BoundedModule(model, x)`` bounds our l_p-distance layers with every method
(IBP, CROWN-IBP, CROWN, forward, forward+backward, alpha-CROWN).
"""
from . import compat

compat.apply()

from .operator_fixes import applied_operator_fixes, apply_operator_fixes  # noqa: E402

apply_operator_fixes()

from . import interval_guard  # noqa: E402

interval_guard.apply()

from .bound import BoundLpDist  # noqa: E402  (after the compat layer)
from .module import bounded_module, default_bound_opts  # noqa: E402
from .op import OP_NAME, custom_ops, is_registered, register, unregister  # noqa: E402
from .relaxation import LOWER_POINTS, Plane, lower_plane, upper_plane  # noqa: E402

register()

__all__ = ["compat", "interval_guard", "default_bound_opts", "apply_operator_fixes", "applied_operator_fixes", "BoundLpDist", "bounded_module", "register", "unregister", "is_registered", "custom_ops",
           "OP_NAME", "Plane", "lower_plane", "upper_plane", "LOWER_POINTS"]
