"""linf_plugin: l_inf-distance nets as an auto_LiRPA plugin.

Importing the package first makes auto_LiRPA importable on torch 2.x and
numpy 2 (see :mod:`linf_plugin.lirpa.compat`), so ``import auto_LiRPA`` after
``import linf_plugin`` just works, whichever auto_LiRPA version is installed.

The public entry points, one per concept, are re-exported lazily here so that
``import linf_plugin`` stays cheap and never imports CuPy::

    from linf_plugin import lp_dist, create_model, list_models, load_dataset
    from linf_plugin import certify, pgd_attack, train
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

from .lirpa import compat as _compat

_compat.apply()


def _read_version() -> str:
    """The installed distribution's version; in a source tree never installed, ``pyproject.toml``'s.

    ``pyproject.toml`` is the one place the version is written.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("linf_plugin")
    except PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    found = project and re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.MULTILINE)
    return found.group(1) if found else "0+unknown"


__version__ = _read_version()

# name -> module that defines it; resolved on first attribute access.
_LAZY = {
    "lp_dist": "linf_plugin.ops",
    "lp_dist_interval": "linf_plugin.ops",
    "LpDistLinear": "linf_plugin.nn",
    "MeanShiftNorm": "linf_plugin.nn",
    "set_p": "linf_plugin.nn",
    "create_model": "linf_plugin.models",
    "list_models": "linf_plugin.models",
    "register_model": "linf_plugin.models",
    "save_checkpoint": "linf_plugin.models",
    "load_checkpoint": "linf_plugin.models",
    "load_dataset": "linf_plugin.data",
    "list_datasets": "linf_plugin.data",
    "certify": "linf_plugin.certification",
    "certified_accuracy_curve": "linf_plugin.certification",
    "curve_from_result": "linf_plugin.certification",
    "CertResult": "linf_plugin.certification",
    "CurveResult": "linf_plugin.certification",
    "Method": "linf_plugin.names",
    "Family": "linf_plugin.names",
    "pgd_attack": "linf_plugin.attacks",
    "AttackResult": "linf_plugin.attacks",
    "train": "linf_plugin.training",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'linf_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
