"""The names of the certification methods and of the model families, defined once.

Both are ``str`` enums: a member IS its string (``Method.CROWN == "crown"``,
``json.dumps(Method.CROWN) == '"crown"'``, ``f"{Method.CROWN}" == "crown"``),
so every function that takes a method or a family accepts either form.  A
leaf module like :mod:`linf_plugin.io`: models, certification, training and
the comparisons harness all read their names from here.

A union of methods is named by joining them with ``+``
(``"interval+margin"``): :func:`split_method` reads such a name.
"""
from __future__ import annotations

from enum import Enum
from typing import Tuple

__all__ = ["Method", "Family", "METHODS", "BOUND_PROPAGATION_METHODS", "FAMILIES", "UNION_SEPARATOR",
           "split_method"]


class _StrEnum(str, Enum):
    """A ``str`` whose ``str()`` and ``format()`` are its value (Python's own StrEnum is 3.11+)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Method(_StrEnum):
    """A certification method of :func:`linf_plugin.certification.certify`.

    ``MARGIN``: the Lipschitz margin certificate (l_inf-dist nets at p = inf);
    ``INTERVAL``: exact interval propagation (l_inf-dist nets, any p);
    ``IBP``, ``CROWN_IBP``, ``CROWN``, ``ALPHA_CROWN``: bound propagation
    through auto_LiRPA (every model).
    """

    MARGIN = "margin"
    INTERVAL = "interval"
    IBP = "ibp"
    CROWN_IBP = "crown-ibp"
    CROWN = "crown"
    ALPHA_CROWN = "alpha-crown"


class Family(_StrEnum):
    """A model family of the registry: pure l_inf-dist nets, l_inf-dist + MLP hybrids, ReLU baselines."""

    LINF_DIST = "linf_dist"
    HYBRID = "hybrid"
    RELU = "relu"


#: Every method, cheapest certificate first.
METHODS: Tuple[Method, ...] = tuple(Method)
#: The methods that run through auto_LiRPA and apply to every model.
BOUND_PROPAGATION_METHODS: Tuple[Method, ...] = (Method.IBP, Method.CROWN_IBP, Method.CROWN, Method.ALPHA_CROWN)
#: Every model family.
FAMILIES: Tuple[Family, ...] = tuple(Family)
#: Joins the members of a union of methods: ``"interval+margin"``.
UNION_SEPARATOR = "+"


def split_method(method) -> Tuple[Method, ...]:
    """The member methods of ``method``: one for a plain method, several for a union ``"a+b"``.

    Args:
        method: a :class:`Method`, its string, or members joined by ``+``.

    Returns:
        The members, in the order given.

    Raises:
        ValueError: an unknown member, a member named twice, or not a string.
    """
    if not isinstance(method, str):
        raise ValueError(f"a certification method is a string such as 'margin' or 'interval+margin', got "
                         f"{type(method).__name__} {method!r}")
    parts = [p.strip() for p in str(method).split(UNION_SEPARATOR)]
    choices = [m.value for m in METHODS]
    bad = [p for p in parts if p not in choices]
    if bad:
        raise ValueError(f"unknown certification method {bad[0]!r} in {str(method)!r}; choose from {choices}, "
                         f"or join several with {UNION_SEPARATOR!r} for their union (e.g. 'interval+margin')")
    members = tuple(Method(p) for p in parts)
    if len(set(members)) != len(members):
        raise ValueError(f"{str(method)!r} names a method twice; a union names each member once")
    return members
