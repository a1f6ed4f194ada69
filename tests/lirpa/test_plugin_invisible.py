"""Importing the plugin must not change auto_LiRPA for a user's other models.

Bounds of user-style models (tests/lirpa/user_models.py: an MLP, a CNN with
batch norm, a CNN normalising with registered buffers) with IBP, CROWN-IBP,
CROWN and forward mode are bit-identical with and without ``import
linf_plugin`` wherever both run; where only the plugin's run succeeds (an
operator fix turned a crash into a bound), that bound is checked by sampling.
"Without" imports auto_LiRPA with the compat layer's import shims only (0.3
cannot be imported on numpy 2 without them; see user_models.py), in a separate
process, since the plugin's fixes last for the process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from linf_plugin.lirpa import compat
from .user_models import EPS, METHODS, MODELS, assert_sound, build_model, example_input

SCRIPT = Path(__file__).with_name("user_models.py")
ROOT = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ)
    # This checkout first, so the subprocess bounds with this code (and the same auto_LiRPA).
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _run(code_or_args, tmp_path=None):
    args = [sys.executable, *code_or_args]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_user_model_bounds_identical_with_and_without_plugin(tmp_path):
    results = {}
    for mode in ("plain", "plugin"):
        _run([str(SCRIPT), mode, str(tmp_path / f"{mode}.pt")])
        results[mode] = torch.load(tmp_path / f"{mode}.pt")
    plain, plugin = results["plain"], results["plugin"]
    assert set(plain) == set(plugin) == {f"{m}/{k}" for m in MODELS for k in METHODS}
    both = [k for k in plain if not isinstance(plain[k], str) and not isinstance(plugin[k], str)]
    # Never vacuous: IBP runs everywhere on both versions, and so does everything on the MLP.
    assert {f"{m}/IBP" for m in MODELS} | {f"mlp/{k}" for k in METHODS} <= set(both)
    for key in both:
        assert torch.equal(plain[key][0], plugin[key][0]) and torch.equal(plain[key][1], plugin[key][1]), key
    # The plugin never breaks what ran without it ...
    broken = [k for k in plugin if isinstance(plugin[k], str) and not isinstance(plain[k], str)]
    assert not broken, broken
    # ... and what it makes run is sound.
    torch.set_num_threads(1)
    for key in plain:
        if isinstance(plain[key], str) and not isinstance(plugin[key], str):
            name, method = key.split("/")
            lb, ub = assert_sound(build_model(name), example_input(name), EPS, method)
            assert torch.equal(lb, plugin[key][0]) and torch.equal(ub, plugin[key][1]), key


_FILTERS = "import warnings, sys; print(repr(warnings.filters)); print('numpy.lib.arraysetops' in sys.modules)"


def test_import_keeps_warning_filters_and_leaves_no_shim_module():
    """After ``import linf_plugin``, ``warnings.filters`` equal those after a plain
    ``import torch; import auto_LiRPA`` (with the import shims), torch not imported before."""
    load_compat = ("import importlib.util as u; s = u.spec_from_file_location('c', {path!r}); "
                   "c = u.module_from_spec(s); s.loader.exec_module(c)\n").format(
        path=str(ROOT / "linf_plugin" / "lirpa" / "compat.py"))
    plain = _run(["-c", load_compat + "with c.legacy_import_shims():\n    import torch, auto_LiRPA\n" + _FILTERS])
    ours = _run(["-c", "import linf_plugin.lirpa\n" + _FILTERS])
    assert ours == plain
    import numpy

    # The numpy 2 alias is gone after the import (numpy 1 has the real module).
    assert ours.split()[-1] == str(int(numpy.__version__.split(".")[0]) < 2)
    assert "'once'" in ours  # auto_LiRPA's simplefilter("once") survives (both versions make it)


def test_version_comes_from_the_module_imported_not_the_metadata(tmp_path):
    """A source checkout on sys.path wins over the installed dist-info: the version
    check reads the ``__init__.py`` that ``import auto_LiRPA`` will run."""
    from importlib import metadata

    pkg = tmp_path / "auto_LiRPA"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("# a checkout\n__version__ = '0.9.0'\n")
    code = ("import importlib.util as u; s = u.spec_from_file_location('c', {path!r}); "
            "c = u.module_from_spec(s); s.loader.exec_module(c); "
            "print(c.lirpa_version(), c.needs_legacy_fixes())").format(
        path=str(ROOT / "linf_plugin" / "lirpa" / "compat.py"))
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0.9.0", "False"]
    try:
        installed = metadata.version("auto_LiRPA")
    except metadata.PackageNotFoundError:
        installed = None
    assert installed != "0.9.0"  # the metadata would have said something else


def test_version_check_in_this_process_matches_the_module():
    import auto_LiRPA

    assert compat.lirpa_version() == auto_LiRPA.__version__
    assert compat.needs_legacy_fixes() is auto_LiRPA.__version__.startswith("0.3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.auto_lirpa_version() == auto_LiRPA.__version__


def test_upstream_checkout_is_not_patched():
    """With ``UPSTREAM_LIRPA=/path/to/auto_LiRPA-checkout`` (e.g. 0.7.1) set, import the
    plugin with that checkout first on the path, whatever dist-info is installed:
    nothing in the compat layer runs, only the probe-gated fix 10, and bounds work."""
    src = os.environ.get("UPSTREAM_LIRPA")
    if not src:
        import pytest

        pytest.skip("set UPSTREAM_LIRPA to an upstream auto_LiRPA source checkout")
    code = ("import linf_plugin, auto_LiRPA, torch\n"
            "from linf_plugin.lirpa import compat, applied_operator_fixes, bounded_module\n"
            "from linf_plugin.models import create_model\n"
            "print(auto_LiRPA.__file__); print(compat.applied_fixes()); print(applied_operator_fixes())\n"
            "m = create_model('linf_dist_mlp', (1, 4, 4), 3, depth=2, width=8).eval()\n"
            "b = bounded_module(m, torch.zeros(1, 1, 4, 4))\n"
            "x = auto_LiRPA.BoundedTensor(torch.rand(2, 1, 4, 4), auto_LiRPA.PerturbationLpNorm(eps=0.1))\n"
            "print(tuple(b.compute_bounds(x=(x,), method='CROWN')[0].shape))\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert Path(lines[0]).resolve().is_relative_to(Path(src).resolve())
    assert lines[1] == "[]"
    assert "BoundBuffers" not in lines[2] and "broadcast_backward" not in lines[2]
    assert lines[3] == "(2, 3)"
