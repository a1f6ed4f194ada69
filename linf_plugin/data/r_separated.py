"""r-separated sets: the three-point set of Mirman et al. and the separation of any set.

A labelled set is *r-separated* in l_inf when every two points with different
labels are more than 2r apart (Zhang et al. 2022, Theorem 3.2 uses ``>``;
the three-point set below also has a *touching* variant at exactly 2r).
"""
from __future__ import annotations

import math

import torch

from .base import DatasetSplit

__all__ = ["three_point_set", "linf_separation"]


def three_point_set(r: float = 1.0, dim: int = 1, separation: float = 1.0, axis: int = 0,
                    dtype: torch.dtype = torch.float64) -> DatasetSplit:
    """Labels A, B, A at ``-2*r*separation``, ``0``, ``+2*r*separation`` along one axis.

    With ``separation == 1`` the boxes of radius r around the points touch
    (l_inf distance exactly 2r across labels); with ``separation > 1`` the set
    is strictly r-separated.  The other ``dim - 1`` coordinates are 0.

    Args:
        r: the radius (> 0).
        dim: input dimension d >= 1.
        separation: factor >= 1 on the spacing.
        axis: which coordinate carries the points.
        dtype: float64 by default, so both sides can be checked exactly.

    Returns:
        A :class:`DatasetSplit` with ``x`` of shape ``(3, dim)``, labels
        ``[0, 1, 0]`` (A = 0, B = 1), ``num_classes = 2`` and an unbounded
        data range.
    """
    if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
        raise ValueError(f"r must be a positive finite number, got {r!r}")
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if not (math.isfinite(separation) and separation >= 1):
        raise ValueError(f"separation must be >= 1 (1 = touching boxes), got {separation!r}")
    if not 0 <= axis < dim:
        raise ValueError(f"axis must lie in [0, {dim}), got {axis}")
    x = torch.zeros(3, dim, dtype=dtype)
    x[0, axis], x[2, axis] = -2 * r * separation, 2 * r * separation
    y = torch.tensor([0, 1, 0])
    kind = "touching" if separation == 1 else f"separated x{separation:g}"
    return DatasetSplit(x, y, name=f"three_point(r={r:g}, d={dim}, {kind})", split="all", num_classes=2,
                        data_range=(-math.inf, math.inf), mean=(0.0,), std=1.0)


def linf_separation(x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    """Half the smallest l_inf distance between two points with different labels.

    The set is r-separated for every r below this value (and touching at it).

    Args:
        x: ``(n, *shape)`` points (flattened internally).
        y: ``(n,)`` labels.
        chunk: rows per block, to bound memory at ``chunk * n`` distances.

    Returns:
        ``r = min_{y_i != y_j} ||x_i - x_j||_inf / 2`` as a Python float
        (``inf`` when there is only one label).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} points but y has {y.shape[0]} labels")
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    best = math.inf
    for start in range(0, flat.shape[0], chunk):
        block = flat[start:start + chunk]
        dist = torch.cdist(block, flat, p=math.inf)
        other = y[start:start + chunk, None] != y[None, :]
        if other.any():
            best = min(best, dist[other].min().item())
    return best / 2
