"""Schedules against the paper's formulas at their boundaries, and the ε ramp against auto_LiRPA's own scheduler."""
from __future__ import annotations

import math

import pytest
import torch

from linf_plugin.training import get_preset
from linf_plugin.training.schedules import (Schedule, cosine_lr, crown_ibp_factor, smoothed_ramp, step_lr)


def _paper_schedule(name: str, n_train: int):
    cfg = get_preset(name)
    steps = math.ceil(n_train / cfg.batch_size)
    return cfg, Schedule(cfg, steps), steps


@pytest.mark.parametrize("name,n_train,e1,e2,e3", [("mnist-0.3", 60000, 25, 375, 50),
                                                   ("cifar10-8/255", 50000, 100, 1150, 50)])
def test_table3_p_and_lambda_boundaries(name, n_train, e1, e2, e3):
    cfg, s, S = _paper_schedule(name, n_train)
    assert (cfg.p_ramp_start, cfg.p_ramp_epochs, cfg.epochs - cfg.p_ramp_start - cfg.p_ramp_epochs) == (e1, e2, e3)
    lam0, lam_end = cfg.lam0, cfg.lam_end
    # phase 1: p = 8, λ = λ0, for every step of the first e1 epochs (the ramp starts AT step e1·S)
    for t in (0, 1, e1 * S - 1, e1 * S):
        assert s.p(t) == 8.0 and s.lam(t) == pytest.approx(lam0, rel=1e-12)
    # phase 2: geometric in the step, with λ following the same ratio
    for frac in (0.25, 0.5, 0.75):
        t = e1 * S + round(frac * e2 * S)
        r = (t - e1 * S) / (e2 * S)
        assert s.p(t) == pytest.approx(8.0 * (1000.0 / 8.0) ** r, rel=1e-12)
        assert s.lam(t) == pytest.approx(lam0 * (lam_end / lam0) ** r, rel=1e-12)
    mid = e1 * S + e2 * S // 2
    if (e2 * S) % 2 == 0:
        assert s.p(mid) == pytest.approx(math.sqrt(8.0 * 1000.0), rel=1e-12)
        assert s.lam(mid) == pytest.approx(math.sqrt(lam0 * lam_end), rel=1e-12)
    last = (e1 + e2) * S - 1  # the last step of the ramp is still finite and just below p_end / above λend
    assert 900 < s.p(last) < 1000 and lam_end < s.lam(last) < lam_end * 1.01
    # phase 3: p = ∞ and λ = 0 from the first step after the ramp to the end
    for t in ((e1 + e2) * S, (e1 + e2) * S + 1, (e1 + e2 + e3) * S - 1):
        assert math.isinf(s.p(t)) and s.lam(t) == 0.0


def test_table3_cosine_lr_per_step():
    cfg, s, S = _paper_schedule("mnist-0.1", 60000)
    T = cfg.epochs * S
    assert s.lr(0) == pytest.approx(0.03)
    assert s.lr(T // 2) == pytest.approx(0.015, rel=1e-3)
    for t in (1, 7, S + 3, T - 1):
        assert s.lr(t) == pytest.approx(0.5 * 0.03 * (1 + math.cos(math.pi * t / T)), rel=1e-12)
    assert s.lr(1) < s.lr(0)  # decays within an epoch (per step), not per epoch
    assert 0 < s.lr(T - 1) < 1e-8


def test_table3_values():
    expect = {"mnist-0.1": (0.6, 0.05, 2e-4), "mnist-0.3": (0.9, 0.05, 2e-4), "cifar10-2/255": (20 / 255, 0.05, 2e-3),
              "cifar10-8/255": (48 / 255, 0.1, 5e-4), "cifar10-16/255": (80 / 255, 0.1, 2e-4)}
    for name, (theta, lam0, lam_end) in expect.items():
        cfg = get_preset(name)
        assert cfg.theta == pytest.approx(theta) and cfg.lam0 == lam0 and cfg.lam_end == lam_end
        assert (cfg.lr, cfg.batch_size, tuple(cfg.adam_betas), cfg.adam_eps) == (0.03, 512, (0.9, 0.99), 1e-10)
        assert cfg.scale_lr_factor == pytest.approx(0.2)  # the authors' scalar lr 0.006 = 0.03 / 5
        assert cfg.crop_padding == (1 if name.startswith("mnist") else 3)
        assert cfg.hflip == name.startswith("cifar")


def test_zero_length_p_ramp_jumps_at_its_start():
    cfg = get_preset("digits-linf", p_ramp_start=3, p_ramp_epochs=0, epochs=5)
    s = Schedule(cfg, 4)
    assert s.p(11) == 8.0 and math.isinf(s.p(12))
    assert s.lam(11) == cfg.lam0 and s.lam(12) == 0.0


@pytest.mark.parametrize("start,length,mid,beta,L", [(1, 10, 0.25, 4.0, 7), (3, 60, 0.25, 4.0, 12),
                                                     (101, 801, 0.4, 4.0, 3), (2, 5, 0.5, 2.0, 10)])
def test_smoothed_ramp_equals_auto_lirpa_smoothed_scheduler(start, length, mid, beta, L):
    from auto_LiRPA.eps_scheduler import SmoothedScheduler

    eps_max = 0.3
    ref = SmoothedScheduler(eps_max, f"start={start},length={length},mid={mid},beta={beta}")
    ref.set_epoch_length(L)
    ref.train()
    epochs = start + length + 2
    t = 0
    for _ in range(epochs):
        ref.step_epoch(verbose=True)  # what their training loop calls (no batch stepping)
        for _ in range(L):
            ref.step_batch()
            ours = smoothed_ramp(t, (start - 1) * L, length * L, eps_max, mid, beta)
            assert ours == pytest.approx(ref.get_eps(), rel=1e-9, abs=1e-15), t
            t += 1
    assert smoothed_ramp(t, (start - 1) * L, length * L, eps_max, mid, beta) == eps_max


def test_smoothed_ramp_shape():
    vals = [smoothed_ramp(t, 10, 100, 1.0) for t in range(0, 130)]
    assert vals[:11] == [0.0] * 11 and vals[110:] == [1.0] * 20
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    # polynomial start (slow), then linear with the same slope at the switch point (step 35)
    assert vals[20] < 0.1 * 10 / 100
    slopes = [vals[t + 1] - vals[t] for t in range(36, 109)]
    assert max(slopes) == pytest.approx(min(slopes), rel=1e-9)


def test_step_lr_matches_torch_multisteplr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[14, 17], gamma=0.1)
    for epoch in range(20):
        assert step_lr(epoch, 5e-4, (14, 17), 0.1) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()


def test_cosine_with_constant_start():
    assert cosine_lr(5, 100, 0.02, start=10) == 0.02
    assert cosine_lr(10, 100, 0.02, start=10) == 0.02
    assert cosine_lr(55, 100, 0.02, start=10) == pytest.approx(0.01)
    assert cosine_lr(100, 100, 0.02, start=10) == pytest.approx(0.0, abs=1e-15)


def test_crown_ibp_factor_goes_from_crown_to_ibp():
    assert crown_ibp_factor(0.0, 0.2) == 1.0
    assert crown_ibp_factor(0.05, 0.2) == pytest.approx(0.75)
    assert crown_ibp_factor(0.2, 0.2) == 0.0
    cfg = get_preset("digits-crown-ibp")
    s = Schedule(cfg, 12)
    warm = cfg.eps_ramp_start * 12
    assert s.at(0).eps == 0.0 and s.at(warm).eps == 0.0 and s.at(warm).crown_factor == 1.0
    end = (cfg.eps_ramp_start + cfg.eps_ramp_epochs) * 12
    assert s.at(end).eps == pytest.approx(cfg.eps_train) and s.at(end).crown_factor == 0.0
    mids = [s.at(t) for t in range(warm, end)]
    assert all(0.0 <= st.crown_factor <= 1.0 for st in mids)
    assert all(a.crown_factor >= b.crown_factor for a, b in zip(mids, mids[1:]))


def test_schedule_is_a_pure_function_of_the_step():
    cfg = get_preset("digits-hybrid")
    a, b = Schedule(cfg, 12), Schedule(cfg, 12)
    steps = [0, 5, 100, 240, 1000, 1799]
    forward = [a.at(t) for t in steps]
    backward = [b.at(t) for t in reversed(steps)][::-1]
    assert forward == backward
