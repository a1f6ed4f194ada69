"""``make gpu-check`` on a CPU: the plan matches the scripts' real command lines, the runner works.

The GPU steps themselves cannot run here; what can break without a GPU is
caught: a renamed flag of a benchmark, of ``comparisons run`` or of
compute-sanitizer, more than 8 files under OUT, a plan that no longer fits
its time budget, the wheel list and its download command, the wheel install
and the PYTHONPATH the children see, time limits, the log, the summary and
the exit code.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "sanitizer-memcheck", "sanitizer-racecheck", "sanitizer-synccheck", "sanitizer-initcheck",
         "pytest-gpu", "sharded", "lp_dist", "certify", "crown_memory", "comparisons"]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _flags(argv):
    return [a.split("=")[0] for a in argv if a.startswith("--")]


def test_dry_run_lists_every_step(tmp_path):
    (tmp_path / "w").mkdir()
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path / "o"), "--wheels",
                           str(tmp_path / "w"), "--dry-run"], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0][1:] for line in lines] == STEPS
    assert all(re.search(r"\] \(limit \d+ s\) ", line) for line in lines)
    assert "pip install --no-deps --no-index --target" in proc.stdout and "--device cuda" in proc.stdout
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        line = next(line for line in lines if line.startswith(f"[sanitizer-{tool}]"))
        # the wheel's compute-sanitizer (unless one is on this machine), our kernels only, the kernel families
        assert re.search(r"compute-sanitizer --tool " + tool + r" --kernel-name 'regex=", line), line
        assert line.endswith("tests/ops/emulation/sanitize_run.py --cuda")
    assert not (tmp_path / "o").exists(), "a dry run writes nothing"


def test_plan_matches_the_real_command_lines(tmp_path):
    from comparisons.cli import build_parser

    gc = _script()
    steps = {s.name: s.argv for s in gc.plan(tmp_path, sys.executable, None, tmp_path / "s")}
    assert list(steps) == STEPS
    args = build_parser().parse_args(steps["comparisons"][3:])          # after "python -m comparisons"
    assert args.device == "cuda" and args.epochs == 1
    for name in ("lp_dist", "certify", "crown_memory"):
        script = steps[name][1]
        help_text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout
        for flag in _flags(steps[name][2:]):
            assert flag in help_text, f"{script} has no {flag}"
    assert "gpu" in (ROOT / "pyproject.toml").read_text()            # the marker pytest -m selects
    # the child the sanitizer runs: it exists, and without a GPU it says so (exit 2) instead of passing
    proc = subprocess.run([sys.executable, "tests/ops/emulation/sanitize_run.py", "--cuda"], cwd=ROOT,
                          capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin",
                                                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr, proc.stderr[-2000:]


def test_the_compute_sanitizer_flags_exist(tmp_path):
    """The flags the plan gives compute-sanitizer, against the real tool's --help (from the wheel that make
    gpu-wheels put in .whl/; runs where that was done: the binary needs no GPU for --help)."""
    gc = _script()
    wheel = sorted((ROOT / ".whl").glob("nvidia_cuda_sanitizer_api-*.whl"))
    if not wheel:
        pytest.skip("no compute-sanitizer wheel in .whl/ (make gpu-wheels)")
    with zipfile.ZipFile(wheel[-1]) as z:
        z.extractall(tmp_path)
    tool = next(tmp_path.glob("nvidia/cu*/bin/compute-sanitizer"))
    tool.chmod(0o755)
    help_text = subprocess.run([str(tool), "--help"], capture_output=True, text=True).stdout
    for step in gc.sanitizer_steps(str(tool), sys.executable, tmp_path):
        argv = step.argv[1:step.argv.index(sys.executable)]
        for flag in _flags(argv):
            assert f"  {flag} " in help_text, flag
        assert argv[argv.index("--tool") + 1] in help_text
    assert "regex" in help_text and "kernel_substring" in help_text


def test_the_plan_fits_ten_minutes_and_eight_files(tmp_path):
    gc = _script()
    steps = gc.plan(tmp_path, sys.executable, tmp_path, tmp_path / "s")
    assert all(0 < s.limit <= 150 for s in steps)
    assert gc.BUDGET + 60 <= 600                                      # the wheel install and the version probe
    files = {gc.LOG, gc.SUMMARY} | {f for s in steps for f in s.files}
    assert len(files) <= gc.MAX_FILES


def test_vs_seed_runs_only_with_a_seed_repo_and_the_script(tmp_path):
    gc = _script()
    names = [s.name for s in gc.plan(tmp_path, sys.executable, tmp_path, tmp_path / "s")]
    assert ("vs_seed" in names) == (ROOT / "benchmarks" / "vs_seed.py").exists()
    assert "vs_seed" not in [s.name for s in gc.plan(tmp_path, sys.executable, None, tmp_path / "s")]


def test_the_wheel_list_and_its_download(tmp_path):
    """make gpu-wheels downloads exactly the pinned wheels, for CPython 3.12 on manylinux x86_64, into .whl/
    (ignored by git); the dry run prints the pip command."""
    gc = _script()
    names = {re.split(r"==", w)[0] for w in gc.WHEELS}
    assert names == {"auto_LiRPA", "appdirs", "graphviz", "nvidia-cuda-sanitizer-api"}
    assert all("==" in w for w in gc.WHEELS)
    assert any(w.startswith("nvidia-cuda-sanitizer-api==13.0.") for w in gc.WHEELS)   # CUDA 13.0, as torch there
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--download-wheels", str(tmp_path / "d"),
                           "--dry-run"], cwd=ROOT, capture_output=True, text=True, check=True)
    cmd = proc.stdout.split()
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--implementation") + 1] == "cp"
    assert {cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"} >= {"manylinux_2_25_x86_64",
                                                                             "manylinux2014_x86_64"}
    assert cmd[-len(gc.WHEELS):] == list(gc.WHEELS) and not (tmp_path / "d").exists()
    assert "/.whl/" in (ROOT / ".gitignore").read_text().split()
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^gpu-wheels:\n\t.*scripts/gpu_check.py --download-wheels \.whl", make, re.M)


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


def test_runner_installs_wheels_limits_steps_logs_and_summarises(tmp_path, monkeypatch):
    if shutil.which("pip") is None and subprocess.run([sys.executable, "-m", "pip", "--version"],
                                                      capture_output=True).returncode != 0:
        pytest.skip("pip is not available")
    gc = _script()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    out = tmp_path / "out"
    probe = "import carried_probe, linf_plugin, json; print('probe', carried_probe.VALUE)"

    def fake_plan(out_dir, python, seed_repo, scratch, sanitizer="compute-sanitizer"):
        result, tool_log = scratch / "r.json", scratch / "tool.log"
        slow = f"import time, subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
               f"time.sleep(60)"
        return [gc.Step("child", [python, "-c", probe], 20),
                gc.Step("copy", [python, "-c", f"open({str(result)!r}, 'w').write('{{}}')"], 20, ("r.json",),
                        (result, out_dir / "r.json")),
                gc.Step("broken", [python, "-c", "raise SystemExit(3)"], 20),
                gc.Step("slow", [python, "-c", slow], 2),
                gc.Step("tool", [python, "-c", f"open({str(tool_log)!r}, 'w').write("
                                               "'========= ERROR SUMMARY: 2 errors\\n'); raise SystemExit(3)"],
                        20, tool_log=tool_log),
                gc.Step("sanitizer-memcheck", [sanitizer, "--version"], 20),
                gc.Step("after", [python, "-c", "print('still runs')"], 20)]

    monkeypatch.setattr(gc, "plan", fake_plan)
    monkeypatch.setattr(gc, "find_compute_sanitizer", lambda site: None)   # as on a machine without the wheel
    monkeypatch.setenv("PYTHONPATH", "")
    t0 = time.perf_counter()
    rc = gc.main(["--out", str(out), "--wheels", str(wheels)])
    assert time.perf_counter() - t0 < 60                         # the slow step was cut after 2 s, its child too
    assert rc == 1                                               # some steps failed, every step ran
    log = (out / "gpu-check.log").read_text()
    assert "probe 42" in log and "===== broken: failed (exit 3)" in log and "still runs" in log
    assert "ERROR SUMMARY: 2 errors" in log                      # the tool's own log, bundled
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"child": "ok", "copy": "ok", "broken": "failed", "slow": "timeout", "tool": "failed",
                      "sanitizer-memcheck": "missing", "after": "ok"}
    assert next(s for s in summary["steps"] if s["name"] == "tool")["sanitizer_errors"] == 2
    assert "compute-sanitizer not found" in log
    assert summary["ok"] is False and "device" in summary and summary["wheels"] == ["carried_probe-0.1-py3-none-any.whl"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.log", "r.json", "summary.json"]


def test_a_spent_budget_skips_the_remaining_steps(tmp_path, monkeypatch):
    gc = _script()

    def fake_plan(out_dir, python, seed_repo, scratch, sanitizer="compute-sanitizer"):
        return [gc.Step("first", [python, "-c", "import time; time.sleep(3)"], 20),
                gc.Step("second", [python, "-c", "print(1)"], 20)]

    monkeypatch.setattr(gc, "plan", fake_plan)
    assert gc.main(["--out", str(tmp_path), "--budget", "6"]) == 1
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert [s["status"] for s in steps] == ["ok", "skipped"] and steps[1]["reason"] == "no time left in the budget"


def test_an_embedded_result_goes_into_the_summary_not_under_out(tmp_path, monkeypatch):
    gc = _script()

    def fake_plan(out_dir, python, seed_repo, scratch, sanitizer="compute-sanitizer"):
        made, lost = scratch / "made.json", scratch / "lost.json"
        write = f"import json; json.dump({{'same': True}}, open({str(made)!r}, 'w'))"
        return [gc.Step("writes", [python, "-c", write], 20, embed=made),
                gc.Step("forgets", [python, "-c", "print(1)"], 20, embed=lost)]

    monkeypatch.setattr(gc, "plan", fake_plan)
    assert gc.main(["--out", str(tmp_path), "--budget", "60"]) == 1
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps[0]["status"] == "ok" and steps[0]["result"] == {"same": True}
    assert steps[1]["status"] == "failed" and "result" not in steps[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check.log", "summary.json"]


def test_bad_arguments_are_named(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path), "--wheels",
                           str(tmp_path / "missing")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--wheels" in proc.stderr
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--out is required" in proc.stderr
