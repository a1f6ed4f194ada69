"""Make auto_LiRPA 0.3 (the only release on PyPI) work on torch 2.x and numpy 2.

auto_LiRPA 0.3 (2022) was written against torch 1.12 and numpy 1.x.  Four
things it relies on are gone in torch 2.14 / numpy 2; each was fixed upstream
later, so upstream 0.7.x needs none of this.  Every fix below is

* **feature-detected** -- applied only when the auto_LiRPA that ``import
  auto_LiRPA`` gives is a pre-0.4 release (:func:`lirpa_version`: the
  imported module's ``__version__``, or before the import the one in the
  ``__init__.py`` it will run -- never the installed metadata, which a source
  checkout on ``sys.path`` overrides) AND the thing the fix provides is
  missing, so on upstream 0.7.x (or on old torch/numpy) nothing is touched;
  :func:`needs_legacy_fixes` is the package's one version check;
* **idempotent** -- applying twice changes nothing;
* **recorded** -- :func:`applied_fixes` says which ones ran, and the
  environment report prints them.

The fixes:

1. ``numpy.lib.arraysetops`` was removed in numpy 2.0.  0.3's
   ``operators/base.py`` does ``from numpy.lib.arraysetops import isin``.
   While auto_LiRPA is imported (:func:`legacy_import_shims`) a tiny alias
   module exposing ``numpy.isin`` sits in ``sys.modules``; it is removed
   right after, so no other library sees it.  *Needed by 0.3 with numpy >= 2.0.*
2. ``torch.onnx.symbolic_helper._set_opset_version`` was removed (torch 2.x
   moved the TorchScript ONNX exporter under ``torch.onnx._internal``).  0.3's
   ``parse_graph.py`` imports it and calls it with 12 before graph
   optimisation.  During the import we provide a function that sets the
   opset on the ``GLOBALS`` object of the module that defines
   ``torch.onnx.utils._optimize_graph`` (the one ``_optimize_graph`` itself
   reads); ``parse_graph`` keeps its reference, torch's module does not.
   *Needed by 0.3 with torch >= 2.x where the helper is missing.*
3. ``torch._C.Node`` is no longer subscriptable.  0.3 reads node attributes
   with ``n[k]``; the value is ``getattr(n, n.kindOf(k))(k)`` (``kindOf``
   returns the accessor name: ``f``, ``i``, ``s``, ``t``, ``fs``, ...).  We add
   ``__getitem__`` to the class -- the one change visible outside auto_LiRPA
   (``node[k]`` works instead of raising ``TypeError``); docs/installation.md
   lists it.  *Needed by 0.3 with torch >= 2.1 or so.*
4. ``torch.nn.Module.parameters()`` now calls
   ``self._named_members(..., remove_duplicate=...)``; 0.3 overrides
   ``_named_members`` on ``BoundedModule`` (and ``BoundDataParallel``) without
   that keyword, so ``parameters()`` -- and therefore every optimizer built on
   a ``BoundedModule`` -- raises ``TypeError``.  We wrap the override so it
   accepts the keyword and honours ``remove_duplicate=False``.  This one can
   only be applied to the class after auto_LiRPA is imported, so
   :func:`apply` imports auto_LiRPA itself and patches it before anyone else
   can use it.  *Needed by 0.3 with torch >= 2.0.*

0.3 also imports ``tqdm`` and ``appdirs`` without declaring them; the project
declares both (see ``pyproject.toml``).

``import linf_plugin`` calls :func:`apply`, so a user's own
``import auto_LiRPA`` afterwards just works.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types

__all__ = ["apply", "applied_fixes", "auto_lirpa_version", "legacy_import_shims", "lirpa_version", "needs_legacy_fixes"]

_APPLIED: list[str] = []
_DONE = False


def _arraysetops_alias():
    """A stand-in for ``numpy.lib.arraysetops`` (None where numpy still has it)."""
    try:
        importlib.import_module("numpy.lib.arraysetops")
        return None
    except ImportError:
        pass
    import numpy as np

    alias = types.ModuleType("numpy.lib.arraysetops")
    alias.__doc__ = "Alias created by linf_plugin.lirpa.compat while auto_LiRPA 0.3 is imported."
    alias.isin = np.isin
    alias.unique = np.unique
    alias.intersect1d = np.intersect1d
    alias.union1d = np.union1d
    alias.setdiff1d = np.setdiff1d
    alias.in1d = getattr(np, "in1d", np.isin)
    return alias


def _opset_setter():
    """A ``_set_opset_version`` for torch versions that lack it (None where present)."""
    import torch.onnx.symbolic_helper as symbolic_helper

    if hasattr(symbolic_helper, "_set_opset_version"):
        return None
    import torch.onnx.utils as onnx_utils

    exporter = sys.modules[onnx_utils._optimize_graph.__module__]
    globals_obj = exporter.GLOBALS

    def _set_opset_version(opset_version: int) -> None:
        globals_obj.export_onnx_opset_version = opset_version

    return _set_opset_version


@contextlib.contextmanager
def legacy_import_shims():
    """While active, ``import auto_LiRPA`` works for 0.3 on numpy 2 / torch 2.x.

    0.3 binds both names at import time (``from numpy.lib.arraysetops import
    isin`` in ``operators/base.py``, ``from torch.onnx.symbolic_helper import
    _set_opset_version`` in ``parse_graph.py``), so the stand-ins are needed
    only during the import: on exit both are removed again, and neither
    ``sys.modules`` nor torch shows them to other libraries (a
    ``numpy.lib.arraysetops`` entry would read as "numpy < 2" to a library
    probing for it).  Where numpy / torch still have the real thing, nothing
    is installed.
    """
    import torch.onnx.symbolic_helper as symbolic_helper

    alias, setter = _arraysetops_alias(), _opset_setter()
    if alias is not None:
        sys.modules["numpy.lib.arraysetops"] = alias
    if setter is not None:
        symbolic_helper._set_opset_version = setter
    try:
        yield
    finally:
        if alias is not None and sys.modules.get("numpy.lib.arraysetops") is alias:
            del sys.modules["numpy.lib.arraysetops"]
        if setter is not None and symbolic_helper.__dict__.get("_set_opset_version") is setter:
            del symbolic_helper._set_opset_version
    for done, name in ((alias, "numpy.lib.arraysetops alias while importing (numpy>=2)"),
                       (setter, "torch.onnx.symbolic_helper._set_opset_version while importing")):
        if done is not None and name not in _APPLIED:
            _APPLIED.append(name)


def _fix_node_getitem() -> None:
    import torch

    node_cls = torch._C.Node
    if hasattr(node_cls, "__getitem__"):
        return

    def __getitem__(node, key):
        return getattr(node, node.kindOf(key))(key)

    node_cls.__getitem__ = __getitem__
    _APPLIED.append("torch._C.Node.__getitem__ added")


def _accepts_remove_duplicate(fn) -> bool:
    try:
        return "remove_duplicate" in inspect.signature(fn, follow_wrapped=False).parameters
    except (TypeError, ValueError):
        return True


def _patch_named_members(cls) -> bool:
    original = cls.__dict__.get("_named_members")
    if original is None or _accepts_remove_duplicate(original):
        return False

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        if remove_duplicate:
            yield from original(self, get_members_fn, prefix, recurse)
            return
        # Same traversal as 0.3's override, without the de-duplication memo.
        node_name_map = getattr(self, "node_name_map", {})
        modules = self.named_modules(prefix=prefix, remove_duplicate=False) if recurse else [(prefix, self)]
        for module_prefix, module in modules:
            for k, v in get_members_fn(module):
                if v is None:
                    continue
                name = module_prefix + ("." if module_prefix else "") + k
                yield node_name_map.get(name, name), v

    _named_members.__wrapped__ = original
    _named_members.__doc__ = original.__doc__
    cls._named_members = _named_members
    return True


def _fix_named_members() -> None:
    from auto_LiRPA.bound_general import BoundedModule

    if _patch_named_members(BoundedModule):
        _APPLIED.append("BoundedModule._named_members accepts remove_duplicate")
    try:
        from auto_LiRPA.bound_multi_gpu import BoundDataParallel
    except ImportError:  # pragma: no cover - module absent in some versions
        return
    if _patch_named_members(BoundDataParallel):
        _APPLIED.append("BoundDataParallel._named_members accepts remove_duplicate")


def _quiet_import(name: str):
    """Import ``name`` without the deprecation noise auto_LiRPA's import makes
    on torch 2.x (``torch.jit.script`` FutureWarning, cpp_extension's
    CUDA_HOME notice); neither says anything about the user's code.

    The warning filters the import installs (auto_LiRPA's
    ``simplefilter("once")``; torch's own when torch is imported here first)
    are kept: afterwards ``warnings.filters`` is what a plain import leaves.
    """
    import logging
    import warnings

    import torch  # noqa: F401  (its import-time filters, outside the capture below)

    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        # record=True, because auto_LiRPA changes the filters while importing.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = warnings.filters[0]
            module = importlib.import_module(name)
            installed = [f for f in warnings.filters if f is not ours]
        # catch_warnings restored the filters from before; put back what the import added.
        warnings.filters[:] = installed
        warnings._filters_mutated()
        for w in caught:
            if "torch.jit" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return module
    finally:
        cpp_logger.setLevel(level)


def lirpa_version() -> str | None:
    """The version of the auto_LiRPA that ``import auto_LiRPA`` gives in this process.

    The module's own ``__version__`` once imported; before that, read from the
    ``__init__.py`` that the import will execute (0.3 cannot be imported before
    :func:`legacy_import_shims`).  Never from the installed package metadata: a
    source checkout on ``sys.path`` (e.g. upstream 0.7.x) wins over an installed
    0.3 dist-info.  None when auto_LiRPA cannot be found; ``"unknown"`` when the
    file names no version.
    """
    import importlib.util
    import re

    module = sys.modules.get("auto_LiRPA")
    if module is not None:
        return str(getattr(module, "__version__", "unknown"))
    spec = importlib.util.find_spec("auto_LiRPA")
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with open(spec.origin, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return "unknown"
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else "unknown"


def needs_legacy_fixes(version: str | None = None) -> bool:
    """True for auto_LiRPA releases before 0.4 (PyPI's 0.3): THE version check.

    Every "is this auto_LiRPA 0.3?" decision in the package goes through here
    (with ``version`` from :func:`lirpa_version` by default).  Upstream 0.7.x
    imports and runs on torch 2.x / numpy 2 as it is, so nothing is patched
    there even where torch or numpy lack what 0.3 used.
    """
    from packaging.version import InvalidVersion, Version

    version = lirpa_version() if version is None else version
    if version in (None, "unknown"):
        return False
    try:
        return Version(version) < Version("0.4")
    except InvalidVersion:
        return False


def apply() -> list[str]:
    """Apply every needed fix and import auto_LiRPA.  Safe to call repeatedly.

    Returns:
        The list of fixes applied in this process (empty on upstream 0.7.x).

    Raises:
        ImportError: auto_LiRPA is not installed (the message says how to
            install it without letting pip downgrade torch).
    """
    global _DONE
    if _DONE:
        return list(_APPLIED)
    legacy = needs_legacy_fixes()
    try:
        with legacy_import_shims() if legacy else contextlib.nullcontext():
            module = _quiet_import("auto_LiRPA")
    except ImportError as exc:
        if getattr(exc, "name", None) == "auto_LiRPA":
            raise ImportError(
                "auto_LiRPA is not installed. Install it without its pinned "
                "dependencies (they would downgrade torch): "
                "`pip install --no-deps auto_LiRPA==0.3`, or upstream 0.7.x from "
                "source (https://github.com/Verified-Intelligence/auto_LiRPA)."
            ) from exc
        raise
    if needs_legacy_fixes(getattr(module, "__version__", "unknown")) != legacy:  # pragma: no cover
        raise RuntimeError(f"auto_LiRPA imported from {module.__file__} has version "
                           f"{getattr(module, '__version__', 'unknown')}, not what its source file said")
    if legacy:
        _fix_node_getitem()
        _fix_named_members()
    _DONE = True
    return list(_APPLIED)


def applied_fixes() -> list[str]:
    """The fixes :func:`apply` applied in this process, in order."""
    return list(_APPLIED)


def auto_lirpa_version() -> str:
    """The imported auto_LiRPA's version string (after :func:`apply`)."""
    apply()
    return lirpa_version() or "unknown"
