"""``CertResult``: the per-sample outcome of one certification run, as data."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

__all__ = ["CertResult"]


@dataclass
class CertResult:
    """Per-sample certification results for one model, method and eps.

    Attributes:
        method: one of ``linf_plugin.certification.METHODS``.
        eps: l_inf radius in pixel units.
        model_name: the registry name of the model (or its class name).
        correct: ``(n,)`` bool, the clean prediction equals the label.
        certified: ``(n,)`` bool, correct AND proven constant on the box.
        radius: ``(n,)`` float certified radius where the method yields one
            (margin; bound propagation with bisection), else ``None``.  A
            sample is certified at every eps strictly below its radius; 0
            for misclassified samples.
        wall_time: seconds spent certifying (model forward passes included).
        extra: method details (e.g. the rounding-error bound used; for a
            result that is not float-rigorous, ``float_rigorous_reason``).
        float_rigorous: every certificate holds for the real-arithmetic
            network whatever the rounding of the computation (margin,
            interval, and bound propagation re-checked in float64 with a
            derived slack; see the README, "What a certificate promises").
            ``False``: the float computation was trusted up to a heuristic
            slack.  Results saved before this field existed load as
            ``False`` (nothing vouched for their rounding).
    """

    method: str
    eps: float
    model_name: str
    correct: np.ndarray
    certified: np.ndarray
    radius: Optional[np.ndarray] = None
    wall_time: float = 0.0
    extra: dict = field(default_factory=dict)
    float_rigorous: bool = False

    def __post_init__(self):
        self.float_rigorous = bool(self.float_rigorous)
        self.correct = np.asarray(self.correct, dtype=bool)
        self.certified = np.asarray(self.certified, dtype=bool)
        if self.correct.shape != self.certified.shape or self.correct.ndim != 1:
            raise ValueError("correct and certified must be 1-D arrays of equal length")
        if (self.certified & ~self.correct).any():
            raise ValueError("a misclassified sample cannot be certified")
        if self.radius is not None:
            self.radius = np.asarray(self.radius, dtype=np.float64)
            if self.radius.shape != self.correct.shape:
                raise ValueError("radius must have one entry per sample")

    @property
    def n(self) -> int:
        return int(self.correct.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float(self.correct.mean()) if self.n else math.nan

    @property
    def certified_accuracy(self) -> float:
        return float(self.certified.mean()) if self.n else math.nan

    def to_dict(self, per_sample: bool = True) -> dict:
        """JSON-able dict (per-sample arrays as lists unless ``per_sample=False``)."""
        out = {"method": self.method, "eps": float(self.eps), "model_name": self.model_name, "n": self.n,
               "clean_accuracy": self.clean_accuracy, "certified_accuracy": self.certified_accuracy,
               "wall_time": float(self.wall_time), "extra": self.extra, "float_rigorous": self.float_rigorous}
        if per_sample:
            out["correct"] = self.correct.tolist()
            out["certified"] = self.certified.tolist()
            out["radius"] = None if self.radius is None else [float(r) for r in self.radius]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "CertResult":
        return cls(method=d["method"], eps=d["eps"], model_name=d["model_name"], correct=d["correct"],
                   certified=d["certified"], radius=d.get("radius"), wall_time=d.get("wall_time", 0.0),
                   extra=d.get("extra", {}), float_rigorous=d.get("float_rigorous", False))

    def summary(self) -> str:
        return (f"{self.model_name} {self.method} eps={self.eps:g}: clean {100 * self.clean_accuracy:.2f}%, "
                f"certified {100 * self.certified_accuracy:.2f}% ({self.n} samples, {self.wall_time:.3g} s"
                f"{'' if self.float_rigorous else ', not float-rigorous'})")
