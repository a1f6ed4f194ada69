"""The trainer end to end on tiny digits runs: files, checkpoints, callbacks, exact resume after a SIGKILL, NaN stop."""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linf_plugin.models import create_model, load_checkpoint
from linf_plugin.training import ConfigError, TrainingDivergedError, get_preset, train
from linf_plugin.training.trainer import FINITE_CHECK_STEPS

ROOT = Path(__file__).resolve().parents[2]

# Tiny versions of the digits presets (same code paths, seconds per epoch).
TINY = {
    "linf_dist": ["--preset", "digits-linf", "--model-kwargs", '{"depth": 3, "width": 32}', "--epochs", "3",
                  "--p-ramp-start", "1", "--p-ramp-epochs", "1", "--crop-padding", "1"],
    "hybrid": ["--preset", "digits-hybrid", "--model-kwargs", '{"depth": 2, "width": 32, "head_hidden": 16}',
               "--epochs", "3", "--p-ramp-start", "1", "--p-ramp-epochs", "1", "--eps-ramp-epochs", "2",
               "--lr-cosine-start", "1"],
    "relu": ["--preset", "digits-crown-ibp", "--model", "cnn_7layer_bn", "--model-kwargs",
             '{"width": 4, "linear_size": 32}', "--epochs", "3", "--eps-ramp-start", "0", "--eps-ramp-epochs", "2",
             "--lr-milestones", "2"],
}
COMMON = ["--train-subset", "256", "--batch-size", "64", "--eval-subset", "64", "--eval-every", "1",
          "--num-threads", "1", "--progress", "false", "--seed", "3"]


def _tiny_config(family: str, tmp_path, **kw):
    from linf_plugin.training.__main__ import build_parser, config_from_args

    args = build_parser().parse_args(TINY[family] + COMMON + ["--out", str(tmp_path)])
    return config_from_args(args).replace(**kw)


def _env():
    # prepend, never replace: carried wheels (make gpu-check WHEELS=...) reach the child through PYTHONPATH
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
                OMP_NUM_THREADS="1")


def _run_cli(args, check=True):
    proc = subprocess.run([sys.executable, "-m", "linf_plugin.training", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


class _Recorder:
    """Records every hook call: (hook, epochs in the history, checkpoint epoch on disk)."""

    def __init__(self):
        self.calls = []

    def _record(self, hook, result):
        on_disk = load_checkpoint(result.checkpoint_path).epoch if result.checkpoint_path else None
        self.calls.append((hook, len(result.history), on_disk))

    def on_train_start(self, result):
        self._record("start", result)

    def on_epoch_end(self, result):
        self._record("epoch", result)

    def on_train_end(self, result):
        self._record("end", result)


def test_train_writes_logs_checkpoint_and_final_metrics(tmp_path):
    cfg = _tiny_config("linf_dist", tmp_path / "run")
    recorder = _Recorder()
    result = train(cfg, callbacks=[recorder])
    # each epoch's hook runs after its checkpoint is on disk
    assert recorder.calls == [("start", 0, None), ("epoch", 1, 1), ("epoch", 2, 2), ("epoch", 3, 3), ("end", 3, 3)]
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] == [r["epoch"] for r in result.history]
    for key in ("train_loss", "train_acc", "p", "lam", "lr", "time", "scale", "eval_eps", "test_clean_acc",
                "test_cert_acc"):
        assert key in records[-1], key
    # p and λ of each epoch's last step: p = 8 in epoch 1, the ramp in epoch 2, ∞ (and λ = 0) in epoch 3
    assert records[0]["p"] == 8.0 and 8.0 < records[1]["p"] < 1000.0 and records[1]["lam"] > 0
    assert records[2]["p"] == "inf" and records[2]["lam"] == 0.0
    assert json.loads((out / "config.json").read_text())["name"] == "digits-linf"
    final = json.loads((out / "final.json").read_text())
    assert final["final_metrics"]["method"] == "margin"
    assert 0.0 <= result.final_metrics["cert_acc"] <= result.final_metrics["clean_acc"] <= 1.0
    ckpt = load_checkpoint(result.checkpoint_path)
    assert ckpt.epoch == 3 and ckpt.extra["train_config"]["model"] == "linf_dist_mlp"
    x = torch.rand(5, 1, 8, 8)
    result.model.eval()
    assert torch.equal(ckpt.model(x), result.model(x))
    assert not result.model.training


def test_train_without_out_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _tiny_config("linf_dist", tmp_path / "unused", epochs=1).replace(out_dir=None)
    result = train(cfg)
    assert result.checkpoint_path is None and result.out_dir is None and list(tmp_path.iterdir()) == []
    assert len(result.history) == 1


# The child trains with a callback that kills its own process (SIGKILL) after the first epoch's checkpoint.
_KILLED_AFTER_EPOCH_1 = """
import os, signal, sys
from linf_plugin.training import train
from linf_plugin.training.__main__ import build_parser, config_from_args

class KillAfterFirstEpoch:
    def on_epoch_end(self, result):
        if len(result.history) == 1:
            os.kill(os.getpid(), signal.SIGKILL)

train(config_from_args(build_parser().parse_args(sys.argv[1:])), callbacks=[KillAfterFirstEpoch()])
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["linf_dist", "hybrid", "relu"])
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, family):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run_cli(TINY[family] + COMMON + ["--out", str(full)])
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_EPOCH_1, *TINY[family], *COMMON, "--out", str(cut)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert load_checkpoint(cut / "checkpoint.pt").epoch == 1
    assert len((cut / "log.jsonl").read_text().splitlines()) == 1
    _run_cli(TINY[family] + COMMON + ["--out", str(cut), "--resume"])
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a.epoch == b.epoch == 3
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k, v in a.extra["objective_state"].items():
        assert torch.equal(v, b.extra["objective_state"][k])
    ha, hb = a.extra["history"], b.extra["history"]
    drop = ("time", "eval_time")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ha] == \
           [{k: v for k, v in r.items() if k not in drop} for r in hb]
    assert len((cut / "log.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = _tiny_config("linf_dist", tmp_path, epochs=1)
    train(cfg)
    with pytest.raises(ConfigError, match="lr"):
        train(cfg.replace(resume=True, lr=0.5, epochs=1))


@pytest.mark.parametrize("batch, bad_step", [(64, 2), (4, FINITE_CHECK_STEPS + 3)])
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, batch, bad_step):
    # batch 4: 64 steps an epoch, so the bad step lies past the first finiteness check window
    cfg = _tiny_config("linf_dist", tmp_path, epochs=3, batch_size=batch)
    steps_per_epoch = math.ceil(256 / batch)
    model = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=3, width=32,
                         mean=(0.3054,), std=0.3761)
    seen = {"calls": 0, "digest": None}

    def poison(module, inputs, output):
        if module.training:
            seen["calls"] += 1
            if seen["calls"] == steps_per_epoch + bad_step:  # step `bad_step` of epoch 2
                seen["digest"] = hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest()
                return output * float("nan")
        return output

    model.register_forward_hook(poison)
    with pytest.raises(TrainingDivergedError) as e:
        train(cfg, model=model)
    msg = str(e.value)
    assert f"epoch 2, step {bad_step}/{steps_per_epoch}" in msg and "the loss is nan" in msg, msg
    assert "epoch 1" in msg and "untouched" in msg
    assert hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest() == seen["digest"]
    assert load_checkpoint(tmp_path / "checkpoint.pt").epoch == 1
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1


def test_a_callback_that_raises_stops_the_run_and_resume_goes_on(tmp_path):
    cfg = _tiny_config("linf_dist", tmp_path, epochs=2)

    class Stop:
        def on_epoch_end(self, result):
            raise KeyboardInterrupt("stop here")

    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[Stop()])
    assert load_checkpoint(tmp_path / "checkpoint.pt").epoch == 1
    recorder = _Recorder()
    result = train(cfg.replace(resume=True), callbacks=[recorder])
    assert recorder.calls[0] == ("start", 1, 1) and [r["epoch"] for r in result.history] == [1, 2]
    with pytest.raises(TypeError, match="defines none of"):
        train(cfg, callbacks=[object()])
    with pytest.raises(TypeError, match="sequence of callbacks"):
        train(cfg, callbacks=recorder)


def test_the_step_loop_reads_nothing_back_per_step(tmp_path, monkeypatch):
    """The finiteness check and the statistics need one host read per FINITE_CHECK_STEPS steps, not per step
    (a read is a device sync on a GPU)."""
    cfg = _tiny_config("linf_dist", tmp_path, epochs=1, batch_size=4, eval_every=0, crop_padding=0)
    steps = 256 // 4
    reads = {"n": 0}
    # reads made by linf_plugin's code (torch's Adam reads its CPU step counters, which is no device sync;
    # __bool__ is left out: the ℓp-dist op scans CPU inputs for NaN, and does not on CUDA)
    for name in ("item", "tolist", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, **kw):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("linf_plugin."):
                reads["n"] += 1
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counting)
    model = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=3, width=32,
                         mean=(0.3054,), std=0.3761)

    def count_steps(module, inputs, output):
        if module.training:
            reads["train_steps"] = reads.get("train_steps", 0) + 1
            reads["at_last_step"] = reads["n"]
    model.register_forward_hook(count_steps)
    train(cfg.replace(out_dir=None), model=model)
    assert reads["train_steps"] == steps
    # the reads up to the last step's forward (the evaluation comes after it)
    assert reads["at_last_step"] <= math.ceil(steps / FINITE_CHECK_STEPS), reads


def test_stop_after_epoch_is_deprecated_and_needs_an_out_dir(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="out_dir"):
        train(get_preset("digits-linf", stop_after_epoch=1, epochs=2))
    kills = []

    def fake_kill(pid, sig):  # the shim still kills its own process; here it only records that it would
        kills.append((pid, sig, load_checkpoint(tmp_path / "checkpoint.pt").epoch))

    monkeypatch.setattr(os, "kill", fake_kill)
    with pytest.warns(DeprecationWarning, match="stop_after_epoch"):
        train(_tiny_config("linf_dist", tmp_path, epochs=1, stop_after_epoch=1))
    assert kills == [(os.getpid(), signal.SIGKILL, 1)]


def test_cli_children_keep_the_callers_pythonpath(tmp_path, monkeypatch):
    """The training CLI's child sees the caller's PYTHONPATH (carried wheels), after the repository."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = subprocess.run([sys.executable, "-c", "import sys; print('\\n'.join(sys.path))"], env=_env(),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert str(tmp_path) in out and out.index(str(ROOT)) < out.index(str(tmp_path))
