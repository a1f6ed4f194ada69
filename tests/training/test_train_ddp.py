"""DDP: ``torchrun --nproc-per-node 2`` (gloo, CPU) matches one process on the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linf_plugin.models import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]

# Small runs of the digits presets.  The batch statistics (mean shift, batch norm) are over the GLOBAL
# batch in DDP, so the two runs compute the same function up to floating-point summation order.
RUNS = {
    "linf_dist": ["--preset", "digits-linf", "--model-kwargs", '{"depth": 3, "width": 32}', "--epochs", "2",
                  "--p-ramp-start", "1", "--p-ramp-epochs", "1", "--crop-padding", "1", "--adam-eps", "1e-6"],
    "relu": ["--preset", "digits-crown-ibp", "--model", "cnn_7layer_bn", "--model-kwargs",
             '{"width": 4, "linear_size": 32}', "--epochs", "2", "--eps-ramp-start", "0", "--eps-ramp-epochs", "1",
             "--adam-eps", "1e-3"],  # conv biases before batch norm have an exactly-zero true gradient
}
# Adam's eps is raised from the presets' 1e-10 (ℓ∞-dist) / 1e-8 (ReLU) in RUNS: with a tiny eps Adam turns
# a gradient of 1e-12 (summation-order noise where the exact gradient is 0: the sparse ℓ∞ subgradient, a
# conv bias before batch norm) into a full ±lr step, which would bury the comparison in noise that has
# nothing to do with DDP.
COMMON = ["--train-subset", "256", "--batch-size", "64", "--eval-subset", "64", "--eval-every", "0",
          "--num-threads", "1", "--progress", "false", "--seed", "5"]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
                OMP_NUM_THREADS="1")


def _single(args, out):
    proc = subprocess.run([sys.executable, "-m", "linf_plugin.training", *args, "--out", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _torchrun(args, out):
    # the ranks run the CLI's main() through a driver that also checks they leave no process group or
    # gloo thread behind; faulthandler prints every thread's stack if a rank dies of a signal anyway
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).with_name("torchrun_main.py")), *args, "--out", str(out)], cwd=ROOT,
                          env=dict(_env(), PYTHONFAULTHANDLER="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("nothing left running") == 2, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("family", ["linf_dist", "relu"])
def test_torchrun_two_processes_match_one_process(tmp_path, family):
    args = RUNS[family] + COMMON
    _single(args, tmp_path / "single")
    proc = _torchrun(args, tmp_path / "ddp")
    assert proc.stderr.count("epoch 2/2") == 1  # rank 0 alone logs
    a = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            scale = max(1.0, sa[k].abs().max().item())
            assert torch.allclose(sa[k], sb[k], rtol=0, atol=2e-4 * scale), (k, (sa[k] - sb[k]).abs().max())
        else:
            assert torch.equal(sa[k], sb[k]), k
    la = [json.loads(x) for x in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 2
    for ra, rb in zip(la, lb):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-4 * max(1.0, abs(ra["train_loss"]))
        assert ra["train_acc"] == pytest.approx(rb["train_acc"], abs=1.5 / 256)


def test_child_processes_keep_the_callers_pythonpath(tmp_path, monkeypatch):
    """A machine whose auto_LiRPA comes from a wheel directory on PYTHONPATH (make gpu-check WHEELS=...)
    must hand that directory to torchrun's children too; the repository goes first."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = subprocess.run([sys.executable, "-c", "import sys; print('\\n'.join(sys.path))"], env=_env(),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert str(tmp_path) in out and out.index(str(ROOT)) < out.index(str(tmp_path))
