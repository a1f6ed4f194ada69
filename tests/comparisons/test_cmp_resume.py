"""``python -m comparisons run``: stopped by SIGTERM and resumed, and run under ``torchrun`` with 2 processes.

Both must give the results of one uninterrupted process (accuracies of
every method and of PGD at every ε), and the per-chunk logs must show each
finished batch saved exactly once over both sessions.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from comparisons.cli import main

from .comparisons_helpers import load

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["run", "--models", "linf,ibp", "--methods", "margin,interval,ibp,crown", "--epochs", "2", "--train-subset",
        "120", "--test-subset", "24", "--pgd-steps", "3", "--batch-size", "4", "--points", "crown=24", "--no-progress",
        "--device", "cpu", "--set", 'linf.model_kwargs={"depth": 3, "width": 16}',
        "--set", 'ibp.model_kwargs={"width": 1, "linear_size": 16}', "--set", "batch_size=64"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted process (it also trains the two models into the shared cache)."""
    root = tmp_path_factory.mktemp("resume")
    out, cache = root / "reference", root / "cache"
    assert main(ARGS + ["--out", str(out), "--cache-dir", str(cache)]) == 0
    return cache, load(out)


def _outcomes(res: dict) -> dict:
    """Every measured accuracy of a results.json, keyed by model, step and ε (times left out)."""
    out = {}
    for m in res["models"]:
        ev = m["evaluation"]
        out[(m["key"], "clean")] = ev["clean_accuracy"]
        for r in ev["pgd"]["results"]:
            out[(m["key"], "pgd", r["eps"])] = r["accuracy"]
        for meth, rec in ev["methods"].items():
            if rec["status"] != "ok":
                out[(m["key"], meth)] = rec["status"]
                continue
            for r in rec["results"]:
                out[(m["key"], meth, r["eps"])] = r["certified_accuracy"]
    return out


def _saved_chunks(out: Path) -> list:
    """``(job folder, chunk, session)`` of every chunk saved under a run folder, from the per-chunk logs."""
    recs = []
    for log in sorted((out / "chunks").rglob("log.jsonl")):
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line being written while the run goes on
                continue
            recs.append((str(log.parent.relative_to(out)), rec["chunk"], rec["session"]))
    return recs


def test_sigterm_then_resume_gives_the_uninterrupted_results(reference, tmp_path, capsys):
    cache, ref = reference
    out = tmp_path / "run"
    args = ARGS + ["--out", str(out), "--cache-dir", str(cache)]
    fired = threading.Event()

    def stop_after_some_chunks():  # the scheduler: SIGTERM once a dozen batches are saved
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not fired.is_set():
            if out.exists() and len(_saved_chunks(out)) >= 12:
                fired.set()
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=stop_after_some_chunks, daemon=True)
    # main() puts its own handler in place while it runs; a SIGTERM that came after it returned must not
    # end the test session
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        watcher.start()
        rc = main(args)
        fired.set()
        watcher.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert rc == 143, err
    assert "stopped by SIGTERM; every finished batch is saved in" in err
    assert "python -m comparisons run" in err and err.rstrip().endswith("--resume"), err
    first = _saved_chunks(out)
    assert len(first) >= 12 and not (out / "results.json").exists()

    assert main(args + ["--resume"]) == 0
    assert _outcomes(load(out)) == _outcomes(ref)
    saved = _saved_chunks(out)
    keys = [(job, chunk) for job, chunk, _ in saved]
    assert len(keys) == len(set(keys)), "a batch was saved twice: finished work was computed again"
    assert set(first) <= set(saved) and len(saved) > len(first)  # the first session's batches were kept

    # the same command again without --resume is refused, and a resume with other settings too
    assert main(args) == 2
    assert "add --resume to continue it" in capsys.readouterr().err
    assert main(args[:args.index("--pgd-steps") + 1] + ["4"] + args[args.index("--pgd-steps") + 2:] + ["--resume"]) == 2
    assert "pgd_steps (saved 3, now 4)" in capsys.readouterr().err


@pytest.mark.slow
def test_run_under_torchrun_gives_the_one_process_results(reference, tmp_path):
    cache, ref = reference
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "comparisons", *ARGS, "--out", str(out), "--cache-dir", str(cache)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = load(out)
    assert _outcomes(res) == _outcomes(ref)
    assert res["environment"]["world_size"] == 2
    assert proc.stdout.count("comparison digits:") == 1  # rank 0 alone prints the summary
    crown = res["models"][1]["evaluation"]["methods"]["crown"]
    assert crown["status"] == "ok"
    logs = [json.loads(line) for p in (out / "chunks").rglob("log.jsonl") for line in p.read_text().splitlines()]
    assert {rec["rank"] for rec in logs} == {0, 1}  # both ranks certified and attacked batches
