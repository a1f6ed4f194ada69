"""Checkpoint round trips and every bad file's error."""
from __future__ import annotations

import math
import os
import pickle
import random

import numpy as np
import pytest
import torch

from linf_plugin.data import load_dataset
from linf_plugin.models import (CheckpointError, capture_rng_state, create_model, list_models, load_checkpoint,
                                restore_rng_state, save_checkpoint, theorem32_net)
from linf_plugin.models import registry as registry_module
from linf_plugin.nn import set_p


def _trained(name="linf_dist_mlp_5x128", steps=2):
    torch.manual_seed(0)
    model = create_model(name, (1, 8, 8), 10, mean=(0.3,), std=0.37)
    opt = torch.optim.Adam(model.parameters(), lr=0.03, betas=(0.9, 0.99), eps=1e-10)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.rand(16, 1, 8, 8)).logsumexp(1).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


@pytest.mark.parametrize("name", [n for n in list_models() if "5120" not in n])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    model, opt, sched = _trained(name)
    model.eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        expect = model(x)
    path = save_checkpoint(model, tmp_path / "ck.pt", optimizer=opt, scheduler=sched, epoch=7,
                           extra={"dataset": "digits", "preset": "digits_fast", "train": {"lr": 0.03, "p": math.inf}})
    ck = load_checkpoint(path)
    assert ck.config == model.model_config and ck.model.model_name == name and not ck.model.training
    with torch.no_grad():
        assert torch.equal(ck.model(x), expect)
    assert ck.epoch == 7 and ck.extra == {"dataset": "digits", "preset": "digits_fast",
                                          "train": {"lr": 0.03, "p": math.inf}}
    opt2 = torch.optim.Adam(ck.model.parameters(), lr=0.03)
    opt2.load_state_dict(ck.optimizer_state)  # resumes: same step counts and moments
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    sched2.load_state_dict(ck.scheduler_state)
    assert sched2.last_epoch == sched.last_epoch == 2
    assert [f for f in os.listdir(tmp_path)] == ["ck.pt"]  # no temp file left behind


def test_layer_p_dtype_and_construction_survive(tmp_path):
    model, _, _ = _trained()
    set_p(model, 8.0)
    ck = load_checkpoint(save_checkpoint(model, tmp_path / "p8.pt"))
    assert [m.p for m in ck.model.layers] == [8.0] * 5 and ck.model.lipschitz_linf is None
    digits = load_dataset("digits", "all").subset(100)
    net = theorem32_net(digits.x.double(), digits.y)
    ck = load_checkpoint(save_checkpoint(net, tmp_path / "t32.pt", extra={"dataset": "digits"}))
    assert ck.model.layers[0].weight.dtype == torch.float64 and ck.model.construction == net.construction
    with torch.no_grad():
        assert torch.equal(ck.model(digits.x.double()), net(digits.x.double()))


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    model, _, _ = _trained("mlp_3layer")
    path = save_checkpoint(model, tmp_path / "rng.pt")
    expect = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    load_checkpoint(path).restore_rng()
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]
    state = capture_rng_state()
    a = torch.rand(2)
    restore_rng_state(state)
    assert torch.equal(torch.rand(2), a)


def test_weights_only_loading_is_used(tmp_path):
    model, _, _ = _trained("mlp_3layer")
    path = save_checkpoint(model, tmp_path / "ck.pt")
    payload = torch.load(path, weights_only=True)  # the file itself is weights_only-safe
    assert payload["format"] == "linf_plugin.checkpoint" and payload["version"] == 1


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_files_get_clear_errors(tmp_path):
    model, _, _ = _trained("mlp_3layer")
    good = save_checkpoint(model, tmp_path / "good.pt")
    blob = good.read_bytes()

    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")

    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")

    (tmp_path / "half.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "half.pt")

    flipped = bytearray(blob)
    weight = model.body[1].weight.detach().reshape(-1)[:4].numpy().tobytes()
    at = bytes(flipped).find(weight)
    assert at > 0
    flipped[at + 2] ^= 0xFF  # one byte of a stored weight: torch.load alone would not notice
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "flipped.pt")

    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain state_dict"):
        load_checkpoint(tmp_path / "plain.pt")

    torch.save({"epoch": 3, "model": "resnet"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a linf_plugin checkpoint"):
        load_checkpoint(tmp_path / "other.pt")

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(_Evil(), f, protocol=2)
    with pytest.raises(CheckpointError, match="not a linf_plugin checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")

    (tmp_path / "text.pt").write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a linf_plugin checkpoint"):
        load_checkpoint(tmp_path / "text.pt")


def _rewrite(path, dest, **changes):
    """Re-save a checkpoint with changed fields (keeping the digest valid)."""
    from linf_plugin.models.checkpoint import _digest

    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    body = {k: v for k, v in payload.items() if k not in ("format", "version", "sha256")}
    payload["sha256"] = _digest(body)
    torch.save(payload, dest)
    return dest


def test_unknown_model_and_shape_mismatch(tmp_path):
    model, _, _ = _trained("mlp_3layer")
    good = save_checkpoint(model, tmp_path / "good.pt")
    config = dict(model.model_config, name="mlp_9layer")
    with pytest.raises(CheckpointError, match=r"'mlp_9layer', which is not registered.*mlp_3layer"):
        load_checkpoint(_rewrite(good, tmp_path / "unknown.pt", model_config=config))

    # the rebuilt model is twice as wide; as a flat config and as the nested one of checkpoints before 0.2
    for config in (dict(model.model_config, width=2), dict(model.model_config, kwargs={"width": 2})):
        with pytest.raises(CheckpointError, match=r"shape mismatch for 'body.1.weight': the checkpoint has "
                                                  r"\(256, 64\).*expects \(512, 64\)"):
            load_checkpoint(_rewrite(good, tmp_path / "wide.pt", model_config=config))

    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(_rewrite(good, tmp_path / "future.pt", version=99))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, _, _ = _trained("mlp_3layer")
    path = save_checkpoint(model, tmp_path / "ck.pt", epoch=1)
    before = path.read_bytes()

    def crash(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, path, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.pt"]
    assert load_checkpoint(path).epoch == 1


def test_save_refuses_what_it_could_not_load(tmp_path):
    with pytest.raises(ValueError, match="create_model"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.pt")
    model = create_model("mlp_3layer", (1, 8, 8), 10)
    with pytest.raises(TypeError, match=r"extra\['root'\] is a PosixPath"):
        save_checkpoint(model, tmp_path / "x.pt", extra={"root": tmp_path})
    with pytest.raises(TypeError, match="epoch"):
        save_checkpoint(model, tmp_path / "x.pt", epoch=1.5)
    assert not (tmp_path / "x.pt").exists()
    assert registry_module.is_model("mlp_3layer")


@pytest.mark.parametrize("as_str", [True, False])
def test_swapped_arguments_name_torch_save_order(tmp_path, as_str):
    """``save_checkpoint(model, f)`` follows ``torch.save(obj, f)``; the reverse order is named."""
    model = create_model("mlp_3layer", (1, 8, 8), 10)
    path = str(tmp_path / "x.pt") if as_str else tmp_path / "x.pt"
    with pytest.raises(TypeError, match=r"model first and the file second.*torch\.save\(obj, f\)"):
        save_checkpoint(path, model)
    with pytest.raises(TypeError, match="f must be a file path"):
        save_checkpoint(model, 3)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        save_checkpoint({"w": 1}, path)
    assert not (tmp_path / "x.pt").exists()
    assert load_checkpoint(save_checkpoint(model, path)).config == model.model_config


@pytest.mark.gpu
def test_cuda_round_trip_and_map_location(tmp_path):
    model = create_model("linf_dist_mlp_5x128", (1, 8, 8), 10, mean=(0.3,), std=0.37).cuda().eval()
    x = torch.rand(4, 1, 8, 8, device="cuda")
    with torch.no_grad():
        expect = model(x)
    path = save_checkpoint(model, tmp_path / "gpu.pt")
    on_gpu = load_checkpoint(path, map_location="cuda")
    assert next(on_gpu.model.parameters()).is_cuda and "cuda" in on_gpu.rng_state
    with torch.no_grad():
        torch.testing.assert_close(on_gpu.model(x), expect)
    on_cpu = load_checkpoint(path)  # default map_location="cpu"
    assert not next(on_cpu.model.parameters()).is_cuda
    with torch.no_grad():
        torch.testing.assert_close(on_cpu.model(x.cpu()), expect.cpu())
