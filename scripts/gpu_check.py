"""`make gpu-check OUT=dir`: every check that needs a GPU, in one command, written under one folder.

Runs, in this order, each as a child process of the Python that runs this
script (it must already have torch with CUDA and CuPy; the project's venv is
not used):

1. ``python -m linf_plugin.env`` (what the machine is);
2. ``pytest -m gpu`` (the GPU tests; JUnit XML too);
3. ``benchmarks/lp_dist.py --device cuda``;
4. ``benchmarks/certify.py --device cuda``;
5. ``benchmarks/crown_memory.py --device cuda --n 256`` (CROWN's peak memory
   on the 6x5120 net under ``$LINF_BOUND_MEMORY_GB``);
6. a short ``python -m comparisons run --device cuda`` (digits, one epoch);
7. ``benchmarks/vs_seed.py --seed-repo PATH`` when ``--seed-repo`` is given
   and that script exists.

Dependencies the machine's Python lacks (auto_LiRPA, appdirs) come from
wheels: ``--wheels DIR`` installs every ``*.whl`` there with
``pip install --no-deps --target SITE`` and puts SITE, after the checkout,
on ``PYTHONPATH``, which every child (and the tests' own subprocesses, which
prepend to it) inherits.

Files under ``--out`` (at most 8): ``gpu-check.log`` (every step's output,
in order), ``summary.json`` (steps, commands, exit codes, seconds,
versions), ``pytest-gpu.xml``, ``lp_dist-cuda.json``, ``certify-cuda.json``,
``crown_memory-cuda.json``, ``comparisons-cuda.json`` and, with a seed
checkout, ``vs-seed.json``.
Every step runs even when an earlier one fails; the exit code is 1 when any
failed.  ``--dry-run`` prints the plan (commands and PYTHONPATH) and runs
nothing, so CI checks that the plan still matches the scripts' interfaces.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8
LOG = "gpu-check.log"
SUMMARY = "summary.json"


def plan(out: Path, python: str, seed_repo: Path | None, scratch: Path) -> list:
    """The steps: ``(name, argv, files it leaves under out, post-step)``; post-steps copy a result in."""
    runs = scratch / "comparisons-run"
    steps = [
        ("env", [python, "-m", "linf_plugin.env"], [], None),
        ("pytest-gpu", [python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfE",
                        f"--junitxml={out / 'pytest-gpu.xml'}"], ["pytest-gpu.xml"], None),
        ("lp_dist", [python, "benchmarks/lp_dist.py", "--device", "cuda", "--out", str(out / "lp_dist-cuda.json")],
         ["lp_dist-cuda.json"], None),
        ("certify", [python, "benchmarks/certify.py", "--device", "cuda", "--out", str(out / "certify-cuda.json")],
         ["certify-cuda.json"], None),
        # CROWN under the memory cap on the 6x5120 net (#13 item 4), sized to a short device session
        ("crown_memory", [python, "benchmarks/crown_memory.py", "--device", "cuda", "--n", "256",
                          "--out", str(out / "crown_memory-cuda.json")], ["crown_memory-cuda.json"], None),
        ("comparisons", [python, "-m", "comparisons", "run", "--preset", "digits", "--device", "cuda",
                         "--epochs", "1", "--test-subset", "200", "--points", "alpha-crown=20", "--no-cache",
                         "--no-progress", "--out", str(runs)],
         ["comparisons-cuda.json"], (runs / "results.json", out / "comparisons-cuda.json")),
    ]
    if seed_repo is not None and (ROOT / "benchmarks" / "vs_seed.py").exists():
        steps.append(("vs_seed", [python, "benchmarks/vs_seed.py", "--seed-repo", str(seed_repo),
                                  "--out", str(out / "vs-seed.json")], ["vs-seed.json"], None))
    files = {LOG, SUMMARY} | {f for _, _, fs, _ in steps for f in fs}
    if len(files) > MAX_FILES:
        raise AssertionError(f"the plan writes {len(files)} files under OUT, more than {MAX_FILES}")
    return steps


def install_wheels(wheels: Path, site: Path, python: str, log) -> list:
    """``pip install --no-deps --target site`` every wheel in ``wheels``; returns their names."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"--wheels {wheels}: no *.whl files there")
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
            "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}\n"
            "try:\n import cupy; v['cupy'] = cupy.__version__\nexcept Exception as e: v['cupy'] = repr(e)\n"
            "print(json.dumps(v))")
    proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": proc.stderr[-500:]}


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the logs and JSON (created)")
    ap.add_argument("--wheels", type=Path, default=None, help="folder of *.whl to install with --no-deps")
    ap.add_argument("--seed-repo", type=Path, default=None, help="checkout of the seed repository (vs_seed)")
    ap.add_argument("--python", default=sys.executable, help="the Python with torch and CuPy")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = ap.parse_args(argv)
    if args.wheels is not None and not args.wheels.is_dir():
        ap.error(f"--wheels {args.wheels}: not a folder")
    if args.seed_repo is not None and not args.seed_repo.is_dir():
        ap.error(f"--seed-repo {args.seed_repo}: not a folder")
    out = args.out.resolve()
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    site = scratch / "site" if args.wheels else None
    steps = plan(out, args.python, args.seed_repo, scratch)
    env = dict(os.environ, PYTHONPATH=pythonpath(site))
    if args.dry_run:
        if args.wheels:
            print(f"# pip install --no-deps --target {site} {args.wheels}/*.whl")
        print(f"# PYTHONPATH={env['PYTHONPATH']}")
        for name, cmd, _, post in steps:
            print(f"[{name}] {shlex.join(cmd)}" + (f"  (then copy {post[0].name} -> {post[1]})" if post else ""))
        shutil.rmtree(scratch, ignore_errors=True)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "root": str(ROOT), "python": args.python,
               "steps": []}
    failed = False
    try:
        with open(out / LOG, "w") as log:
            if args.wheels:
                summary["wheels"] = install_wheels(args.wheels, site, args.python, log)
            summary["versions"] = _versions(args.python, env)
            for name, cmd, _, post in steps:
                log.write(f"\n===== {name}: {shlex.join(cmd)}\n")
                log.flush()
                t0 = time.perf_counter()
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if post is not None and rc == 0:
                    if post[0].exists():
                        shutil.copyfile(post[0], post[1])
                        report = post[0].with_suffix(".md")      # the run's tables, readable in the log
                        if report.exists():
                            log.write(f"----- {report.name}\n{report.read_text()}\n")
                    else:
                        log.write(f"(expected {post[0]}, not written)\n")
                        rc = 1
                seconds = round(time.perf_counter() - t0, 1)
                log.write(f"===== {name}: exit {rc} after {seconds} s\n")
                log.flush()
                summary["steps"].append({"name": name, "command": cmd, "exit": rc, "seconds": seconds})
                failed |= rc != 0
                print(f"{name}: exit {rc} ({seconds} s)", flush=True)
    except BaseException:
        failed = True
        raise
    finally:
        summary["ok"] = not failed
        _write_json(out / SUMMARY, summary)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"gpu-check: {'all steps passed' if not failed else 'FAILED'}; see {out / LOG}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
