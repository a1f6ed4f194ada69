"""Constructive ℓ∞-dist nets from a labelled set: Theorem 3.2 (2 layers) and Theorem A.2 (L layers).

Both nets output ``g_j(x) = −min_{i: y_i = j} ||z − z_i||∞`` with ``z`` the
normalised input (identity normalisation by default, so ``z = x``), for
every ``x`` in the domain ``{x : dist∞(z, box(Z)) <= radius}`` around the
bounding box of the data, and so classify every data point correctly with
margin ``>= 2r`` when the set is r-separated: margin certification (radius
margin/2, Lipschitz constant 1/std) certifies 100 % of the set at ε = r·std.
An ℓ∞-dist neuron can produce ``−min`` but not ``+min``, so these nets give
their last layer's output as the logits (``negate_output=False``).

The big constant ``C`` of the proofs is computed from the data (its ℓ∞
diameter and magnitude, and ``radius``) and rounded up to a power of two, so
every weight is exactly representable in float32, float64 and rationals.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .linf_dist import LinfDistNet
from .registry import create_model, register_model

__all__ = ["theorem32_net", "theoremA2_net", "theoremA2_width", "construction_constants"]


def theoremA2_width(num_points: int, input_dim: int, num_classes: int, depth: int) -> int:
    """Hidden width of the Theorem A.2 net: ``ceil(n / (L − 1)) + K + 2d`` (the paper's bound)."""
    if depth < 2:
        raise ValueError(f"Theorem A.2 needs depth >= 2, got {depth}")
    return -(-num_points // (depth - 1)) + num_classes + 2 * input_dim


@register_model(family="linf_dist", name="theorem32_net")
def _theorem32_entry(input_shape, num_classes, num_points: int = 16, mean=0.0, std=1.0, p: float = math.inf,
                     backend: Optional[str] = None):
    """Shapes of the Theorem 3.2 net (weights are filled by ``theorem32_net(x, y)``)."""
    return LinfDistNet(input_shape, num_classes, [int(num_points)], mean=mean, std=std, p=p, mean_shift=False,
                       hidden_bias=False, output_bias=True, identity_init=False, negate_output=False,
                       backend=backend)


@register_model(family="linf_dist", name="theoremA2_net")
def _theoremA2_entry(input_shape, num_classes, num_points: int = 16, depth: int = 3, mean=0.0, std=1.0,
                     p: float = math.inf, backend: Optional[str] = None):
    """Shapes of the Theorem A.2 net (weights are filled by ``theoremA2_net(x, y, depth)``)."""
    d = int(math.prod(input_shape))
    width = theoremA2_width(int(num_points), d, num_classes, int(depth))
    return LinfDistNet(input_shape, num_classes, [width] * (int(depth) - 1), mean=mean, std=std, p=p,
                       mean_shift=False, hidden_bias=True, output_bias=True, identity_init=False,
                       negate_output=False, backend=backend)


def _prepare(x, y, num_classes, dtype, mean, std):
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors (use DatasetSplit.x / .y)")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dim() < 2 or y.dim() != 1 or y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need x of shape (n, *input_shape) and y of shape (n,), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    y = y.long()
    if y.min() < 0:
        raise ValueError("labels must be >= 0")
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if int(y.max()) >= k:
        raise ValueError(f"labels reach {int(y.max())} but num_classes is {k}")
    dtype = dtype or x.dtype
    input_shape = tuple(x.shape[1:])
    model_kw = {"mean": mean, "std": std}
    return x.to(dtype), y, k, dtype, input_shape, model_kw


def _pow2_at_least(v: float) -> float:
    return 2.0 ** math.ceil(math.log2(max(v, 1e-30)))


def construction_constants(z: torch.Tensor, radius: Optional[float] = None) -> dict:
    """The data-dependent constants of the constructions, for normalised points ``z (n, D)``.

    Returns:
        ``{"diameter": ℓ∞ diameter of the bounding box, "radius": ρ,
        "max_dist": D = diameter + ρ (largest ||z − z_i||∞ on the domain),
        "max_abs": M (largest |z_k| on the domain)}``.
    """
    lo, hi = z.min(dim=0).values, z.max(dim=0).values
    diameter = float((hi - lo).max())
    if radius is None:
        radius = diameter if diameter > 0 else 1.0
    radius = float(radius)
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    max_abs = float(torch.maximum((lo - radius).abs(), (hi + radius).abs()).max())
    return {"diameter": diameter, "radius": radius, "max_dist": diameter + radius, "max_abs": max_abs}


@torch.no_grad()
def theorem32_net(x: torch.Tensor, y: torch.Tensor, num_classes: Optional[int] = None, *, dtype=None,
                  mean=0.0, std=1.0, radius: Optional[float] = None, backend: Optional[str] = None) -> LinfDistNet:
    """The 2-layer ℓ∞-dist net of Theorem 3.2, a nearest-neighbour classifier of ``(x, y)``.

    Layer 1 has one neuron per point (``w = z_i``, no bias): ``||z − z_i||∞``.
    Layer 2 has ``w[j, i] = C·[y_i = j]``, ``b_j = −C``, which gives
    ``−min_{y_i=j} ||z − z_i||∞`` whenever every ``||z − z_i||∞ <= C/2``
    (Eq. 11–14 of the paper); here ``C = 2^ceil(log2(2·D))`` with ``D`` the
    largest such distance on the domain (see the module docstring), so the
    formula holds on the whole domain, not only on the data.  A class with no
    point gets ``−C + max_i ||z − z_i||∞ <= −C/2``.

    Args:
        x: ``(n, *input_shape)`` points (pixel units).
        y: ``(n,)`` integer labels.
        num_classes: ``K`` (default ``max(y) + 1``).
        dtype: weight dtype (default ``x.dtype``; float64 for exact checks).
        mean, std: input normalisation stored in the net (scalar std).
        radius: the domain's margin around the data's bounding box, in
            normalised units (default: the box's ℓ∞ diameter).
        backend: ``lp_dist`` backend.

    Returns:
        A :class:`LinfDistNet` in eval mode (registry name ``theorem32_net``),
        logits ``(B, K)``.
    """
    x, y, k, dtype, input_shape, model_kw = _prepare(x, y, num_classes, dtype, mean, std)
    n = x.shape[0]
    net = create_model("theorem32_net", input_shape, k, num_points=n, backend=backend, **model_kw).to(dtype)
    z = net.normalize(x).flatten(1)
    consts = construction_constants(z, radius)
    c = _pow2_at_least(2.0 * consts["max_dist"])
    first, second = net.layers
    first.weight.copy_(z)
    onehot = torch.zeros(k, n, dtype=dtype)
    onehot[y, torch.arange(n)] = 1.0
    second.weight.copy_(c * onehot)
    second.bias.fill_(-c)
    net.construction = {"theorem": "3.2", "C": c, **consts}
    return net.eval()


@torch.no_grad()
def theoremA2_net(x: torch.Tensor, y: torch.Tensor, depth: int, num_classes: Optional[int] = None, *,
                  dtype=None, mean=0.0, std=1.0, radius: Optional[float] = None,
                  backend: Optional[str] = None) -> LinfDistNet:
    """The L-layer ℓ∞-dist net of Theorem A.2 (hidden width ``ceil(n/(L−1)) + K + 2d``).

    Each hidden layer holds four groups (the proof's I, Ĩ, O, S): two copies
    of the input ``z`` (neurons ``||u − (−C e_k)||∞ − C = z_k``), the K running
    class maxima ``h_j = −min ||z − z_i||∞`` over the points seen so far, and
    the distances ``||z − z_i||∞`` to the next chunk of ``ceil(n/(L−1))``
    points (computed from the two input copies with weights ``z_i ∓ C``).
    Each layer merges the previous chunk into the maxima (weights ``−C`` on
    ``h_j``, ``+C`` on same-class distances, bias ``−C``); the last layer
    outputs the K maxima, the same function as :func:`theorem32_net`.  The
    running maxima start at ``||z||∞ − B`` with ``B = M + D``, below every
    real value; ``C = 2^ceil(log2(2M + 2D))`` dominates every other term.

    Args:
        x, y, num_classes, dtype, mean, std, radius, backend: as for :func:`theorem32_net`.
        depth: ``L >= 2``, the number of ℓ∞-dist layers.

    Returns:
        A :class:`LinfDistNet` in eval mode (registry name ``theoremA2_net``).
    """
    depth = int(depth)
    x, y, k, dtype, input_shape, model_kw = _prepare(x, y, num_classes, dtype, mean, std)
    n = x.shape[0]
    net = create_model("theoremA2_net", input_shape, k, num_points=n, depth=depth, backend=backend,
                       **model_kw).to(dtype)
    z = net.normalize(x).flatten(1)
    d = z.shape[1]
    consts = construction_constants(z, radius)
    m_abs, dmax = consts["max_abs"], consts["max_dist"]
    big_b = m_abs + dmax
    c = _pow2_at_least(2.0 * (m_abs + dmax))
    chunk = -(-n // (depth - 1))
    bounds = [-(-n * l // (depth - 1)) for l in range(depth)]  # chunk l covers points bounds[l-1]:bounds[l]
    i_cp, i_cp2, o_off, s_off = 0, d, 2 * d, 2 * d + k  # offsets of I, Ĩ, O, S in a hidden layer
    eye = torch.eye(d, dtype=dtype)

    def fill_s(layer, lidx: int, first: bool):
        """S of hidden layer ``lidx`` (1-based): distances to the points of chunk ``lidx``."""
        pts = list(range(bounds[lidx - 1], bounds[lidx]))
        pts += [pts[0] if pts else 0] * (chunk - len(pts))  # unused slots: any bounded distance
        for s, i in enumerate(pts):
            row = s_off + s
            if first:
                layer.weight[row] = z[i]
                layer.bias[row] = 0.0
            else:
                layer.weight[row].zero_()
                layer.weight[row, i_cp:i_cp + d] = z[i] - c
                layer.weight[row, i_cp2:i_cp2 + d] = z[i] + c
                layer.bias[row] = -c
        return pts[:bounds[lidx] - bounds[lidx - 1]]

    def fill_merge(layer, row0: int, prev_pts: list):
        """Rows ``row0 + j`` = max(h_j, −dist to same-class points of the previous chunk)."""
        for j in range(k):
            row = row0 + j
            layer.weight[row].zero_()
            layer.weight[row, o_off + j] = -c
            for s, i in enumerate(prev_pts):
                if int(y[i]) == j:
                    layer.weight[row, s_off + s] = c
            layer.bias[row] = -c

    layers = list(net.layers)
    prev_pts: list = []
    for lidx, layer in enumerate(layers, start=1):
        layer.weight.zero_()
        layer.bias.zero_()
        if lidx == len(layers):  # output: the K class maxima
            fill_merge(layer, 0, prev_pts)
            break
        if lidx == 1:
            for copy in (i_cp, i_cp2):  # z_k = ||z + C e_k||∞ − C on the domain
                layer.weight[copy:copy + d] = -c * eye
                layer.bias[copy:copy + d] = -c
            layer.bias[o_off:o_off + k] = -big_b  # h_j starts at ||z||∞ − B <= −D
        else:
            for copy in (i_cp, i_cp2):  # copy I of the previous layer
                layer.weight[copy:copy + d, i_cp:i_cp + d] = -c * eye
                layer.bias[copy:copy + d] = -c
            fill_merge(layer, o_off, prev_pts)
        prev_pts = fill_s(layer, lidx, first=lidx == 1)
    net.construction = {"theorem": "A.2", "C": c, "B": big_b, "depth": depth, "chunk": chunk, **consts}
    return net.eval()
