"""Tiny end-to-end runs of every subcommand, shared by the tests of this folder (seconds each).

Each fixture runs the real command line (``comparisons.cli.main``) once per
session on a tiny configuration: 2 training epochs on a digits subset, tiny
models, few test points, few PGD steps.
"""
from __future__ import annotations

import pytest

from comparisons.cli import main
from .comparisons_helpers import load, tiny_run_args


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``python -m comparisons run`` on three tiny models; returns ``(run_dir, cache_dir, results)``."""
    root = tmp_path_factory.mktemp("run")
    out, cache = root / "run1", root / "cache"
    assert main(tiny_run_args(out, cache)) == 0
    return out, cache, load(out)


@pytest.fixture(scope="session")
def tiny_mirman(tmp_path_factory):
    """``python -m comparisons mirman`` in 1-D and 2-D, touching and strictly separated, small ReLU suite."""
    out = tmp_path_factory.mktemp("mirman") / "m"
    args = ["mirman", "--dims", "1,2", "--separations", "1,1.25", "--sizes", "8,16", "--depths", "1",
            "--seeds", "0", "--train-steps", "80", "--alpha-iterations", "3", "--alpha-bisect-steps", "10",
            "--bisect-steps", "30",
            "--linf-depth", "2", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    return out, load(out)
