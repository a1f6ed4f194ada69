"""One registry for every architecture: ``register_model``, ``create_model``, ``list_models``.

In the style of timm: an entrypoint is a small function that fixes the
hyper-parameters of one named model and hands off to its family's builder.
Unlike timm, registering a name twice raises instead of overwriting.

A named variant carries its own defaults, as timm's pretrained configs do:
``create_model("linf_dist_mlp_6x5120")`` builds the CIFAR-10 net for
``(3, 32, 32)`` inputs and 10 classes, ``linf_dist_mlp_5x5120`` the MNIST one
for ``(1, 28, 28)``.  :func:`model_defaults` shows them; names registered
without defaults use the digits shape ``(1, 8, 8)`` and 10 classes.  Explicit
arguments always win.

Every model built by :func:`create_model` carries ``model_name``,
``family``, ``model_config`` (a JSON-able dict; ``create_model(**config)``
rebuilds the same architecture), ``input_shape`` and ``num_classes``.

As in timm, :func:`model_entrypoint` returns the entrypoint itself;
:func:`model_info` returns the registry's record of a name (family, defaults).
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import json
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import nn

from ..names import FAMILIES, Family

__all__ = ["register_model", "create_model", "list_models", "model_family", "model_entrypoint", "model_info",
           "is_model", "model_defaults", "FAMILIES", "GENERIC_DEFAULTS", "ModelEntry", "UnknownModelError"]

#: Defaults of names registered without their own: the digits data set.
GENERIC_DEFAULTS = {"input_shape": (1, 8, 8), "num_classes": 10}


class UnknownModelError(ValueError):
    """A model name that is not registered."""


@dataclass(frozen=True)
class ModelEntry:
    """The registry's record of one name (:func:`model_info`).

    Attributes:
        name: the registry name.
        family: its :class:`~linf_plugin.names.Family`.
        fn: the entrypoint ``fn(input_shape, num_classes, **kwargs) -> nn.Module``.
        doc: the first line of the entrypoint's docstring.
        defaults: ``((key, value), ...)``: the variant's own ``input_shape`` / ``num_classes``.
    """

    name: str
    family: Family
    fn: Callable[..., nn.Module]
    doc: str = ""
    defaults: tuple = ()


_REGISTRY: dict = {}


def register_model(fn: Optional[Callable] = None, *, family: str, name: Optional[str] = None,
                   input_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None):
    """Register an entrypoint ``fn(input_shape, num_classes, **kwargs) -> nn.Module`` under a name.

    Use as a decorator, ``@register_model(family="relu")``, or call it as
    ``register_model(fn, family=..., name=...)``.

    Args:
        fn: the entrypoint.
        family: ``"linf_dist"``, ``"hybrid"`` or ``"relu"``.
        name: registry name (default ``fn.__name__``).
        input_shape, num_classes: the variant's own defaults for
            :func:`create_model` (e.g. ``(3, 32, 32)``, 10 for a CIFAR-10 net);
            None = :data:`GENERIC_DEFAULTS`.

    Returns:
        ``fn`` unchanged (or a decorator when ``fn`` is None).

    Raises:
        ValueError: unknown family, bad defaults, or the name is already registered.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {[f.value for f in FAMILIES]}")
    family = Family(family)
    defaults = {}
    if input_shape is not None:
        defaults["input_shape"] = _check_input_shape(input_shape)
    if num_classes is not None:
        defaults["num_classes"] = _check_num_classes(num_classes)

    def deco(f: Callable) -> Callable:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered (by {_REGISTRY[key].fn.__module__}."
                             f"{_REGISTRY[key].fn.__qualname__}); pick another name")
        _REGISTRY[key] = ModelEntry(key, family, f, (f.__doc__ or "").strip().split("\n")[0],
                                    tuple(defaults.items()))
        return f

    return deco if fn is None else deco(fn)


def model_defaults(name: str) -> dict:
    """What :func:`create_model` uses for ``name`` when the caller does not say.

    Returns:
        ``{"input_shape": (C, H, W) or (d,), "num_classes": K}``: the
        variant's own defaults over :data:`GENERIC_DEFAULTS`.

    Raises:
        UnknownModelError: ``name`` is not registered.
    """
    out = dict(GENERIC_DEFAULTS)
    out.update(model_info(name).defaults)
    return out


def list_models(filter: str | Sequence[str] = "", family: Optional[str] = None) -> list:
    """Registered model names, sorted.

    Args:
        filter: an fnmatch pattern (``"linf_dist_*"``) or several; ``""`` = all.
        family: keep only this family.

    Returns:
        A sorted list of names.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {[f.value for f in FAMILIES]}")
    names = [n for n, e in _REGISTRY.items() if family is None or e.family == family]
    patterns = [filter] if isinstance(filter, str) else list(filter)
    patterns = [p for p in patterns if p]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return sorted(names)


def is_model(name: str) -> bool:
    return name in _REGISTRY


def model_info(name: str) -> ModelEntry:
    """The registry's record of ``name``: family, entrypoint, defaults.

    Raises:
        UnknownModelError: ``name`` is not registered (close matches and all choices listed).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Registered models: {list_models()}") from None


class _Entrypoint:
    """The entrypoint of a name, callable as itself; reading a :class:`ModelEntry` field from it still works
    for one release, with a ``DeprecationWarning`` (``model_entrypoint`` returned the entry before)."""

    def __init__(self, entry: ModelEntry):
        self._entry = entry
        functools.update_wrapper(self, entry.fn)

    def __call__(self, *args, **kwargs):
        return self._entry.fn(*args, **kwargs)

    def __getattr__(self, attr: str):
        if attr in ("name", "family", "fn", "doc", "defaults"):
            warnings.warn(f"model_entrypoint(name).{attr} is deprecated and will be removed in the next release: "
                          f"model_entrypoint returns the entrypoint itself, as timm's does; use "
                          f"model_info(name).{attr}", DeprecationWarning, stacklevel=2)
            return getattr(self._entry, attr)
        raise AttributeError(f"{type(self._entry.fn).__name__} {self._entry.name!r} has no attribute {attr!r}")


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The entrypoint of ``name``, ``fn(input_shape, num_classes, **kwargs) -> nn.Module``, as timm's.

    Calling it builds the bare model; :func:`create_model` also fills in the
    defaults and sets ``model_name``, ``family`` and ``model_config``.
    :func:`model_info` gives the registry's record (family, defaults).

    Raises:
        UnknownModelError: ``name`` is not registered (close matches and all choices listed).
    """
    return _Entrypoint(model_info(name))


def model_family(name: str) -> Family:
    """The family (``linf_dist``, ``hybrid``, ``relu``) of a registered name."""
    return model_info(name).family


def _check_input_shape(input_shape) -> tuple:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of ints such as (1, 28, 28) or (d,), "
                         f"got {input_shape!r}") from None
    if not shape or any(s < 1 for s in shape) or len(shape) not in (1, 3):
        raise ValueError(f"input_shape must be (C, H, W) or (d,) with positive sizes, got {input_shape!r}")
    return shape


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _jsonable(value, where: str):
    """Turn tuples into lists and check that ``value`` survives a JSON round trip."""
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json writes Infinity; Python's json reads it back
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where} must be JSON-able (numbers, strings, lists, dicts) so checkpoints can rebuild "
                    f"the model, got {type(value).__name__}: {value!r}")


def _accepts(fn: Callable, name: str) -> bool:
    """``fn`` takes a keyword argument ``name`` (explicitly, not only through ``**kwargs``)."""
    try:
        param = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)


def create_model(name: str, input_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                 **kwargs) -> nn.Module:
    """Build a registered model by name, as timm's ``create_model``.

    Args:
        name: a name from :func:`list_models`.
        input_shape: shape of ONE input, ``(C, H, W)`` or ``(d,)``
            (digits ``(1, 8, 8)``, MNIST ``(1, 28, 28)``, CIFAR-10 ``(3, 32, 32)``);
            None = the name's default (:func:`model_defaults`).
        num_classes: number of logits; None = the name's default.
        **kwargs: the model's keyword arguments (``mean``, ``std``, ``p``,
            ``depth``, ``width``, ...).

    Returns:
        The model (train mode), with ``model_name``, ``family``,
        ``model_config``, ``input_shape`` and ``num_classes`` set;
        ``create_model(**model.model_config)`` rebuilds the architecture.

    Raises:
        UnknownModelError: ``name`` is not registered (close matches listed).
        ValueError / TypeError: bad shape, class count, or kwargs.

    The previous release's ``create_model(name, kwargs={...})`` (a dict of
    keyword arguments) still works for one release, with a ``DeprecationWarning``.
    """
    entry = model_info(name)
    if isinstance(kwargs.get("kwargs"), dict) and not _accepts(entry.fn, "kwargs"):
        warnings.warn("create_model(name, kwargs={...}) is deprecated and will be removed in the next release; "
                      "pass the keyword arguments themselves: create_model(name, **kwargs)", DeprecationWarning,
                      stacklevel=2)
        nested = kwargs.pop("kwargs")
        kwargs = {**nested, **kwargs}
    defaults = model_defaults(name)
    shape = _check_input_shape(defaults["input_shape"] if input_shape is None else input_shape)
    num_classes = _check_num_classes(defaults["num_classes"] if num_classes is None else num_classes)
    model_kwargs = _jsonable(kwargs, f"the keyword arguments of {name!r}")
    config = {"name": name, "input_shape": list(shape), "num_classes": num_classes, **model_kwargs}
    json.dumps(config)  # guaranteed by _jsonable; fails loudly if not
    try:
        model = entry.fn(input_shape=shape, num_classes=num_classes, **kwargs)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"model {name!r} does not accept one of the keyword arguments "
                            f"{sorted(kwargs)}: {e}") from None
        raise
    model.model_name = name
    model.family = entry.family
    model.model_config = config
    model.input_shape = shape
    model.num_classes = num_classes
    return model
