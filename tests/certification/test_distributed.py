"""``certify`` under ``torchrun`` (gloo, CPU, 2 processes): equal to one process, and what survives a kill.

The ranks run ``dist_worker.py``: plain ``certify`` calls on checkpoints
trained here, with no distributed code of their own.  The kill tests stop
a job mid-run (SIGKILL of one rank, SIGTERM of the whole job), resume it
with the same command plus ``--resume``, and check the per-chunk log: every
chunk saved exactly once over both runs (nothing finished is computed
again, nothing is lost) and the results equal an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from linf_plugin.certification import certify
from linf_plugin.data import load_dataset

from .tiny_models import save_tiny_models

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
JOBS = ["linf:margin:0.0", "relu:ibp:0.01", "relu:crown:0.05", "relu:alpha-crown:0.06"]
# the kill tests' job: 30 chunks of 4 points, long enough per rank to be stopped in the middle
KILL_JOB, KILL_POINTS, KILL_BATCH = "relu:crown:0.05", 120, 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def _env(**extra):
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
                OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **extra)


def _worker_args(checkpoints, jobs, out, points, batch, *extra):
    args = [str(WORKER), "--out", str(out), "--points", str(points), "--batch-size", str(batch), *extra]
    for name, (path, _) in checkpoints.items():
        args += ["--model", f"{name}={path}"]
    for job in jobs:
        args += ["--job", job]
    return args


def _torchrun(args, **popen):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def _one_process(checkpoints, job, points, batch):
    name, method, eps = job.split(":")
    data = load_dataset("digits", "test").subset(points)
    return certify(checkpoints[name][1], data, float(eps), method, batch_size=batch, alpha_iterations=3,
                   distributed=False)


def _assert_same(res, got: dict):
    assert torch.equal(torch.as_tensor(res.correct), got["correct"])
    assert torch.equal(torch.as_tensor(res.certified), got["certified"])
    if res.radius is None:
        assert got["radius"] is None
    else:  # bit for bit: each point sat in the same batch as in one process
        assert torch.equal(torch.as_tensor(res.radius), got["radius"])
    assert res.float_rigorous == got["float_rigorous"]


def _log(folder: Path) -> list:
    path = folder / "log.jsonl"
    recs = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            recs.append(json.loads(line))
        except ValueError:  # a line being written while the job goes on
            continue
    return recs


def _wait_for_chunks(proc, folder: Path, count: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) before it could be stopped: "
                        f"{proc.stderr.read()[-3000:]}")
        if len(_log(folder)) >= count:
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"fewer than {count} chunks saved after {timeout} s")


@pytest.mark.slow
def test_two_ranks_give_the_one_process_results(checkpoints, tmp_path):
    out = tmp_path / "out.pt"
    proc = _torchrun(_worker_args(checkpoints, JOBS, out, 24, 4))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    got = torch.load(out, weights_only=False)
    for job in JOBS:
        res = _one_process(checkpoints, job, 24, 4)
        _assert_same(res, got[job])
        chunks = got[job]["extra"]["chunks"]
        assert chunks["world_size"] == 2 and chunks["chunks"] == 6 and len(chunks["rank_time"]) == 2
        assert all(t > 0 for t in chunks["rank_time"]), chunks  # both ranks certified a share
    assert 0 < int(got["relu:crown:0.05"]["certified"].sum()) < int(got["relu:crown:0.05"]["correct"].sum())


@pytest.fixture(scope="module")
def kill_reference(checkpoints):
    return _one_process(checkpoints, KILL_JOB, KILL_POINTS, KILL_BATCH)


def _resume_and_check(checkpoints, kill_reference, tmp_path, first_session_chunks, ranks: int):
    """Run the stopped job again with --resume (on 2 ranks, or in 1 process: the layout does not depend on the
    number of ranks); compare with the uninterrupted run; check the log."""
    out, chunk_dir = tmp_path / "out.pt", tmp_path / "chunks"
    args = _worker_args(checkpoints, [KILL_JOB], out, KILL_POINTS, KILL_BATCH, "--chunk-dir", str(chunk_dir),
                        "--resume")
    proc = _torchrun(args) if ranks == 2 else subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    got = torch.load(out, weights_only=False)[KILL_JOB]
    _assert_same(kill_reference, got)
    log = _log(chunk_dir / "0")
    counts = {}
    for rec in log:
        counts[rec["chunk"]] = counts.get(rec["chunk"], 0) + 1
    assert sorted(counts) == list(range(KILL_POINTS // KILL_BATCH)), "a chunk is missing"
    assert max(counts.values()) == 1, f"chunks saved twice (computed again): {[c for c, k in counts.items() if k > 1]}"
    sessions = list(dict.fromkeys(rec["session"] for rec in log))
    assert len(sessions) == 2
    assert sum(rec["session"] == sessions[0] for rec in log) == first_session_chunks
    assert got["extra"]["chunks"]["resumed_chunks"] == first_session_chunks
    assert got["extra"]["chunks"]["world_size"] == ranks


@pytest.mark.slow
def test_sigkill_of_one_rank_then_resume(checkpoints, kill_reference, tmp_path):
    chunk_dir, pids = tmp_path / "chunks", tmp_path / "pids"
    proc = _torchrun(_worker_args(checkpoints, [KILL_JOB], tmp_path / "out.pt", KILL_POINTS, KILL_BATCH,
                                  "--chunk-dir", str(chunk_dir), "--pids", str(pids)))
    _wait_for_chunks(proc, chunk_dir / "0", 6)
    os.kill(int((pids / "rank1").read_text()), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)  # torchrun stops rank 0 too: no hang
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in stderr and "rank      : 1" in stderr, stderr[-3000:]  # torchrun names it
    saved = len(_log(chunk_dir / "0"))
    assert 6 <= saved < KILL_POINTS // KILL_BATCH
    _resume_and_check(checkpoints, kill_reference, tmp_path, saved, ranks=2)


@pytest.mark.slow
def test_sigterm_of_the_job_then_resume(checkpoints, kill_reference, tmp_path):
    chunk_dir = tmp_path / "chunks"
    proc = _torchrun(_worker_args(checkpoints, [KILL_JOB], tmp_path / "out.pt", KILL_POINTS, KILL_BATCH,
                                  "--chunk-dir", str(chunk_dir)))
    _wait_for_chunks(proc, chunk_dir / "0", 6)
    proc.send_signal(signal.SIGTERM)  # what a scheduler does to the launcher; torchrun passes it on
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    saved = len(_log(chunk_dir / "0"))
    assert f"stopped by SIGTERM: {saved} of {KILL_POINTS // KILL_BATCH} chunks are saved in" in stderr, stderr[-3000:]
    assert "again with resume" in stderr
    _resume_and_check(checkpoints, kill_reference, tmp_path, saved, ranks=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_dead_rank_is_named_by_the_others(checkpoints, tmp_path):
    """Two processes joined without torchrun (as across machines, where no launcher sees the other's death):
    when rank 1 dies, rank 0 stops at once with an error naming rank 1, instead of waiting for a timeout."""
    chunk_dir, pids = tmp_path / "chunks", tmp_path / "pids"
    base = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                LINF_DIST_TIMEOUT="300")
    args = [sys.executable, *_worker_args(checkpoints, [KILL_JOB], tmp_path / "out.pt", KILL_POINTS, KILL_BATCH,
                                          "--chunk-dir", str(chunk_dir), "--pids", str(pids))]
    procs = [subprocess.Popen(args, cwd=ROOT, env=_env(**base, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    try:
        _wait_for_chunks(procs[0], chunk_dir / "0", 4)
        procs[1].kill()
        t0 = time.monotonic()
        _, stderr = procs[0].communicate(timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    assert "RankFailure" in stderr and "rank 1 stopped" in stderr, stderr[-3000:]
    assert "chunks are saved in" in stderr
