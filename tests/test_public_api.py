"""One name, one thing: every public entry point of ``linf_plugin`` is one object, whatever was imported first."""
import pkgutil
import subprocess
import sys

import linf_plugin


def test_no_public_name_is_also_a_subpackage():
    subpackages = {m.name for m in pkgutil.iter_modules(linf_plugin.__path__)}
    clash = sorted(subpackages & set(linf_plugin.__all__))
    assert not clash, f"these names are both a subpackage and a public function: {clash}"


def test_certify_and_train_are_functions_whatever_was_imported_first():
    # Importing a submodule binds it as an attribute of the parent package; a function of the same
    # name re-exported lazily would then lose to the module (the trap of issue #15, item 8).
    code = ("import importlib, sys\n"
            "import linf_plugin.certification.api, linf_plugin.training.trainer\n"
            "from linf_plugin import certify, train\n"
            "assert callable(certify) and not isinstance(certify, type(sys)), certify\n"
            "assert callable(train) and not isinstance(train, type(sys)), train\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_the_version_is_written_once_in_pyproject(monkeypatch):
    import importlib.metadata
    import re
    from pathlib import Path

    root = Path(linf_plugin.__file__).resolve().parents[1]
    written = re.search(r'^version\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert linf_plugin.__version__ == written
    assert not [p for p in (root / "linf_plugin").rglob("*.py") if f'"{written}"' in p.read_text()]

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert linf_plugin._read_version() == written  # a source tree that was never installed
