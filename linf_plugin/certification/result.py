"""``CertResult`` and ``CurveResult``: the per-sample outcome of a certification, as data.

Both hold CPU tensors (bool flags, float64 radii; see :mod:`linf_plugin.results`),
so they combine with each other and with :class:`~linf_plugin.attacks.AttackResult`.
``to_dict`` / ``from_dict`` round-trip through JSON; the per-sample tensors
are written as lists, in the same format as before they were tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..names import UNION_SEPARATOR
from ..results import Result, tensor_to_list

__all__ = ["CertResult", "CurveResult", "union_results"]

_MEMBERS = "members"  # extra[_MEMBERS]: a union's per-member results, {method: CertResult or CurveResult}


def _extra_to_dict(extra: dict, per_sample: bool) -> dict:
    members = extra.get(_MEMBERS)
    if not members:
        return extra
    return {**extra, _MEMBERS: {k: v.to_dict(per_sample) if isinstance(v, Result) else v for k, v in members.items()}}


def _extra_from_dict(extra: Optional[dict], cls) -> dict:
    extra = dict(extra or {})
    members = extra.get(_MEMBERS)
    if members:
        extra[_MEMBERS] = {k: cls.from_dict(v) if isinstance(v, dict) and "correct" in v else v
                           for k, v in members.items()}
    return extra


@dataclass
class CertResult(Result):
    """Per-sample certification results for one model, method and eps.

    Attributes:
        method: a method of :data:`linf_plugin.certification.METHODS`, or a
            union of them joined by ``+`` (``"interval+margin"``).
        eps: l_inf radius in pixel units.
        model_name: the registry name of the model (or its class name).
        correct: ``(n,)`` bool CPU tensor, the clean prediction equals the label.
        certified: ``(n,)`` bool CPU tensor, correct AND proven constant on the box.
        radius: ``(n,)`` float64 CPU tensor, the certified radius where the
            method yields one (margin; interval and bound propagation with
            bisection), else ``None``.  A sample is certified at every eps
            strictly below its radius; 0 for misclassified samples.
        wall_time: seconds spent certifying (model forward passes included).
        extra: method details (e.g. the rounding-error bound used; for a
            result that is not float-rigorous, ``float_rigorous_reason``; for
            a union, ``extra["members"]``: each member's own result).
        float_rigorous: every certificate holds for the real-arithmetic
            network whatever the rounding of the computation (margin,
            interval, and bound propagation re-checked in float64 with a
            derived slack; see docs/certificates.md).
            ``False``: the float computation was trusted up to a heuristic
            slack.  Results saved before this field existed load as
            ``False`` (nothing vouched for their rounding).

    Tensors, numpy arrays and lists are accepted for the per-sample fields
    and stored as CPU tensors.
    """

    method: str
    eps: float
    model_name: str
    correct: torch.Tensor
    certified: torch.Tensor
    radius: Optional[torch.Tensor] = None
    wall_time: float = 0.0
    extra: dict = field(default_factory=dict)
    float_rigorous: bool = False

    _TENSOR_FIELDS = {"correct": torch.bool, "certified": torch.bool, "radius": torch.float64}

    def __post_init__(self):
        self.float_rigorous = bool(self.float_rigorous)
        self.method = str(self.method)
        self._to_tensors()
        if self.correct.shape != self.certified.shape or self.correct.dim() != 1:
            raise ValueError("correct and certified must be 1-D and of equal length, got shapes "
                             f"{tuple(self.correct.shape)} and {tuple(self.certified.shape)}")
        if (self.certified & ~self.correct).any():
            raise ValueError("a misclassified sample cannot be certified")
        if self.radius is not None and self.radius.shape != self.correct.shape:
            raise ValueError(f"radius must have one entry per sample ({self.n}), got shape {tuple(self.radius.shape)}")

    @property
    def n(self) -> int:
        return int(self.correct.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return self._mean(self.correct)

    @property
    def certified_accuracy(self) -> float:
        return self._mean(self.certified)

    def to_dict(self, per_sample: bool = True) -> dict:
        """JSON-able dict (per-sample tensors as lists unless ``per_sample=False``)."""
        out = {"method": self.method, "eps": float(self.eps), "model_name": self.model_name, "n": self.n,
               "clean_accuracy": self.clean_accuracy, "certified_accuracy": self.certified_accuracy,
               "wall_time": float(self.wall_time), "extra": _extra_to_dict(self.extra, per_sample),
               "float_rigorous": self.float_rigorous}
        if per_sample:
            out["correct"] = tensor_to_list(self.correct)
            out["certified"] = tensor_to_list(self.certified)
            out["radius"] = tensor_to_list(self.radius)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "CertResult":
        """Inverse of :meth:`to_dict` (``per_sample=True``); results saved by earlier versions load too."""
        return cls(method=d["method"], eps=d["eps"], model_name=d["model_name"], correct=d["correct"],
                   certified=d["certified"], radius=d.get("radius"), wall_time=d.get("wall_time", 0.0),
                   extra=_extra_from_dict(d.get("extra"), cls), float_rigorous=d.get("float_rigorous", False))

    def summary(self) -> str:
        return (f"{self.model_name} {self.method} eps={self.eps:g}: clean {100 * self.clean_accuracy:.2f}%, "
                f"certified {100 * self.certified_accuracy:.2f}% ({self.n} samples, {self.wall_time:.3g} s"
                f"{'' if self.float_rigorous else ', not float-rigorous'})")


@dataclass
class CurveResult(Result):
    """Certified accuracy against eps for one model and method.

    Attributes:
        method: the method (or union, ``"a+b"``).
        model_name: the registry name of the model (or its class name).
        eps: ``(E,)`` float64 CPU tensor, the grid.
        certified_accuracy: ``(E,)`` float64 CPU tensor, the fraction certified at each eps.
        clean_accuracy: the fraction classified correctly.
        wall_time: seconds for the whole curve.
        radius: ``(n,)`` float64 CPU tensor of per-sample certified radii
            when the curve came from radii (margin, bisection), else ``None``.
        extra: method details; ``extra["float_rigorous"]`` says whether every
            certificate of the curve is float-rigorous.
        correct: ``(n,)`` bool CPU tensor, or ``None`` (curves saved before it existed).
        certified: ``(n, E)`` bool CPU tensor, sample i certified at ``eps[j]``, or ``None``.
    """

    method: str
    model_name: str
    eps: torch.Tensor
    certified_accuracy: torch.Tensor
    clean_accuracy: float
    wall_time: float
    radius: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)
    correct: Optional[torch.Tensor] = None
    certified: Optional[torch.Tensor] = None

    _TENSOR_FIELDS = {"eps": torch.float64, "certified_accuracy": torch.float64, "radius": torch.float64,
                      "correct": torch.bool, "certified": torch.bool}

    def __post_init__(self):
        self.method = str(self.method)
        self._to_tensors()
        self.clean_accuracy = float(self.clean_accuracy)
        if self.eps.dim() != 1 or self.certified_accuracy.shape != self.eps.shape:
            raise ValueError(f"eps and certified_accuracy must be 1-D and of equal length, got shapes "
                             f"{tuple(self.eps.shape)} and {tuple(self.certified_accuracy.shape)}")
        n = None if self.correct is None else self.correct.shape[0]
        if self.certified is not None and (self.certified.dim() != 2 or self.certified.shape[1] != self.eps.shape[0]
                                           or (n is not None and self.certified.shape[0] != n)):
            raise ValueError(f"certified must have shape (n, {self.eps.shape[0]}), got {tuple(self.certified.shape)}")
        if self.radius is not None and n is not None and self.radius.shape != (n,):
            raise ValueError(f"radius must have one entry per sample ({n}), got shape {tuple(self.radius.shape)}")

    @property
    def n(self) -> int:
        """The number of samples (from ``correct``, else ``radius``; 0 when neither is known)."""
        if self.correct is not None:
            return int(self.correct.shape[0])
        return 0 if self.radius is None else int(self.radius.shape[0])

    @property
    def float_rigorous(self) -> bool:
        return bool(self.extra.get("float_rigorous", False))

    def to_dict(self, per_sample: bool = True) -> dict:
        """JSON-able dict: the format of earlier versions, plus ``correct`` and ``certified`` when ``per_sample``."""
        out = {"method": self.method, "model_name": self.model_name, "eps": tensor_to_list(self.eps),
               "certified_accuracy": tensor_to_list(self.certified_accuracy),
               "clean_accuracy": float(self.clean_accuracy), "wall_time": float(self.wall_time),
               "radius": tensor_to_list(self.radius), "extra": _extra_to_dict(self.extra, per_sample)}
        if per_sample:
            out["correct"] = tensor_to_list(self.correct)
            out["certified"] = tensor_to_list(self.certified)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "CurveResult":
        """Inverse of :meth:`to_dict`."""
        return cls(method=d["method"], model_name=d["model_name"], eps=d["eps"],
                   certified_accuracy=d["certified_accuracy"], clean_accuracy=d["clean_accuracy"],
                   wall_time=d.get("wall_time", 0.0), radius=d.get("radius"),
                   extra=_extra_from_dict(d.get("extra"), cls), correct=d.get("correct"),
                   certified=d.get("certified"))

    def summary(self) -> str:
        accs = ", ".join(f"{e:g}: {100 * a:.2f}%" for e, a in zip(self.eps.tolist(), self.certified_accuracy.tolist()))
        clean = "n/a" if math.isnan(self.clean_accuracy) else f"{100 * self.clean_accuracy:.2f}%"
        return f"{self.model_name} {self.method}: clean {clean}, certified at eps {accs} ({self.wall_time:.3g} s)"


def union_results(results):
    """The union of several methods' results on the same samples: certified when any member certifies.

    Every member's certificate is sound on its own, so their union is.  This
    is the one place a union is defined: ``certify(..., "a+b")`` and
    ``certified_accuracy_curve(..., "a+b")`` both call it.

    Args:
        results: two or more :class:`CertResult` of one model at one eps, or
            :class:`CurveResult` of one model on one eps grid, each of one
            method (not itself a union), in the order of the union's name.

    Returns:
        The same type, with ``method`` the members' names joined by ``+``;
        ``correct`` and ``certified`` any member's; ``radius`` the members'
        maximum when every member has radii, else ``None``; ``wall_time``
        their sum; ``float_rigorous`` only when every member's is; and
        ``extra["members"]`` = ``{method: member result}``.

    Raises:
        ValueError: fewer than two results, mixed types, another model, eps
            (grid) or number of samples, a repeated method.
    """
    results = list(results)
    if len(results) < 2 or len({type(r) for r in results}) != 1 or not isinstance(results[0], (CertResult,
                                                                                                  CurveResult)):
        raise ValueError("a union needs two or more results of one type (CertResult or CurveResult)")
    first = results[0]
    names = [r.method for r in results]
    if len(set(names)) != len(names) or any(UNION_SEPARATOR in n for n in names):
        raise ValueError(f"a union's members are distinct single methods, got {names}")
    if any(r.model_name != first.model_name or r.n != first.n for r in results):
        raise ValueError("the results of a union must come from one model on the same samples")
    method = UNION_SEPARATOR.join(names)
    members = dict(zip(names, results))
    radius = None
    if all(r.radius is not None for r in results):
        radius = torch.stack([r.radius for r in results]).amax(dim=0)
    correct = _any([r.correct for r in results])
    certified = _any([r.certified for r in results])
    wall = float(sum(r.wall_time for r in results))
    if isinstance(first, CertResult):
        if any(float(r.eps) != float(first.eps) for r in results):
            raise ValueError(f"the results of a union must be at one eps, got {[r.eps for r in results]}")
        return CertResult(method=method, eps=first.eps, model_name=first.model_name, correct=correct,
                          certified=certified, radius=radius, wall_time=wall, extra={_MEMBERS: members},
                          float_rigorous=all(r.float_rigorous for r in results))
    if any(not torch.equal(r.eps, first.eps) for r in results):
        raise ValueError("the curves of a union must share one eps grid")
    if certified is None:
        raise ValueError("a union of curves needs each member's per-sample verdicts (CurveResult.certified)")
    return CurveResult(method=method, model_name=first.model_name, eps=first.eps,
                       certified_accuracy=certified.to(torch.float64).mean(dim=0),
                       clean_accuracy=Result._mean(correct), wall_time=wall, radius=radius,
                       extra={"float_rigorous": all(r.float_rigorous for r in results), _MEMBERS: members},
                       correct=correct, certified=certified)


def _any(flags):
    """Element-wise OR of bool tensors (``None`` when any is missing)."""
    if any(f is None for f in flags):
        return None
    out = flags[0].clone()
    for f in flags[1:]:
        out |= f
    return out
