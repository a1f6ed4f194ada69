"""``certify`` with ``chunk_dir`` in one process: saved per chunk, stopped by a signal, resumed, OOM retried."""
from __future__ import annotations

import copy
import json
import re
import signal

import pytest
import torch

from linf_plugin import distributed as pg
from linf_plugin.certification import certify
from linf_plugin.certification.chunks import ResumeError, model_fingerprint
from linf_plugin.certification.distributed import Interrupted
from linf_plugin.data import load_dataset

from .tiny_models import tiny_models


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "test").subset(40)


def _log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _same(a, b):
    assert torch.equal(torch.as_tensor(a.correct), torch.as_tensor(b.correct))
    assert torch.equal(torch.as_tensor(a.certified), torch.as_tensor(b.certified))
    assert (a.radius is None) == (b.radius is None)
    if a.radius is not None:
        assert torch.equal(torch.as_tensor(a.radius), torch.as_tensor(b.radius))


class SignalAfter(torch.nn.Module):
    """Wraps a model; its ``calls``-th forward on a batch of more than one input sends ``signum`` to this process
    (as a scheduler's SIGTERM or a Ctrl-C arrives in the middle of a batch); ``calls=0``: never."""

    def __init__(self, inner, calls: int, signum=signal.SIGTERM):
        super().__init__()
        self.inner, self.calls, self.signum, self.count = inner, calls, signum, 0
        self.model_name = getattr(inner, "model_name", "wrapped")

    def forward(self, x):
        if x.shape[0] > 1:
            self.count += 1
            if self.count == self.calls:
                signal.raise_signal(self.signum)
        return self.inner(x)


class OutOfMemoryAbove(torch.nn.Module):
    """Wraps a model; its forward raises torch.OutOfMemoryError on batches of more than ``limit`` inputs."""

    def __init__(self, inner, limit: int):
        super().__init__()
        self.inner, self.limit = inner, limit
        self.model_name = getattr(inner, "model_name", "wrapped")

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"injected: {x.shape[0]} inputs > {self.limit}")
        return self.inner(x)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_finished_chunks_and_resume_finishes_the_rest(models, data, tmp_path, signum):
    ref = certify(models["relu"], data, 0.05, "crown", batch_size=4, distributed=False)
    folder = tmp_path / "job"
    stopping = SignalAfter(models["relu"], calls=4, signum=signum)  # the 4th batch: 3 chunks finished
    with pytest.raises(Interrupted) as info:
        certify(stopping, data, 0.05, "crown", batch_size=4, chunk_dir=folder)
    exc = info.value
    assert (exc.saved, exc.total, exc.folder) == (3, 10, folder) and exc.exit_code == 128 + signum
    assert f"3 of 10 chunks are saved in {folder}" in str(exc) and "again with resume" in str(exc)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    assert [r["chunk"] for r in _log(folder)] == [0, 1, 2]

    calm = SignalAfter(models["relu"], calls=0)  # the same model (the hash covers the wrapper too), no signal
    res = certify(calm, data, 0.05, "crown", batch_size=4, chunk_dir=folder, resume=True)
    _same(res, ref)
    log = _log(folder)
    assert sorted(r["chunk"] for r in log) == list(range(10))  # each chunk saved once: nothing computed again
    assert len({r["session"] for r in log[:3]} & {r["session"] for r in log[3:]}) == 0
    assert res.extra["chunks"]["resumed_chunks"] == 3 and res.extra["chunks"]["chunks"] == 10

    again = certify(calm, data, 0.05, "crown", batch_size=4, chunk_dir=folder, resume=True)
    _same(again, ref)
    assert len(_log(folder)) == 10 and again.extra["chunks"]["resumed_chunks"] == 10


def test_margin_radii_survive_a_resume_bit_for_bit(models, data, tmp_path):
    ref = certify(models["linf"], data, 0.01, "margin", batch_size=8, distributed=False)
    folder = tmp_path / "job"
    first = certify(models["linf"], data.subset(16), 0.01, "margin", batch_size=8, chunk_dir=tmp_path / "other")
    assert first.n == 16
    res = certify(models["linf"], data, 0.01, "margin", batch_size=8, chunk_dir=folder)
    _same(res, ref)
    assert res.extra["lipschitz"] == ref.extra["lipschitz"]
    assert res.extra["max_logit_error"] == ref.extra["max_logit_error"]  # the largest over the chunks
    _same(certify(models["linf"], data, 0.01, "margin", batch_size=8, chunk_dir=folder, resume=True), ref)


def test_resume_refuses_another_job_and_names_the_difference(models, data, tmp_path):
    folder = tmp_path / "job"
    certify(models["relu"], data, 0.05, "ibp", batch_size=8, chunk_dir=folder)
    with pytest.raises(ResumeError, match="holds an earlier certification job .* resume it"):
        certify(models["relu"], data, 0.05, "ibp", batch_size=8, chunk_dir=folder)
    changed = copy.deepcopy(models["relu"])
    with torch.no_grad():
        next(iter(changed.parameters())).view(-1)[0] += 1e-3
    assert model_fingerprint(changed) != model_fingerprint(models["relu"])
    cases = [((changed, data, 0.05, "ibp", 8), "model_sha256 (saved"),
             ((models["relu"], (data.x[1:], data.y[1:]), 0.05, "ibp", 8), "data_sha256"),
             ((models["relu"], data, 0.06, "ibp", 8), "eps (saved 0.05, now 0.06)"),
             ((models["relu"], data, 0.05, "crown", 8), "method (saved 'ibp', now 'crown')"),
             ((models["relu"], data, 0.05, "ibp", 4), "batch_size (saved 8, now 4)")]
    for (model, d, eps, method, batch), what in cases:
        with pytest.raises(ResumeError, match="cannot resume the job in .*" + re.escape(what)):
            certify(model, d, eps, method, batch_size=batch, chunk_dir=folder, resume=True)
    assert len(_log(folder)) == 5  # nothing was added by the refused runs


def test_out_of_memory_halves_the_batch_and_records_it(models, data, tmp_path):
    ref = certify(models["relu"], data, 0.05, "crown", batch_size=2, distributed=False)
    res = certify(OutOfMemoryAbove(models["relu"], limit=2), data, 0.05, "crown", batch_size=8,
                  chunk_dir=tmp_path / "job")
    _same(res, ref)  # batches of 2, as the reference's
    retries = res.extra["chunks"]["oom_retries"]
    assert [(r["batch_size"], r["retry_batch_size"]) for r in retries] == [(8, 4), (4, 2)]  # sticky afterwards
    assert "OutOfMemoryError: injected" in retries[0]["error"]
    with pytest.raises(RuntimeError, match=r"out of memory on points \[0, 8\) even one point at a time"):
        certify(OutOfMemoryAbove(models["relu"], limit=0), data, 0.05, "ibp", batch_size=8,
                chunk_dir=tmp_path / "one")


def test_bad_requests_are_refused(models, data):
    with pytest.raises(ValueError, match="resume=True\\) needs the chunk_dir"):
        certify(models["relu"], data, 0.05, "ibp", resume=True)
    with pytest.raises(ValueError, match="distributed=True\\) needs several processes: launch .* torchrun"):
        certify(models["relu"], data, 0.05, "ibp", distributed=True)
    assert pg.gather_objects({"a": 1}) == [{"a": 1}] and pg.broadcast_object(3) == 3


def test_collective_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(pg.TIMEOUT_ENV, "12.5")
    assert pg.collective_timeout().total_seconds() == 12.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(pg.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=pg.TIMEOUT_ENV):
            pg.collective_timeout()


def test_a_signal_during_a_save_is_raised_after_it():
    """A chunk's file and its log line are written together: the signal waits for both, then stops the job."""
    from linf_plugin.certification.distributed import _saving, stop_on_signals

    steps = []
    with stop_on_signals():
        with pytest.raises(Interrupted) as info:
            with _saving():
                signal.raise_signal(signal.SIGTERM)
                steps.append("file")
                steps.append("log line")
        steps.append("after")
    assert steps == ["file", "log line", "after"] and info.value.signum == signal.SIGTERM


def test_a_union_saves_each_member_in_its_own_folder(models, data, tmp_path):
    ref = certify(models["linf"], data, 0.02, "interval+margin", batch_size=8, distributed=False)
    res = certify(models["linf"], data, 0.02, "interval+margin", batch_size=8, chunk_dir=tmp_path / "job")
    _same(res, ref)
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["interval", "margin"]
    assert all(len(_log(tmp_path / "job" / m)) == 5 for m in ("interval", "margin"))


def test_more_ranks_than_gpus_share_them(monkeypatch):
    """A rank whose LOCAL_RANK has no GPU of its own takes GPU ``LOCAL_RANK mod count`` (a CPU stand-in
    for the device calls): init_distributed once failed here with an UnboundLocalError on ``torch``."""
    import torch

    import linf_plugin.distributed as D

    chosen = []

    class Stop(Exception):
        pass

    def init_group(**kw):
        raise Stop

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(D, "resolve_device", lambda device, local_rank: torch.device("cuda", local_rank))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", init_group)
    with pytest.raises(Stop):
        D.init_distributed("cuda")
    assert chosen == [torch.device("cuda:0")]
