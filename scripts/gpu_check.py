"""`make gpu-check OUT=dir`: every check that needs a GPU, in one command, written under one folder.

Runs, in this order, each as a child process of the Python that runs this
script (it must already have torch with CUDA and CuPy; the project's venv is
not used), each with a time limit, within a total budget (``--budget``,
default 540 s: with the wheel install the check fits a 10-minute slot on one GPU):

1. ``python -m linf_plugin.env`` (what the machine is);
2. NVIDIA compute-sanitizer, four tools (memcheck: out-of-bounds and
   misaligned accesses; racecheck: shared-memory hazards; synccheck: barrier
   misuse; initcheck: reads of uninitialised global memory), each over
   ``tests/ops/emulation/sanitize_run.py --cuda``: every kernel family once on
   small shapes with partial tiles, results checked against the reference;
   only our kernels are instrumented (``--kernel-name regex=...``);
3. ``pytest -m gpu`` (the GPU tests; JUnit XML too);
4. ``benchmarks/lp_dist.py --device cuda``;
5. ``benchmarks/certify.py --device cuda``;
6. ``benchmarks/crown_memory.py --device cuda --n 256`` (CROWN's peak memory
   on the 6x5120 net under ``$LINF_BOUND_MEMORY_GB``);
7. a short ``python -m comparisons run --device cuda`` (digits, one epoch);
8. ``benchmarks/vs_seed.py --seed-repo PATH`` when ``--seed-repo`` is given
   and that script exists.

A step that fails, times out (its process group is killed) or finds no time
left in the budget is recorded and the next one runs; the exit code is 1
when any step did not pass.

Dependencies the machine's Python lacks come from wheels (:data:`WHEELS`:
auto_LiRPA, appdirs, graphviz, and ``nvidia-cuda-sanitizer-api``, which
holds ``compute-sanitizer``): ``--wheels DIR`` installs every ``*.whl``
there with ``pip install --no-deps --no-index --target SITE`` and puts SITE,
after the checkout, on ``PYTHONPATH``, which every child (and the tests' own
subprocesses, which prepend to it) inherits.  ``make gpu-wheels`` (this
script with ``--download-wheels DIR``) downloads exactly those wheels for
CPython 3.12 on manylinux x86_64.

Files under ``--out`` (at most 8): ``gpu-check.log`` (every step's output,
in order, with compute-sanitizer's own logs), ``summary.json`` (the device,
versions, and per step the command, exit code, status, seconds, limit and
the sanitizer's error count), ``pytest-gpu.xml``, ``lp_dist-cuda.json``,
``certify-cuda.json``, ``crown_memory-cuda.json``, ``comparisons-cuda.json``
and, with a seed checkout, ``vs-seed.json``.  ``--dry-run`` prints the plan
(commands, limits and PYTHONPATH) and runs nothing, so CI checks that the
plan still matches the scripts' interfaces.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8
LOG = "gpu-check.log"
SUMMARY = "summary.json"
BUDGET = 540
# What the GPU machine's Python (3.12 with torch, CuPy, pytest) lacks.  compute-sanitizer 13.0 matches the
# CUDA 13.0 build of torch there, so the driver that runs torch runs it too.
WHEELS = ("auto_LiRPA==0.3", "appdirs==1.4.4", "graphviz==0.21", "nvidia-cuda-sanitizer-api==13.0.85")
WHEEL_PYTHON = "3.12"
# pip (23) does not widen a manylinux tag to the older ones it implies: list the ones the wheels use
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_25_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64")
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# our kernels' mangled names (_Z12linf_forward..., _Z10lp_forward..., _Z20interval_inf_forward...): torch's
# own kernels in the same process are not instrumented
KERNEL_REGEX = "_Z[0-9]+(linf|lp|interval)_"


@dataclass
class Step:
    """One step: ``argv`` run in the checkout within ``limit`` seconds; ``files`` it leaves under OUT;
    ``post`` = (a result in the scratch folder, its place under OUT); ``tool_log``: a log of its own,
    appended to the main log; ``embed``: a JSON result in the scratch folder that goes into the step's
    record in the summary (no file of its own under OUT, which holds at most :data:`MAX_FILES`)."""

    name: str
    argv: list
    limit: int
    files: tuple = ()
    post: tuple | None = None
    tool_log: Path | None = None
    embed: Path | None = None
    extra: dict = field(default_factory=dict)


def find_compute_sanitizer(site: Path | None) -> str | None:
    """compute-sanitizer from the wheel site (``nvidia/cu*/bin``), then PATH, then ``/usr/local/cuda*/bin``."""
    roots = [str(site)] if site else []
    roots += [p for p in sys.path if p]
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "bin", "compute-sanitizer")), reverse=True):
            if os.access(path, os.X_OK):
                return path
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for path in sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"), reverse=True):
        if os.access(path, os.X_OK):
            return path
    return None


def sanitizer_steps(sanitizer: str, python: str, scratch: Path) -> list:
    """The four compute-sanitizer runs over the kernel families (sanitize_run.py --cuda)."""
    steps = []
    limits = {"memcheck": 60, "racecheck": 90, "synccheck": 60, "initcheck": 60}
    for tool in SANITIZER_TOOLS:
        log = scratch / f"{tool}.log"
        argv = [sanitizer, "--tool", tool, "--kernel-name", f"regex={KERNEL_REGEX}", "--error-exitcode", "3",
                "--print-limit", "20", "--log-file", str(log), python, "tests/ops/emulation/sanitize_run.py", "--cuda"]
        steps.append(Step(f"sanitizer-{tool}", argv, limits[tool], tool_log=log))
    return steps


def plan(out: Path, python: str, seed_repo: Path | None, scratch: Path, sanitizer: str = "compute-sanitizer") -> list:
    """The steps, in order (:class:`Step`)."""
    runs = scratch / "comparisons-run"
    steps = [Step("env", [python, "-m", "linf_plugin.env"], 30)]
    steps += sanitizer_steps(sanitizer, python, scratch)
    steps += [
        Step("pytest-gpu", [python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfE",
                            f"--junitxml={out / 'pytest-gpu.xml'}"], 150, ("pytest-gpu.xml",)),
        # 2 torchrun ranks against 1 on the GPU (NCCL with 2 GPUs, else gloo on the one), bit for bit
        Step("sharded", [python, "scripts/sharded_check.py", "--device", "cuda", "--out",
                         str(scratch / "sharded-cuda.json")], 90, embed=scratch / "sharded-cuda.json"),
        Step("lp_dist", [python, "benchmarks/lp_dist.py", "--device", "cuda", "--repeat", "3",
                         "--out", str(out / "lp_dist-cuda.json")], 60, ("lp_dist-cuda.json",)),
        Step("certify", [python, "benchmarks/certify.py", "--device", "cuda", "--n-cifar", "2000", "--budget", "10",
                         "--out", str(out / "certify-cuda.json")], 60, ("certify-cuda.json",)),
        # CROWN under the memory cap on the 6x5120 net, sized to a short device session
        Step("crown_memory", [python, "benchmarks/crown_memory.py", "--device", "cuda", "--n", "256",
                              "--out", str(out / "crown_memory-cuda.json")], 45, ("crown_memory-cuda.json",)),
        Step("comparisons", [python, "-m", "comparisons", "run", "--suite", "digits", "--device", "cuda",
                             "--epochs", "1", "--test-subset", "200", "--points", "alpha-crown=20", "--no-cache",
                             "--no-progress", "--out", str(runs)], 60, ("comparisons-cuda.json",),
             (runs / "results.json", out / "comparisons-cuda.json")),
    ]
    if seed_repo is not None and (ROOT / "benchmarks" / "vs_seed.py").exists():
        steps.append(Step("vs_seed", [python, "benchmarks/vs_seed.py", "--seed-repo", str(seed_repo),
                                      "--out", str(out / "vs-seed.json")], 60, ("vs-seed.json",)))
    files = {LOG, SUMMARY} | {f for s in steps for f in s.files}
    if len(files) > MAX_FILES:
        raise AssertionError(f"the plan writes {len(files)} files under OUT, more than {MAX_FILES}")
    return steps


def download_command(dest: Path, python: str = sys.executable) -> list:
    """``pip download`` of exactly :data:`WHEELS` for CPython 3.12 on manylinux x86_64 into ``dest``."""
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    return [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", WHEEL_PYTHON,
            "--implementation", "cp", *platforms, "--dest", str(dest), *WHEELS]


def install_wheels(wheels: Path, site: Path, python: str, log) -> list:
    """``pip install --no-deps --target site`` every wheel in ``wheels``; returns their names."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"--wheels {wheels}: no *.whl files there (make gpu-wheels downloads them)")
    cmd = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), *map(str, found)]
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return [w.name for w in found]


def pythonpath(site: Path | None) -> str:
    """The checkout, then the wheel site, then whatever the caller had."""
    parts = [str(ROOT), str(site) if site else None, os.environ.get("PYTHONPATH")]
    return os.pathsep.join(p for p in parts if p)


def _versions(python: str, env: dict) -> dict:
    code = ("import json, torch\nv = {'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "
            "'capability': list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None}\n"
            "try:\n import cupy; v['cupy'] = cupy.__version__\nexcept Exception as e: v['cupy'] = repr(e)\n"
            "print(json.dumps(v))")
    try:
        proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[-500:]}


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _run_limited(argv, env, log, limit: float) -> tuple:
    """Run ``argv`` in the checkout, output to ``log``; kill its whole process group after ``limit`` seconds.
    Returns ``(exit code or None, timed out)``."""
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        log.write(f"(could not start: {exc})\n")
        return 127, False
    try:
        return proc.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None, True


_SANITIZER_SUMMARY = re.compile(r"(ERROR SUMMARY|RACECHECK SUMMARY): (\d+) (error|hazard)")


def run_step(step: Step, env: dict, log, remaining: float) -> dict:
    """Run one step within ``min(step.limit, remaining)`` seconds; its record for the summary."""
    record = {"name": step.name, "command": step.argv, "limit": step.limit}
    if step.extra.get("missing"):
        log.write(f"\n===== {step.name}: skipped: {step.extra['missing']}\n")
        return {**record, "exit": None, "seconds": 0.0, "status": "missing", "reason": step.extra["missing"]}
    limit = min(step.limit, remaining)
    if limit < min(step.limit, 5):      # not even 5 s left of the budget
        log.write(f"\n===== {step.name}: skipped: no time left in the budget\n")
        return {**record, "exit": None, "seconds": 0.0, "status": "skipped", "reason": "no time left in the budget"}
    log.write(f"\n===== {step.name} (limit {limit:.0f} s): {shlex.join(step.argv)}\n")
    log.flush()
    t0 = time.perf_counter()
    rc, timed_out = _run_limited(step.argv, env, log, limit)
    if step.post is not None and rc == 0:
        if step.post[0].exists():
            shutil.copyfile(step.post[0], step.post[1])
            report = step.post[0].with_suffix(".md")      # the run's tables, readable in the log
            if report.exists():
                log.write(f"----- {report.name}\n{report.read_text()}\n")
        else:
            log.write(f"(expected {step.post[0]}, not written)\n")
            rc = 1
    if step.embed is not None:
        try:
            record["result"] = json.loads(step.embed.read_text())
        except (OSError, ValueError) as exc:
            log.write(f"(expected a JSON result in {step.embed}: {exc})\n")
            rc = 1 if rc == 0 else rc
    if step.tool_log is not None:
        text = step.tool_log.read_text(errors="replace") if step.tool_log.exists() else "(no log written)\n"
        log.write(f"----- {step.tool_log.name}\n{text}\n")
        counts = [int(m.group(2)) for m in _SANITIZER_SUMMARY.finditer(text)]
        record["sanitizer_errors"] = sum(counts) if counts else None
    seconds = round(time.perf_counter() - t0, 1)
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    log.write(f"===== {step.name}: {status} (exit {rc}) after {seconds} s\n")
    log.flush()
    return {**record, "exit": rc, "seconds": seconds, "status": status}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="folder for the logs and JSON (created)")
    ap.add_argument("--wheels", type=Path, default=None, help="folder of *.whl to install with --no-deps")
    ap.add_argument("--seed-repo", type=Path, default=None, help="checkout of the seed repository (vs_seed)")
    ap.add_argument("--python", default=sys.executable, help="the Python with torch and CuPy")
    ap.add_argument("--budget", type=float, default=BUDGET,
                    help=f"seconds for all steps together, after the wheel install ({BUDGET})")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--download-wheels", type=Path, default=None, metavar="DIR",
                    help="download the wheels the GPU machine needs (WHEELS, CPython 3.12, manylinux x86_64) into DIR")
    return ap


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.download_wheels is not None:
        cmd = download_command(args.download_wheels, args.python)
        print(shlex.join(cmd), flush=True)
        if args.dry_run:
            return 0
        args.download_wheels.mkdir(parents=True, exist_ok=True)
        return subprocess.run(cmd).returncode
    if args.out is None:
        ap.error("--out is required (or --download-wheels DIR)")
    if args.wheels is not None and not args.wheels.is_dir():
        ap.error(f"--wheels {args.wheels}: not a folder (make gpu-wheels fills .whl/)")
    if args.seed_repo is not None and not args.seed_repo.is_dir():
        ap.error(f"--seed-repo {args.seed_repo}: not a folder")
    out = args.out.resolve()
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    site = scratch / "site" if args.wheels else None
    env = dict(os.environ, PYTHONPATH=pythonpath(site))
    if args.dry_run:
        # where the sanitizer will be once the wheels are in (or where it is now)
        sanitizer = find_compute_sanitizer(None) or (str(site / "nvidia" / "cu13" / "bin" / "compute-sanitizer")
                                                     if site else "compute-sanitizer")
        steps = plan(out, args.python, args.seed_repo, scratch, sanitizer)
        if args.wheels:
            print(f"# pip install --no-deps --no-index --target {site} {args.wheels}/*.whl")
        print(f"# PYTHONPATH={env['PYTHONPATH']}")
        print(f"# budget {args.budget:.0f} s; steps: {len(steps)}")
        for step in steps:
            post = f"  (then copy {step.post[0].name} -> {step.post[1]})" if step.post else ""
            print(f"[{step.name}] (limit {step.limit} s) {shlex.join(step.argv)}{post}")
        shutil.rmtree(scratch, ignore_errors=True)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "root": str(ROOT), "python": args.python,
               "budget_s": args.budget, "steps": []}
    failed = False
    try:
        with open(out / LOG, "w") as log:
            if args.wheels:
                summary["wheels"] = install_wheels(args.wheels, site, args.python, log)
            summary["versions"] = _versions(args.python, env)
            summary["device"] = summary["versions"].get("gpu")
            sanitizer = find_compute_sanitizer(site)
            steps = plan(out, args.python, args.seed_repo, scratch, sanitizer or "compute-sanitizer")
            if sanitizer is None:
                for step in steps:
                    if step.name.startswith("sanitizer-"):
                        step.extra["missing"] = ("compute-sanitizer not found: carry the nvidia-cuda-sanitizer-api "
                                                 "wheel (make gpu-wheels) and pass WHEELS")
            steps_start = time.perf_counter()        # the budget covers the steps (not the install and probe)
            for step in steps:
                record = run_step(step, env, log, args.budget - (time.perf_counter() - steps_start))
                summary["steps"].append(record)
                failed |= record["status"] != "ok"
                print(f"{step.name}: {record['status']} ({record['seconds']} s)", flush=True)
    except BaseException:
        failed = True
        raise
    finally:
        summary["ok"] = not failed
        summary["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(out / SUMMARY, summary)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"gpu-check: {'all steps passed' if not failed else 'NOT all steps passed'}; see {out / LOG}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
