"""Results as data: CPU tensors that combine across certify, attacks and curves, and their JSON formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from linf_plugin.attacks import AttackResult, pgd_attack
from linf_plugin.certification import CertResult, CurveResult, certified_accuracy_curve, certify, union_results
from linf_plugin.data import load_dataset
from linf_plugin.models import create_model


@pytest.fixture(scope="module")
def net_and_data():
    torch.manual_seed(0)
    net = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=3, width=32, mean=0.3, std=0.37)
    net.train()
    net(torch.rand(64, 1, 8, 8))
    return net.eval(), load_dataset("digits", "test").subset(30)


def test_certify_attack_and_curve_results_combine(net_and_data):
    net, data = net_and_data
    cert = certify(net, data, 0.02, "interval")
    adv = pgd_attack(net, data.x, data.y, 0.02, steps=10)
    curve = certified_accuracy_curve(net, data, [0.0, 0.02], "margin")
    for flags in (cert.correct, cert.certified, adv.success, adv.correct, curve.correct, curve.certified):
        assert flags.dtype == torch.bool and flags.device.type == "cpu"
    assert curve.radius.dtype == torch.float64
    unbroken = cert.certified & ~adv.success  # raised TypeError while certify returned numpy arrays
    assert torch.equal(unbroken, cert.certified)  # a certified point is never broken
    assert torch.equal(adv.correct, cert.correct)
    assert not (curve.certified[:, 1] & ~cert.certified).any()  # margin at 0.02 only certifies what interval does
    assert adv.robust_accuracy == pytest.approx(float((~adv.success).double().mean()))


def test_saved_results_of_the_list_era_still_load():
    # a result written by the release whose fields were numpy arrays: to_dict() turned them into lists
    saved = {"method": "margin", "eps": 0.1, "model_name": "m", "n": 3, "clean_accuracy": 2 / 3,
             "certified_accuracy": 1 / 3, "wall_time": 0.5, "extra": {"lipschitz": 2.0}, "float_rigorous": True,
             "correct": [True, True, False], "certified": [True, False, False], "radius": [0.2, 0.05, 0.0]}
    res = CertResult.from_dict(saved)
    assert torch.equal(res.certified, torch.tensor([True, False, False])) and res.radius.dtype == torch.float64
    assert json.loads(json.dumps(res.to_dict())) == saved
    curve = {"method": "margin", "model_name": "m", "eps": [0.0, 0.1], "certified_accuracy": [2 / 3, 1 / 3],
             "clean_accuracy": 2 / 3, "wall_time": 0.5, "radius": [0.2, 0.05, 0.0], "extra": {}}
    back = CurveResult.from_dict(curve)
    assert back.n == 3 and back.correct is None and back.to_dict(per_sample=False) == curve


def test_result_fields_refuse_what_would_hide_a_mix_up():
    with pytest.raises(TypeError, match="bool flags"):
        CertResult("margin", 0.1, "m", correct=torch.ones(3), certified=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="misclassified"):
        CertResult("margin", 0.1, "m", correct=[True, False], certified=[False, True])
    res = CertResult("margin", 0.1, "m", correct=np.array([True, False]), certified=np.array([True, False]))
    assert res.correct.dtype == torch.bool  # numpy arrays are accepted and stored as tensors


def test_union_is_any_member_with_each_member_kept():
    a = CertResult("interval", 0.1, "m", [True, True, True, False], [True, False, False, False], wall_time=1.0,
                   float_rigorous=True)
    b = CertResult("margin", 0.1, "m", [True, True, True, False], [False, True, False, False],
                   radius=[0.05, 0.2, 0.0, 0.0], wall_time=2.0, float_rigorous=True)
    u = union_results([a, b])
    assert u.method == "interval+margin" and u.wall_time == 3.0 and u.float_rigorous
    assert u.certified.tolist() == [True, True, False, False]
    assert u.radius is None  # interval has no radii: no maximum to take
    assert u.extra["members"]["interval"] is a
    back = CertResult.from_dict(json.loads(json.dumps(u.to_dict())))
    assert torch.equal(back.extra["members"]["margin"].radius, b.radius)
    with pytest.raises(ValueError, match="one eps"):
        union_results([a, CertResult("margin", 0.2, "m", a.correct, a.correct & False)])
    with pytest.raises(ValueError, match="distinct"):
        union_results([a, a])


def test_attack_result_round_trip(net_and_data):
    net, data = net_and_data
    adv = pgd_attack(net, data.x, data.y, torch.tensor(0.03), steps=5)
    assert adv.eps == pytest.approx(0.03) and adv.model_name == "linf_dist_mlp" and adv.x_adv.shape == data.x.shape
    back = AttackResult.from_dict(json.loads(json.dumps(adv.to_dict())))
    assert back.x_adv is None and torch.equal(back.success, adv.success) and back.robust_accuracy == adv.robust_accuracy
    with pytest.raises(ValueError, match="0-d tensor"):
        pgd_attack(net, data.x, data.y, torch.tensor([0.03]), steps=1)
