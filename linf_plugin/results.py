"""What every result shares: per-sample fields are CPU tensors, so results of different calls combine.

:class:`~linf_plugin.certification.CertResult` (``certify``),
:class:`~linf_plugin.certification.CurveResult` (``certified_accuracy_curve``)
and :class:`~linf_plugin.attacks.AttackResult` (``pgd_attack``) derive from
:class:`Result`: their per-sample flags are ``torch.bool`` tensors and their
radii ``torch.float64`` tensors, all on the CPU, whatever device computed
them.  So ``cert.certified & ~adv.success`` is a bool tensor, and results
computed on a GPU combine with results computed on the CPU.

A leaf module like :mod:`linf_plugin.io`: certification and attacks build on it.
"""
from __future__ import annotations

import math
from typing import ClassVar, Dict, Optional

import numpy as np
import torch

__all__ = ["Result", "as_cpu_tensor", "tensor_to_list"]


def as_cpu_tensor(value, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``value`` (a tensor on any device, a numpy array or a list) as a CPU tensor of ``dtype``.

    A bool field refuses tensors and arrays of another dtype (a 0/1 float
    tensor read as flags would hide a mix-up); JSON lists are converted.

    Raises:
        TypeError: a non-bool tensor or array for a bool field, or something that is no array at all.
    """
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if torch.is_tensor(value):
        if dtype == torch.bool and value.dtype != torch.bool:
            raise TypeError(f"{name} must hold bool flags, got a {value.dtype} tensor")
        return value.detach().to(device="cpu", dtype=dtype)
    if isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=dtype)
    raise TypeError(f"{name} must be a tensor, a numpy array or a list, got {type(value).__name__}")


def tensor_to_list(value: Optional[torch.Tensor]) -> Optional[list]:
    """A CPU tensor as JSON-able nested lists (floats, bools), None as None."""
    return None if value is None else value.tolist()


class Result:
    """Base class of the results: converts the per-sample fields named in ``_TENSOR_FIELDS``.

    Subclasses are dataclasses that call :meth:`_to_tensors` in their
    ``__post_init__``; each entry of ``_TENSOR_FIELDS`` maps a field to its
    dtype (``None`` values stay ``None``).
    """

    _TENSOR_FIELDS: ClassVar[Dict[str, torch.dtype]] = {}

    def _to_tensors(self) -> None:
        for name, dtype in self._TENSOR_FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, as_cpu_tensor(value, dtype, name))

    @staticmethod
    def _mean(flags: Optional[torch.Tensor]) -> float:
        """The fraction of True entries of a 1-D bool tensor; NaN when it is empty or missing."""
        if flags is None or flags.numel() == 0:
            return math.nan
        return float(flags.to(torch.float64).mean())
