"""``make gpu-check`` on a CPU: the plan matches the scripts' real command lines, the runner works.

The GPU steps themselves cannot run here; what can break without a GPU is
caught: a renamed flag of a benchmark or of ``comparisons run``, more than 8
files under OUT, the wheel install and the PYTHONPATH the children see,
the log, the summary and the exit code.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags(argv):
    return [a.split("=")[0] for a in argv if a.startswith("--")]


def test_dry_run_lists_every_step(tmp_path):
    (tmp_path / "w").mkdir()
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path / "o"), "--wheels",
                           str(tmp_path / "w"), "--dry-run"], cwd=ROOT, capture_output=True, text=True, check=True)
    names = [line.split("]")[0][1:] for line in proc.stdout.splitlines() if line.startswith("[")]
    assert names == ["env", "pytest-gpu", "lp_dist", "certify", "crown_memory", "comparisons"]
    assert "pip install --no-deps --target" in proc.stdout and "--device cuda" in proc.stdout
    assert not (tmp_path / "o").exists(), "a dry run writes nothing"


def test_plan_matches_the_real_command_lines(tmp_path):
    from comparisons.cli import build_parser

    gc = _script()
    steps = {name: cmd for name, cmd, _, _ in gc.plan(tmp_path, sys.executable, None, tmp_path / "s")}
    args = build_parser().parse_args(steps["comparisons"][3:])          # after "python -m comparisons"
    assert args.device == "cuda" and args.epochs == 1
    for name in ("lp_dist", "certify", "crown_memory"):
        script = steps[name][1]
        help_text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout
        for flag in _flags(steps[name][2:]):
            assert flag in help_text, f"{script} has no {flag}"
    assert "gpu" in (ROOT / "pyproject.toml").read_text()            # the marker pytest -m selects


def test_vs_seed_runs_only_with_a_seed_repo_and_the_script(tmp_path):
    gc = _script()
    names = [n for n, *_ in gc.plan(tmp_path, sys.executable, tmp_path, tmp_path / "s")]
    assert ("vs_seed" in names) == (ROOT / "benchmarks" / "vs_seed.py").exists()
    assert "vs_seed" not in [n for n, *_ in gc.plan(tmp_path, sys.executable, None, tmp_path / "s")]


def _wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel of a module ``carried_probe``."""
    path = directory / "carried_probe-0.1-py3-none-any.whl"
    info = "carried_probe-0.1.dist-info"
    files = {"carried_probe.py": "VALUE = 42\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: carried_probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_runner_installs_wheels_logs_and_summarises(tmp_path, monkeypatch):
    if shutil.which("pip") is None and subprocess.run([sys.executable, "-m", "pip", "--version"],
                                                      capture_output=True).returncode != 0:
        pytest.skip("pip is not available")
    gc = _script()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    out = tmp_path / "out"
    probe = "import carried_probe, linf_plugin, json; print('probe', carried_probe.VALUE)"

    def fake_plan(out_dir, python, seed_repo, scratch):
        result = scratch / "r.json"
        return [("child", [python, "-c", probe], [], None),
                ("copy", [python, "-c", f"open({str(result)!r}, 'w').write('{{}}')"], ["r.json"],
                 (result, out_dir / "r.json")),
                ("broken", [python, "-c", "raise SystemExit(3)"], [], None)]

    monkeypatch.setattr(gc, "plan", fake_plan)
    monkeypatch.setenv("PYTHONPATH", "")
    rc = gc.main(["--out", str(out), "--wheels", str(wheels)])
    assert rc == 1                                               # one step failed, every step ran
    log = (out / "gpu-check.log").read_text()
    assert "probe 42" in log and "===== broken: exit 3" in log
    summary = json.loads((out / "summary.json").read_text())
    assert [s["exit"] for s in summary["steps"]] == [0, 0, 3] and summary["ok"] is False
    assert summary["wheels"] == ["carried_probe-0.1-py3-none-any.whl"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.log", "r.json", "summary.json"]


def test_bad_arguments_are_named(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path), "--wheels",
                           str(tmp_path / "missing")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--wheels" in proc.stderr
