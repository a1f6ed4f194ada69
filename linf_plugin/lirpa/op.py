"""Registration of ``custom::LpDist`` with auto_LiRPA.

:class:`linf_plugin.ops.LpDistFunction` is the autograd Function every
l_p-distance layer runs through; its ONNX ``symbolic`` emits one
``custom::LpDist(x, w)`` node with the float attribute ``p`` (``inf``
allowed).  :func:`register` maps that node to
:class:`~linf_plugin.lirpa.bound.BoundLpDist` in auto_LiRPA's global operator
table, so a ``BoundedModule`` built by the user (after ``import linf_plugin``)
bounds our layers without any extra argument.  ``linf_plugin.lirpa`` calls it
on import, after the compat layer.
"""
from __future__ import annotations

from .compat import apply as _apply_compat

__all__ = ["OP_NAME", "register", "unregister", "is_registered", "custom_ops"]

OP_NAME = "custom::LpDist"


def _op_map():
    from auto_LiRPA import bound_op_map as module

    return module


def register() -> None:
    """Map ``custom::LpDist`` to :class:`BoundLpDist` in auto_LiRPA (idempotent).

    Safe to call any number of times; re-registering replaces the entry with
    the same class.
    """
    _apply_compat()
    from .bound import BoundLpDist

    _op_map().register_custom_op(OP_NAME, BoundLpDist)


def unregister() -> None:
    """Remove the mapping (no error if it is absent)."""
    _op_map().bound_op_map.pop(OP_NAME, None)


def is_registered() -> bool:
    """Whether auto_LiRPA currently maps ``custom::LpDist`` to :class:`BoundLpDist`."""
    from .bound import BoundLpDist

    return _op_map().bound_op_map.get(OP_NAME) is BoundLpDist


def custom_ops() -> dict:
    """``{"custom::LpDist": BoundLpDist}``, for ``BoundedModule(..., custom_ops=...)``."""
    from .bound import BoundLpDist

    return {OP_NAME: BoundLpDist}
